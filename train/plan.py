"""The global plan of every step: which samples make each task's global batch, and which rank builds each.

Computed from the source tables alone (no sample is read to plan), identically on every rank and worker:
each block of a source's epoch positions is planned once, vectorised (sample, shard, row, length, view,
CFG drop), and each step merges the sources' next samples by weighted fair queueing (`train.mixture`), in
samples or tokens. Samples that cannot fit are dropped and counted; samples of shards every rank agreed to
skip are passed over and counted; sources that run out start a new epoch.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from synergen.errors import ConfigMismatchError, ShardError, SynergenError
from train.mixture import MixLedger, MixtureManifest, merge_by_credit, resolve_weights
from train.sequence import VIEW_DROPPED, LayoutIds, SequenceSpec, plan_lengths
from train.shard_store import SourceTable
from train.source_order import ORDER, SourceOrder
from train.sources import Source

log = logging.getLogger(__name__)

STATE_VERSION = 2
BLOCK = 4096  # epoch positions planned together (one vectorised pass over their index rows)


@dataclass
class SourceCursor:
    epoch: int = 0
    pos: int = 0
    dropped: int = 0  # samples passed over because no layout fits seq_len
    skipped: int = 0  # samples of skipped shards passed over

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "dropped": self.dropped, "skipped": self.skipped}


@dataclass
class BlockPlan:
    """Every position of one block of a source's epoch, planned once from its table."""

    shard: np.ndarray  # [n] int64, into source.shards
    row: np.ndarray  # [n] int64, the sample's row in its shard's index
    sample: np.ndarray  # [n] int64, the sample's row in the source table
    length: np.ndarray  # [n] int64, planned sequence length
    view: np.ndarray  # [n] int8, train.sequence view; VIEW_DROPPED when unusable
    bad: np.ndarray  # [n] bool, sample of a skipped shard
    uncond: np.ndarray  # [n] bool, CFG prompt drop


# a task's global batch, one entry per sample in batch order (struct of arrays; `assign_ranks` splits it)
PLAN_FIELDS = ("source", "epoch", "pos", "shard", "row", "sample", "length", "view", "uncond")


def _uncond(seed: int, name: str, epoch: int, pos: np.ndarray, prob: float) -> np.ndarray:
    """Seeded per-sample CFG drop: splitmix64 of (seed, source, epoch, position), no RNG state."""
    key = int.from_bytes(hashlib.blake2b(repr((seed, name, epoch)).encode(), digest_size=8).digest(), "little")
    z = pos.astype(np.uint64) + np.uint64(key) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < prob


_STATE_FIX = "resume with the loader state saved with the checkpoint itself (StreamingLoader.state_dict()), unedited"


def _bad_state(field: str, value, why: str) -> SynergenError:
    return SynergenError(f"loader state: {field} is {value!r} ({why}); {_STATE_FIX}")


def check_state(state) -> None:
    """Refuse a loader state that is not one a loader saved (missing keys, wrong types, negative counts) with a
    SynergenError naming the field, its value and the fix; whether it fits the sources is `Planner.load`'s check."""
    if not isinstance(state, dict):
        raise _bad_state("the state", type(state).__name__, "not a dict")

    def need(d: dict, key: str, where: str, kind: type, minimum: int | None = None, required: bool = True):
        if key not in d:
            if required:
                raise SynergenError(f"loader state: {where}{key} is missing; {_STATE_FIX}")
            return
        v = d[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise _bad_state(f"{where}{key}", v, f"not {'an int' if kind is int else 'a ' + kind.__name__}")
        if minimum is not None and v < minimum:
            raise _bad_state(f"{where}{key}", v, f"below {minimum}")

    need(state, "step", "", int, 0)
    need(state, "seed", "", int)
    need(state, "mixture", "", str)
    need(state, "sources", "", dict)
    need(state, "skip", "", list, required=False)
    need(state, "mix", "", dict, required=False)
    for n, src in state["sources"].items():
        where = f"sources.{n}."
        if not isinstance(src, dict):
            raise _bad_state(f"sources.{n}", src, "not a dict")
        for key in ("epoch", "pos"):
            need(src, key, where, int, 0)
        for key in ("dropped", "skipped"):
            need(src, key, where, int, 0, required=False)
        need(src, "fingerprint", where, str, required=state.get("order", ORDER) == ORDER)


def assign_ranks(length: np.ndarray, world_size: int) -> np.ndarray:
    """The rank of each sample of a global batch, balancing tokens: samples longest first (ties by batch order)
    dealt to ranks in a snake (0..W-1, W-1..0, ...), so every rank gets B//W or B//W + 1 samples and rank token
    loads differ by at most about one sample's length. Deterministic: every rank computes the same split."""
    order = np.lexsort((np.arange(len(length)), -np.asarray(length)))
    k = np.arange(len(length))
    lap, i = k // world_size, k % world_size
    rank = np.empty(len(length), np.int64)
    rank[order] = np.where(lap % 2 == 0, i, world_size - 1 - i)
    return rank


class Planner:
    """Computes each step's global batches (per task) from the cursors and the source tables; identical everywhere.

    Sampling is weighted fair queueing with each source's credit carried across batches
    (`train.mixture.merge_by_credit`, `MixLedger`).

    `skip` is the set of shard sha256s whose samples are passed over: decided once for all ranks (see
    `train.dataset`), recorded in the state, never changed by what one process fails to read."""

    def __init__(self, manifest: MixtureManifest, sources: dict[str, Source], tables: dict[str, SourceTable], seq: SequenceSpec,
                 ids: LayoutIds, seed: int, skip: set[str]):
        self.manifest = manifest
        self.sources = sources
        self.tables = tables
        self.seq = seq
        self.ids = ids
        self.seed = seed
        self.skip = set(skip)
        self.orders = {n: SourceOrder(n, s.size.samples, seed) for n, s in sources.items() if s.size.samples > 0}
        self.cursors: dict[str, SourceCursor] = {n: SourceCursor() for n in sources}
        self._identity = {n: {"fingerprint": s.fingerprint, "size": s.size.samples} for n, s in sources.items()}  # O(shards): once
        self.carried: dict[str, dict] = {}  # cursors of sources not in this manifest (kept for a switch back)
        self.ledger = MixLedger()
        self.online = None  # train.reweight.OnlineWeights when a task reweights online
        self._blocks: dict[str, OrderedDict[tuple[int, int], BlockPlan]] = {n: OrderedDict() for n in sources}
        self._weights_cache: dict[tuple[str, int], dict[str, float]] = {}
        self._mixture_ids: dict[int, str] = {}
        self.planned = 0  # steps this planner planned (a DataLoader worker plans only its own: train.dataset.PlanRelay)

    def mixture_id(self, step: int) -> str:
        """`manifest.mixture_id(step)`, computed once per schedule segment (it hashes the manifest)."""
        seg = self.manifest.segment(step)
        if seg not in self._mixture_ids:
            self._mixture_ids[seg] = self.manifest.mixture_id(step)
        return self._mixture_ids[seg]

    def weights(self, task: str, step: int) -> dict[str, float]:
        if self.online is not None and task in self.online.tasks:
            return self.online.weights(task, step)
        key = (task, self.manifest.segment(step))
        if key not in self._weights_cache:
            sizes = {n: self.sources[n].size for n in self.manifest.tasks[task].sources}
            self._weights_cache[key] = resolve_weights(self.manifest, task, step, sizes)
        return self._weights_cache[key]

    def _block(self, name: str, epoch: int, b: int) -> BlockPlan:
        cache = self._blocks[name]
        if (epoch, b) in cache:
            cache.move_to_end((epoch, b))
            return cache[(epoch, b)]
        source, table = self.sources[name], self.tables[name]
        lo, hi = b * BLOCK, min(self.orders[name].size, (b + 1) * BLOCK)
        sample = self.orders[name].samples(epoch, np.arange(lo, hi))
        shard, row = table.locate(sample)
        bad = np.isin(shard, [i for i, s in enumerate(source.shards) if s.sha256 in self.skip])
        uncond = np.zeros(hi - lo, bool)
        if source.task == "gen":
            uncond = _uncond(self.seed, name, epoch, np.arange(lo, hi), self.manifest.uncond_prob)
        length, view = np.zeros(hi - lo, np.int64), np.zeros(hi - lo, np.int8)
        ok = np.flatnonzero(~bad)
        if ok.size:
            length[ok], view[ok] = plan_lengths(table.rows[sample[ok]], source.task, uncond[ok], self.seq, self.ids)
        cache[(epoch, b)] = BlockPlan(shard, row, sample, length, view, bad, uncond)
        while len(cache) > 3:
            cache.popitem(last=False)
        return cache[(epoch, b)]

    def _upcoming(self, name: str, need: int) -> dict[str, np.ndarray]:
        """The source's positions from its cursor on, far enough to hold `need` usable samples (or one epoch)."""
        size, cur = self.orders[name].size, self.cursors[name]
        epoch, pos = cur.epoch, cur.pos
        parts: list[dict[str, np.ndarray]] = []
        usable = passed = 0
        while usable < need:
            if pos >= size:
                epoch, pos = epoch + 1, 0
            if passed >= size and usable == 0:
                raise ShardError(f"source {name}: no usable sample in a whole epoch (all shards bad or every sample longer "
                                 f"than seq_len={self.seq.seq_len}); fix its shards or drop it from the mixture")
            b = pos // BLOCK
            lo, hi = b * BLOCK, min(size, (b + 1) * BLOCK)
            bp = self._block(name, epoch, b)
            end = min(hi, pos + 2 * (need - usable) + 16)  # enough when few are dropped; the loop takes more if not
            a, e = pos - lo, end - lo
            parts.append({"epoch": np.full(end - pos, epoch, np.int64), "pos": np.arange(pos, end, dtype=np.int64),
                          "shard": bp.shard[a:e], "row": bp.row[a:e], "sample": bp.sample[a:e], "length": bp.length[a:e],
                          "view": bp.view[a:e], "bad": bp.bad[a:e], "uncond": bp.uncond[a:e]})
            usable += int((bp.view[a:e] != VIEW_DROPPED).sum())
            passed += end - pos
            pos = end
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]

    def progress(self) -> tuple[dict, dict]:
        """What planning a step changes (every source's cursor and the credit ledger): all another planner over the
        same manifest, tables, seed and skip list needs to plan the next step exactly as this one would (`advance_to`)."""
        return {n: c.as_dict() for n, c in self.cursors.items()}, self.ledger.state()

    def advance_to(self, progress: tuple[dict, dict]) -> None:
        """Continue from another planner's `progress()` (no checks: `load` is for states from outside this run)."""
        cursors, ledger = progress
        self.cursors = {n: SourceCursor(**c) for n, c in cursors.items()}
        self.ledger.load(ledger)

    def plan_step(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """The global batch of every task at `step` (PLAN_FIELDS arrays); advances the cursors past it."""
        self.planned += 1
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
                    costs.append(st["length"][ok] if tspec.unit == "tokens" else np.ones(len(ok), np.int64))
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
        """Loader state before `step`: the cursors and everything else that decides which sample sits at a position."""
        sources = dict(copy.deepcopy(self.carried))
        for n, c in self.cursors.items():
            sources[n] = {**c.as_dict(), **self._identity[n]}
        return {"version": STATE_VERSION, "step": step, "seed": self.seed, "order": ORDER,
                "mixture": self.mixture_id(step), "sources": sources, "skip": sorted(self.skip),
                "mix": self.ledger.state()}

    def load(self, state: dict, migrate_order: bool = False) -> None:
        """Continue from `state`: the same order (else ConfigMismatchError, or with `migrate_order` every source
        starts its next epoch in this loader's order), the same content per source (by shard sha256s, wherever
        they are stored), and the skip list of the run (kept, so every rank still passes over the same shards).
        A malformed state (`check_state`) or a position past its source's end is refused, naming the field."""
        check_state(state)
        order = state.get("order", f"shards shuffled in groups (state version {state.get('version')})")
        if order != ORDER and not migrate_order:
            raise ConfigMismatchError(f"loader state orders samples by {order!r} but this loader by {ORDER!r}: positions would "
                                      "name other samples; resume with the loader that saved it, or set data_options "
                                      "migrate_order: true to start every source's next epoch in the new order")
        self.carried = {}
        self.ledger.load(state.get("mix"))  # absent in states saved before credit was carried: start at 0
        for n, s in state["sources"].items():
            if n not in self.sources:
                self.carried[n] = s
                continue
            if order != ORDER:  # a state of another order names its sources' content another way: sizes must agree
                if s.get("size") != self.sources[n].size.samples:
                    raise ConfigMismatchError(f"source {n}: {s.get('size')} samples in the checkpoint but "
                                              f"{self.sources[n].size.samples} now; restore the catalog to migrate")
            elif s["fingerprint"] != self.sources[n].fingerprint:
                raise ConfigMismatchError(f"source {n}: its shards changed since the checkpoint (fingerprint {s['fingerprint']} "
                                          f"then, {self.sources[n].fingerprint} now: another shard list or other shard contents), "
                                          "so saved positions would name other samples; restore the catalog or give the new "
                                          "data another source name")
            if s["pos"] > self.sources[n].size.samples:
                raise ConfigMismatchError(f"loader state: sources.{n}.pos is {s['pos']} but source {n} has "
                                          f"{self.sources[n].size.samples} samples; {_STATE_FIX}")
            cur = SourceCursor(s["epoch"], s["pos"], s.get("dropped", 0), s.get("skipped", 0))
            if order != ORDER:
                log.warning("source %s: migrating from order %r: epoch %d ends at position %d; epoch %d starts in order %r",
                            n, order, cur.epoch, cur.pos, cur.epoch + 1, ORDER)
                cur.epoch, cur.pos = cur.epoch + 1, 0
            self.cursors[n] = cur
        self.skip |= set(state.get("skip", []))
        for blocks in self._blocks.values():
            blocks.clear()
