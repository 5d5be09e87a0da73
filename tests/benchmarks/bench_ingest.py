"""Benchmark: `synergen ingest` (run_ingest on local Ray) vs img2dataset's multiprocessing distributor.

Same 2,000-row list of 256x256 JPEGs served by the local web; both keep the original size and encode jpg.
Run: unshare -n sh -c 'ip link set lo up && .venv/bin/python tests/benchmarks/bench_ingest.py [--rows 2000] [--processes 2]'
Each side is timed from its own call: img2dataset's `download` (its process pool included), our `run_ingest` after
`init_ray` (Ray's start, with the job's worker processes; on a cluster they are up before any job).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from synergen.local_ray import init_ray
    from img2dataset import download

    from synergen.demo.corpus import write_demo_corpus, write_url_list
    from pipeline.ingest import run_ingest
    from synergen.demo.localweb import LocalWeb
    from pipeline.sources import SourceManifest

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    rows = write_demo_corpus(work / "www", n=args.rows)
    web = LocalWeb(work / "www").start()
    urls = str(work / "urls.parquet")
    write_url_list(rows, web.base, urls)
    assert pq.read_metadata(urls).num_rows == args.rows

    t = time.time()
    download(url_list=urls, input_format="parquet", url_col="url", caption_col="caption", output_format="webdataset",
             output_folder=str(work / "i2d"), processes_count=args.processes, thread_count=32,
             number_sample_per_shard=args.shard_size, resize_mode="no", encode_format="jpg", encode_quality=95,
             distributor="multiprocessing", enable_wandb=False, timeout=10)
    base = time.time() - t
    base_ok = sum(pq.read_table(p).column("status").to_pylist().count("success") for p in (work / "i2d").glob("*.parquet"))

    init_ray(num_cpus=args.processes, log_to_driver=False)
    m = SourceManifest(name="bench", task="gen", url_lists=[urls], filters={"dedup_exact": False, "dedup_near": False})
    t = time.time()
    s = run_ingest(m, str(work / "ours"), shard_size=args.shard_size, allow_networks=("127.0.0.0/8",), thread_count=32)
    ours = time.time() - t
    web.stop()
    ray.shutdown()
    print(f"rows {args.rows}, processes/CPUs {args.processes}, shard size {args.shard_size}")
    print(f"img2dataset multiprocessing: {base_ok} ok in {base:.1f} s = {base_ok / base:.1f} samples/s")
    print(f"synergen ingest (Ray):       {s['ok']} ok in {ours:.1f} s = {s['ok'] / ours:.1f} samples/s "
          f"(ledger, filters, atomic publish; timed after init_ray, which starts Ray and one worker per CPU)")
    print(f"ratio synergen / img2dataset: {(s['ok'] / ours) / (base_ok / base):.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
