"""Job-wide duplicate decisions, sharded over Ray actors: the first row to claim an image keeps it.

Exact duplicates (sha256 of the downloaded bytes) are decided by the one shard that owns the hash's prefix, in
one atomic step (claim = look up, insert on a miss; the bytes stay registered to their first claimer even when
it turns out a near duplicate, so a later copy names that row and the chain leads to the keeper). Near duplicates (64-bit dHash within `max_distance` bits)
use `max_distance + 1` bands: two hashes that close agree exactly on at least one band (pigeonhole), and each
(band, value) bucket lives on one shard, where a probe is one vectorised XOR + popcount over the bucket. A near
claim probes its bands' owners, then commits to them when nothing matched; two near-duplicates claimed at the
same instant by different tasks can both be kept (never both dropped).

Claims are idempotent: a row that kept its image finds itself on a re-claim and keeps it again; a duplicate
finds the same keeper. Every shard rebuilds its part of the index from the published ledger fragments when it
starts, so an actor restarted on another node (its node lost) continues with what is durable.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

RID_DTYPE = "S24"  # claimers' row ids are "<20 hex>-0" (later occurrences of a URL are never downloaded)


def _owner(value: int, band: int, n_shards: int) -> int:
    """The shard holding bucket (band, value): a multiplicative hash (uint64 arithmetic, as in `add_many`)."""
    return (((value * 0x9E3779B1 + band * 0x85EBCA77) & 0xFFFFFFFFFFFFFFFF) >> 7) % n_shards


class DedupShard:
    """One shard of the index: the exact hashes and near-hash buckets it owns (see the module docstring)."""

    def __init__(self, index: int, n_shards: int, exact: bool = True, near: bool = True, max_distance: int = 4,
                 rebuild_from: str | None = None):
        self.index, self.n_shards = index, n_shards
        self.exact, self.near, self.max_distance = exact, near, max_distance
        nb = max_distance + 1
        self.bands = [(i * 64 // nb, (i + 1) * 64 // nb) for i in range(nb)]
        self._by_sha: dict[bytes, str] = {}
        self._buckets: dict[tuple[int, int], list] = {}  # (band, value) -> [hashes uint64[cap], rids S32[cap], n]
        if rebuild_from is not None:
            self._rebuild(rebuild_from)

    def _rebuild(self, out: str) -> None:
        import pyarrow.compute as pc

        from pipeline import ledger

        n = 0
        for table in ledger.iter_fragments(out, ["row_id", "state", "sha256", "phash"]):
            kept = table.filter(pc.equal(table["state"], "ok"))
            n += self.add_many(kept["row_id"].to_pylist(), kept["sha256"].to_pylist(), kept["phash"].to_pylist())
        log.info("dedup shard %d/%d rebuilt %d entries from %s", self.index, self.n_shards, n, out)

    def add_many(self, rids: list[str], shas: list[str | None], phashes: list[int | None]) -> int:
        """Register kept images in bulk (vectorised per band); returns the entries this shard took."""
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
        r = np.array([rids[i] for i in have], RID_DTYPE)
        for b, (lo, hi) in enumerate(self.bands):
            v = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
            mine = np.flatnonzero(((v * np.uint64(0x9E3779B1) + np.uint64(b * 0x85EBCA77)) >> np.uint64(7)) % np.uint64(self.n_shards) == self.index)
            order = mine[np.argsort(v[mine], kind="stable")]
            vs = v[order]
            cuts = np.flatnonzero(np.r_[True, vs[1:] != vs[:-1]]) if len(vs) else np.zeros(0, np.int64)
            for start, end in zip(cuts.tolist(), [*cuts[1:].tolist(), len(vs)]):
                idx = order[start:end]
                key = (b, int(vs[start]))
                old = self._buckets.get(key)
                hs, rs = (h[idx], r[idx]) if old is None else (np.r_[old[0][:old[2]], h[idx]], np.r_[old[1][:old[2]], r[idx]])
                self._buckets[key] = [hs, rs, len(hs)]
            added += len(order)
        return added

    def band_values(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def owns_sha(self, sha: str) -> bool:
        return int(sha[:8], 16) % self.n_shards == self.index

    def _insert(self, band: int, value: int, h: int, rid: str) -> None:
        bucket = self._buckets.get((band, value))
        if bucket is None:
            bucket = self._buckets[(band, value)] = [np.zeros(4, np.uint64), np.zeros(4, RID_DTYPE), 0]
        hs, rids, n = bucket
        if n == len(hs):
            bucket[0] = hs = np.concatenate([hs, np.zeros(n, np.uint64)])
            bucket[1] = rids = np.concatenate([rids, np.zeros(n, RID_DTYPE)])
        hs[n], rids[n] = h, rid.encode()
        bucket[2] = n + 1

    def claim_exact(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """For (row_id, sha256) pairs this shard owns: the row that kept that image first, None for the claimer itself."""
        out = []
        for rid, sha in claims:
            first = self._by_sha.setdefault(bytes.fromhex(sha), rid)
            out.append(None if first == rid else first)
        return out

    def probe(self, probes: list[tuple[str, int, int]]) -> list[str | None]:
        """For (row_id, phash, band): a kept row within max_distance in that band's bucket, "" when the claimer
        itself is there (it kept its image before), None when nothing matches. One XOR + popcount over every
        candidate of the batch."""
        out: list[str | None] = [None] * len(probes)
        hs, rids, lens, owner, query = [], [], [], [], []
        for j, (_, h, band) in enumerate(probes):
            lo, hi = self.bands[band]
            bucket = self._buckets.get((band, (h >> lo) & ((1 << (hi - lo)) - 1)))
            if bucket is not None:
                n = bucket[2]
                hs.append(bucket[0][:n])
                rids.append(bucket[1][:n])
                lens.append(n)
                owner.append(j)
                query.append(h)
        if not hs:
            return out
        q = np.repeat(np.array(query, np.uint64), lens)
        hit = np.flatnonzero(np.bitwise_count(np.concatenate(hs) ^ q) <= self.max_distance)
        found_rids, found_owner = np.concatenate(rids)[hit], np.repeat(np.array(owner), lens)[hit]
        for rid, j in zip(found_rids.tolist(), found_owner.tolist()):
            mine = probes[j][0].encode()
            if rid == mine:
                out[j] = ""
            elif out[j] is None:
                out[j] = rid.decode()
        return out

    def commit(self, entries: list[tuple[str, int, int]]) -> None:
        """Insert kept (row_id, phash, band) entries into their buckets (the claimer found none of them there)."""
        for rid, h, band in entries:
            lo, hi = self.bands[band]
            self._insert(band, (h >> lo) & ((1 << (hi - lo)) - 1), h, rid)

    def size(self) -> int:
        return len(self._by_sha) + sum(b[2] for b in self._buckets.values())


class Dedup:
    """The claimer's side: routes claims to the shards that own them and combines the answers.

    `shards` are DedupShard actor handles, or DedupShard objects in this process (benchmarks). Decisions: None (keeps its image) or (reason, row_id it duplicates).
    """

    def __init__(self, shards: list, exact: bool, near: bool, max_distance: int):
        self.shards, self.exact, self.near, self.max_distance = shards, exact, near, max_distance
        self.n = len(shards)
        nb = max_distance + 1
        self.bands = [(i * 64 // nb, (i + 1) * 64 // nb) for i in range(nb)]

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
            for b, (lo, hi) in enumerate(self.bands):
                k = _owner((h >> lo) & ((1 << (hi - lo)) - 1), b, self.n)
                where_near.setdefault(i, []).append((k, len(probes.setdefault(k, []))))
                probes[k].append((rid, h, b))
        answers = self._call("probe", probes)
        commits: dict[int, list] = {}
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
            kept_here.add(pos)  # kept before (a retry: already stored), or nothing near: keep
            if "" not in found:
                for k, j in where_near[i]:
                    commits.setdefault(k, []).append(probes[k][j])
        self._call("commit", commits)
        return decisions


def start_dedup(out: str, n_actors: int, exact: bool, near: bool, max_distance: int) -> Dedup:
    """Start the job's dedup actors (spread over nodes; restarted, and rebuilt from `out`'s fragments, when lost)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(DedupShard)
    shards = [actor.options(name=None, scheduling_strategy="SPREAD").remote(i, n_actors, exact, near, max_distance, out)
              for i in range(n_actors)]
    return Dedup(shards, exact, near, max_distance)
