"""The order of a source's samples in an epoch: a whole-source shuffle, a pure function of (seed, source, epoch).

Position p of epoch e is sample `perm(p)` of the source (its index in catalog order: shard after shard), where
`perm` is a keyed bijection of [0, n): a 4-round Feistel network over the smallest even number of bits that
holds n, with cycle walking for values >= n. Every sample appears once per epoch, any position maps to its
sample in O(1) (vectorised over many positions), and nothing is materialised per sample, so resuming costs
nothing and a global batch is a random sample of the whole source, not slices of a few shards.
"""

from __future__ import annotations

import hashlib

import numpy as np

ORDER = "feistel-source-v1"  # recorded in the loader state; another value there means another order (checked on resume)
_ROUNDS = 4
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping multiplication is intended)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


class SourceOrder:
    """Position in epoch -> sample index of the source (catalog order), a pure function of (seed, source, epoch)."""

    def __init__(self, name: str, size: int, seed: int):
        self.name = name
        self.size = size
        self.seed = seed
        bits = max(2, int(size - 1).bit_length() if size > 1 else 1)
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys: dict[int, list[np.uint64]] = {}

    def _round_keys(self, epoch: int) -> list[np.uint64]:
        if epoch not in self._keys:
            d = hashlib.blake2b(repr((self.seed, self.name, epoch)).encode(), digest_size=8 * _ROUNDS).digest()
            self._keys = {epoch: [np.uint64(int.from_bytes(d[8 * i:8 * i + 8], "little")) for i in range(_ROUNDS)]}
        return self._keys[epoch]

    def _feistel(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << half) | right

    def samples(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        """Sample index (int64) of every position in `pos` (each in [0, size), else ValueError: cycle walking from a
        value outside the domain would never end)."""
        pos = np.asarray(pos)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.size):
            raise ValueError(f"source {self.name}: positions {int(pos.min())}..{int(pos.max())} are not all in "
                             f"[0, {self.size})")
        keys = self._round_keys(epoch)
        out = self._feistel(pos.astype(np.uint64), keys)
        n = np.uint64(self.size)
        walk = np.flatnonzero(out >= n)
        while walk.size:  # cycle walking: the domain is < 4n, so a few rounds at most on average
            out[walk] = self._feistel(out[walk], keys)
            walk = walk[out[walk] >= n]
        return out.astype(np.int64)
