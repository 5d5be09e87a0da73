"""The streaming pretraining dataset: catalogs -> verified shards -> global order -> mixture -> rank slice -> packed batches.

The stream, link by link (each a small piece with its own test):
  1. `resolve_sources`: each mixture source's catalogs -> its shards, checked against the model (fold,
     codebook, tokenizer vocab hash); a mismatch is an error naming both.
  2. `SourceOrder`: a source's sample order in an epoch, a pure function of (seed, source, epoch): shards
     permuted, then samples shuffled within groups of `shuffle_shards` consecutive shards. Any position
     maps to its (shard, sample) in O(1), so resuming never replays.
  3. `ShardStore`: shard bytes, local or remote via fsspec, with read-ahead into a bounded local cache;
     size and sha256 verified before use; a bad shard is an error naming it, or a recorded skip.
  4. `Planner`: the global batch of every step, identical on every rank and worker: `MixtureSampler`
     picks the source of each next sample (in samples or tokens), sequences that cannot fit are dropped
     and counted, sources that run out start a new epoch with a new order (counted).
  5. Rank slice: sample j of the global batch goes to rank j % world_size; DataLoader worker w builds
     the steps s with (s - first step) % num_workers == w, which is the order torch's DataLoader reads them.
  6. `train.sequence` builds each sample's sequence, `train.packing` packs the rank's share per task.

State is a handful of counters per source (epoch, position) plus the step, the same on every rank:
resuming on another number of ranks or workers continues the same global stream, so the epoch's
remaining samples are neither repeated nor skipped. Changing the mixture (a new manifest or the
manifest's schedule) keeps each source's position, so no source repeats a sample within its epoch.

The cost of a global plan: every worker reads the samples of every global batch (to know their
lengths for token weighting), but builds and packs only its own. Shards are shared through the local
cache, so remote traffic is per machine, not per worker.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import logging
import os
import tempfile
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Literal

import fsspec
import numpy as np
import torch

from model.batch import PackedBatch
from model.folding import Fold
from pipeline.tokenshard import TokenSample, iter_token_shard_fast, read_catalog
from synergen.errors import ConfigMismatchError, ShardError, SynergenError
from train.mixture import MixtureManifest, MixtureSampler, SourceSize, resolve_weights
from train.packing import pack, packing_efficiency
from train.sequence import LayoutIds, SequenceSpec, build_sequence, plan_layout

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


# ---- 3. shard bytes: verified, cached, read ahead ---------------------------------------------------------


@dataclass
class ShardStore:
    """Verified shard contents; remote shards go through a bounded local cache with read-ahead."""

    cache_dir: str
    cache_bytes: int
    on_bad_shard: Literal["error", "skip"]
    storage_options: dict = field(default_factory=dict)
    decoded_capacity: int = 16
    readahead_threads: int = 2

    def __post_init__(self) -> None:
        self._decoded: OrderedDict[str, list[TokenSample] | None] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.skipped: dict[str, str] = {}  # shard url -> reason
        self.downloaded_bytes = 0

    @staticmethod
    def is_remote(url: str) -> bool:
        return "://" in url and not url.startswith("file://")

    def _cache_path(self, shard: Shard) -> str:
        return os.path.join(self.cache_dir, shard.sha256[:2], f"{shard.sha256}.tar")

    def _verify(self, shard: Shard, data: bytes) -> None:
        if len(data) != shard.bytes:
            raise ShardError(f"token shard {shard.url}: {len(data)} bytes but its catalog says {shard.bytes} "
                             "(truncated or replaced); re-tokenize it or set on_bad_shard='skip'")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardError(f"token shard {shard.url}: sha256 {digest[:12]}... but its catalog says {shard.sha256[:12]}... "
                             "(corrupt or replaced); re-tokenize it or set on_bad_shard='skip'")

    def _read(self, url: str) -> bytes:
        try:
            with fsspec.open(url, "rb", **self.storage_options) as f:
                return f.read()
        except FileNotFoundError:
            raise ShardError(f"token shard {url} is missing though its catalog lists it; restore it, re-tokenize, "
                             "or set on_bad_shard='skip'") from None

    def _fetch_remote(self, shard: Shard) -> bytes:
        path = self._cache_path(shard)
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) == shard.bytes:  # written only after verification, renamed into place
                os.utime(path)
                return data
        except FileNotFoundError:
            pass
        data = self._read(shard.url)
        self._verify(shard, data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self.downloaded_bytes += len(data)
        self._evict(keep=path)
        return data

    def _evict(self, keep: str) -> None:
        """Drop least recently used cached shards until the cache fits `cache_bytes`."""
        files = []
        for root, _, names in os.walk(self.cache_dir):
            for n in names:
                if n.endswith(".tar"):
                    p = os.path.join(root, n)
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, size, p in sorted(files):
            if total <= self.cache_bytes:
                break
            if p == keep:
                continue
            try:
                os.remove(p)
                total -= size
            except FileNotFoundError:
                pass

    def _bytes(self, shard: Shard) -> bytes:
        if self.is_remote(shard.url):
            return self._fetch_remote(shard)
        data = self._read(shard.url)
        self._verify(shard, data)
        return data

    def prefetch(self, shards: list[Shard]) -> None:
        """Start downloading remote shards into the cache in the background (no-op for local ones)."""
        for s in shards:
            if not self.is_remote(s.url) or s.url in self._decoded or s.url in self._inflight:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.readahead_threads, thread_name_prefix="shard-readahead")
            self._inflight[s.url] = self._pool.submit(self._fetch_remote, s)

    def samples(self, shard: Shard) -> list[TokenSample] | None:
        """The shard's samples in tar order, or None when it is bad and bad shards are skipped."""
        if shard.url in self._decoded:
            self._decoded.move_to_end(shard.url)
            return self._decoded[shard.url]
        try:
            fut = self._inflight.pop(shard.url, None)
            data = fut.result() if fut is not None else self._bytes(shard)
            out = list(iter_token_shard_fast(shard.url, data))
            if len(out) != shard.samples:
                raise ShardError(f"token shard {shard.url}: {len(out)} samples but its catalog says {shard.samples}; "
                                 "re-tokenize it or set on_bad_shard='skip'")
        except ShardError as e:
            if self.on_bad_shard == "error":
                raise
            log.warning("skipping bad shard: %s", e)
            self.skipped[shard.url] = str(e)
            out = None
        self._decoded[shard.url] = out
        if len(self._decoded) > self.decoded_capacity:
            self._decoded.popitem(last=False)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight.clear()


# ---- 4. the global plan of every step --------------------------------------------------------------------


@dataclass
class Draw:
    """One sample of a global batch."""

    source: str
    epoch: int
    pos: int
    sample: TokenSample
    uncond: bool
    layout: object  # train.sequence.Layout


@dataclass
class SourceCursor:
    epoch: int = 0
    pos: int = 0
    dropped: int = 0  # samples passed over because no layout fits seq_len
    skipped: int = 0  # samples of bad shards passed over

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "dropped": self.dropped, "skipped": self.skipped}


def _unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from the parts: per-sample randomness without RNG state."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


class Planner:
    """Computes each step's global batches (per task) from the cursors; identical on every rank and worker."""

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
        self._heads: dict[str, Draw] = {}
        self._prefetched: dict[str, tuple[int, int]] = {}
        self._weights_cache: dict[tuple[str, int], dict[str, float]] = {}

    def weights(self, task: str, step: int) -> dict[str, float]:
        key = (task, self.manifest.segment(step))
        if key not in self._weights_cache:
            sizes = {n: self.sources[n].size for n in self.manifest.tasks[task].sources}
            self._weights_cache[key] = resolve_weights(self.manifest, task, step, sizes)
        return self._weights_cache[key]

    def _readahead(self, name: str, epoch: int, pos: int) -> None:
        order = self.orders[name]
        g = order.group_of(epoch, pos)
        if self._prefetched.get(name) == (epoch, g):
            return
        self._prefetched[name] = (epoch, g)
        shards = self.sources[name].shards
        groups = [(epoch, g + d) for d in range(0, self.readahead + 1)]
        ahead = []
        for e, gg in groups:
            if gg >= len(order.group_starts) - 1:  # past the end: the next epoch's first groups
                e, gg = e + 1, gg - (len(order.group_starts) - 1)
                if gg >= len(order.group_starts) - 1:
                    continue
            ahead += [shards[i] for i in order.shards_of_group(e, gg)]
        self.store.prefetch(ahead)
        order._set_epoch(epoch)

    def _head(self, name: str) -> Draw:
        """The next sample of a source that can be used (bad shards and unfit samples are passed, counted)."""
        if name in self._heads:
            return self._heads[name]
        order, cur, task = self.orders[name], self.cursors[name], self.sources[name].task
        passed = 0
        while True:
            if cur.pos >= order.size:
                cur.epoch += 1
                cur.pos = 0
                log.info("source %s starts epoch %d", name, cur.epoch)
            if passed > order.size:
                raise ShardError(f"source {name}: no usable sample in a whole epoch (all shards bad or every sample longer "
                                 f"than seq_len={self.seq.seq_len}); fix its shards or drop it from the mixture")
            self._readahead(name, cur.epoch, cur.pos)
            shard_i, sample_i = order.locate(cur.epoch, cur.pos)
            samples = self.store.samples(self.sources[name].shards[shard_i])
            if samples is None:
                cur.pos += 1
                cur.skipped += 1
                passed += 1
                continue
            sample = samples[sample_i]
            uncond = task == "gen" and _unit_hash(self.seed, name, cur.epoch, cur.pos) < self.manifest.uncond_prob
            layout = plan_layout(sample, task, uncond, self.seq, self.ids)
            if layout is None:
                cur.pos += 1
                cur.dropped += 1
                passed += 1
                continue
            self._heads[name] = Draw(name, cur.epoch, cur.pos, sample, uncond, layout)
            return self._heads[name]

    def plan_step(self, step: int) -> dict[str, list[Draw]]:
        """The global batch of every task at `step`; advances the cursors past it."""
        out = {}
        for task, tspec in self.manifest.tasks.items():
            sampler = MixtureSampler(self.weights(task, step))
            unit_tokens = tspec.unit == "tokens"
            draws = []
            for _ in range(tspec.global_batch):
                heads = {n: self._head(n) for n in sampler.weights}
                name = sampler.pick({n: (h.layout.length if unit_tokens else 1) for n, h in heads.items()})
                d = heads[name]
                sampler.record(name, d.layout.length if unit_tokens else 1)
                draws.append(d)
                del self._heads[name]
                self.cursors[name].pos = d.pos + 1
            out[task] = draws
        return out

    def state(self, step: int) -> dict:
        """Loader state before `step` (heads not yet drawn are re-derived from the cursors on load)."""
        sources = dict(copy.deepcopy(self.carried))
        for n, c in self.cursors.items():
            # a head that was peeked but not drawn has moved the cursor past unusable samples only
            sources[n] = {**c.as_dict(), "fingerprint": self.sources[n].fingerprint, "size": self.sources[n].size.samples}
            if n in self._heads:
                sources[n]["epoch"], sources[n]["pos"] = self._heads[n].epoch, self._heads[n].pos
        return {"version": STATE_VERSION, "step": step, "seed": self.seed, "mixture": self.manifest.mixture_id(step),
                "sources": sources}

    def load(self, state: dict) -> None:
        self._heads.clear()
        self.carried = {}
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
        self._state: dict | None = None

    # -- state

    def _planner(self) -> Planner:
        c = self.config
        store = ShardStore(c.cache_dir or os.path.join(tempfile.gettempdir(), "synergen-shards"), c.cache_bytes,
                           c.on_bad_shard, dict(c.storage_options), decoded_capacity=max(16, 3 * c.shuffle_shards))
        return Planner(self.manifest, self.sources, store, self.seq, self.ids, c.seed, c.shuffle_shards, c.readahead)

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
                plan = planner.plan_step(step)
                if (step - start) % n_workers == worker:
                    yield self._build(step, plan, planner)
                step += 1
        finally:
            planner.store.close()

    def _build(self, step: int, plan: dict[str, list[Draw]], planner: Planner) -> StepBatch:
        c = self.config
        batches, samples, report = {}, {}, {"step": step, "mixture": self.manifest.mixture_id(step), "tasks": {}}
        for task, draws in plan.items():
            mine = draws[c.rank::c.world_size]
            docs = [build_sequence(d.sample, task, d.uncond, d.layout, self.ids, source=d.source) for d in mine]
            batch = pack(docs, self.seq.seq_len, self.ids.pad, task)
            batches[task] = batch
            samples[task] = [(d.source, d.epoch, d.sample.key) for d in mine]
            report["tasks"][task] = {
                "global": _tally(draws),
                "rank": _tally(mine),
                "rows": int(batch.input_ids.shape[0]),
                "packing_efficiency": packing_efficiency(batch),
                "uncond": sum(d.uncond for d in mine),
            }
        state = planner.state(step + 1)
        report["sources"] = {n: {k: s[k] for k in ("epoch", "pos", "dropped", "skipped")} for n, s in state["sources"].items()
                             if n in self.sources}
        report["skipped_shards"] = sorted(planner.store.skipped)
        return StepBatch(step, batches, report, state, samples)


def _tally(draws: list[Draw]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for d in draws:
        t = out.setdefault(d.source, {"samples": 0, "tokens": 0})
        t["samples"] += 1
        t["tokens"] += d.layout.length
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

