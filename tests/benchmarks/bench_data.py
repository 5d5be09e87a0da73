"""Benchmark: the streaming mixture loader against a plain `webdataset.WebDataset` read of the same tars.

Run:  .venv/bin/python tests/benchmarks/bench_data.py [--shards 16 --per-shard 256]

Writes token shards (Emu3-size samples: one 512px image = 4,096 codes folded 2x8 into 256 positions,
~20 caption tokens) to a temp folder, then measures in a fresh process each:
  - webdataset: WebDataset(tars).map(decode_token_sample), one pass (the baseline: reading only);
  - synergen, 0 workers and 2 workers: every feature on (size + sha256 checks, shard + sample shuffle,
    token-weighted mixture of two sources, CFG drop, sequence building, packing into 4,096 slots).
Prints samples/s and tokens/s per worker, the ratio to webdataset, peak RSS, time to first batch, and
the time to resume (load state + first batch) at several positions (it must not grow with the position).
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

    from pipeline.tokenshard import TokenSample, TokenShardWriter, vocab_hash, write_catalog

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

    from pipeline.tokenshard import decode_token_sample

    urls = sorted(glob.glob(f"{root}/*/*.tar"))
    t0 = time.perf_counter()
    n = tokens = 0
    first = None
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(lambda s: decode_token_sample(s["sgt"], s["__key__"])):
        n += 1
        tokens += s.n_image_tokens + int(s.text_ids.size)
        if first is None:
            first = time.perf_counter() - t0
            n = tokens = 0  # steady-state rate: count what comes after the first item
    dt = time.perf_counter() - t0 - first
    return {"samples": n, "tokens": tokens, "seconds": dt, "first": first, "workers": 1, "rss_mib": peak_rss_mib()}


def loader(root: str, workers: int, max_steps: int, global_batch: int, tok):
    from model.folding import Fold
    from pipeline.tokenshard import vocab_hash
    from train.data import LoaderConfig, ModelDataSpec, StreamingLoader, StreamingMixture
    from train.mixture import MixtureManifest

    m = MixtureManifest.model_validate({"name": "bench", "data_root": root, "seq_len": 4096, "tasks": {"gen": {
        "global_batch": global_batch, "unit": "tokens",
        "sources": {"src_a": {"catalogs": ["src_a"], "weight": 2}, "src_b": {"catalogs": ["src_b"], "weight": 1}}}}})
    ds = StreamingMixture(m, ModelDataSpec(Fold(2, 8), 32768, vocab_hash(tok)), tok, LoaderConfig(seed=1, max_steps=max_steps))
    return StreamingLoader(ds, num_workers=workers, prefetch_factor=4 if workers else None)


def run_synergen(root: str, workers: int, steps: int, global_batch: int, resume_at: list[int]) -> dict:
    import train.data  # noqa: F401  (imports are not the loader's cost)

    tok = tokenizer()
    t0 = time.perf_counter()
    ld = loader(root, workers, steps, global_batch, tok)
    n = tokens = 0
    first = None
    states = {}
    eff = []
    for sb in ld:
        g = sb.report["tasks"]["gen"]["global"]
        n += sum(v["samples"] for v in g.values())
        tokens += sum(v["tokens"] for v in g.values())
        eff.append(sb.report["tasks"]["gen"]["packing_efficiency"])
        if sb.step + 1 in resume_at:
            states[sb.step + 1] = sb.state
        if first is None:
            first = time.perf_counter() - t0
            n = tokens = 0  # steady-state rate: count what comes after the first batch
    dt = time.perf_counter() - t0 - first
    resume = {}
    for k, st in states.items():
        t1 = time.perf_counter()
        ld2 = loader(root, 0, k + 1, global_batch, tok)
        ld2.load_state_dict(st)
        next(iter(ld2))
        resume[k] = time.perf_counter() - t1
    return {"samples": n, "tokens": tokens, "seconds": dt, "first": first, "workers": max(1, workers), "rss_mib": peak_rss_mib(),
            "packing_efficiency": sum(eff) / len(eff), "resume_s": resume}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--part", default="")
    ap.add_argument("--root", default="")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    total = args.shards * args.per_shard
    steps = total // args.global_batch
    if args.part == "webdataset":
        print(json.dumps(run_webdataset(args.root)))
        return
    if args.part == "synergen":
        print(json.dumps(run_synergen(args.root, args.workers, steps, args.global_batch, [1, steps // 4, steps // 2, steps - 1])))
        return

    with tempfile.TemporaryDirectory() as root:
        write_corpus(root, args.shards, args.per_shard)
        size = sum(p.stat().st_size for p in Path(root).rglob("*.tar"))
        print(f"corpus: {total:,} samples in {args.shards} shards, {size / 2**20:.1f} MiB; {os.cpu_count()} CPUs")
        results = {}
        for name, extra in (("webdataset", []), ("synergen w=0", ["--workers", "0"]), ("synergen w=2", ["--workers", "2"])):
            part = name.split()[0]
            cmd = [sys.executable, __file__, "--part", part, "--root", root, "--shards", str(args.shards),
                   "--per-shard", str(args.per_shard), "--global-batch", str(args.global_batch), *extra]
            results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        base = results["webdataset"]
        base_rate = base["samples"] / base["seconds"]
        print("rates are steady-state (after the first item); 'first' includes building the loader (catalogs, checks)")
        print(f"{'reader':<14}{'samples/s/worker':>18}{'tokens/s/worker':>18}{'vs wds':>8}{'peak RSS MiB':>14}{'first batch s':>15}")
        for name, r in results.items():
            rate = r["samples"] / r["seconds"] / r["workers"]
            print(f"{name:<14}{rate:>18,.0f}{r['tokens'] / r['seconds'] / r['workers']:>18,.0f}{rate / base_rate:>8.2f}"
                  f"{r['rss_mib']:>14.0f}{r['first']:>15.3f}")
        for name in ("synergen w=0", "synergen w=2"):
            r = results[name]
            print(f"{name}: packing efficiency {r['packing_efficiency']:.3f}; resume (load state + first batch) at step: "
                  + ", ".join(f"{k}: {v:.3f}s" for k, v in sorted(r["resume_s"].items(), key=lambda kv: int(kv[0]))))


if __name__ == "__main__":
    main()
