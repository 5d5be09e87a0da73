"""Tokenize driver cost vs job size: peak RSS and CPU seconds of the driver process (the one calling
`run_tokenize`, imports and Ray's start excluded) against the number of shards and samples, for the driver-assembles baseline (the
`ShardAssembler` version of pipeline/tokenization.py at commit 19720ca: every code passes through the driver) and
ours (shard tasks publish; the driver gets per-shard stats). Tiny demo VQ, 64-px generation images, local Ray.

Each measurement runs in a fresh process (peak RSS is per process), baseline and ours alternating.
Run: .venv/bin/python tests/benchmarks/bench_tokenize_scale.py [--sizes 8x4,64x4,8x64] [--impls baseline,ours]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE_COMMIT = "19720ca"  # the last commit whose driver assembled every token shard


def one(impl: str, shards: int, per_shard: int, tmp: str) -> dict:
    """Child process: write the raw shards, run the job, report this process's (the driver's) figures."""
    import logging

    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from tokenize_helpers import REPO_TOKENIZER, REPO_VQ, write_raw_shards

    if impl == "baseline":
        import tokenize_baseline as tk  # noqa: F401 (written by main() into tmp, on PYTHONPATH)
    else:
        import pipeline.tokenization as tk
    logging.basicConfig(level=logging.WARNING)
    raw, out = f"{tmp}/raw_{shards}x{per_shard}", f"{tmp}/tok_{impl}_{shards}x{per_shard}"
    if not Path(raw).exists():
        write_raw_shards(raw, shards, per_shard, seed=1, size=96, failed_rows=0)
    from model.vq import VQTokenizer
    from pipeline.text_tokenizer import load_text_tokenizer
    from synergen.local_ray import init_ray

    # Imports (torch, transformers) and Ray's start are one-off costs: warmed here, outside the figures.
    VQTokenizer.from_pretrained(str(REPO / REPO_VQ))
    load_text_tokenizer(str(REPO / REPO_TOKENIZER))
    init_ray(num_cpus=2, log_to_driver=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    cfg = tk.TokenizeConfig(raw=raw, out=out, task="gen", vq=str(REPO / REPO_VQ), tokenizer=str(REPO / REPO_TOKENIZER),
                            fold="2x4", image_size=64, batch_size=16, psnr_images=0,
                            quality=tk.QualityThresholds(min_distinct_codes=0, min_entropy_bits=0.0, min_psnr_db=-1e9, max_flagged_share=1.0))
    s = tk.run_tokenize(cfg)
    assert s["tokenized"] == shards * per_shard, s
    return {"impl": impl, "shards": shards, "samples": shards * per_shard, "wall_s": s["wall_s"],
            "driver_cpu_s": time.process_time() - cpu0,
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_job_mib": rss0 / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8x4,64x4,8x64", help="SHARDSxSAMPLES_PER_SHARD, comma-separated")
    ap.add_argument("--impls", default="baseline,ours")
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "SHARDS", "PER_SHARD", "TMP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, shards, per_shard, tmp = args.one
        print(json.dumps(one(impl, int(shards), int(per_shard), tmp)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        baseline = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:pipeline/tokenization.py"],
                                  check=True, capture_output=True, text=True).stdout
        Path(tmp, "tokenize_baseline.py").write_text(baseline)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), tmp, os.environ.get("PYTHONPATH", "")])}
        print("driver = the process calling run_tokenize; CPU = its user+sys seconds during the job; local Ray, 2 CPUs, "
              "tiny demo VQ, 64-px gen")
        print(f"{'impl':>9}{'shards':>8}{'samples':>9}{'driver CPU s':>14}{'CPU ms/shard':>14}{'CPU ms/sample':>15}"
              f"{'peak RSS MiB':>14}{'RSS growth MiB':>16}{'wall s':>8}")
        for size in args.sizes.split(","):
            shards, per_shard = (int(x) for x in size.split("x"))
            for impl in args.impls.split(","):
                res = subprocess.run([sys.executable, __file__, "--one", impl, str(shards), str(per_shard), tmp], env=env,
                                     capture_output=True, text=True)
                if res.returncode:
                    sys.exit(f"{impl} {size} failed:\n{res.stderr[-3000:]}")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{impl:>9}{r['shards']:>8}{r['samples']:>9}{r['driver_cpu_s']:>14.2f}"
                      f"{1000 * r['driver_cpu_s'] / r['shards']:>14.1f}{1000 * r['driver_cpu_s'] / r['samples']:>15.2f}"
                      f"{r['driver_peak_rss_mib']:>14.0f}{r['driver_peak_rss_mib'] - r['rss_before_job_mib']:>16.0f}"
                      f"{r['wall_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
