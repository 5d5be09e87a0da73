"""Benchmark: the streaming mixture loader against a plain `webdataset.WebDataset` read of the same tars.

Run (S3 is moto's server on loopback, so run it in a network namespace):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python tests/benchmarks/bench_data.py --shards 32 --repeat 3'

Writes token shards (Emu3-size samples: one 512px image = 4,096 codes folded 2x8 into 256 positions,
~20 caption tokens) to a temp folder, then measures in a fresh process each:
  - webdataset: WebDataset(tars).map(decode_token_sample), one pass (the baseline: reading only);
  - synergen, 0, 2 and 4 workers: every feature on (per-sample xxh3 check, whole-source shuffle,
    token-weighted mixture of two sources, CFG drop, sequence building, token-balanced rank split,
    packing into 4,096 slots);
  - synergen, 2 ranks x 2 workers (the ranks simulated one after the other in one process).
Per worker: samples/s (wall, steady state after the first item), samples per CPU-second of that worker
(its cost, what the machine's other load cannot inflate much), decodes per sample it yields (1.00:
a worker reads only its own samples, whatever the number of ranks and workers) and steps it plans per step
it builds (1.00: a worker plans only its own steps, `train.dataset.PlanRelay`). Each configuration runs
`--repeat` times, interleaved, and the best run is kept (the CPUs are shared with other work). Also peak
RSS, time to first batch, and resume time (load state + first batch) at several positions.
The machine's share: 3 and 5 in-process readers at once (as many busy processes as 2 and 4 workers with
their main process), so the workers' cost per CPU-second is also compared with the in-process path on an
equally busy machine (on 2 cores, 4-5 busy processes cost each ~15% more CPU per sample: caches, switches).
Then, with the shards on S3 (moto): bytes each simulated node reads in one epoch of one source, for 1, 2
and 4 nodes (each node its own cache, one rank each), against the goal of 1/nodes of the dataset plus the
indices; and shuffle quality: the rank correlation of a sample's position in the catalog (the URL-list
order the shards were ingested in) with its position in the epoch, and the shards one global batch draws
from against a uniform random sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GROUPS, FOLD_SIZE, CAPTION = 256, 16, 20


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from model.special_tokens import ALL_SPECIAL_TOKENS, PROMPT_GEN, PROMPT_UND, PROMPT_UNCOND

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([PROMPT_UND, PROMPT_GEN, PROMPT_UNCOND, "a red circle on the left"],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                             "additional_special_tokens": [t for t in ALL_SPECIAL_TOKENS if t not in ("<s>", "</s>", "<pad>")]})
    return fast


def write_corpus(root: str, shards: int, per_shard: int) -> None:
    import numpy as np

    from pipeline.token_shards import TokenSample, TokenShardWriter
    from pipeline.catalog import vocab_hash, write_catalog

    vh = vocab_hash(tokenizer())
    rng = np.random.default_rng(0)
    for source in ("src_a", "src_b"):
        rows = []
        for s in range(shards // 2):
            path = f"{source}-{s:05d}.tar"
            with TokenShardWriter(f"{root}/{source}/{path}") as w:
                for i in range(per_shard):
                    w.write(TokenSample(f"{source}-{s:04d}-{i:05d}",
                                        rng.integers(0, 32768, (1, GROUPS, FOLD_SIZE), dtype=np.uint16),
                                        rng.integers(0, 100, int(rng.integers(CAPTION // 2, CAPTION * 2)), dtype=np.int32),
                                        {"source": source, "task": "gen", "tiles": [1, 1], "thumbnail": False,
                                         "grid": [32, 128], "fold": [2, 8]}))
                pub = w.publish()
            rows.append({"path": path, "source": source, "task": "gen", "samples": w.n_samples, "image_tokens": w.n_image_tokens,
                         "codes": w.n_codes, "text_tokens": w.n_text_tokens, **pub, "vq_model": "emu3", "codebook_size": 32768,
                         "fold": "2x8", "text_tokenizer": "bench-bpe", "vocab_hash": vh})
        write_catalog(f"{root}/{source}", rows)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_webdataset(root: str) -> dict:
    import glob

    import webdataset as wds

    from pipeline.token_shards import decode_token_sample

    urls = sorted(glob.glob(f"{root}/*/*.tar"))
    t0 = time.perf_counter()
    n = tokens = 0
    first = cpu0 = None
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(lambda s: decode_token_sample(s["sgt"], s["__key__"])):
        n += 1
        tokens += s.n_image_tokens + int(s.text_ids.size)
        if first is None:
            first, cpu0 = time.perf_counter() - t0, time.process_time()
            n = tokens = 0  # steady-state rate: count what comes after the first item
    dt = time.perf_counter() - t0 - first
    return {"samples": n, "tokens": tokens, "seconds": dt, "cpu": {"0": [n, time.process_time() - cpu0, n]}, "first": first,
            "workers": 1, "rss_mib": peak_rss_mib()}


def loader(root: str, workers: int, max_steps: int, global_batch: int, tok, rank: int = 0, world: int = 1,
           sources: tuple[str, ...] = ("src_a", "src_b"), cache_dir: str = ""):
    from model.folding import Fold
    from pipeline.catalog import vocab_hash
    from train.data import LoaderConfig, ModelDataSpec, StreamingLoader, StreamingMixture
    from train.mixture import MixtureManifest

    m = MixtureManifest.model_validate({"name": "bench", "data_root": root, "seq_len": 4096, "tasks": {"gen": {
        "global_batch": global_batch, "unit": "tokens",
        "sources": {s: {"catalogs": [s], "weight": 2 if s == "src_a" else 1} for s in sources}}}})
    ds = StreamingMixture(m, ModelDataSpec(Fold(2, 8), 32768, vocab_hash(tok)), tok,
                          LoaderConfig(seed=1, max_steps=max_steps, rank=rank, world_size=world,
                                       cache_dir=cache_dir or os.path.join(root, "_cache")))
    return StreamingLoader(ds, num_workers=workers, prefetch_factor=4 if workers else None)


def start_moto() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, with a bucket; (process, endpoint)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    return proc, endpoint


def run_s3_bytes(root: str, global_batch: int) -> dict:
    """Bytes each simulated node reads from S3 in one epoch of src_a (1 rank per node, its own cache), for 1, 2, 4 nodes."""
    import fsspec

    proc, _ = start_moto()
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(f"{root}/src_a", "bench/src_a", recursive=True)
        tars = sum(fs.size(p) for p in fs.glob("bench/src_a/*.tar"))
        indices = sum(fs.size(p) for p in fs.glob("bench/src_a/*.idx.npy"))
        tok = tokenizer()
        out = {"dataset": tars, "indices": indices, "nodes": {}}
        with tempfile.TemporaryDirectory() as caches:
            for nodes in (1, 2, 4):
                per_node = []
                for node in range(nodes):
                    ld = loader("s3://bench", 0, None, global_batch, tok, node, nodes, ("src_a",), f"{caches}/{nodes}-{node}")
                    size = ld.dataset.sources["src_a"].size.samples
                    ld.dataset.config.max_steps = size // global_batch  # one epoch
                    last = None
                    for sb in ld:
                        last = sb.report["io"]
                    per_node.append(last["index_bytes"] + last["read_bytes"])
                out["nodes"][nodes] = per_node
        return out
    finally:
        proc.terminate()
        proc.wait()


def run_shuffle(root: str, global_batch: int) -> dict:
    """Rank correlation of catalog position vs epoch position over one epoch of src_a, and shards per global batch."""
    import numpy as np
    from scipy.stats import spearmanr

    ld = loader(root, 0, None, global_batch, tokenizer(), sources=("src_a",))
    ds = ld.dataset
    planner = ds._planner()
    src = ds.sources["src_a"]
    order, shards_per_batch = [], []
    step = 0
    while len(order) < src.size.samples // global_batch * global_batch:
        p = planner.plan_step(step)["gen"]
        order.extend(p["sample"].tolist())
        shards_per_batch.append(len(set(p["shard"].tolist())))
        step += 1
    n_shards, per_shard = len(src.shards), src.shards[0].samples
    rng = np.random.default_rng(0)
    uniform = np.mean([len(set((rng.choice(src.size.samples, global_batch, replace=False) // per_shard).tolist())) for _ in range(200)])
    # the baseline: the loader before the whole-source shuffle (shards permuted, samples shuffled within groups of 4)
    perm = rng.permutation(n_shards)
    before = np.concatenate([rng.permutation(np.concatenate([np.arange(s * per_shard, (s + 1) * per_shard) for s in perm[g:g + 4]]))
                             for g in range(0, n_shards, 4)])[:len(order)]
    before_shards = np.mean([len(set((before[i:i + global_batch] // per_shard).tolist()))
                             for i in range(0, len(before) - global_batch + 1, global_batch)])
    return {"spearman": float(spearmanr(np.arange(len(order)), order)[0]), "shards_per_batch": float(np.mean(shards_per_batch)),
            "uniform_shards_per_batch": float(uniform), "shards": n_shards,
            "before_spearman": float(spearmanr(np.arange(len(before)), before)[0]), "before_shards_per_batch": float(before_shards)}


def run_synergen(root: str, workers: int, steps: int, global_batch: int, resume_at: list[int], world: int = 1) -> dict:
    import train.data  # noqa: F401  (imports are not the loader's cost)

    tok = tokenizer()
    n = tokens = 0
    seconds = 0.0
    first = None
    states = {}
    eff = []
    io0: dict[str, tuple] = {}  # "rank/worker" -> (CPU s, decoded) at its first batch, and now
    io1: dict[str, tuple] = {}
    yielded: dict[str, int] = {}  # samples each worker yielded after its first batch
    built: dict[str, int] = {}  # steps each worker built after its first batch
    for rank in range(world):
        t0 = time.perf_counter()
        ld = loader(root, workers, steps, global_batch, tok, rank, world)
        started = None
        for sb in ld:
            r = sb.report["tasks"]["gen"]["rank"]
            io = sb.report["io"]
            key = f"{rank}/{io['worker']}"
            if key in io0:
                yielded[key] += sum(v["samples"] for v in r.values())
                built[key] += 1
            else:
                io0[key], yielded[key], built[key] = (io["cpu_s"], io["decoded"], io.get("planned", -1)), 0, 0
            io1[key] = (io["cpu_s"], io["decoded"], io.get("planned", -1))
            eff.append(sb.report["tasks"]["gen"]["packing_efficiency"])
            if rank == 0 and sb.step + 1 in resume_at:
                states[sb.step + 1] = sb.state
            if started is None:
                started = time.perf_counter()
                if first is None:
                    first = started - t0
                continue  # steady-state rate: count what comes after the first batch
            n += sum(v["samples"] for v in r.values())
            tokens += sum(v["tokens"] for v in r.values())
        seconds += time.perf_counter() - started
    resume = {}
    for k, st in states.items():
        t1 = time.perf_counter()
        ld2 = loader(root, 0, k + 1, global_batch, tok)
        ld2.load_state_dict(st)
        next(iter(ld2))
        resume[k] = time.perf_counter() - t1
    return {"samples": n, "tokens": tokens, "seconds": seconds, "first": first, "workers": max(1, workers),
            "rss_mib": peak_rss_mib(), "packing_efficiency": sum(eff) / len(eff), "resume_s": resume,
            "cpu": {k: [yielded[k], io1[k][0] - io0[k][0], io1[k][1] - io0[k][1],
                        io1[k][2] - io0[k][2] if io1[k][2] >= 0 else -1, built[k]] for k in io0}}


CONFIGS = (("webdataset", "webdataset", []), ("synergen w=0", "synergen", ["--workers", "0"]),
           ("synergen w=2", "synergen", ["--workers", "2"]), ("synergen w=4", "synergen", ["--workers", "4"]),
           ("synergen 2 ranks x w=2", "synergen", ["--workers", "2", "--world", "2"]),
           ("w=0, 3 at once", "together", ["--procs", "3"]), ("w=0, 5 at once", "together", ["--procs", "5"]))


def run_together(argv: list[str], procs: int) -> dict:
    """`procs` in-process readers at once, each its own process: the CPU cost of the in-process path on a machine
    as busy as it is with W = procs - 1 DataLoader workers and the main process (the same number of busy processes
    sharing the cores and caches), so the workers' figures can be told apart from the machine's."""
    children = [subprocess.Popen([sys.executable, __file__, "--part", "synergen", "--workers", "0", *argv],
                                 stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    rs = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    if any(c.returncode for c in children):
        raise SystemExit("a reader running alongside others failed")
    return {"samples": sum(r["samples"] for r in rs), "tokens": sum(r["tokens"] for r in rs), "workers": procs,
            "seconds": statistics.fmean(r["seconds"] for r in rs), "first": max(r["first"] for r in rs),
            "rss_mib": max(r["rss_mib"] for r in rs), "packing_efficiency": rs[0]["packing_efficiency"],
            "resume_s": rs[0]["resume_s"], "cpu": {f"{i}/{k}": c for i, r in enumerate(rs) for k, c in r["cpu"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", default="")
    ap.add_argument("--root", default="")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--procs", type=int, default=1)
    args = ap.parse_args()
    total = args.shards * args.per_shard
    steps = total // args.global_batch
    if args.part == "webdataset":
        print(json.dumps(run_webdataset(args.root)))
        return
    if args.part == "together":
        print(json.dumps(run_together(["--root", args.root, "--shards", str(args.shards), "--per-shard", str(args.per_shard),
                                       "--global-batch", str(args.global_batch)], args.procs)))
        return
    if args.part == "synergen":
        print(json.dumps(run_synergen(args.root, args.workers, steps, args.global_batch, [1, steps // 4, steps // 2, steps - 1],
                                      args.world)))
        return

    with tempfile.TemporaryDirectory() as root:
        write_corpus(root, args.shards, args.per_shard)
        size = sum(p.stat().st_size for p in Path(root).rglob("*.tar"))
        print(f"corpus: {total:,} samples in {args.shards} shards, {size / 2**20:.1f} MiB; {os.cpu_count()} CPUs; "
              f"best of {args.repeat} interleaved runs")
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
        for _ in range(args.repeat):
            for name, part, extra in CONFIGS:
                cmd = [sys.executable, __file__, "--part", part, "--root", root, "--shards", str(args.shards),
                       "--per-shard", str(args.per_shard), "--global-batch", str(args.global_batch), *extra]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                runs[name].append(json.loads(out))

        def wall(r: dict) -> float:
            return r["samples"] / r["seconds"] / r["workers"]

        def cpu_rate(r: dict) -> float:  # samples per CPU-second, per worker (mean over the workers)
            return sum(c[0] / c[1] for c in r["cpu"].values() if c[1] > 0) / len(r["cpu"])

        best = {name: max(rs, key=cpu_rate) for name, rs in runs.items()}  # CPU cost: its best run
        fastest = {name: max(rs, key=wall) for name, rs in runs.items()}  # wall rates: their best run
        best_wall = {name: wall(r) for name, r in fastest.items()}
        base_wall, base_cpu = best_wall["webdataset"], cpu_rate(best["webdataset"])
        print("per worker; steady state (after each worker's first item); 'first' includes building the loader")
        print(f"{'reader':<24}{'samples/s':>10}{'vs wds':>8}{'samples/CPU-s':>15}{'vs wds':>8}{'decodes/sample':>16}"
              f"{'plans/build':>13}{'tokens/s':>11}{'RSS MiB':>9}{'first s':>9}")
        for name, r in best.items():
            amp = sum(c[2] for c in r["cpu"].values()) / max(1, sum(c[0] for c in r["cpu"].values()))
            plans = (f"{sum(c[3] for c in r['cpu'].values()) / max(1, sum(c[4] for c in r['cpu'].values())):.2f}"
                     if all(len(c) > 3 and c[3] >= 0 for c in r["cpu"].values()) else "-")  # "-": not reported
            print(f"{name:<24}{best_wall[name]:>10,.0f}{best_wall[name] / base_wall:>8.2f}{cpu_rate(r):>15,.0f}"
                  f"{cpu_rate(r) / base_cpu:>8.2f}{amp:>16.2f}{plans:>13}{fastest[name]['tokens'] / fastest[name]['seconds'] / r['workers']:>11,.0f}"
                  f"{r['rss_mib']:>9.0f}{r['first']:>9.3f}")
        for name in ("synergen w=0", "synergen w=2"):
            r = best[name]
            print(f"{name}: packing efficiency {r['packing_efficiency']:.3f}; resume (load state + first batch) at step: "
                  + ", ".join(f"{k}: {v:.3f}s" for k, v in sorted(r["resume_s"].items(), key=lambda kv: int(kv[0]))))
        w0, w2, w4 = (cpu_rate(best[f"synergen w={w}"]) for w in (0, 2, 4))
        print(f"in-process vs webdataset per CPU-second: {w0 / base_cpu:.2f} (goal >= 0.9); "
              f"workers vs in-process per CPU-second: 2 workers {w2 / w0:.2f}, 4 workers {w4 / w0:.2f} (goal >= 0.8)")
        t3, t5 = (cpu_rate(best[f"w=0, {k} at once"]) for k in (3, 5))
        print(f"the machine's share: in-process readers run {t3 / w0:.2f}x (3 at once) and {t5 / w0:.2f}x (5 at once) as fast per "
              f"CPU-second as one alone; workers vs in-process readers with as many busy processes (workers + main): "
              f"2 workers {w2 / t3:.2f}, 4 workers {w4 / t5:.2f}")

        sh = run_shuffle(root, args.global_batch)
        print(f"shuffle, one epoch of src_a ({sh['shards']} shards): rank correlation of catalog position vs epoch position "
              f"{sh['spearman']:+.4f} (goal ~0); shards per global batch of {args.global_batch}: {sh['shards_per_batch']:.1f} "
              f"(a uniform random sample: {sh['uniform_shards_per_batch']:.1f}); before (groups of 4 shards): "
              f"{sh['before_spearman']:+.4f}, {sh['before_shards_per_batch']:.1f} shards per batch")
        b = run_s3_bytes(root, args.global_batch)
        print(f"bytes read from S3 per node in one epoch of src_a ({b['dataset'] / 2**20:.1f} MiB of shards, "
              f"{b['indices'] / 2**10:.1f} KiB of indices); goal: dataset/nodes + indices")
        print(f"{'nodes':>6}{'max MiB/node':>14}{'goal MiB':>10}{'vs goal':>9}{'all nodes / dataset':>21}")
        for nodes, per in b["nodes"].items():
            goal = b["dataset"] / nodes + b["indices"]
            print(f"{nodes:>6}{max(per) / 2**20:>14.2f}{goal / 2**20:>10.2f}{max(per) / goal:>9.3f}{sum(per) / b['dataset']:>21.3f}")


if __name__ == "__main__":
    main()
