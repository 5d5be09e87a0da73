"""The carried-credit merge as first written (one pick at a time, every quantity accumulated as it goes): the test
oracle and the benchmark baseline of `train.mixture.merge_by_credit`, which must pick exactly the same samples."""

from __future__ import annotations

import heapq

import numpy as np


def reference_merge(costs: list[list[int]], weights: list[float], credits: list[float], batch: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`train.mixture.merge_by_credit`, by the same rule, with running sums and two heaps updated per pick."""
    n = len(costs)
    nxt = [0] * n
    own = [0.0] * n  # drawn by each source in this batch
    drawn = 0.0  # drawn by all in this batch
    eps = 1e-9 * max(1.0, max((max(c) for c in costs if c), default=1))
    # In virtual time (what the batch has drawn), source i is owed something from start = (own - credit) / weight on,
    # and its next sample finishes at (own + cost - credit) / weight; both move only when i is served. Sources
    # wait in `later` (by start) until owed, then in `ready` (by finish, then list order): O(log n) per pick.
    later = [((own[i] - credits[i] - eps) / weights[i], i) for i in range(n) if costs[i]]
    ready: list[tuple[float, int]] = []
    heapq.heapify(later)
    offset = np.concatenate([[0], np.cumsum([len(c) for c in costs])]).tolist()
    out, rows = [], []
    for _ in range(batch):
        while later and later[0][0] <= drawn:
            _, i = heapq.heappop(later)
            heapq.heappush(ready, ((own[i] + costs[i][nxt[i]] - credits[i]) / weights[i], i))
        if ready:
            _, i = heapq.heappop(ready)
        elif later:  # none owed (credits of sources out of the mixture do not sum to 0): the one owed soonest
            _, i = heapq.heappop(later)
        else:
            break
        c = costs[i][nxt[i]]
        own[i] += c
        drawn += c
        rows.append(offset[i] + nxt[i])
        nxt[i] += 1
        out.append(i)
        if nxt[i] < len(costs[i]):
            heapq.heappush(later, ((own[i] - credits[i] - eps) / weights[i], i))
    return np.array(out, np.int64), np.array(rows, np.int64)

