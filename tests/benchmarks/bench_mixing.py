"""Planning cost of the carried-credit sampler vs the per-batch one it replaced, at paper-scale global batches.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_mixing.py [--repeat 5]

Baseline: the previous merge (credit reset every batch), vectorised: finish = cumsum(cost) / weight, the batch takes
the smallest (numpy lexsort). Ours: `train.mixture.merge_by_credit` (WF2Q with carried credit, heaps). Same
candidates (token lengths 50..4,000), alternated, median of `--repeat`; per global batch, i.e. per step per worker.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.mixture import merge_by_credit  # noqa: E402


def per_batch_merge(costs: list[np.ndarray], weights: list[float], batch: int) -> np.ndarray:
    finish = np.concatenate([np.cumsum(c) / w for c, w in zip(costs, weights)])
    src = np.concatenate([np.full(len(c), i) for i, c in enumerate(costs)])
    k = np.concatenate([np.arange(len(c)) for c in costs])
    return src[np.lexsort((k, src, finish))[:batch]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'sources':>7} {'batch':>6} {'per-batch (ms)':>15} {'carried credit (ms)':>20} {'ratio':>6}")
    for k, batch in ((3, 8), (8, 6988), (26, 5090)):  # the demo; stage 1 gen (Table 8); stage 2 und, 26 sources
        w = rng.random(k) + 0.01
        w = list(w / w.sum())
        costs = [rng.integers(50, 4000, int(2 * wi * batch) + 8) for wi in w]
        as_lists = [c.tolist() for c in costs]
        base, ours = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            per_batch_merge(costs, w, batch)
            base.append(time.perf_counter() - t)
            t = time.perf_counter()
            merge_by_credit(as_lists, w, [0.0] * k, batch)
            ours.append(time.perf_counter() - t)
        b, o = statistics.median(base) * 1e3, statistics.median(ours) * 1e3
        print(f"{k:7d} {batch:6d} {b:15.2f} {o:20.2f} {o / b:6.1f}")


if __name__ == "__main__":
    main()
