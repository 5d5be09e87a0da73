"""Job-wide duplicate decisions, sharded over Ray actors: the first row to claim an image keeps it.

Exact duplicates (sha256 of the downloaded bytes) are decided by the one shard that owns the hash's prefix, in
one atomic step (claim = look up, insert on a miss; the bytes stay registered to their first claimer even when
it turns out a near duplicate, so a later copy names that row and the chain leads to the keeper). Near
duplicates (64-bit dHash within `max_distance` bits) are found through `BandKeys` buckets; each bucket lives on
one shard, where a probe is one vectorised XOR + popcount over the candidates of a whole batch. A near claim
probes its keys' owners at once (most duplicates are decided there), then, when nothing matched, probes and
inserts owner by owner in ascending shard order, each step atomic on its shard: two near-duplicates share a key,
so of two claimed at the same instant by different tasks the one first at the lowest shard owning a shared key
is kept and the other finds it (never both kept, never both dropped).

Claims are idempotent: a row that kept its image finds itself on a re-claim and keeps it again; a duplicate
finds the same keeper. Every shard rebuilds its part of the index from the published ledger fragments when it
starts, so an actor restarted on another node (its node lost) continues with what is durable.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from synergen.errors import SynergenError
from synergen.local_ray import started

log = logging.getLogger(__name__)

RID_DTYPE = "S24"  # claimers' row ids are "<20 hex>-0" (later occurrences of a URL are never downloaded)


class BandKeys:
    """Index keys of a 64-bit hash for near lookups within `max_distance` bits.

    The hash is cut into m = max_distance + 2 bands; two hashes within max_distance bits differ in at most
    max_distance bands, so they agree exactly on at least 2 (pigeonhole). Each pair of bands is one key (~2*64/m
    bits), so a bucket holds N / 2^21 hashes for d=4 (5 at 10^7) instead of N / 2^13 with single bands (1,200):
    the cost of a claim stays flat as the index grows, for C(m, 2) keys per hash (15 for d=4).
    """

    def __init__(self, max_distance: int):
        m = max_distance + 2
        bands = [(i * 64 // m, (i + 1) * 64 // m) for i in range(m)]
        self.pairs = [(bands[a], bands[b]) for a in range(m) for b in range(a + 1, m)]

    def value(self, h: int, key: int) -> int:
        (alo, ahi), (blo, bhi) = self.pairs[key]
        return (((h >> alo) & ((1 << (ahi - alo)) - 1)) << (bhi - blo)) | ((h >> blo) & ((1 << (bhi - blo)) - 1))

    def values(self, h: np.ndarray, key: int) -> np.ndarray:
        (alo, ahi), (blo, bhi) = self.pairs[key]
        a = (h >> np.uint64(alo)) & np.uint64((1 << (ahi - alo)) - 1)
        return (a << np.uint64(bhi - blo)) | ((h >> np.uint64(blo)) & np.uint64((1 << (bhi - blo)) - 1))


def _owner(value: int, band: int, n_shards: int) -> int:
    """The shard holding bucket (band, value): a multiplicative hash (uint64 arithmetic, as in `add_many`)."""
    return (((value * 0x9E3779B1 + band * 0x85EBCA77) & 0xFFFFFFFFFFFFFFFF) >> 7) % n_shards


class DedupShard:
    """One shard of the index: the exact hashes and near-hash keys it owns (see the module docstring).

    Near entries live per key in a sorted table (values, hashes, row-id indices: 16 bytes an entry) found with
    `searchsorted` for a whole batch at once, plus a small dict of entries committed since the last merge; the
    dict is merged into the table (a linear merge of two sorted runs) when it passes `merge_at` entries.
    """

    RECENT = 1 << 16  # inserts kept for probe_insert's check of what arrived since a claimer's probe

    def __init__(self, index: int, n_shards: int, exact: bool = True, near: bool = True, max_distance: int = 4,
                 rebuild_from: str | None = None, merge_at: int = 1 << 20):
        self.index, self.n_shards = index, n_shards
        self.exact, self.near, self.max_distance, self.merge_at = exact, near, max_distance, merge_at
        self.keys = BandKeys(max_distance)
        n_keys = len(self.keys.pairs)
        self._by_sha: dict[bytes, str] = {}
        self._rids = np.zeros(0, RID_DTYPE)
        self._n_rids = 0
        empty = (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        self._tables = [empty] * n_keys  # per key: (values sorted, hashes, row-id indices)
        self._bulk: list[list[tuple]] = [[] for _ in range(n_keys)]  # add_many chunks not merged yet
        self._delta: list[dict[int, list]] = [{} for _ in range(n_keys)]  # value -> [(hash, row-id index)]
        self._n_delta = 0
        self._withdrawn: set[str] = set()  # rows whose entries stay but no longer count (see `withdraw`)
        self._inserted = 0  # entries committed so far; the last ones, from number _recent_base on, in _recent
        self._recent: list[tuple[int, int, int, int]] = []  # (key, value, hash, row-id index)
        self._recent_base = 0
        self._incarnation = uuid.uuid4().hex
        if rebuild_from is not None:
            self._rebuild(rebuild_from)

    def _rebuild(self, out: str) -> None:
        import pyarrow.compute as pc

        from pipeline import ledger

        n = 0
        for table in ledger.iter_fragments(out, ["row_id", "state", "sha256", "phash"]):
            kept = table.filter(pc.equal(table["state"], "ok"))
            n += self.add_many(kept["row_id"].to_pylist(), kept["sha256"].to_pylist(), kept["phash"].to_pylist())
        self.merge()
        log.info("dedup shard %d/%d rebuilt %d entries from %s", self.index, self.n_shards, n, out)

    def _store_rids(self, rids: list[str]) -> np.ndarray:
        need = self._n_rids + len(rids)
        if need > len(self._rids):
            grown = np.zeros(max(need, 2 * len(self._rids), 1024), RID_DTYPE)
            grown[:self._n_rids] = self._rids[:self._n_rids]
            self._rids = grown
        self._rids[self._n_rids:need] = rids
        idx = np.arange(self._n_rids, need, dtype=np.uint32)
        self._n_rids = need
        return idx

    def _mine(self, v: np.ndarray, key: int) -> np.ndarray:
        return ((v * np.uint64(0x9E3779B1) + np.uint64(key * 0x85EBCA77)) >> np.uint64(7)) % np.uint64(self.n_shards) == self.index

    def add_many(self, rids: list[str], shas: list[str | None], phashes: list[int | None]) -> int:
        """Register kept images in bulk (vectorised per key; merged into the tables at the next probe)."""
        added = 0
        if self.exact:
            for rid, sha in zip(rids, shas):
                if sha and self.owns_sha(sha):
                    self._by_sha.setdefault(bytes.fromhex(sha), rid)
                    added += 1
        have = [i for i, h in enumerate(phashes) if h is not None]
        if not self.near or not have:
            return added
        h = np.array([phashes[i] for i in have], np.uint64)
        r = self._store_rids([rids[i] for i in have])
        for k in range(len(self.keys.pairs)):
            v = self.keys.values(h, k)
            mine = self._mine(v, k)
            self._bulk[k].append((v[mine], h[mine], r[mine]))
            added += int(mine.sum())
        return added

    def merge(self) -> None:
        """Fold bulk-added and committed entries into the sorted per-key tables."""
        for k in range(len(self.keys.pairs)):
            parts = [self._tables[k], *self._bulk[k]]
            if self._delta[k]:
                items = [(v, h, r) for v, lst in self._delta[k].items() for h, r in lst]
                parts.append((np.array([x[0] for x in items], np.uint64), np.array([x[1] for x in items], np.uint64),
                              np.array([x[2] for x in items], np.uint32)))
            if len(parts) == 1:
                continue
            v = np.concatenate([p[0] for p in parts])
            order = np.argsort(v, kind="stable")  # timsort: sorted runs merge in linear time
            self._tables[k] = (v[order], np.concatenate([p[1] for p in parts])[order],
                               np.concatenate([p[2] for p in parts])[order])
            self._bulk[k], self._delta[k] = [], {}
        self._n_delta = 0

    def owns_sha(self, sha: str) -> bool:
        return int(sha[:8], 16) % self.n_shards == self.index

    def claim_exact(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """For (row_id, sha256) pairs this shard owns: the row that kept that image first, None for the claimer itself."""
        out = []
        for rid, sha in claims:
            first = self._by_sha.setdefault(bytes.fromhex(sha), rid)
            out.append(None if first == rid else first)
        return out

    def probe(self, probes: list[tuple[str, int, int]]) -> list[str | None]:
        """For (row_id, phash, key): a kept row within max_distance under that key, "" when the claimer itself is
        there (it kept its image before), None when nothing matches. Per key, one searchsorted and one
        XOR + popcount over the candidates of the whole batch."""
        if any(self._bulk) or self._n_delta > self.merge_at:
            self.merge()
        out: list[str | None] = [None] * len(probes)
        by_key: dict[int, list[int]] = {}
        for j, p in enumerate(probes):
            by_key.setdefault(p[2], []).append(j)
        hits: list[tuple[int, int]] = []  # (probe, row-id index)
        for k, js in by_key.items():
            hs = np.array([probes[j][1] for j in js], np.uint64)
            vals = self.keys.values(hs, k)
            table_v, table_h, table_r = self._tables[k]
            lo, hi = np.searchsorted(table_v, vals, "left"), np.searchsorted(table_v, vals, "right")
            cnt = hi - lo
            total = int(cnt.sum())
            if total:
                idx = np.repeat(lo - np.cumsum(np.r_[0, cnt[:-1]]), cnt) + np.arange(total)
                close = np.bitwise_count(table_h[idx] ^ np.repeat(hs, cnt)) <= self.max_distance
                owners = np.repeat(np.array(js), cnt)[close]
                hits += zip(owners.tolist(), table_r[idx][close].tolist())
            delta = self._delta[k]
            if delta:
                for j, h, v in zip(js, hs.tolist(), vals.tolist()):
                    hits += [(j, r) for dh, r in delta.get(v, ()) if (dh ^ h).bit_count() <= self.max_distance]
        for j, r in hits:
            rid = self._rids[r].decode()
            if rid in self._withdrawn:
                continue
            if rid == probes[j][0]:
                out[j] = ""
            elif out[j] is None:
                out[j] = rid
        return out

    def probe_at(self, probes: list[tuple[str, int, int]]) -> tuple[list[str | None], tuple[str, int]]:
        """`probe`, and where this shard's inserts stood at that moment (`probe_insert`'s `since`): this copy of the
        shard (a restarted actor counts from its rebuild) and the number of entries it had inserted."""
        return self.probe(probes), (self._incarnation, self._inserted)

    def probe_insert(self, batch: tuple[list[list[tuple[str, int, int]]], tuple[str, int], list[bool]]) -> list[str | None]:
        """For (claims, since, kept): per claim (its (row_id, phash, key) entries this shard owns), in one atomic
        step for the whole batch, a row inserted here since the claimer's `probe_at` (`since`) within max_distance
        when there is one (nothing inserted), else None after inserting what is not there yet. Rows inserted before
        `since` were seen by that probe, so only the recent ones are checked (the whole index when the log of
        recent inserts no longer reaches back that far). A claim `kept` by an earlier attempt (a retry that found
        itself) stays kept: its missing entries are inserted whatever is found, so its decision never depends on
        which of the two checks ran. A claimer's batch holds no two claims near each other (the claimer settles
        those itself, `Dedup.claim_many`)."""
        claims, (incarnation, since), kept = batch
        entries = [e for c in claims for e in c]
        if incarnation != self._incarnation or since < self._recent_base:  # restarted since, or the log is too short
            found = self.probe(entries)
        else:
            recent: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for k, v, h, r in self._recent[since - self._recent_base:]:
                recent.setdefault((k, v), []).append((h, r))
            found = [None] * len(entries)
            for j, (rid, h, k) in enumerate(entries):
                for dh, r in recent.get((k, self.keys.value(h, k)), ()):
                    other = self._rids[r].decode()
                    if (dh ^ h).bit_count() > self.max_distance or other in self._withdrawn:
                        continue
                    if other == rid:
                        found[j] = ""
                    elif found[j] is None:
                        found[j] = other
        out: list[str | None] = []
        commits: list[tuple[str, int, int]] = []
        pos = 0
        for c, kept_before in zip(claims, kept):
            mine, pos = found[pos:pos + len(c)], pos + len(c)
            if not kept_before and "" not in mine and any(mine):
                out.append(next(f for f in mine if f))
                continue
            commits += [e for e, f in zip(c, mine) if f != ""]
            out.append(None)
        self.commit(commits)
        return out

    def release_exact(self, rids: list[str]) -> None:
        """Rows whose images will not be stored (their shard failed every attempt): their hashes are free again.
        A scan of this shard's hashes: shards seldom fail for good."""
        gone = set(rids)
        for key in [k for k, rid in self._by_sha.items() if rid in gone]:
            del self._by_sha[key]

    def withdraw(self, rids: list[str]) -> None:
        """Rows that inserted entries here, then found a near row at a later shard: probes no longer see them."""
        self._withdrawn.update(rids)

    def commit(self, entries: list[tuple[str, int, int]]) -> None:
        """Insert kept (row_id, phash, key) entries (the claimer found none of them there)."""
        self._withdrawn.difference_update({rid for rid, _, _ in entries})
        last_rid, last_idx = None, 0
        for rid, h, k in entries:
            if rid != last_rid:
                last_rid, last_idx = rid, int(self._store_rids([rid])[0])
            v = self.keys.value(h, k)
            self._delta[k].setdefault(v, []).append((h, last_idx))
            self._recent.append((k, v, h, last_idx))
            self._n_delta += 1
        self._inserted += len(entries)
        if len(self._recent) > self.RECENT:  # older inserts are checked by a whole-index probe instead
            drop = len(self._recent) - self.RECENT // 2
            self._recent, self._recent_base = self._recent[drop:], self._recent_base + drop


class Dedup:
    """The claimer's side: routes claims to the shards that own them and combines the answers.

    `shards` are DedupShard actor handles, or DedupShard objects in this process (benchmarks). Decisions: None (keeps its image) or (reason, row_id it duplicates).
    """

    def __init__(self, shards: list, exact: bool, near: bool, max_distance: int):
        self.shards, self.exact, self.near, self.max_distance = shards, exact, near, max_distance
        self.n = len(shards)
        self.keys = BandKeys(max_distance)

    def _call(self, method: str, per_shard: dict[int, list]) -> dict[int, list]:
        if isinstance(self.shards[0], DedupShard):  # in-process shards (benchmarks, tests)
            return {k: getattr(self.shards[k], method)(v) for k, v in per_shard.items() if v}
        import ray

        refs = {k: getattr(self.shards[k], method).remote(v) for k, v in per_shard.items() if v}
        return dict(zip(refs, ray.get(list(refs.values()))))

    def claim_many(self, claims: list[tuple[str, str | None, int | None]]) -> list[tuple[str, str] | None]:
        decisions: list[tuple[str, str] | None] = [None] * len(claims)
        if self.exact:
            by_shard: dict[int, list] = {}
            where = []
            for i, (rid, sha, _) in enumerate(claims):
                if sha:
                    k = int(sha[:8], 16) % self.n
                    where.append((i, k, len(by_shard.setdefault(k, []))))
                    by_shard[k].append((rid, sha))
            answers = self._call("claim_exact", by_shard)
            for i, k, j in where:
                if answers[k][j] is not None:
                    decisions[i] = ("duplicate_exact", answers[k][j])
        if not self.near:
            return decisions
        probes: dict[int, list] = {}
        where_near: dict[int, list] = {}
        for i, (rid, _, h) in enumerate(claims):
            if decisions[i] is not None or h is None:
                continue
            for b in range(len(self.keys.pairs)):
                k = _owner(self.keys.value(h, b), b, self.n)
                where_near.setdefault(i, []).append((k, len(probes.setdefault(k, []))))
                probes[k].append((rid, h, b))
        probed = self._call("probe_at", probes)
        answers = {k: a for k, (a, _) in probed.items()}
        since = {k: n for k, (_, n) in probed.items()}
        # near pairs inside this batch (claims the shards cannot know yet): one popcount over all pairs
        order = list(where_near)
        hb = np.array([claims[i][2] for i in order], np.uint64)
        close: dict[int, list[int]] = {}  # position -> earlier positions within max_distance
        for a, b in np.argwhere(np.tril(np.bitwise_count(hb[:, None] ^ hb[None, :]) <= self.max_distance, -1)).tolist():
            close.setdefault(a, []).append(b)
        kept_here: set[int] = set()  # positions in `order` kept so far
        for pos, i in enumerate(order):
            found = [answers[k][j] for k, j in where_near[i]]
            if "" not in found and any(found):
                decisions[i] = ("duplicate_near", next(f for f in found if f))
                continue
            earlier = next((p for p in close.get(pos, ()) if p in kept_here), None) if "" not in found else None
            if earlier is not None:
                decisions[i] = ("duplicate_near", claims[order[earlier]][0])
                continue
            kept_here.add(pos)  # kept before (a retry: already stored), or nothing near so far
        self._insert(claims, [order[p] for p in sorted(kept_here)], where_near, probes, answers, since, decisions)
        return decisions

    def release(self, rids: list[str]) -> None:
        """Rows of a shard that failed every attempt (none of its images is stored): their exact hashes are freed
        and their near entries no longer count, so a copy claimed later is kept (one claimed before stays a
        duplicate of it; a re-run retries the failed rows, which claim again). Called by the driver once no attempt
        of the shard is left, so a straggler's other attempt, which claims with the same row ids, cannot lose its
        claims to a failed one."""
        everywhere = {k: list(rids) for k in range(self.n)}
        if self.exact:
            self._call("release_exact", everywhere)
        if self.near:
            self._call("withdraw", everywhere)

    def _insert(self, claims, todo: list[int], where_near: dict, probes: dict, answers: dict, since: dict,
                decisions: list) -> None:
        """Insert the claims nothing near was found for, owner by owner in ascending shard order, each step one
        atomic probe-and-insert on its shard. Two near-duplicates share a band-pair key, so at the lowest shard
        owning a shared key one of two claimed at once by different tasks arrives first and the other finds it:
        exactly one is kept. A claim that finds a near row at a later shard withdraws what it inserted before."""
        inserted: dict[int, list[int]] = {}
        missing = {i: [(k, j) for k, j in where_near[i] if answers[k][j] != ""] for i in todo}  # own entries stay
        for k in sorted({k for i in todo for k, _ in missing[i]}):
            batch = [i for i in todo if decisions[i] is None and any(kk == k for kk, _ in missing[i])]
            if not batch:
                continue
            entries = [[probes[k][j] for kk, j in missing[i] if kk == k] for i in batch]
            kept = [any(answers[kk][j] == "" for kk, j in where_near[i]) for i in batch]  # by an earlier attempt
            answer = self._call("probe_insert", {k: (entries, since[k], kept)})[k]
            for i, found in zip(batch, answer):
                if found:
                    decisions[i] = ("duplicate_near", found)
                else:
                    inserted.setdefault(i, []).append(k)
        withdraw: dict[int, list[str]] = {}
        for i, shards in inserted.items():
            if decisions[i] is not None:
                for k in shards:
                    withdraw.setdefault(k, []).append(claims[i][0])
        self._call("withdraw", withdraw)


START_S = 120.0  # a dedup actor that does not run by then is replaced, once


def start_dedup(out: str, n_actors: int, exact: bool, near: bool, max_distance: int) -> Dedup:
    """Start the job's dedup actors (spread over nodes; restarted, and rebuilt from `out`'s fragments, when lost).
    One that does not start within START_S is replaced once; then SynergenError naming the cluster."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(DedupShard)

    def new(i: int):
        return actor.options(name=None, scheduling_strategy="SPREAD").remote(i, n_actors, exact, near, max_distance, out)

    shards = [new(i) for i in range(n_actors)]
    for attempt in range(2):
        late = [i for i, ok in enumerate(started(shards, START_S)) if not ok]
        if not late:
            return Dedup(shards, exact, near, max_distance)
        log.warning("%d of %d dedup actors did not start within %g s%s", len(late), n_actors, START_S,
                    ": starting them again" if attempt == 0 else "")
        for i in late:
            ray.kill(shards[i], no_restart=True)
            shards[i] = new(i)
    raise SynergenError(f"{len(late)} of {n_actors} dedup actors did not start within {START_S:g} s, twice: check the "
                        "cluster's nodes (ray status) and re-run (published shards are kept)")
