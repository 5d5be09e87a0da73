"""Planning cost of the carried-credit sampler vs what came before, at paper-scale global batches.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_mixing.py [--repeat 5]

Per-batch: the merge before carried credit (credit reset every batch), vectorised: finish = cumsum(cost) / weight,
the batch takes the smallest (numpy lexsort). Pick-by-pick: the carried-credit merge as first written
(`tests/mixing_reference.py`, every quantity accumulated per pick). Ours: `train.mixture.merge_by_credit`, the same
picks with releases and finishes precomputed by numpy prefix sums. Same candidates (unit costs, or token lengths
50..4,000) and carried credits, alternated, median of `--repeat`; per global batch, i.e. per step per worker.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mixing_reference import reference_merge  # noqa: E402
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
    print(f"{'sources':>7} {'batch':>6} {'unit':>7} {'per-batch (ms)':>15} {'pick-by-pick (ms)':>18} {'ours (ms)':>10} "
          f"{'pick-by-pick / ours':>20}")
    for k, batch in ((3, 8), (8, 6988), (26, 5090)):  # the demo; stage 1 gen (Table 8); stage 2 und, 26 sources
        for unit in ("samples", "tokens"):
            w = rng.random(k) + 0.01
            w = list(w / w.sum())
            n = [int(2 * wi * batch) + 8 for wi in w]
            costs = [rng.integers(50, 4000, m) if unit == "tokens" else np.ones(m, np.int64) for m in n]
            credits = list(rng.normal(0, 1000 if unit == "tokens" else 0.5, k))
            as_lists = [c.tolist() for c in costs]
            assert all(np.array_equal(a, b) for a, b in zip(merge_by_credit(costs, w, credits, batch),
                                                            reference_merge(as_lists, w, credits, batch)))
            times: dict[str, list[float]] = {"base": [], "ref": [], "ours": []}
            for _ in range(args.repeat):
                for name, fn in (("base", lambda: per_batch_merge(costs, w, batch)),
                                 ("ref", lambda: reference_merge(as_lists, w, credits, batch)),
                                 ("ours", lambda: merge_by_credit(costs, w, credits, batch))):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            b, r, o = (statistics.median(times[x]) * 1e3 for x in ("base", "ref", "ours"))
            print(f"{k:7d} {batch:6d} {unit:>7} {b:15.2f} {r:18.2f} {o:10.2f} {r / o:20.2f}")


if __name__ == "__main__":
    main()
