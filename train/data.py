"""The streaming pretraining dataset: catalogs -> verified shards + indices -> global plan -> own samples -> packed batches.

The stream, link by link (each a small piece with its own test):
  1. `resolve_sources`: each mixture source's catalogs -> its shards, checked against the model (fold,
     codebook, tokenizer vocab hash); a mismatch is an error naming both.
  2. `SourceOrder`: a source's sample order in an epoch, a pure function of (seed, source, epoch): shards
     permuted, then samples shuffled within groups of `shuffle_shards` consecutive shards. Any position
     maps to its (shard, sample) in O(1), so resuming never replays.
  3. `ShardStore`: per shard, its verified tar (size + sha256, once per machine: a stamp in the local
     cache; remote shards are downloaded whole into a bounded cache shared by the machine's processes)
     and its per-sample index (`NNNNN.tar.idx.npy` beside the shard, else built once by scanning the
     tar's headers). A bad shard is an error naming it, or a recorded skip.
  4. `Planner`: the global batch of every step, identical on every rank and worker, from the indices
     alone (no sample is read to plan): each shuffle group's lengths are computed once, vectorised, and
     each step merges the sources' next samples by weighted fair queueing (`train.mixture`), in samples
     or tokens. Samples that cannot fit are dropped and counted; sources that run out start a new epoch.
  5. Rank slice: sample j of the global batch goes to rank j % world_size; DataLoader worker w builds
     the steps s with (s - first step) % num_workers == w, which is the order torch's DataLoader reads them.
  6. Each worker reads and decodes only its own samples (byte ranges of the verified tar, checked against
     the index), `train.sequence` builds them, `train.packing` packs the rank's share per task.

State is a handful of counters per source (epoch, position) plus the step, the same on every rank:
resuming on another number of ranks or workers continues the same global stream, so the epoch's
remaining samples are neither repeated nor skipped. Changing the mixture (a new manifest or the
manifest's schedule) keeps each source's position, so no source repeats a sample within its epoch.

Cost per worker: decoding and building only its own samples, plus planning from indices (a few numpy
operations per step and per shuffle group) and reading each shard's index once.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import fcntl
import glob
import hashlib
import json
import logging
import os
import tarfile
import time
import tempfile
import threading
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Iterator, Literal

import fsspec
import numpy as np
import torch

from model.batch import PackedBatch
from model.folding import Fold
from pipeline.tokenshard import (INDEX_SUFFIX, TokenSample, build_shard_index, decode_token_sample, parse_shard_index,
                                 read_catalog, read_shard_index)
from synergen.errors import ConfigMismatchError, ShardError, SynergenError
from train.mixture import MixLedger, MixtureManifest, SourceSize, merge_by_credit, online_weights, resolve_weights
from train.packing import pack, packing_efficiency
from train.sequence import VIEW_DROPPED, LayoutIds, SequenceSpec, layout_of, plan_lengths

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ---- 1. sources and their shards ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDataSpec:
    """What the model expects of its data; every catalog row must agree."""

    fold: Fold
    codebook_size: int
    vocab_hash: str


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    bytes: int
    sha256: str
    tokens: int  # image positions + caption tokens, from the catalog


@dataclass
class Source:
    name: str
    task: str
    shards: list[Shard]

    @property
    def size(self) -> SourceSize:
        return SourceSize(sum(s.samples for s in self.shards), sum(s.tokens for s in self.shards))

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list (a changed list would map positions to other samples)."""
        blob = "\n".join(f"{s.url}:{s.sha256}:{s.samples}" for s in self.shards).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_row(row: dict, catalog: str, spec: ModelDataSpec) -> None:
    shard = f"{catalog} shard {row['path']}"
    if str(Fold.parse(row["fold"])) != str(spec.fold):
        raise ConfigMismatchError(f"{shard}: fold {row['fold']} but the model config folds {spec.fold}; "
                                  "use catalogs tokenized with the model's fold or change model.fold")
    if int(row["codebook_size"]) != spec.codebook_size:
        raise ConfigMismatchError(f"{shard}: codebook {row['codebook_size']} ({row.get('vq_model')}) but the model config has "
                                  f"{spec.codebook_size}; use the VQ model the catalog names or re-tokenize")
    if row["vocab_hash"] != spec.vocab_hash:
        raise ConfigMismatchError(f"{shard}: text tokenizer {row.get('text_tokenizer')} with vocab hash {row['vocab_hash']} "
                                  f"but the run's tokenizer hashes to {spec.vocab_hash}; load the tokenizer the catalog "
                                  "names or re-tokenize the captions")


def resolve_sources(manifest: MixtureManifest, spec: ModelDataSpec, storage_options: dict | None = None) -> dict[str, Source]:
    """Every source of every task -> its verified shard list (catalog order)."""
    sources: dict[str, Source] = {}
    for task, tspec in manifest.tasks.items():
        for name, src in tspec.sources.items():
            if name in sources:
                raise SynergenError(f"mixture {manifest.name!r}: source {name!r} appears in two tasks; name them apart")
            shards = []
            for url in manifest.catalog_urls(src):
                folder = url.rsplit("/", 1)[0] if url.endswith(".parquet") else url.rstrip("/")
                for row in read_catalog(url, storage_options):
                    if src.select is not None and row["source"] != src.select:
                        continue
                    if row["task"] != task:
                        raise ConfigMismatchError(f"catalog {url} shard {row['path']}: task {row['task']!r} but the mixture "
                                                  f"uses source {name!r} for task {task!r}; fix the manifest")
                    _check_row(row, url, spec)
                    shards.append(Shard(f"{folder}/{row['path']}", int(row["samples"]), int(row["bytes"]), row["sha256"],
                                        int(row["image_tokens"]) + int(row["text_tokens"])))
            sources[name] = Source(name, task, shards)
            if not shards:
                log.warning("source %s (task %s) lists no shards; it is left out of the mixture", name, task)
    return sources


# ---- 2. the order of a source's samples in an epoch -----------------------------------------------------


def _seed(*parts: int | str) -> list[int]:
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]


class SourceOrder:
    """Position in epoch -> (shard index, sample index), a pure function of (seed, source, epoch)."""

    def __init__(self, source: Source, seed: int, shuffle_shards: int):
        self.source = source
        self.seed = seed
        self.k = max(1, shuffle_shards)
        self.size = source.size.samples
        self._epoch: int | None = None
        self._groups: OrderedDict[int, np.ndarray] = OrderedDict()

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        rng = np.random.default_rng(_seed(self.seed, self.source.name, epoch))
        self.perm = rng.permutation(len(self.source.shards))
        counts = np.array([self.source.shards[i].samples for i in self.perm], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # start of each shard (perm order) in the epoch
        self.group_starts = self.starts[:: self.k].tolist()
        if self.group_starts[-1] != self.size:
            self.group_starts.append(int(self.size))
        self._epoch = epoch
        self._groups.clear()

    def group_of(self, epoch: int, pos: int) -> int:
        self._set_epoch(epoch)
        return bisect.bisect_right(self.group_starts, pos) - 1

    def shards_of_group(self, epoch: int, g: int) -> list[int]:
        self._set_epoch(epoch)
        return [int(i) for i in self.perm[g * self.k:(g + 1) * self.k]]

    def group_bounds(self, epoch: int, g: int) -> tuple[int, int]:
        self._set_epoch(epoch)
        return int(self.group_starts[g]), int(self.group_starts[g + 1])

    @property
    def n_groups(self) -> int:
        return len(self.group_starts) - 1

    def group_arrays(self, epoch: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index [n], sample index [n]) of every position of group g, in position order (`locate`, vectorised)."""
        lo, hi = self.group_bounds(epoch, g)
        j = lo + np.random.default_rng(_seed(self.seed, self.source.name, epoch, g + 1)).permutation(hi - lo)
        k = np.searchsorted(self.starts, j, side="right") - 1
        return self.perm[k].astype(np.int64), (j - self.starts[k]).astype(np.int64)

    def locate(self, epoch: int, pos: int) -> tuple[int, int]:
        self._set_epoch(epoch)
        g = self.group_of(epoch, pos)
        if g not in self._groups:
            n = self.group_starts[g + 1] - self.group_starts[g]
            self._groups[g] = np.random.default_rng(_seed(self.seed, self.source.name, epoch, g + 1)).permutation(n)
            if len(self._groups) > 4:
                self._groups.popitem(last=False)
        j = self.group_starts[g] + int(self._groups[g][pos - self.group_starts[g]])
        k = int(np.searchsorted(self.starts, j, side="right")) - 1
        return int(self.perm[k]), int(j - self.starts[k])


# ---- 3. verified shards and their indices -----------------------------------------------------------------


STALE_PART_S = 3600  # a partial file untouched this long belongs to a dead process


def index_problem(index: np.ndarray, shard: Shard) -> str | None:
    """Why `index` cannot be the index of `shard` (checked against the catalog's count and the tar's size), or None."""
    if len(index) != shard.samples:
        return f"{len(index)} rows but the catalog lists {shard.samples} samples"
    if not len(index):
        return None
    off, size = index["offset"].astype(np.int64), index["size"].astype(np.int64)
    if off[0] < 512 or (off % 512).any() or (size < 0).any() or (off[:-1] + size[:-1] + 512 > off[1:]).any():
        return "its byte offsets are not those of consecutive tar members"
    end = int(off[-1] + size[-1] + 511) // 512 * 512 + 1024  # last member, padded, then the end-of-archive blocks
    if not end <= shard.bytes < end + tarfile.RECORDSIZE:
        return f"its last sample ends at byte {int(off[-1] + size[-1])} but the shard has {shard.bytes} bytes"
    return None


@dataclass
class ShardStore:
    """Verified shards, their per-sample indices, and byte-range reads of single samples.

    Verification (size + sha256) happens once per machine: remote shards are downloaded into the bounded
    local cache under a per-shard file lock and renamed into place only once verified; local shards get
    a stamp (path, size, mtime) in the cache once hashed. A crash leaves no state that blocks a restart:
    locks die with their process and partial downloads are deleted by the next holder of the lock.
    """

    cache_dir: str
    cache_bytes: int
    on_bad_shard: Literal["error", "skip"]
    storage_options: dict = field(default_factory=dict)
    readahead_threads: int = 2
    index_capacity: int = 256  # shard indices kept in memory (a dropped one is re-read from the sidecar or cache)
    open_files: int = 32

    def __post_init__(self) -> None:
        self._index: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.skipped: dict[str, str] = {}  # shard url -> reason
        self.downloaded_bytes = 0  # by this process
        self.hashed_bytes = 0  # verified by this process (others on the machine trust its stamp)
        self.scanned = 0  # indices this process built by scanning a tar (no usable sidecar)
        self.decoded = 0  # samples this process read and decoded
        self.read_bytes = 0

    @staticmethod
    def is_remote(url: str) -> bool:
        return "://" in url and not url.startswith("file://")

    # -- paths and locks

    def _cached(self, shard: Shard, suffix: str = ".tar") -> str:
        return os.path.join(self.cache_dir, shard.sha256[:2], f"{shard.sha256}{suffix}")

    def _local_path(self, shard: Shard) -> str:
        return shard.url[len("file://"):] if shard.url.startswith("file://") else shard.url

    def _tar_path(self, shard: Shard) -> str:
        return self._cached(shard) if self.is_remote(shard.url) else self._local_path(shard)

    @contextlib.contextmanager
    def _locked(self, name: str, blocking: bool = True):
        """An exclusive lock between the machine's processes; released by the OS if its holder dies."""
        os.makedirs(os.path.join(self.cache_dir, "locks"), exist_ok=True)
        with open(os.path.join(self.cache_dir, "locks", f"{name}.lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _write_atomic(path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    # -- verification

    def _bad(self, shard: Shard, what: str) -> ShardError:
        return ShardError(f"token shard {shard.url}: {what}; re-tokenize it or set on_bad_shard='skip'")

    def _verify_local(self, shard: Shard) -> str:
        path = self._local_path(shard)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardError(f"token shard {shard.url} is missing though its catalog lists it; restore it, re-tokenize, "
                             "or set on_bad_shard='skip'") from None
        if st.st_size != shard.bytes:
            raise self._bad(shard, f"{st.st_size} bytes but its catalog says {shard.bytes} (truncated or replaced)")
        want = {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": shard.sha256}
        stamp = os.path.join(self.cache_dir, "verified", f"{hashlib.sha256(want['path'].encode()).hexdigest()[:32]}.json")

        def stamped() -> bool:
            try:
                with open(stamp) as f:
                    return json.load(f) == want
            except (FileNotFoundError, ValueError):
                return False

        if stamped():
            return path
        with self._locked(shard.sha256):
            if stamped():
                return path
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            with self._lock:
                self.hashed_bytes += shard.bytes
            if h.hexdigest() != shard.sha256:
                raise self._bad(shard, f"sha256 {h.hexdigest()[:12]}... but its catalog says {shard.sha256[:12]}... (corrupt or replaced)")
            self._write_atomic(stamp, json.dumps(want).encode())
        return path

    def _fetch_remote(self, shard: Shard) -> str:
        """The shard's verified copy in the cache (downloaded by whichever process of the machine gets there first)."""
        path = self._cached(shard)

        def present() -> bool:
            try:
                if os.path.getsize(path) == shard.bytes:  # written only after verification, renamed into place
                    os.utime(path)
                    return True
            except FileNotFoundError:
                pass
            return False

        if present():
            return path
        with self._locked(shard.sha256):
            if present():
                return path
            for stale in glob.glob(f"{path}.part.*"):  # a crashed download: we hold the lock, so nobody writes it
                os.remove(stale)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.part.{uuid.uuid4().hex}"
            h, n = hashlib.sha256(), 0
            try:
                with fsspec.open(shard.url, "rb", **self.storage_options) as src, open(tmp, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        dst.write(block)
                        n += len(block)
                if n != shard.bytes:
                    raise self._bad(shard, f"{n} bytes but its catalog says {shard.bytes} (truncated or replaced)")
                if h.hexdigest() != shard.sha256:
                    raise self._bad(shard, f"sha256 {h.hexdigest()[:12]}... but its catalog says {shard.sha256[:12]}... "
                                           "(corrupt or replaced)")
                os.replace(tmp, path)
            except FileNotFoundError:
                raise ShardError(f"token shard {shard.url} is missing though its catalog lists it; restore it, re-tokenize, "
                                 "or set on_bad_shard='skip'") from None
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        with self._lock:
            self.downloaded_bytes += n
            self.hashed_bytes += n
        self._evict(keep=path)
        return path

    def _evict(self, keep: str) -> None:
        """Drop least recently used cached shards (with their indices) until the cache fits `cache_bytes`."""
        files, total = [], 0
        for root, _, names in os.walk(self.cache_dir):
            for n in names:
                p = os.path.join(root, n)
                if ".part." in n:  # a crash's leftover once nobody has written it for a while (live ones grow)
                    with contextlib.suppress(FileNotFoundError):
                        if time.time() - os.stat(p).st_mtime > STALE_PART_S:
                            os.remove(p)
                    continue
                if not n.endswith(".tar"):
                    continue
                try:
                    st = os.stat(p)
                    extra = os.path.getsize(p[:-4] + INDEX_SUFFIX) if os.path.exists(p[:-4] + INDEX_SUFFIX) else 0
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size + extra, p))
                total += st.st_size + extra
        for _, size, p in sorted(files):
            if total <= self.cache_bytes:
                break
            if p == keep:
                continue
            for victim in (p, p[:-4] + INDEX_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(victim)
            total -= size

    def _verified_tar(self, shard: Shard) -> str:
        return self._fetch_remote(shard) if self.is_remote(shard.url) else self._verify_local(shard)

    # -- indices

    def _load_index(self, shard: Shard) -> np.ndarray:
        """The shard's verified per-sample index: its sidecar, else one built from the tar (cached for the machine)."""
        tar = self._verified_tar(shard)
        cached = self._cached(shard, INDEX_SUFFIX) if self.is_remote(shard.url) else \
            os.path.join(self.cache_dir, "index", f"{shard.sha256}{INDEX_SUFFIX}")
        with contextlib.suppress(FileNotFoundError, ShardError):
            with open(cached, "rb") as f:
                index = parse_shard_index(f.read(), cached)
            if index_problem(index, shard) is None:
                return index
        sidecar = shard.url + INDEX_SUFFIX
        try:
            index = read_shard_index(shard.url, self.storage_options)
            problem = "missing" if index is None else index_problem(index, shard)
        except ShardError as e:
            problem = str(e)
        if problem is None:
            if self.is_remote(shard.url):
                self._write_atomic(cached, _npy_bytes(index))
            return index
        with self._locked(f"{shard.sha256}.idx"):
            with contextlib.suppress(FileNotFoundError, ShardError):  # another process built it meanwhile
                with open(cached, "rb") as f:
                    index = parse_shard_index(f.read(), cached)
                if index_problem(index, shard) is None:
                    return index
            if problem == "missing":
                log.info("token shard %s has no index %s; building it from the tar's headers (once per machine)", shard.url, sidecar)
            else:
                log.warning("shard index %s does not match its shard (%s); rebuilding it from the tar's headers", sidecar, problem)
            with open(tar, "rb") as f:
                index = build_shard_index(f.read(), shard.url)
            if len(index) != shard.samples:
                raise self._bad(shard, f"{len(index)} samples but its catalog says {shard.samples}")
            self._write_atomic(cached, _npy_bytes(index))
            with self._lock:
                self.scanned += 1
        return index

    def index(self, shard: Shard) -> np.ndarray | None:
        """The shard's index (rows in tar order), or None when the shard is bad and bad shards are skipped."""
        with self._lock:
            if shard.url in self._index:
                self._index.move_to_end(shard.url)
                return self._index[shard.url]
            fut = self._inflight.pop(shard.url, None)
        try:
            index = fut.result() if fut is not None else self._load_index(shard)
        except ShardError as e:
            if self.on_bad_shard == "error":
                raise
            if shard.url not in self.skipped:
                log.warning("skipping bad shard: %s", e)
            self.skipped[shard.url] = str(e)
            index = None
        with self._lock:
            self._index[shard.url] = index
            while len(self._index) > self.index_capacity:
                self._index.popitem(last=False)
        return index

    def prefetch(self, shards: list[Shard]) -> None:
        """Verify (download, for remote ones) and index shards in the background."""
        with self._lock:
            for s in shards:
                if s.url in self._index or s.url in self._inflight:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.readahead_threads, thread_name_prefix="shard-readahead")
                self._inflight[s.url] = self._pool.submit(self._load_index, s)

    # -- single samples

    def _fd(self, shard: Shard) -> int:
        path = self._tar_path(shard)
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # evicted from the cache by another process since it was verified
            fd = os.open(self._verified_tar(shard), os.O_RDONLY)
        self._fds[path] = fd
        while len(self._fds) > self.open_files:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, shard: Shard, row: int) -> tuple[TokenSample, tuple]:
        """Sample `row` of the shard, read by byte range and checked against its index row; and that row's
        (n_images, groups, fold_size, text, tiles, thumbnail)."""
        index = self.index(shard)
        if index is None:
            raise AssertionError(f"planned a sample of skipped shard {shard.url}")  # the planner never does
        key, off, size, *facts = index[row].item()
        key = key.decode()
        buf = os.pread(self._fd(shard), size + 512, off - 512)  # the member's tar header, then its data
        name = buf[:100].split(b"\0", 1)[0].decode(errors="replace")
        try:
            member_size = int(buf[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            member_size = -1
        if len(buf) != size + 512 or member_size != size or not name.startswith(f"{key}."):
            raise ShardError(f"shard index {shard.url}{INDEX_SUFFIX}: row {row} names {key} ({size} bytes at {off}) but the tar has "
                             f"{name!r} ({member_size} bytes) there; delete the index (the loader rebuilds it) or re-tokenize")
        sample = decode_token_sample(buf[512:], key)
        c = sample.codes
        rows, cols = sample.meta.get("tiles", [1, 1])
        got = [c.shape[0] if c.ndim else 0, c.shape[1] if c.ndim == 3 else 0, c.shape[2] if c.ndim == 3 else -1,
               int(sample.text_ids.size), int(rows) * int(cols), bool(sample.meta.get("thumbnail", False))]
        if got != facts:
            raise ShardError(f"shard index {shard.url}{INDEX_SUFFIX}: sample {key} is {got} (images, groups, fold size, text, "
                             f"tiles, thumbnail) but its index row says {facts}; delete the index (the loader rebuilds it) or re-tokenize")
        self.decoded += 1
        self.read_bytes += size
        return sample, tuple(facts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight.clear()
        while self._fds:
            os.close(self._fds.popitem()[1])


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ---- 4. the global plan of every step, from the indices ---------------------------------------------------


@dataclass
class SourceCursor:
    epoch: int = 0
    pos: int = 0
    dropped: int = 0  # samples passed over because no layout fits seq_len
    skipped: int = 0  # samples of bad shards passed over

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "dropped": self.dropped, "skipped": self.skipped}


@dataclass
class GroupPlan:
    """Every position of one shuffle group of a source in one epoch, planned once from the shards' indices."""

    shard: np.ndarray  # [n] int64, into source.shards
    row: np.ndarray  # [n] int64, the sample's row in its shard's index
    length: np.ndarray  # [n] int64, planned sequence length
    view: np.ndarray  # [n] int8, train.sequence view; VIEW_DROPPED when unusable
    bad: np.ndarray  # [n] bool, sample of a skipped shard
    uncond: np.ndarray  # [n] bool, CFG prompt drop


# a task's global batch, one entry per sample in batch order (struct of arrays; rank r takes [r::world_size])
PLAN_FIELDS = ("source", "epoch", "pos", "shard", "row", "length", "view", "uncond")


def _uncond(seed: int, name: str, epoch: int, pos: np.ndarray, prob: float) -> np.ndarray:
    """Seeded per-sample CFG drop: splitmix64 of (seed, source, epoch, position), no RNG state."""
    key = int.from_bytes(hashlib.blake2b(repr((seed, name, epoch)).encode(), digest_size=8).digest(), "little")
    z = pos.astype(np.uint64) + np.uint64(key) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < prob


class Planner:
    """Computes each step's global batches (per task) from the cursors and the shards' indices; identical everywhere.

    Sampling is weighted fair queueing with each source's credit carried across batches
    (`train.mixture.merge_by_credit`, `MixLedger`)."""

    def __init__(self, manifest: MixtureManifest, sources: dict[str, Source], store: ShardStore, seq: SequenceSpec,
                 ids: LayoutIds, seed: int, shuffle_shards: int, readahead: int):
        self.manifest = manifest
        self.sources = sources
        self.store = store
        self.seq = seq
        self.ids = ids
        self.seed = seed
        self.readahead = readahead
        self.orders = {n: SourceOrder(s, seed, shuffle_shards) for n, s in sources.items() if s.size.samples > 0}
        self.cursors: dict[str, SourceCursor] = {n: SourceCursor() for n in sources}
        self.carried: dict[str, dict] = {}  # cursors of sources not in this manifest (kept for a switch back)
        self.ledger = MixLedger()
        self.online = None  # train.reweight.OnlineWeights when a task reweights online
        self._groups: dict[str, OrderedDict[tuple[int, int], GroupPlan]] = {n: OrderedDict() for n in sources}
        self._weights_cache: dict[tuple[str, int], dict[str, float]] = {}

    def weights(self, task: str, step: int) -> dict[str, float]:
        if self.online is not None and task in self.online.tasks:
            return self.online.weights(task, step)
        key = (task, self.manifest.segment(step))
        if key not in self._weights_cache:
            sizes = {n: self.sources[n].size for n in self.manifest.tasks[task].sources}
            self._weights_cache[key] = resolve_weights(self.manifest, task, step, sizes)
        return self._weights_cache[key]

    def _group(self, name: str, epoch: int, g: int) -> GroupPlan:
        cache = self._groups[name]
        if (epoch, g) in cache:
            cache.move_to_end((epoch, g))
            return cache[(epoch, g)]
        order, source = self.orders[name], self.sources[name]
        self._readahead(name, epoch, g)
        shard, row = order.group_arrays(epoch, g)
        lo, hi = order.group_bounds(epoch, g)
        n = hi - lo
        uncond = np.zeros(n, bool)
        if source.task == "gen":
            uncond = _uncond(self.seed, name, epoch, np.arange(lo, hi), self.manifest.uncond_prob)
        length, view, bad = np.zeros(n, np.int64), np.zeros(n, np.int8), np.zeros(n, bool)
        for s in order.shards_of_group(epoch, g):
            index = self.store.index(source.shards[s])
            m = shard == s
            if index is None:
                bad[m] = True
                continue
            length[m], view[m] = plan_lengths(index[row[m]], source.task, uncond[m], self.seq, self.ids)
        cache[(epoch, g)] = GroupPlan(shard, row, length, view, bad, uncond)
        while len(cache) > 3:
            cache.popitem(last=False)
        return cache[(epoch, g)]

    def _readahead(self, name: str, epoch: int, g: int) -> None:
        """Start verifying/indexing the shards of the next `readahead` groups (the next epoch's, past the end)."""
        order, shards = self.orders[name], self.sources[name].shards
        ahead = []
        for d in range(1, self.readahead + 1):
            e, gg = epoch, g + d
            while gg >= order.n_groups:
                e, gg = e + 1, gg - order.n_groups
            ahead += [shards[i] for i in order.shards_of_group(e, gg)]
        order._set_epoch(epoch)
        self.store.prefetch(ahead)

    def _upcoming(self, name: str, need: int) -> dict[str, np.ndarray]:
        """The source's positions from its cursor on, far enough to hold `need` usable samples (or one epoch)."""
        order, cur = self.orders[name], self.cursors[name]
        epoch, pos = cur.epoch, cur.pos
        parts: list[dict[str, np.ndarray]] = []
        usable = passed = 0
        while usable < need:
            if pos >= order.size:
                epoch, pos = epoch + 1, 0
            if passed >= order.size and usable == 0:
                raise ShardError(f"source {name}: no usable sample in a whole epoch (all shards bad or every sample longer "
                                 f"than seq_len={self.seq.seq_len}); fix its shards or drop it from the mixture")
            g = order.group_of(epoch, pos)
            lo, hi = order.group_bounds(epoch, g)
            gp = self._group(name, epoch, g)
            a = pos - lo
            parts.append({"epoch": np.full(hi - pos, epoch, np.int64), "pos": np.arange(pos, hi, dtype=np.int64),
                          "shard": gp.shard[a:], "row": gp.row[a:], "length": gp.length[a:], "view": gp.view[a:],
                          "bad": gp.bad[a:], "uncond": gp.uncond[a:]})
            usable += int((gp.view[a:] != VIEW_DROPPED).sum())
            passed += hi - pos
            pos = hi
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]

    def plan_step(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """The global batch of every task at `step` (PLAN_FIELDS arrays); advances the cursors past it."""
        out = {}
        for task, tspec in self.manifest.tasks.items():
            weights = self.weights(task, step)
            names = list(weights)
            B = tspec.global_batch
            # gather a few more candidates than each source's share; a source whose every candidate is taken
            # may have more to give, so gather more and merge again (rare: only when lengths run far from average)
            need = {n: min(B, int(2 * w * B) + 8) for n, w in weights.items()}
            while True:
                streams, costs = [], []
                for si, n in enumerate(names):
                    st = self._upcoming(n, need[n])
                    ok = np.flatnonzero(st["view"] != VIEW_DROPPED)[:need[n]]
                    streams.append((st, ok))
                    costs.append(st["length"][ok].tolist() if tspec.unit == "tokens" else [1] * len(ok))
                src, take = merge_by_credit(costs, [weights[n] for n in names], [self.ledger.credit(task, n) for n in names], B)
                counts = np.bincount(src, minlength=len(names))
                short = [n for si, n in enumerate(names) if counts[si] == len(streams[si][1]) and need[n] < B]
                if not short:
                    break
                for n in short:
                    need[n] = min(B, 2 * need[n])
            batch: dict = {}
            for si, n in enumerate(names):
                st, ok = streams[si]
                c = int(counts[si])
                if c == 0:
                    continue
                cut = int(ok[c - 1]) + 1  # positions up to the last one drawn are consumed
                cur = self.cursors[n]
                dropped = int(((st["view"][:cut] == VIEW_DROPPED) & ~st["bad"][:cut]).sum())
                cur.dropped += dropped
                cur.skipped += int(st["bad"][:cut].sum())
                if int(st["epoch"][cut - 1]) != cur.epoch:
                    log.info("source %s starts epoch %d", n, int(st["epoch"][cut - 1]))
                cur.epoch, cur.pos = int(st["epoch"][cut - 1]), int(st["pos"][cut - 1]) + 1
            taken_len = {n: int(streams[si][0]["length"][streams[si][1][:counts[si]]].sum()) for si, n in enumerate(names)}
            self.ledger.advance(task, weights, taken_len if tspec.unit == "tokens" else {n: int(counts[si]) for si, n in enumerate(names)},
                                {n: int(counts[si]) for si, n in enumerate(names)}, taken_len)
            # gather in batch order: candidate i of source s is row `ok[k]` of its stream
            for f in PLAN_FIELDS:
                if f == "source":
                    batch[f] = src
                    continue
                col = np.concatenate([streams[si][0][f][streams[si][1]] for si in range(len(names))])
                batch[f] = col[take]
            batch["names"] = names
            batch["weights"] = weights
            out[task] = batch
        return out

    def state(self, step: int) -> dict:
        """Loader state before `step`."""
        sources = dict(copy.deepcopy(self.carried))
        for n, c in self.cursors.items():
            sources[n] = {**c.as_dict(), "fingerprint": self.sources[n].fingerprint, "size": self.sources[n].size.samples}
        return {"version": STATE_VERSION, "step": step, "seed": self.seed, "mixture": self.manifest.mixture_id(step),
                "sources": sources, "mix": self.ledger.state()}

    def load(self, state: dict) -> None:
        self.carried = {}
        self.ledger.load(state.get("mix"))  # absent in states saved before credit was carried: start at 0
        for n, s in state["sources"].items():
            if n not in self.sources:
                self.carried[n] = s
                continue
            if s["fingerprint"] != self.sources[n].fingerprint:
                raise ConfigMismatchError(f"source {n}: its shard list changed since the checkpoint (fingerprint {s['fingerprint']} "
                                          f"then, {self.sources[n].fingerprint} now), so saved positions would name other "
                                          "samples; restore the catalog or give the new data another source name")
            self.cursors[n] = SourceCursor(s["epoch"], s["pos"], s.get("dropped", 0), s.get("skipped", 0))


# ---- 5-6. the dataset ------------------------------------------------------------------------------------


@dataclass
class LoaderConfig:
    """How this process reads the stream (the mixture itself is the manifest)."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_shards: int = 4  # samples are shuffled within groups of this many consecutive (permuted) shards
    on_bad_shard: Literal["error", "skip"] = "error"
    cache_dir: str | None = None  # local cache of remote shards (default: <tmp>/synergen-shards)
    cache_bytes: int = 8 << 30
    readahead: int = 1  # shard groups fetched ahead of the current one per source
    max_steps: int | None = None  # stop after this step (None: stream forever, epochs counted)
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise SynergenError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.on_bad_shard not in ("error", "skip"):
            raise SynergenError(f"on_bad_shard={self.on_bad_shard!r}: use 'error' or 'skip'")


@dataclass
class StepBatch:
    """What one step hands the trainer: a PackedBatch per task for this rank, the realised mixture, the state after it."""

    step: int
    batches: dict[str, PackedBatch]
    report: dict
    state: dict  # loader state after this step: save it with the checkpoint of this step
    samples: dict[str, list[tuple[str, int, str]]]  # task -> (source, epoch, key) of this rank's documents

    def __reduce__(self):
        # From a DataLoader worker, tensors would each go through a new shared-memory file (~30 ms a step for
        # 7 tensors); as numpy arrays they travel in the pickle itself, int64 narrowed to int32 on the way
        # (ids, positions and codes all fit), which halves what is copied; the receiver widens them back.
        arrays = {}
        for t, b in self.batches.items():
            arrays[t] = {}
            for f in fields(b):
                v = getattr(b, f.name)
                if isinstance(v, torch.Tensor):
                    v = v.numpy()
                    if v.dtype == np.int64:
                        v = v.astype(np.int32)
                arrays[t][f.name] = v
        return _step_batch, (self.step, arrays, self.report, self.state, self.samples)


def _step_batch(step: int, arrays: dict, report: dict, state: dict, samples: dict) -> StepBatch:
    def tensor(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)

    batches = {t: PackedBatch(**{k: (tensor(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}) for t, a in arrays.items()}
    return StepBatch(step, batches, report, state, samples)


class StreamingMixture(torch.utils.data.IterableDataset):
    """The mixture's packed batches for one rank, one `StepBatch` per step; use with DataLoader(batch_size=None)."""

    def __init__(self, manifest: MixtureManifest, model: ModelDataSpec, tokenizer, config: LoaderConfig | None = None,
                 layout_ids: LayoutIds | None = None):
        super().__init__()
        self.manifest = manifest
        self.model = model
        self.config = config or LoaderConfig()
        self.ids = layout_ids or LayoutIds.from_tokenizer(tokenizer)
        self.seq = SequenceSpec(manifest.seq_len, manifest.max_tiles, manifest.thumbnail, model.fold)
        self.sources = resolve_sources(manifest, model, self.config.storage_options)
        for task in manifest.tasks:  # fail now, not in a worker, if a task has nothing to draw from
            for seg in range(len(manifest.schedule) + 1):
                step = 0 if seg == 0 else manifest.schedule[seg - 1].at_step
                resolve_weights(manifest, task, step, {n: self.sources[n].size for n in manifest.tasks[task].sources})
        self.online = online_weights(manifest, {n: s.size for n, s in self.sources.items()})  # None unless a task reweights
        self._state: dict | None = None

    # -- state

    def _planner(self) -> Planner:
        c = self.config
        store = ShardStore(c.cache_dir or os.path.join(tempfile.gettempdir(), "synergen-shards"), c.cache_bytes,
                           c.on_bad_shard, dict(c.storage_options))
        planner = Planner(self.manifest, self.sources, store, self.seq, self.ids, c.seed, c.shuffle_shards, c.readahead)
        planner.online = self.online
        return planner

    def state_dict(self) -> dict:
        """The state this dataset will start from (after load_state_dict), else the fresh state."""
        return copy.deepcopy(self._state) if self._state is not None else self._planner().state(0)

    def load_state_dict(self, state: dict) -> None:
        """Start from a saved state (any rank's: they are equal); may follow a mixture change."""
        if state.get("version") != STATE_VERSION:
            raise SynergenError(f"loader state version {state.get('version')} is not {STATE_VERSION}; it was saved by another synergen")
        if state["seed"] != self.config.seed:
            raise ConfigMismatchError(f"loader state has seed {state['seed']} but the config has {self.config.seed}; "
                                      "resume with the checkpoint's seed")
        self._planner().load(state)  # validates fingerprints now, in the main process
        if state["mixture"] != self.manifest.mixture_id(state["step"]):
            log.info("mixture changes at step %d: %s -> %s", state["step"], state["mixture"], self.manifest.mixture_id(state["step"]))
        self._state = copy.deepcopy(state)

    # -- iteration

    def __iter__(self) -> Iterator[StepBatch]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        planner = self._planner()
        start = 0
        if self._state is not None:
            planner.load(self._state)
            start = self._state["step"]
        step = start
        try:
            while self.config.max_steps is None or step < self.config.max_steps:
                plan = planner.plan_step(step)  # every worker plans every step (from indices: cheap), builds only its own
                if (step - start) % n_workers == worker:
                    yield self._build(step, plan, planner, worker)
                step += 1
        finally:
            planner.store.close()

    def _build(self, step: int, plan: dict[str, dict], planner: Planner, worker: int) -> StepBatch:
        c, store = self.config, planner.store
        batches, samples, report = {}, {}, {"step": step, "mixture": self.manifest.mixture_id(step), "tasks": {}}
        for task, p in plan.items():
            names = p["names"]
            mine = np.arange(c.rank, len(p["source"]), c.world_size)
            docs, keys = [], []
            for j in mine:
                name = names[int(p["source"][j])]
                sample, (n_images, _, _, _, n_tiles, thumbnail) = store.read(self.sources[name].shards[int(p["shard"][j])],
                                                                           int(p["row"][j]))
                layout = layout_of(n_images, n_tiles, thumbnail, task, int(p["view"][j]), int(p["length"][j]), self.seq)
                docs.append((sample, layout, bool(p["uncond"][j]), name))
                keys.append((name, int(p["epoch"][j]), sample.key))
            batch = pack(docs, self.seq.seq_len, self.ids, task)
            batches[task] = batch
            samples[task] = keys
            report["tasks"][task] = {
                "global": _tally(names, p["source"], p["length"]),
                "rank": _tally(names, p["source"][mine], p["length"][mine]),
                "rows": int(batch.input_ids.shape[0]),
                "packing_efficiency": packing_efficiency(batch),
                "uncond": int(p["uncond"][mine].sum()),
                "weights": dict(p["weights"]),
            }
        state = planner.state(step + 1)
        report["sources"] = {n: {k: s[k] for k in ("epoch", "pos", "dropped", "skipped")} for n, s in state["sources"].items()
                             if n in self.sources}
        report["cumulative"] = state["mix"]  # per task and source: samples, tokens drawn since step 0, credit, weight
        report["skipped_shards"] = sorted(store.skipped)
        # this process's own I/O and CPU time, cumulative: decodes equal the samples it yields, whatever ranks x workers
        report["io"] = {"rank": c.rank, "worker": worker, "decoded": store.decoded, "read_bytes": store.read_bytes,
                        "downloaded_bytes": store.downloaded_bytes, "hashed_bytes": store.hashed_bytes,
                        "indices_scanned": store.scanned, "cpu_s": time.process_time()}
        return StepBatch(step, batches, report, state, samples)


def _tally(names: list[str], source: np.ndarray, length: np.ndarray) -> dict[str, dict[str, int]]:
    """Samples and tokens per source (in the order sources first appear)."""
    out: dict[str, dict[str, int]] = {}
    for si in dict.fromkeys(source.tolist()):
        m = source == si
        out[names[si]] = {"samples": int(m.sum()), "tokens": int(length[m].sum())}
    return out


class StreamingLoader:
    """A torch DataLoader over a StreamingMixture that remembers the state after the last StepBatch handed out.

    `state_dict()` is what to save with the checkpoint of the last step trained: workers run ahead
    (prefetch), but the state travels with each batch, so it is exact whatever the worker count.
    """

    def __init__(self, dataset: StreamingMixture, num_workers: int = 0, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._state: dict | None = None

    def __iter__(self) -> Iterator[StepBatch]:
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False, **kw)
        for sb in loader:
            self._state = sb.state
            yield sb

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._state = copy.deepcopy(state)

