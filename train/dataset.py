"""The streaming dataset: the loader's configuration, the per-step batch, and the torch dataset and loader.

Each process plans the steps it builds (`train.plan`, from the source tables) and builds only its rank's
samples of each global batch (`train.plan.assign_ranks`), and of those only the steps its DataLoader worker
owns: worker w builds the steps s with (s - first step) % num_workers == w, the order torch's DataLoader reads
them. Planning is sequential (a step's draw depends on the cursors and credit after the step before), so
under `StreamingLoader` the worker of step s hands the planner's progress to the worker of step s + 1
(`PlanRelay`) and no worker plans another's steps; a bare DataLoader over the dataset has every worker plan
every step (the same plan, at W times the planning CPU).

Skips every rank agrees on: the shards a machine cannot index are found when the dataset is built (before
any step), and when torch.distributed is initialised the ranks take the union of what each found, so every
rank plans around the same shards; the set is recorded in the state and kept on resume. A sample that one
process cannot read later (deleted, truncated, bytes changed) never changes the plan: with
on_bad_shard='skip' that rank leaves it out of its batch and reports it, otherwise it is an error naming it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fcntl
import itertools
import logging
import math
import mmap
import os
import pickle
import select
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch
from pydantic import Field, model_validator

from model.batch import PackedBatch
from synergen.errors import ConfigMismatchError, ShardError, SynergenError
from train.config import DataOptions
from train.mixture import MixtureManifest, online_weights, resolve_weights
from train.packing import ROW_ARRAYS, Shapes, pack, packing_efficiency
from train.plan import STATE_VERSION, Planner, assign_ranks, check_state
from train.sequence import Layout, LayoutIds, SequenceSpec, layout_of
from train.shard_store import ShardStore, SourceTable, default_cache_dir
from train.sources import ModelDataSpec, resolve_sources

log = logging.getLogger(__name__)


class LoaderConfig(DataOptions):
    """How this process reads the stream (the mixture itself is the manifest): the train config's `data_options`
    plus this process's rank, the world size and the seed. Bad values raise pydantic's ValidationError; wrap
    with `synergen.errors.validated` where they come from a user."""

    rank: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _rank_in_world(self) -> "LoaderConfig":
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        return self


@dataclass
class StepBatch:
    """What one step hands the trainer: a PackedBatch per task for this rank, the realised mixture, the state after it."""

    step: int
    batches: dict[str, PackedBatch]
    report: dict
    state: dict  # loader state after this step: save it with the checkpoint of this step
    samples: dict[str, list[tuple[str, int, str]]]  # task -> (source, epoch, key) of this rank's documents
    slot: tuple | None = field(default=None, repr=False)  # in a DataLoader worker: where BatchSlots holds the arrays

    def __reduce__(self):
        meta = {t: (b.doc_sources, b.task) for t, b in self.batches.items()}
        if self.slot is not None:  # the arrays wait in shared memory: only where they are travels
            return _step_batch_from_slot, (*self.slot, self.step, meta, self.report, self.state, self.samples)
        # Elsewhere (a spawned worker, a user's pickle) as numpy arrays in the pickle itself, each int64 array narrowed
        # on the way to the smallest of uint16 (codes, positions) or int32 (ids, labels with -100); the receiver widens
        # them back.
        arrays = {}
        for t, b in self.batches.items():
            arrays[t] = {}
            for f in fields(b):
                v = getattr(b, f.name)
                if isinstance(v, torch.Tensor):
                    v = v.numpy()
                    if v.dtype == np.int64:
                        v = v.astype(np.uint16 if v.size and 0 <= v.min() and v.max() < 65536 else np.int32)
                    arrays[t][f.name] = v
        return _step_batch, (self.step, arrays, meta, self.report, self.state, self.samples)


def _step_batch(step: int, arrays: dict, meta: dict, report: dict, state: dict, samples: dict) -> StepBatch:
    def tensor(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(v.astype(np.int64) if v.dtype in (np.int32, np.uint16) else v)

    batches = {t: PackedBatch(**{k: tensor(v) for k, v in a.items()}, doc_sources=meta[t][0], task=meta[t][1])
               for t, a in arrays.items()}
    return StepBatch(step, batches, report, state, samples)


def _step_batch_from_slot(token: str, worker: int, k: int, seq: int, size: int, layout: list, step: int, meta: dict,
                          report: dict, state: dict, samples: dict) -> StepBatch:
    slots = BatchSlots.open.get(token)
    if slots is None:
        raise SynergenError(f"a DataLoader worker's batch of step {step} arrived after its StreamingLoader finished; "
                            "iterate a StreamingLoader's batches only while it runs")
    names = [f for f, _, _, _ in ROW_ARRAYS] + ["image_codes"]
    batches = {t: PackedBatch(**{f: torch.from_numpy(a) for f, a in zip(names, arrays)}, doc_sources=meta[t][0], task=meta[t][1])
               for t, arrays in zip(meta, slots.take(worker, k, seq, size, layout))}
    return StepBatch(step, batches, report, state, samples)


class BatchSlots:
    """Shared memory that DataLoader workers pack their batches into, so only a small header crosses a worker's pipe.

    Made by the main process before the workers fork: per worker `per_worker` slots, each an anonymous memory file
    (memfd) that the worker grows as its batches need and the main process maps to copy a batch out when it arrives
    (one copy, no pickling of arrays, no shared-memory file per tensor). A worker writes slot k again `per_worker`
    batches later; the DataLoader keeps at most prefetch_factor batches of a worker in flight, so
    per_worker = prefetch_factor + 1 never overwrites an unread batch, and each slot's header (the batch's sequence
    number, zero while one is written) makes a violation an error rather than a silently mixed batch."""

    HEADER = 64  # bytes before the arrays: the sequence number, then padding to keep arrays aligned
    open: dict[str, "BatchSlots"] = {}  # this process's slots in use, by token (what a batch's header names)

    def __init__(self, workers: int, per_worker: int):
        self.token = uuid.uuid4().hex
        self.per_worker = per_worker
        self.fds = [[os.memfd_create(f"synergen-batch-{w}-{k}") for k in range(per_worker)] for w in range(workers)]
        self._maps: dict[tuple[int, int], mmap.mmap] = {}
        BatchSlots.open[self.token] = self

    def _map(self, worker: int, k: int, size: int) -> mmap.mmap:
        mm = self._maps.get((worker, k))
        if mm is None or len(mm) < size:
            fd = self.fds[worker][k]
            have = os.fstat(fd).st_size
            if have < size:  # only the slot's worker grows it, before it names the new size in a header
                have = max(size, 2 * have)
                os.ftruncate(fd, have)
            mm = self._maps[(worker, k)] = mmap.mmap(fd, have)  # an old map lives on while arrays view it
        return mm

    def writer(self, worker: int, seq: int) -> "_SlotWriter":
        """In a worker: where its batch number `seq` (>= 1) goes, one `alloc` per task."""
        return _SlotWriter(self, worker, seq)

    def take(self, worker: int, k: int, seq: int, size: int, layout: list) -> list[list[np.ndarray]]:
        """In the main process: copies of a batch's arrays, per `alloc` of its writer (one list per task)."""
        mm = self._map(worker, k, size)
        header = lambda: int(np.frombuffer(mm, np.uint64, 1)[0])  # noqa: E731 - no view of the map outlives a read
        if header() == seq:  # copied out (widened to the batch's dtypes where the worker wrote them narrowed)
            out = [[np.frombuffer(mm, np.dtype(dt), math.prod(shape), off).reshape(shape).astype(wide)
                    for off, shape, dt, wide in arrays] for arrays in layout]
            if header() == seq:  # still: the worker did not start over the slot while it was copied
                return out
        raise SynergenError(f"DataLoader worker {worker} reused a batch slot before its batch {seq} was read (the slot "
                            f"holds batch {header()}): a bug in synergen; set num_workers: 0 to train on meanwhile")

    def close(self) -> None:
        """Unmap and close everything, even while a traceback still holds a view of a map (that map is left to the
        garbage collector; the error being raised is what the user sees)."""
        BatchSlots.open.pop(self.token, None)
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):
                mm.close()
        for fd in (fd for fds in self.fds for fd in fds):
            os.close(fd)
        self._maps, self.fds = {}, []  # closing twice is a no-op


class _SlotWriter:
    """One batch being written into a worker's slot: `alloc` (train.packing's allocator) per task, then `publish`.

    Arrays are written in the narrowest dtype that holds their values (`train.packing.ROW_ARRAYS`: int32 ids, the
    samples' own uint16 codes), about a third of the bytes of int64, so the worker writes, and the main process
    reads, a third as much memory; the main process widens them as it copies them out."""

    def __init__(self, slots: BatchSlots, worker: int, seq: int):
        self.slots, self.worker, self.seq, self.k = slots, worker, seq, seq % slots.per_worker
        self.end = BatchSlots.HEADER
        self.layout: list[list[tuple[int, tuple[int, ...], str, str]]] = []  # per array: offset, shape, dtype written, dtype
        np.frombuffer(slots._map(worker, self.k, self.end), np.uint64, 1)[0] = 0  # being written

    def alloc(self, shapes: Shapes) -> list[np.ndarray]:
        offsets = []
        for shape, _, narrow in shapes:
            offsets.append(self.end)
            self.end += -(-math.prod(shape) * narrow.itemsize // 64) * 64
        mm = self.slots._map(self.worker, self.k, self.end)  # grows the slot if needed; earlier arrays stay valid
        self.layout.append([(off, shape, narrow.str, dt.str) for (shape, dt, narrow), off in zip(shapes, offsets)])
        return [np.frombuffer(mm, narrow, math.prod(shape), off).reshape(shape) for (shape, _, narrow), off in zip(shapes, offsets)]

    def publish(self) -> tuple:
        """The batch is complete: its reference, what travels in place of its arrays."""
        np.frombuffer(self.slots._map(self.worker, self.k, self.end), np.uint64, 1)[0] = self.seq
        return self.slots.token, self.worker, self.k, self.seq, self.end, self.layout


class PlanRelay:
    """How a StreamingLoader's DataLoader workers share the planning: one pipe per worker, made before the fork;
    the worker of step s hands the planner's progress after it (`Planner.progress`) through pipe w + 1 to the
    worker of step s + 1, so in the steady state each step is planned once per rank, by the worker that builds it.

    A relay never decides what is planned, only who computes it: the plan is a pure function of the state the
    loader started from, so a worker whose predecessor has not handed its progress over in about the time the
    missing steps would take to plan (descheduled, finished, failed, killed) plans them itself, as a bare
    DataLoader's workers do; it never waits longer, so a stalled worker cannot stall the others. Messages a
    worker no longer needs (it planned past them) are read and dropped. Each worker keeps only its own two ends
    (`keep`), and the main process closes its copies once the workers are forked, so a finished worker's
    successor reads end-of-file (and plans alone from then on) and a finished successor's pipe is broken (and
    its predecessor stops sending)."""

    CAPACITY = 1 << 20  # bytes a pipe holds (Linux's default limit for a user): several messages of thousands of sources

    def __init__(self, workers: int):
        self.workers = workers
        self.pipes = [os.pipe() for _ in range(workers)]  # pipe w: (read end, write end); worker w reads it
        for r, _ in self.pipes:
            with contextlib.suppress(OSError, AttributeError):  # a smaller pipe only makes senders wait for readers
                fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, self.CAPACITY)

    def keep(self, worker: int) -> None:
        """In worker `worker`: close every end but its own (its pipe's read end, its successor's write end)."""
        mine = {self.pipes[worker][0], self.pipes[(worker + 1) % self.workers][1]}
        for fd in (fd for pipe in self.pipes for fd in pipe if fd >= 0 and fd not in mine):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipes = [(r if r in mine else -1, w if w in mine else -1) for r, w in self.pipes]

    def send(self, worker: int, step: int, progress: tuple) -> None:
        """The planner's progress before `step`, to the worker that builds it (dropped if that worker stopped)."""
        nxt = (worker + 1) % self.workers
        fd = self.pipes[nxt][1]
        if fd < 0:
            return
        blob = pickle.dumps((step, progress), protocol=pickle.HIGHEST_PROTOCOL)
        blob, done = len(blob).to_bytes(8, "little") + blob, 0
        try:
            while done < len(blob):
                done += os.write(fd, blob[done:])
        except BrokenPipeError:  # the successor finished: nobody needs the progress any more
            os.close(fd)
            self.pipes[nxt] = (self.pipes[nxt][0], -1)

    def receive(self, worker: int, step: int, wait_s: float) -> tuple | None:
        """The planner's progress before `step` if its predecessor hands it over within `wait_s`, else None."""
        fd = self.pipes[worker][0]
        if fd < 0:
            return None
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        deadline = time.perf_counter() + wait_s
        while True:
            if not poll.poll(max(0.0, deadline - time.perf_counter()) * 1000):
                return None
            head = self._read(fd, 8)
            body = None if head is None else self._read(fd, int.from_bytes(head, "little"))
            if body is None:  # end of file: the predecessor finished (or died mid-message); plan alone from now on
                os.close(fd)
                self.pipes[worker] = (-1, self.pipes[worker][1])
                return None
            got, progress = pickle.loads(body)
            if got == step:
                return progress
            if got > step:
                raise SynergenError(f"DataLoader worker {worker} was handed the plan before step {got} while it needs step "
                                    f"{step}: a bug in synergen; set num_workers: 0 to train on meanwhile")
            # else a step this worker already planned itself: dropped

    @staticmethod
    def _read(fd: int, n: int) -> bytes | None:
        """`n` bytes of a message the writer has started (it writes each whole), or None at end of file."""
        out = b""
        while len(out) < n:
            chunk = os.read(fd, n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    def close(self) -> None:
        for fd in (fd for pipe in self.pipes for fd in pipe if fd >= 0):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipes = [(-1, -1)] * self.workers  # closing twice is a no-op


def _agree(found: set[str], world_size: int) -> set[str]:
    """The union over ranks of the shards each found bad (torch.distributed when initialised, else this rank's)."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(found))
        return set().union(*map(set, gathered))
    if world_size > 1 and found:
        log.warning("torch.distributed is not initialised, so the other ranks cannot learn of the bad shards this one found "
                    "(%d); they may plan other batches: initialise it before building the dataset", len(found))
    return set(found)


class UnreadWindow:
    """With on_bad_shard='skip', how much of what this process was given it could not read over its last `STEPS`
    steps: a few bad shards among many are skipped and reported, but a process that reads (almost) nothing, e.g.
    after its credentials expired or its mount went away, stops rather than yield empty batches forever.

    `add` raises the ShardError once the window holds at least `MIN_SAMPLES` samples and more than `max_fraction`
    of them (and at least `MIN_UNREAD`) were unread, or once every one of its `STEPS` steps had samples and read
    none of them (a process given fewer samples a step than that minimum). The floor keeps a window of few samples
    from judging by chance: 2 unread of 32 is over 5%, and happens by chance to about one window in five where 2.5%
    of the samples are bad; 8 of 32 does not."""

    STEPS = 20
    MIN_SAMPLES = 32
    MIN_UNREAD = 8

    def __init__(self, max_fraction: float, rank: int):
        self.max_fraction = max_fraction
        self.rank = rank
        self.steps: collections.deque[tuple[int, list[str]]] = collections.deque(maxlen=self.STEPS)

    def add(self, attempted: int, unread_shards: list[str]) -> None:
        """One step's count of samples this process had to read, and the shard (url) of each it could not."""
        self.steps.append((attempted, unread_shards))
        tried = sum(a for a, _ in self.steps)
        unread = sum(len(u) for _, u in self.steps)
        all_empty = len(self.steps) == self.STEPS and all(a and len(u) == a for a, u in self.steps)
        over = tried >= self.MIN_SAMPLES and unread >= self.MIN_UNREAD and unread > self.max_fraction * tried
        if not over and not all_empty:
            return
        worst = collections.Counter(u for _, us in self.steps for u in us).most_common(3)
        raise ShardError(f"rank {self.rank} could not read {unread} of the {tried} samples of its last {len(self.steps)} "
                         f"steps (more than max_unread_fraction={self.max_fraction}); most unread: "
                         + ", ".join(f"{url} ({n})" for url, n in worst)
                         + "; restore access to the shards (credentials, mount) or the shards themselves, or raise "
                         "data_options.max_unread_fraction")


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
        c = self.config
        for task, tspec in manifest.tasks.items():
            if tspec.global_batch < c.world_size:
                raise SynergenError(f"mixture {manifest.name!r}: task {task!r} has global_batch {tspec.global_batch} but the "
                                    f"run has {c.world_size} ranks, so some rank would get no sample; raise "
                                    f"tasks.{task}.global_batch to at least {c.world_size} or run on fewer ranks")
        self.sources = resolve_sources(manifest, model, c.storage_options)
        for task in manifest.tasks:  # fail now, not in a worker, if a task has nothing to draw from
            for seg in range(len(manifest.schedule) + 1):
                step = 0 if seg == 0 else manifest.schedule[seg - 1].at_step
                resolve_weights(manifest, task, step, {n: self.sources[n].size for n in manifest.tasks[task].sources})
        self.store = ShardStore(c.cache_dir or default_cache_dir(), c.cache_bytes,
                                c.on_bad_shard, dict(c.storage_options))
        self._tables = self._load_tables(retry_bad=True)
        self.store.evict(keep=[self.sources[n] for n in self._tables])
        self.table_bytes = sum(int(t.rows.nbytes) for t in self._tables.values())
        if self.table_bytes > c.cache_bytes:
            log.warning("cache_bytes=%d is smaller than this mixture's source indices (%d bytes): they stay in the cache "
                        "while in use, and other runs' indices are evicted; raise data_options.cache_bytes", c.cache_bytes,
                        self.table_bytes)
        found = {self.sources[n].shards[i].sha256 for n, t in self._tables.items()
                 for i in [*t.problems, *self.store.absent(self.sources[n])]}
        # a collective only in skip mode: with on_bad_shard='error' a bad shard already stopped the rank that saw it
        self.skip = _agree(found, c.world_size) if c.on_bad_shard == "skip" else set()
        self.prepared_io = {"index_bytes": self.store.index_bytes, "indices_rebuilt": self.store.rebuilt}
        self.online = online_weights(manifest, {n: s.size for n, s in self.sources.items()})  # None unless a task reweights
        self._state: dict | None = None
        self._slots: BatchSlots | None = None  # set by StreamingLoader while its DataLoader workers run
        self._relay: PlanRelay | None = None  # likewise, with 2 or more workers
        self._layouts: dict[tuple, Layout] = {}

    def _load_tables(self, retry_bad: bool = False) -> dict[str, SourceTable]:
        return {n: self.store.table(s, retry_bad) for n, s in self.sources.items() if s.size.samples > 0}

    def __getstate__(self) -> dict:
        # DataLoader workers reopen the memory-mapped tables from the machine's cache rather than receive copies
        # (and a spawned worker cannot use the slots or the relay, which reach workers by fork: its batches travel
        # pickled, and it plans every step)
        return {**self.__dict__, "_tables": None, "_slots": None, "_relay": None}

    # -- state

    def _planner(self) -> Planner:
        if self._tables is None:
            self._tables = self._load_tables()
        planner = Planner(self.manifest, self.sources, self._tables, self.seq, self.ids, self.config.seed, self.skip)
        planner.online = self.online
        return planner

    def state_dict(self) -> dict:
        """The state this dataset will start from (after load_state_dict), else the fresh state."""
        return copy.deepcopy(self._state) if self._state is not None else self._planner().state(0)

    def load_state_dict(self, state: dict) -> None:
        """Start from a saved state (any rank's: they are equal); may follow a mixture change."""
        if isinstance(state, dict) and state.get("version") not in (1, STATE_VERSION):
            raise SynergenError(f"loader state version {state.get('version')} is not {STATE_VERSION}; it was saved by another synergen")
        check_state(state)
        if state["seed"] != self.config.seed:
            raise ConfigMismatchError(f"loader state has seed {state['seed']} but the config has {self.config.seed}; "
                                      "resume with the checkpoint's seed")
        planner = self._planner()
        planner.load(state, self.config.migrate_order)  # validates order and content now, in the main process
        if state["mixture"] != self.manifest.mixture_id(state["step"]):
            log.info("mixture changes at step %d: %s -> %s", state["step"], state["mixture"], self.manifest.mixture_id(state["step"]))
        self._state = planner.state(state["step"])

    # -- iteration

    def __iter__(self) -> Iterator[StepBatch]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots = self._slots if info is not None else None
        relay = self._relay if info is not None and n_workers > 1 else None
        if relay is not None:
            relay.keep(worker)
        try:
            planner = self._planner()
            start = 0
            if self._state is not None:
                planner.load(self._state)
                start = self._state["step"]
            end = self.config.max_steps
            skipped = sorted(s.url for src in self.sources.values() for s in src.shards if s.sha256 in planner.skip)
            at = start  # the step the planner plans next
            # wall time to plan one step and to build one here (running means): how long a hand-over may take to come
            plan_s, build_s = 1e-3, None
            window = UnreadWindow(self.config.max_unread_fraction, self.config.rank)
            for step in itertools.count(start + worker, n_workers) if end is None else range(start + worker, end, n_workers):
                if at < step and relay is not None:  # the worker of step - 1 hands over where the plan stands
                    # it plans that step right after building its previous one, which it began before this worker
                    # began its own: wait about that long, or as long as planning the missing steps here would take
                    progress = relay.receive(worker, step, max(build_s or 0.0, (step - at) * plan_s))
                    if progress is not None:
                        planner.advance_to(progress)
                        at = step
                t0, first = time.perf_counter(), at
                while at <= step:  # the steps before this worker's own that nobody handed over, then its own
                    plan = planner.plan_step(at)
                    at += 1
                t1 = time.perf_counter()
                plan_s += 0.1 * ((t1 - t0) / (at - first) - plan_s)
                if relay is not None and (end is None or at < end):
                    relay.send(worker, at, planner.progress())
                sb = self._build(step, plan, planner, worker, skipped, window,
                                 slots.writer(worker, (step - start) // n_workers + 1) if slots else None)
                took = time.perf_counter() - t1
                build_s = took if build_s is None else build_s + 0.1 * (took - build_s)
                yield sb
        except SynergenError as e:
            if info is None:
                raise
            yield e  # from a worker as itself: torch would re-raise it with the worker's traceback in its message
        finally:
            self.store.close()
            if relay is not None:
                relay.close()  # the successor reads end-of-file and plans alone

    def _build(self, step: int, plan: dict[str, dict], planner: Planner, worker: int, skipped: list[str],
               window: UnreadWindow, slot: _SlotWriter | None = None) -> StepBatch:
        c, store = self.config, self.store
        mine, rows, items = {}, {}, []
        for task, p in plan.items():
            m = mine[task] = np.flatnonzero(assign_ranks(p["length"], c.world_size) == c.rank)
            src, shard, sample = p["source"][m], p["shard"][m].tolist(), p["sample"][m]
            rows[task] = [None] * len(m)
            for si in np.unique(src).tolist():  # the rank's index rows, one gather per source
                sel = np.flatnonzero(src == si)
                for k, r in zip(sel.tolist(), self._tables[p["names"][si]].row_tuples(sample[sel])):
                    rows[task][k] = r
            items += [(self.sources[p["names"][si]].shards[sh], r) for si, sh, r in zip(src.tolist(), shard, rows[task])]
        got = iter(store.read(items))  # one batch of reads for the whole step (concurrent range GETs remotely)
        batches, samples, unread, unread_shards = {}, {}, [], []
        shards = iter([shard.url for shard, _ in items])
        report = {"step": step, "mixture": planner.mixture_id(step), "tasks": {}}
        for task, p in plan.items():
            names = p["names"]
            docs, keys = [], []
            m = mine[task]
            cols = zip(p["source"][m].tolist(), p["epoch"][m].tolist(), p["view"][m].tolist(), p["length"][m].tolist(),
                       p["uncond"][m].tolist(), rows[task])
            for si, epoch, view, length, uncond, r in cols:
                name = names[si]
                sample, url = next(got), next(shards)
                if isinstance(sample, ShardError):
                    if c.on_bad_shard == "error":
                        raise sample
                    log.warning("rank %d leaves a sample out of step %d (the plan stays the same on every rank): %s", c.rank, step, sample)
                    unread.append(str(sample))
                    unread_shards.append(url)
                    continue
                lay = (r.n_images, r.tiles, r.thumbnail, task, view, length)  # few distinct: made once per process
                if lay not in self._layouts:
                    self._layouts[lay] = layout_of(*lay, self.seq)
                docs.append((sample, self._layouts[lay], uncond, name))
                keys.append((name, epoch, sample.key))
            batch = pack(docs, self.seq.seq_len, self.ids, task, slot.alloc if slot else None)
            batches[task] = batch
            samples[task] = keys
            report["tasks"][task] = {
                "global": _tally(names, p["source"], p["length"]),
                "rank": _tally(names, p["source"][mine[task]], p["length"][mine[task]]),
                "rows": int(batch.input_ids.shape[0]),
                "packing_efficiency": packing_efficiency(batch),
                "uncond": int(p["uncond"][mine[task]].sum()),
                "weights": dict(p["weights"]),
            }
        window.add(len(items), unread_shards)
        state = planner.state(step + 1)
        report["sources"] = {n: {k: s[k] for k in ("epoch", "pos", "dropped", "skipped")} for n, s in state["sources"].items()
                             if n in self.sources}
        report["cumulative"] = state["mix"]  # per task and source: samples, tokens drawn since step 0, credit, weight
        report["skipped_shards"] = skipped
        report["unread_samples"] = unread
        # this process's own I/O and CPU time, cumulative: decodes equal the samples it yields, whatever ranks x workers
        report["io"] = {"rank": c.rank, "worker": worker, "decoded": store.decoded, "read_bytes": store.read_bytes,
                        **self.prepared_io, "planned": planner.planned, "cpu_s": time.process_time()}
        return StepBatch(step, batches, report, state, samples, slot.publish() if slot else None)


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
    (prefetch), but the state travels with each batch, so it is exact whatever the worker count. Iterating
    again (after a `break`, e.g. for an eval) continues from that state, not from where the first loop began.
    """

    def __init__(self, dataset: StreamingMixture, num_workers: int = 0, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._state: dict | None = None

    def __iter__(self) -> Iterator[StepBatch]:
        if self._state is not None:
            self.dataset.load_state_dict(self._state)
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False, **kw)
        # workers reach the slots and the relay by fork (memfds: Linux); elsewhere their batches travel pickled and
        # each plans every step
        shared = self.num_workers and hasattr(os, "memfd_create")
        slots = BatchSlots(self.num_workers, (self.prefetch_factor or 2) + 1) if shared else None
        relay = PlanRelay(self.num_workers) if self.num_workers > 1 else None
        self.dataset._slots, self.dataset._relay = slots, relay
        try:
            batches = iter(loader)  # forks the workers
            if relay is not None:
                relay.close()  # the workers hold the only ends now
            for sb in batches:
                if isinstance(sb, SynergenError):
                    raise sb
                self._state = sb.state
                yield sb
        finally:
            self.dataset._slots = self.dataset._relay = None
            if slots is not None:
                slots.close()
            if relay is not None:
                relay.close()

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._state = self.dataset.state_dict()
