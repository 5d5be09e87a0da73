"""The ingest job's row index: occurrence numbers of URLs and the shard holding each row's current record,
partitioned by URL hash over Ray actors, so no process holds per-row state for the whole corpus.

A row is identified by `<url_hash>-<occurrence>` (`rid64` in 64 bits, `pipeline.rawshard.row_key64`), where the
occurrence counts earlier rows of the same URL across the URL lists. Everything about one URL (its occurrence
count, every planned row of it and the shard holding each one's current record) lives in one partition: the
one `h64 % parts` picks, h64 being the first 64 bits of the URL hash (the row id's first 16 hex digits). A
partition holds 12 bytes per distinct URL of this run's lists plus 12 bytes per planned row of the folder; the
driver only routes batches (O(batch)).

The index is rebuildable from what is durable: the planned shards' input files (`_inputs/`). A partition lost
with its node raises `RowIndexLost` on the next call; the caller rebuilds the whole index (`RowIndex.rebuild`)
and starts its pass again (the planner re-reads the URL lists: rows it already planned are now in the index
and are skipped, so nothing is planned twice).
"""

from __future__ import annotations

import logging
from typing import Callable

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline import rawshard as R
from synergen.errors import SynergenError
from synergen.local_ray import started

log = logging.getLogger(__name__)


class RowIndexLost(SynergenError):
    """A partition of the row index died (its node was lost): rebuild the index and start the pass again."""


def h64_of_row_ids(row_ids) -> np.ndarray:
    """First 64 bits of each row id's URL hash (its first 16 hex digits), vectorised."""
    ids = row_ids.to_pylist() if hasattr(row_ids, "to_pylist") else list(row_ids)
    if not ids:
        return np.zeros(0, np.uint64)
    return np.frombuffer(bytes.fromhex("".join(r[:16] for r in ids)), ">u8").astype(np.uint64)


class UrlOccurrences:
    """Occurrence numbers of URLs across the whole list, in numpy: 12 bytes per distinct URL (sorted arrays of 64-bit
    URL hashes and their counts), so row ids (`<sha1[:20]>-<n>`, stable when rows are appended) and duplicate URLs
    are found without a Python object per row.

    The arrays are kept as a few sorted runs whose sizes at least halve from the first to the last (a log-structured
    merge): each batch becomes a run and equal-sized neighbours merge, so every hash is re-sorted O(log runs) times
    in all rather than once per batch, and a lookup is one binary search per run (at most ~log2(rows/batch) runs).
    """

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted unique hashes, counts), biggest first

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self.runs)

    def add(self, h: np.ndarray) -> np.ndarray:
        """Occurrence number of each hash of this batch (0 for a URL's first row), counting earlier batches."""
        order = np.argsort(h, kind="stable")
        hs = h[order]
        starts = np.r_[True, hs[1:] != hs[:-1]] if len(hs) else np.zeros(0, bool)
        group_start = np.maximum.accumulate(np.where(starts, np.arange(len(hs)), 0))
        prev = np.zeros(len(hs), np.int64)
        for rh, rn in self.runs:  # a hash may sit in several runs (appended in several batches): its counts add up
            pos = np.clip(np.searchsorted(rh, hs), 0, len(rh) - 1)
            prev += np.where(rh[pos] == hs, rn[pos], 0)
        occ = np.empty(len(h), np.int64)
        occ[order] = prev + np.arange(len(hs)) - group_start
        if len(hs):
            self.runs.append((hs[starts], np.diff(np.r_[np.flatnonzero(starts), len(hs)]).astype(np.uint32)))
        while len(self.runs) > 1 and len(self.runs[-1][0]) * 2 > len(self.runs[-2][0]):
            (ah, an), (bh, bn) = self.runs.pop(), self.runs.pop()
            allh, alln = np.concatenate([bh, ah]), np.concatenate([bn, an])
            o = np.argsort(allh, kind="stable")
            allh, alln = allh[o], alln[o]
            first = np.r_[True, allh[1:] != allh[:-1]]
            self.runs.append((allh[first], np.add.reduceat(alln, np.flatnonzero(first)).astype(np.uint32)))
        return occ


class RowIndexPart:
    """One partition of the index (URLs with h64 % parts == its number); a Ray actor in a job."""

    def __init__(self):
        self.occ = UrlOccurrences()
        self._loading: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys, self.shards = np.zeros(0, np.uint64), np.zeros(0, np.int32)

    def add_planned(self, rid64: np.ndarray, sid: int) -> None:
        """Rows planned in shard `sid` (call `seal` after the last); not awaited by the driver: a caller's calls
        to an actor run in order, and `seal` reports a lost partition."""
        self._loading.append((rid64, np.full(len(rid64), sid, np.int32)))

    def seal(self) -> int:
        """Sort the planned rows; a row planned in several shards (retried) is current in the highest. Returns the
        number of distinct planned rows."""
        if self._loading:
            k = np.concatenate([self.keys, *(a for a, _ in self._loading)])
            s = np.concatenate([self.shards, *(b for _, b in self._loading)])
            self._loading = []
            order = np.lexsort((s, k))  # by key, then shard: the last of each key's run is its current shard
            k, s = k[order], s[order]
            last = np.ones(len(k), bool)
            last[:-1] = k[1:] != k[:-1]
            self.keys, self.shards = k[last], s[last]
        return len(self.keys)

    def fresh(self, h64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For URL-list rows (in list order): their occurrence numbers, and whether a shard already holds the row."""
        n = self.occ.add(h64)
        rid64 = R.row_key64(h64, n)
        if not len(self.keys):
            return n, np.zeros(len(h64), bool)
        pos = np.clip(np.searchsorted(self.keys, rid64), 0, len(self.keys) - 1)
        return n, self.keys[pos] == rid64

    def current(self, rid64: np.ndarray, sid: int) -> np.ndarray:
        """Mask of shard `sid`'s rows whose current record is there: no higher shard the index knows holds them
        (a shard planned after the index was loaded holds only new rows, or retried rows it was told of)."""
        if not len(self.keys):
            return np.ones(len(rid64), bool)
        pos = np.clip(np.searchsorted(self.keys, rid64), 0, len(self.keys) - 1)
        return (self.keys[pos] != rid64) | (self.shards[pos] <= sid)


class RowIndex:
    """The driver's side: routes batches to the partitions by h64 and puts the answers back in row order.

    `make_parts()` returns fresh partitions: RowIndexPart objects in this process (`local`), or actor handles
    (`start_row_index`); the index loads every planned shard's rows into them (streaming the input files).
    """

    LOAD_FILES = 64  # input files per loading task

    def __init__(self, out: str, make_parts: Callable[[], list], load: bool = True):
        self.out, self._make = out, make_parts
        self.rebuilds = -1
        if load:
            try:
                self.rebuild()
            except RowIndexLost as err:  # a node lost while the index first loads
                self.recover(err)
        else:
            self.parts, self.rebuilds = make_parts(), 0

    @classmethod
    def local(cls, out: str) -> RowIndex:
        """One partition in this process: 12 bytes per planned row (on-demand compaction, benchmarks)."""
        return cls(out, lambda: [RowIndexPart()])

    @property
    def on_actors(self) -> bool:
        return not isinstance(self.parts[0], RowIndexPart)

    def rebuild(self) -> None:
        """Fresh partitions, loaded from the input files of every planned shard: by Ray tasks when the partitions
        are actors (each task reads a slice of the files and sends their rows to the partitions owning them)."""
        self.parts = self._make()
        self.rebuilds += 1
        if self.on_actors:
            self._started()
        fs, root = fsspec.core.url_to_fs(self.out)
        paths = sorted(fs.glob(f"{root}/{R.INPUTS}/[0-9]*.parquet"))
        if self.on_actors and paths:
            import ray

            # no CPU reserved: a rebuild mid-job must not queue behind the shard tasks holding every CPU
            task = ray.remote(num_cpus=0, max_retries=3)(load_planned)
            slices = [paths[i:i + self.LOAD_FILES] for i in range(0, len(paths), self.LOAD_FILES)]
            try:
                lost = [e for e in ray.get([task.remote(self.out, p, self.parts) for p in slices]) if e]
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as err:  # a loader's node lost
                lost = [f"a row-index loader was lost ({str(err).splitlines()[0][:200]})"]
            if lost:
                raise RowIndexLost(lost[0])
        else:
            load_planned(self.out, paths, self.parts)
        self.seal()

    START_S = 120.0

    def _started(self) -> None:
        """Wait until every partition actor runs; RowIndexLost (the partitions killed, to be replaced by the
        rebuild) if one does not within START_S."""
        import ray

        ok = started(self.parts, self.START_S)
        if not all(ok):
            for p in self.parts:
                ray.kill(p)
            raise RowIndexLost(f"{ok.count(False)} of {len(ok)} row-index partition actors did not start within "
                               f"{self.START_S:g} s")

    def recover(self, err: RowIndexLost, max_rebuilds: int = 5) -> None:
        """Rebuild after a loss, again while partitions keep dying during the rebuild; RowIndexLost saying how often
        once `max_rebuilds` rebuilds were made in all (a cluster that keeps losing nodes)."""
        while True:
            if self.rebuilds >= max_rebuilds:
                raise RowIndexLost(f"the row index was lost {self.rebuilds + 1} times (last: {err})")
            log.warning("%s: rebuilding the row index from the planned shards", err)
            try:
                self.rebuild()
                return
            except RowIndexLost as again:
                err = again

    def fresh(self, h64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(occurrence numbers, already planned) of a batch of URL-list rows, in list order."""
        n, seen = np.zeros(len(h64), np.int64), np.zeros(len(h64), bool)
        for sel, (pn, pseen) in self._scatter("fresh", h64, lambda sel: (h64[sel],)):
            n[sel], seen[sel] = pn, pseen
        return n, seen

    def add_planned(self, row_ids, rid64: np.ndarray, sid: int) -> dict:
        """Rows planned in shard `sid` (after loading: rows already in the index retried there); `seal()` before
        asking `current`. Returns what was sent (object refs for actors: a caller may wait for them)."""
        return self._send("add_planned", {k: (rid64[sel], sid) for k, sel in self._route(h64_of_row_ids(row_ids)).items()})

    def seal(self) -> None:
        self._gather(self._send("seal", {k: () for k in range(len(self.parts))}))

    def current(self, row_ids, rid64: np.ndarray, sid: int) -> np.ndarray:
        """Mask of shard `sid`'s rows (row ids and their keys) whose current record is there."""
        mask = np.zeros(len(rid64), bool)
        for sel, part_mask in self._scatter("current", h64_of_row_ids(row_ids), lambda sel: (rid64[sel], sid)):
            mask[sel] = part_mask
        return mask

    def _scatter(self, method: str, h64: np.ndarray, args: Callable[[np.ndarray], tuple]) -> list:
        """Call `method` on each partition with the rows it owns; [(row positions, answer)] per partition."""
        sels = self._route(h64)
        answers = self._gather(self._send(method, {k: args(sel) for k, sel in sels.items()}))
        return [(sels[k], answers[k]) for k in sels]

    def _route(self, h64: np.ndarray) -> dict[int, np.ndarray]:
        """Row positions owned by each partition (partitions owning none left out)."""
        owner = h64 % np.uint64(len(self.parts))
        sels = {k: np.flatnonzero(owner == k) for k in range(len(self.parts))}
        return {k: sel for k, sel in sels.items() if len(sel)}

    def _send(self, method: str, per_part: dict[int, tuple]) -> dict:
        if not self.on_actors:
            return {k: getattr(self.parts[k], method)(*a) for k, a in per_part.items()}
        return {k: getattr(self.parts[k], method).remote(*a) for k, a in per_part.items()}

    def _gather(self, sent: dict) -> dict:
        if not self.on_actors:
            return sent
        import ray

        try:
            return dict(zip(sent, ray.get(list(sent.values()))))
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:  # its node lost, before or after answering
            raise RowIndexLost(f"a row-index partition died ({str(err).splitlines()[0][:200]})") from None


def load_planned(out: str, paths: list[str], parts: list) -> str | None:
    """Send the planned rows of these input files to the partitions owning them and wait until they have them
    (so the loader's `seal`, called after every loader returned, sees them). Returns why, if a partition died."""
    index = RowIndex(out, lambda: parts, load=False)
    fs, _ = fsspec.core.url_to_fs(out)
    try:
        for path in paths:
            with fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=["row_id", "rid64"])
            index._gather(index.add_planned(t["row_id"], t["rid64"].to_numpy(), R.shard_id_of(path)))
    except RowIndexLost as err:
        return str(err)
    return None


def start_row_index(out: str, n_parts: int) -> RowIndex:
    """The job's index as `n_parts` actors spread over the cluster's nodes. They are not restarted by Ray: a
    restarted partition would be empty and answer wrongly; a lost one raises RowIndexLost instead."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(RowIndexPart)
    return RowIndex(out, lambda: [actor.options(scheduling_strategy="SPREAD").remote() for _ in range(n_parts)])
