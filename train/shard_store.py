"""Per-sample indices of a source's shards, and verified byte-range reads of single samples.

Per source, a table: the index rows of every sample (catalog order), built once per machine from the shards'
`.idx.npy` sidecars (each checked against the catalog: its sha256 when recorded, its row count, byte offsets,
token totals and per-row consistency) and kept in the local cache as one `.npy` memory-mapped by every process
of the machine. A sidecar that fails a check is named and rebuilt from its tar (downloaded once, size and
sha256 checked against the catalog). So what a machine reads of a source to plan is its indices, once.

Samples are read by byte range (a `pread` locally; concurrent range GETs through fsspec on S3), never whole
shards: only a member's own bytes, at the offset and size of its (checked) index row, not its tar header. Those
bytes are checked against the row's xxh3 before decoding, and the decoded sample against the row's facts: a
flipped byte after the index was written is an error naming the shard and the sample.
The whole-shard sha256 stays in the catalog for audits; it is not needed to trust a sample.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import fsspec
import numpy as np
import xxhash

from pipeline.token_shards import (INDEX_SUFFIX, TokenSample, _index_dtype, build_shard_index, codes_dtype,
                                   decode_token_sample, index_bytes, parse_shard_index, sample_checksum)
from synergen.errors import ShardError, SynergenError
from train.sources import Shard, Source

log = logging.getLogger(__name__)

STALE_PART_S = 3600  # a partial file untouched this long belongs to a dead process
TABLE_VERSION = 2  # bump when a table's layout changes: old tables in caches are then rebuilt, not misread (2: digest)


def default_cache_dir() -> str:
    """This user's cache folder under the temp dir (created 0o700): a table there decides which bytes are served as a
    sample, so a folder another user can write (or made before us) is refused rather than trusted."""
    path = os.path.join(tempfile.gettempdir(), f"synergen-shards-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SynergenError(f"the default loader cache {path} is not a folder of this user that only it can write; remove "
                            "it, or set data_options.cache_dir to a folder of yours")
    return path


def _digest(rows: np.ndarray) -> str:
    """What a cached table's json records of its rows (their dtype, shape and bytes): checked whenever it is opened."""
    h = xxhash.xxh3_128(repr((rows.dtype.descr, rows.shape)).encode())
    h.update(np.ascontiguousarray(rows))
    return h.hexdigest()


def index_problem(index: np.ndarray, shard: Shard) -> str | None:
    """Why `index` cannot be the index of `shard` (checked against its catalog row), or None.

    Counts, byte offsets (consecutive tar members that end where the tar does), token totals (so a row that
    would plan a sample wrong, e.g. groups=1000 or n_images=0, cannot pass), and each row's own consistency
    (images = tiles [+ thumbnail], the catalog's fold)."""
    if len(index) != shard.samples:
        return f"{len(index)} rows but the catalog lists {shard.samples} samples"
    if not len(index):
        return None
    off, size = index["offset"].astype(np.int64), index["size"].astype(np.int64)
    if off[0] < 512 or (off % 512).any() or (size < 0).any() or (off[:-1] + size[:-1] + 512 > off[1:]).any():
        return "its byte offsets are not those of consecutive tar members"
    end = int(off[-1] + size[-1] + 511) // 512 * 512 + 1024  # last member, padded, then the end-of-archive blocks
    if not end <= shard.bytes < end + 10240:  # tarfile pads the archive to its 10 KiB record size
        return f"its last sample ends at byte {int(off[-1] + size[-1])} but the shard has {shard.bytes} bytes"
    n_img, groups = index["n_images"].astype(np.int64), index["groups"].astype(np.int64)
    totals = {"image tokens": (int((n_img * groups).sum()), shard.image_tokens),
              "text tokens": (int(index["text"].astype(np.int64).sum()), shard.text_tokens),
              "codes": (int((n_img * groups * np.maximum(index["fold_size"], 0)).sum()), shard.codes)}
    for what, (got, want) in totals.items():
        if got != want:
            return f"its rows add up to {got} {what} but the catalog lists {want}"
    has_images = n_img > 0
    bad = has_images & ((index["fold_size"] != shard.fold_size) | (groups <= 0)
                        | ((n_img != index["tiles"]) & (n_img != index["tiles"] + index["thumbnail"])))
    if bad.any():
        i = int(np.argmax(bad))
        r = index[i]
        return (f"row {i} ({r['key'].decode()}) contradicts itself: {int(r['n_images'])} images, {int(r['tiles'])} tiles, "
                f"thumbnail={bool(r['thumbnail'])}, fold groups of {int(r['fold_size'])} codes (the catalog folds {shard.fold_size})")
    return None


class IndexRow(NamedTuple):
    """One sample's index row as plain Python values (what the read path uses: numpy field access is slow per sample)."""

    key: bytes
    offset: int
    size: int
    xxh3: int
    n_images: int
    groups: int
    fold_size: int
    text: int
    tiles: int
    thumbnail: bool


@dataclass
class SourceTable:
    """Index rows of every sample of a source, in catalog order (shard after shard), and where each shard starts."""

    rows: np.ndarray  # memory-mapped; fields of pipeline.token_shards's index (zeros for a shard this machine could not index)
    starts: np.ndarray  # [n_shards + 1] int64
    problems: dict[int, str]  # shard index -> why this machine could not index it (on_bad_shard='skip')

    def row_tuples(self, j: np.ndarray) -> list[IndexRow]:
        return [IndexRow(*t) for t in self.rows[j].tolist()]

    def locate(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices -> (shard index, row in that shard)."""
        shard = np.searchsorted(self.starts, j, side="right") - 1
        return shard, j - self.starts[shard]


@dataclass
class ShardStore:
    """Source tables (cached per machine) and verified single-sample reads; counts what it reads."""

    cache_dir: str
    cache_bytes: int
    on_bad_shard: Literal["error", "skip"]
    storage_options: dict = field(default_factory=dict)
    threads: int = 8  # concurrent sidecar reads while building a table
    open_files: int = 32

    def __post_init__(self) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self.index_bytes = 0  # sidecars (and tars, to rebuild an index) this process read
        self.rebuilt = 0  # indices this process rebuilt from a tar (missing or bad sidecar)
        self.decoded = 0  # samples this process read and decoded
        self.read_bytes = 0  # bytes of those samples (their members alone: no tar header is read)
        self.table_files: dict[str, str] = {}  # shard url -> the cached table its rows were read from

    def __getstate__(self) -> dict:  # to DataLoader workers (spawn): counters and settings, not locks or open files
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fds, self._lock = OrderedDict(), threading.Lock()

    @staticmethod
    def is_remote(url: str) -> bool:
        return "://" in url and not url.startswith("file://")

    @staticmethod
    def _local_path(url: str) -> str:
        return url[len("file://"):] if url.startswith("file://") else url

    @contextlib.contextmanager
    def _locked(self, name: str):
        """An exclusive lock between the machine's processes; released by the OS if its holder dies."""
        os.makedirs(os.path.join(self.cache_dir, "locks"), exist_ok=True)
        with open(os.path.join(self.cache_dir, "locks", f"{name}.lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _write_atomic(path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _bad(self, shard: Shard, what: str) -> ShardError:
        return ShardError(f"token shard {shard.url}: {what}; re-tokenize it or set on_bad_shard='skip'")

    @staticmethod
    def _missing(shard: Shard) -> ShardError:
        return ShardError(f"token shard {shard.url} is missing though its catalog lists it; restore it, re-tokenize, "
                          "or set on_bad_shard='skip'")

    def _cat(self, url: str) -> bytes:
        data = fsspec.core.url_to_fs(url, **self.storage_options)[0].cat_file(url if self.is_remote(url) else self._local_path(url))
        with self._lock:
            self.index_bytes += len(data)
        return data

    # -- indices

    def shard_index(self, shard: Shard) -> np.ndarray:
        """The shard's checked index: its sidecar, else (named in a warning) one rebuilt from its verified tar."""
        sidecar = shard.url + INDEX_SUFFIX
        try:
            blob = self._cat(sidecar)
            digest = hashlib.sha256(blob).hexdigest()
            if shard.index_sha256 and digest != shard.index_sha256:
                problem = f"sha256 {digest[:12]}... but the catalog says {shard.index_sha256[:12]}... (changed since tokenizing)"
            else:
                index = parse_shard_index(blob, sidecar)
                problem = index_problem(index, shard)
        except FileNotFoundError:
            problem = "missing"
        except ShardError as e:
            problem = str(e)
        if problem is None:
            return index
        if problem == "missing":
            log.info("token shard %s has no index %s; building it from the tar's headers (once per machine)", shard.url, sidecar)
        else:
            log.warning("shard index %s does not match its shard (%s); rebuilding it from the tar's headers "
                        "(to stop this, re-publish the sidecar: delete it and re-tokenize the shard)", sidecar, problem)
        try:
            data = self._cat(shard.url)
        except FileNotFoundError:
            raise self._missing(shard) from None
        if len(data) != shard.bytes:
            raise self._bad(shard, f"{len(data)} bytes but its catalog says {shard.bytes} (truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise self._bad(shard, f"sha256 {digest[:12]}... but its catalog says {shard.sha256[:12]}... (corrupt or replaced)")
        index = build_shard_index(data, shard.url)
        problem = index_problem(index, shard)
        if problem is not None:
            raise self._bad(shard, f"its own samples disagree with its catalog row ({problem})")
        with self._lock:
            self.rebuilt += 1
        return index

    def absent(self, source: Source) -> dict[int, str]:
        """Shards of the source that are missing or of another size than their catalog row, from one listing of each
        catalog folder (metadata only; run at every start, since the cached table says nothing of today's files)."""
        listed: dict[str, dict[str, int]] = {}
        out = {}
        for i, shard in enumerate(source.shards):
            folder, name = shard.url.rsplit("/", 1)
            if folder not in listed:
                fs, path = fsspec.core.url_to_fs(folder if self.is_remote(folder) else self._local_path(folder), **self.storage_options)
                try:
                    listed[folder] = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                                      for e in fs.ls(path, detail=True, refresh=True)}
                except FileNotFoundError:
                    listed[folder] = {}
            size = listed[folder].get(name)
            if size is None:
                out[i] = str(self._missing(shard))
            elif size != shard.bytes:
                out[i] = str(self._bad(shard, f"{size} bytes but its catalog says {shard.bytes} (truncated or replaced)"))
        if out and self.on_bad_shard == "error":
            raise ShardError(next(iter(out.values())))
        for why in out.values():
            log.warning("bad shard (its samples are passed over on every rank): %s", why)
        return out

    def _table_path(self, source: Source) -> str:
        return os.path.join(self.cache_dir, "tables", f"{source.name}-{source.fingerprint}-v{TABLE_VERSION}.npy")

    def _cached(self, source: Source, starts: np.ndarray, retry_bad: bool, warn: bool = True) -> SourceTable | None:
        """The source's table from this machine's cache if it is there, whole (its rows' digest is the one recorded
        beside it when it was written: else a warning naming it, and None so it is rebuilt) and of the catalog's size."""
        path = self._table_path(source)
        try:
            with open(path[:-4] + ".json") as f:
                meta = json.load(f)
            problems = {int(k): v for k, v in meta["problems"].items()}
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
            digest = _digest(rows)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if digest != meta.get("xxh3_128"):
            if warn:
                log.warning("cached source table %s does not match the digest recorded beside it (changed after it was "
                            "written); rebuilding it from the shards' indices", path)
            return None
        if len(rows) != starts[-1] or (retry_bad and problems):
            return None
        os.utime(path)  # recently used: evicted last
        self.table_files.update({s.url: path for s in source.shards})
        return SourceTable(rows, starts, problems)

    def table(self, source: Source, retry_bad: bool = False) -> SourceTable:
        """The source's table: from this machine's cache, else built (by one process of the machine) from the sidecars.

        With `retry_bad`, a cached table that lists shards this machine could not index is built again (their trouble
        may have been passing); the loader asks for that once at start, its DataLoader workers never do, so they
        plan from the very table their main process decided with."""
        path = self._table_path(source)
        starts = np.concatenate([[0], np.cumsum([s.samples for s in source.shards])]).astype(np.int64)
        table = self._cached(source, starts, retry_bad)
        if table is not None:
            return table
        with self._locked(f"table-{source.fingerprint}"):
            table = self._cached(source, starts, retry_bad, warn=False)  # another process may have built it meanwhile
            if table is not None:
                return table
            parts: list[np.ndarray | None] = [None] * len(source.shards)
            problems: dict[int, str] = {}

            def one(i: int) -> None:
                try:
                    parts[i] = self.shard_index(source.shards[i])
                except ShardError as e:
                    if self.on_bad_shard == "error":
                        raise
                    log.warning("bad shard (its samples are passed over on every rank): %s", e)
                    problems[i] = str(e)

            with ThreadPoolExecutor(self.threads, thread_name_prefix="sidecars") as pool:
                for f in [pool.submit(one, i) for i in range(len(source.shards))]:
                    f.result()
            width = max([int(p.dtype["key"].itemsize) for p in parts if p is not None] or [1])
            dtype = _index_dtype(width)
            rows = np.zeros(int(starts[-1]), dtype)  # a bad shard's rows stay zero: planned as passed over
            for i, p in enumerate(parts):
                if p is not None:
                    rows[starts[i]:starts[i + 1]] = p.astype(dtype)
            self._write_atomic(path, index_bytes(rows))
            self._write_atomic(path[:-4] + ".json", json.dumps({"problems": problems, "xxh3_128": _digest(rows)}).encode())
            self.table_files.update({s.url: path for s in source.shards})
            return SourceTable(np.load(path, mmap_mode="r", allow_pickle=False), starts, problems)

    def evict(self, keep: list[Source]) -> None:
        """Drop least recently used tables of other sources (or other shard lists) until the cache fits `cache_bytes`;
        the tables of `keep` (the run's) stay, even over the bound. One listing of the tables' folder per call: a loader
        calls it once at start (samples are never cached, so reads add nothing to evict)."""
        folder = os.path.join(self.cache_dir, "tables")
        kept = {self._table_path(s) for s in keep}
        tables = []
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat()
                    if ".part." in e.name and time.time() - st.st_mtime > STALE_PART_S:  # a crashed writer's leftover
                        os.remove(e.path)
                    elif e.name.endswith(".npy") and ".part." not in e.name:
                        tables.append((st.st_mtime, st.st_size, e.path))
        total = sum(t[1] for t in tables)
        for _, size, p in sorted(tables):
            if total <= self.cache_bytes:
                break
            if p in kept:
                continue
            for victim in (p, p[:-4] + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(victim)
            total -= size

    # -- single samples

    def _fd(self, shard: Shard) -> int:
        path = self._local_path(shard.url)
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._missing(shard) from None
        size = os.fstat(fd).st_size
        if size != shard.bytes:
            os.close(fd)
            raise self._bad(shard, f"{size} bytes but its catalog says {shard.bytes} (truncated or replaced)")
        self._fds[path] = fd
        while len(self._fds) > self.open_files:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _fetch(self, items: list[tuple[Shard, IndexRow]]) -> list[bytes | ShardError]:
        """Each item's member bytes: preads locally, one concurrent batch of range GETs remotely."""
        out: list[bytes | ShardError] = [b""] * len(items)
        remote = []
        for i, (shard, r) in enumerate(items):
            if self.is_remote(shard.url):
                remote.append(i)
                continue
            try:
                out[i] = os.pread(self._fd(shard), r.size, r.offset)
            except ShardError as e:
                out[i] = e
        if remote:
            fs = fsspec.core.url_to_fs(items[remote[0]][0].url, **self.storage_options)[0]
            starts = [items[i][1].offset for i in remote]
            ends = [items[i][1].offset + items[i][1].size for i in remote]
            got = fs.cat_ranges([items[i][0].url for i in remote], starts, ends, on_error="return")
            for i, lo, hi, data in zip(remote, starts, ends, got):
                if isinstance(data, FileNotFoundError):
                    data = self._missing(items[i][0])
                elif isinstance(data, Exception):
                    data = self._bad(items[i][0], f"reading bytes {lo}-{hi} failed ({data})")
                out[i] = data
        return out

    def read(self, items: list[tuple[Shard, IndexRow]]) -> list[TokenSample | ShardError]:
        """The samples of (shard, index row) pairs, each verified (length, xxh3, decode, facts against the row) before
        it is returned; a sample that fails is returned as the ShardError naming its shard, sample and the fix."""
        out: list[TokenSample | ShardError] = []
        for (shard, r), buf in zip(items, self._fetch(items)):
            if isinstance(buf, ShardError):
                out.append(buf)
                continue
            out.append(self._verify(shard, r, buf))
        return out

    def _verify(self, shard: Shard, r: IndexRow, data: bytes) -> TokenSample | ShardError:
        key = r.key.decode()
        if len(data) != r.size:
            return self._bad(shard, f"sample {key}: {len(data)} of its {r.size} bytes at {r.offset} could be read (truncated)")
        got_sum = sample_checksum(data)
        if got_sum != r.xxh3:
            return self._bad(shard, f"sample {key}: xxh3 {got_sum:016x} of its {r.size} bytes at {r.offset} but its index "
                                    f"says {r.xxh3:016x} (its bytes changed since tokenizing)")
        try:
            sample = decode_token_sample(data, key)
        except ShardError as e:
            return self._bad(shard, str(e))
        c = sample.codes
        if c.size and (c.dtype != codes_dtype(shard.codebook_size) or int(c.max()) >= shard.codebook_size):
            return self._bad(shard, f"sample {key}: codes of dtype {c.dtype} up to {int(c.max())}, but the codebook has "
                                    f"{shard.codebook_size} codes ({codes_dtype(shard.codebook_size)})")
        rows, cols = sample.meta.get("tiles", [1, 1])
        facts = (r.n_images, r.groups, r.fold_size, r.text, r.tiles, r.thumbnail)
        got = (c.shape[0] if c.ndim else 0, c.shape[1] if c.ndim == 3 else 0, c.shape[2] if c.ndim == 3 else -1,
               int(sample.text_ids.size), int(rows) * int(cols), bool(sample.meta.get("thumbnail", False)))
        if got != facts:
            table = self.table_files.get(shard.url)
            if table is not None:  # the next start rebuilds it from the sidecars (a process still using it keeps its map)
                for victim in (table, table[:-4] + ".json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(victim)
            held = (f" (read from this machine's source table {table}, built from that index; the table is removed, so "
                    "the next start rebuilds it)") if table is not None else ""
            return ShardError(f"shard index {shard.url}{INDEX_SUFFIX}: sample {key} is {list(got)} (images, groups, fold size, "
                              f"text, tiles, thumbnail) but its index row says {list(facts)}{held}; delete the index (the "
                              "loader then rebuilds it from the tar) or re-tokenize the shard")
        self.decoded += 1
        self.read_bytes += r.size
        return sample

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
