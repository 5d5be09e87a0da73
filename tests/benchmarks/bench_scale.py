"""Benchmark: does ingest's driver stay flat as the URL list grows? (issue 11)

Four parts, each printing a table:
- `e2e`: `run_ingest` on N rows whose URLs are all refused at once on loopback (as the issue measured; so the cost
  is the pipeline's, not the network's): peak RSS of the driver process and of the job's whole process tree (driver +
  Ray's gcs/raylet/workers), planning time, job time per row, ledger fragment bytes and write time per shard,
  compaction time. `--baseline-root OTHER_CHECKOUT` runs the same child with another checkout's code (side by side).
- `plan`: the streaming planner alone on N rows, its row index in the driver (0 actors) or over K actors: time,
  time per row, peak RSS of the driver and of its process tree.
- `dedup`: cost per claim (exact + near, random 64-bit dHashes, batches of 100 as a shard task sends them) vs the
  index size, for one in-process `DedupShard` (what one actor does) and the pre-issue-11 single `DedupIndex`.
- `tokenize`: the tokenize driver's peak RSS and CPU vs number of shards and samples (runs
  bench_tokenize_scale.py: the driver-assembles baseline and ours, alternating).

Run (the machine is shared: big sizes in the background):
  PYTHONPATH=$PWD python tests/benchmarks/bench_scale.py e2e --rows 10000 100000 1000000
  PYTHONPATH=$PWD python tests/benchmarks/bench_scale.py plan --rows 10000 1000000 10000000
  PYTHONPATH=$PWD python tests/benchmarks/bench_scale.py dedup --sizes 10000 100000 1000000 10000000
  PYTHONPATH=$PWD python tests/benchmarks/bench_scale.py tokenize --sizes 8x4,64x4,8x64
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[2]
if not (len(sys.argv) > 1 and sys.argv[1].startswith("child-")):  # children import the code PYTHONPATH names
    sys.path.insert(0, str(REPO))


def write_list(path: Path, n: int, base: str) -> None:
    """n distinct URLs under `base`, in row groups of 100k rows (a reader holds one row group at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 100_000):
            idx = range(start, min(n, start + 100_000))
            w.write_table(pa.table({"url": [f"{base}/img/{i}.jpg" for i in idx],
                                    "caption": [f"caption {i}" for i in idx]}, schema=schema))


class PeakRss:
    """Samples a process and its descendants every 0.2 s: peak RSS of the process and of the whole tree."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak_self, self.peak_tree = psutil.Process(pid), 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                me = self.proc.memory_info().rss
                tree = me
                for c in self.proc.children(recursive=True):
                    try:
                        tree += c.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak_self, self.peak_tree = max(self.peak_self, me), max(self.peak_tree, tree)
            time.sleep(0.2)

    def stop(self):
        self._stop.set()
        self._t.join()


def run_child(args: list[str], root: str) -> tuple[dict | None, int, PeakRss]:
    """This script as a child (`child-...` args) with `root`'s code: its RESULT dict (None if it failed), its exit
    code, and the peak RSS of it and its process tree."""
    p = subprocess.Popen([sys.executable, __file__, *args], env={**os.environ, "PYTHONPATH": root},
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root)
    rss = PeakRss(p.pid)
    stdout, _ = p.communicate()
    rss.stop()
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    return (json.loads(line[7:]) if line else None), p.returncode, rss


def child_e2e(lst: str, out: str, shard_size: int) -> None:
    from pipeline.ingest import IngestOptions, run_ingest
    from pipeline.sources import SourceManifest

    m = SourceManifest(name="scale", task="gen", url_lists=[lst], filters={"dedup_exact": False, "dedup_near": False})
    t = time.time()
    s = run_ingest(m, out, shard_size=shard_size, allow_networks=("127.0.0.0/8",), timeout=2, thread_count=64,
                   **({"row_index_actors": 1} if "row_index_actors" in IngestOptions.model_fields else {}))
    s["wall_s"] = time.time() - t
    s.pop("shards", None)
    print("RESULT " + json.dumps(s))


def run_e2e(args) -> None:
    import socket

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    with socket.socket() as sock:  # a loopback port nobody listens on: every connect is refused at once
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    roots = [("ours", str(REPO))] + ([("baseline", args.baseline_root)] if args.baseline_root else [])
    print(f"e2e: every URL refused at once on loopback, shard size {args.shard_size}; loaded shared 2-core machine")
    print(f"{'code':9} {'rows':>9} {'driver MiB':>10} {'tree MiB':>9} {'plan s':>7} {'wall s':>7} {'us/row':>7} "
          f"{'frag B/shard':>12} {'frag ms/shard':>13} {'compact s':>9}")
    try:
        for n in args.rows:
            lst = work / f"l{n}.parquet"
            write_list(lst, n, base)
            for name, root in roots:  # alternating: ours then the baseline, per size
                out = work / f"out-{name}-{n}"
                s, rc, rss = run_child(["child-e2e", str(lst), str(out), str(args.shard_size)], root)
                if s is None:
                    print(f"{name:9} {n:>9} failed (exit {rc})")
                    continue
                frags = sorted((out / "_fragments").glob("*.parquet")) if (out / "_fragments").exists() else []
                frag_b = sum(f.stat().st_size for f in frags) / max(1, len(frags))
                print(f"{name:9} {n:>9} {rss.peak_self / 2**20:>10.0f} {rss.peak_tree / 2**20:>9.0f} "
                      f"{s.get('planning_s', float('nan')):>7.1f} {s['wall_s']:>7.1f} {1e6 * s['wall_s'] / n:>7.0f} "
                      f"{frag_b:>12.0f} {s.get('fragment_write_ms', float('nan')):>13.1f} {s.get('compact_s', float('nan')):>9.1f}",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
            lst.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child_plan(lst: str, out: str, index_actors: int) -> None:
    from pipeline import ledger as L
    from pipeline.ingest import IngestOptions, Planner
    from pipeline.sources import SourceManifest

    m = SourceManifest(name="scale", task="gen", url_lists=[lst])
    os.makedirs(f"{out}/_inputs", exist_ok=True)
    planner = Planner(m, out, IngestOptions(shard_size=1000), L.scan(out))
    if index_actors:  # the job's partitioned index, on a local Ray (the driver routes batches only)
        from pipeline.row_index import start_row_index
        from synergen.local_ray import init_ray

        init_ray(num_cpus=2, log_to_driver=False)
        planner.index = start_row_index(out, index_actors)
    t = time.time()
    shards = sum(1 for _ in planner)
    print("RESULT " + json.dumps({"rows": planner.rows_in, "shards": shards, "s": time.time() - t}), flush=True)


def run_plan(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    print("plan: the streaming planner (reads the list, writes every shard's input file), its row index in-process "
          "(index actors 0) or partitioned over actors; peak RSS of the driver and of its process tree (Ray's "
          "processes and the index actors); loaded shared machine")
    print(f"{'rows':>9} {'actors':>6} {'shards':>7} {'plan s':>7} {'us/row':>7} {'driver MiB':>10} {'tree MiB':>9}")
    try:
        for n in args.rows:
            lst = work / f"l{n}.parquet"
            write_list(lst, n, "http://127.0.0.1:9")
            for k in args.index_actors:
                out = work / f"out{n}-{k}"
                s, rc, rss = run_child(["child-plan", str(lst), str(out), str(k)], str(REPO))
                if s is None:
                    print(f"{n:>9} {k:>6} failed (exit {rc})")
                    continue
                print(f"{n:>9} {k:>6} {s['shards']:>7} {s['s']:>7.1f} {1e6 * s['s'] / n:>7.2f} "
                      f"{rss.peak_self / 2**20:>10.0f} {rss.peak_tree / 2**20:>9.0f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            lst.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class OldDedupIndex:
    """The pre-issue-11 index (one actor, Python scan of a band bucket), kept here as the baseline."""

    def __init__(self, max_distance: int = 4):
        self.max_distance = max_distance
        self._by_sha, self._hashes, self._decided = {}, {}, {}
        nb = max_distance + 1
        self._bands = [(i * 64 // nb, (i + 1) * 64 // nb) for i in range(nb)]
        self._buckets = collections.defaultdict(list)

    def _band_keys(self, h):
        for i, (lo, hi) in enumerate(self._bands):
            yield i, (h >> lo) & ((1 << (hi - lo)) - 1)

    def add_kept(self, row_id, sha256, phash):
        self._decided[row_id] = None
        self._by_sha.setdefault(sha256, row_id)
        self._hashes[row_id] = phash
        for band in self._band_keys(phash):
            self._buckets[band].append(row_id)

    def claim(self, row_id, sha256, phash):
        if row_id in self._decided:
            return self._decided[row_id]
        decision = None
        if sha256 in self._by_sha:
            decision = ("duplicate_exact", self._by_sha[sha256])
        else:
            for band in self._band_keys(phash):
                for other in self._buckets.get(band, ()):
                    if bin(self._hashes[other] ^ phash).count("1") <= self.max_distance:
                        decision = ("duplicate_near", other)
                        break
                if decision:
                    break
        if decision is None:
            self.add_kept(row_id, sha256, phash)
        self._decided[row_id] = decision
        return decision


def run_dedup(args) -> None:
    import numpy as np

    from pipeline.dedup import Dedup, DedupShard

    rng = np.random.default_rng(0)
    print("dedup: CPU us per claim (exact + near, d=4, random dHashes) vs index size; one process; loaded shared machine")
    print(f"{'index size':>10} {'ours us/claim':>13} {'old us/claim':>12} {'ratio old/ours':>14} {'ours fill s':>11}")
    for n in args.sizes:
        hashes = rng.integers(0, 2**63, n + args.claims, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        shas = lambda lo, hi: [f"{i:064x}" for i in range(lo, hi)]  # noqa: E731 - made per chunk: memory
        rids = lambda lo, hi: [f"{i:020x}-0" for i in range(lo, hi)]  # noqa: E731
        shard = DedupShard(0, 1, max_distance=4)
        t = time.time()
        for lo in range(0, n, 1_000_000):  # as an actor rebuilding from fragments does, fragment by fragment
            hi = min(n, lo + 1_000_000)
            shard.add_many(rids(lo, hi), shas(lo, hi), hashes[lo:hi].tolist())
        shard.merge()
        fill = time.time() - t
        d = Dedup([shard], exact=True, near=True, max_distance=4)
        claims = list(zip(rids(n, n + args.claims), shas(n, n + args.claims), hashes[n:].tolist()))
        warm = len(claims) // 10  # untimed: the first claims pay one-off growth (the row-id array doubles once)
        for s in range(0, warm, 100):
            d.claim_many(claims[s:s + 100])
        t = time.process_time()  # CPU time: steadier than wall time on the shared machine
        for s in range(warm, len(claims), 100):
            d.claim_many(claims[s:s + 100])
        ours = 1e6 * (time.process_time() - t) / (len(claims) - warm)
        del shard, d
        old = float("nan")
        if n <= args.old_max:
            idx = OldDedupIndex(4)
            for rid, sha, h in zip(rids(0, n), shas(0, n), hashes[:n].tolist()):
                idx.add_kept(rid, sha, h)
            t = time.process_time()
            for c in claims:
                idx.claim(*c)
            old = 1e6 * (time.process_time() - t) / len(claims)
            del idx
        print(f"{n:>10} {ours:>13.1f} {old:>12.1f} {old / ours:>14.1f} {fill:>11.1f}", flush=True)


def run_tokenize(args) -> None:
    """Tokenize driver RSS and CPU vs number of shards: the table of bench_tokenize_scale.py (baseline side by side)."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_tokenize_scale.py")), "--sizes", args.sizes],
                   check=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child-e2e":
        return child_e2e(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "child-plan":
        return child_plan(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="part", required=True)
    e = sub.add_parser("e2e")
    e.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    e.add_argument("--shard-size", type=int, default=1000)
    e.add_argument("--baseline-root", default=None, help="another checkout (e.g. of an older commit) run side by side")
    p = sub.add_parser("plan")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--index-actors", type=int, nargs="+", default=[0, 2],
                   help="row-index partitions as actors (0: one in the driver, the pre-partitioning layout)")
    d = sub.add_parser("dedup")
    d.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    d.add_argument("--claims", type=int, default=2000)
    d.add_argument("--old-max", type=int, default=1_000_000, help="largest size run with the old index")
    t = sub.add_parser("tokenize")
    t.add_argument("--sizes", default="8x4,64x4,8x64", help="SHARDSxSAMPLES_PER_SHARD, comma-separated")
    args = ap.parse_args()
    {"e2e": run_e2e, "plan": run_plan, "dedup": run_dedup, "tokenize": run_tokenize}[args.part](args)


if __name__ == "__main__":
    main()
