"""Evidence: static weights vs online reweighting (exp3, doremi) on a demo-sized mixture of sources that differ in difficulty.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_reweight.py [--out /tmp/bench_reweight] [--steps 600]

1. the demo's data: corpus -> local web -> Ray ingest -> tokenize (synergen.demo.run.prepare_data);
2. each task's token shards become two sources: `clean` (as tokenized) and `shuffled` (the same kind of samples with
   their captions permuted among them: the caption-image pairing is unlearnable), each with ~10% held out;
3. three runs, same model, seed, steps and batches: static (natural weights, ~50/50), exp3 (ODM's bandit) and
   doremi (excess loss against the static run's metrics.jsonl as the reference);
4. per run: the weight trajectory, each source's held-out loss at the end, the demo's learning check (generated
   images and captions for held-out scenes), and the policies' overhead (time in the policy hook and data wait
   vs the step time). Writes OUT/reweight.json and OUT/reweight.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.token_shards import TokenShardWriter, iter_token_shard, write_catalog  # noqa: E402
from pipeline.catalog import read_catalog, vocab_hash
from synergen.demo.run import DemoConfig, evaluate, model_overrides, prepare_data  # noqa: E402

TASKS = ("und", "gen")


def split_sources(tokens: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """tokens/<task>/demo -> tokens/<task>/{clean,shuffled}/{train,heldout}; returns the sample counts."""
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        src = tokens / task / "demo"
        rows = read_catalog(str(src))
        samples = [s for r in rows for s in iter_token_shard(str(src / r["path"]))]
        order = rng.permutation(len(samples))
        half = len(samples) // 2
        for name, idx in (("clean", order[:half]), ("shuffled", order[half:])):
            chosen = [samples[i] for i in idx]
            if name == "shuffled":  # captions permuted among the source's samples: no caption fits its image
                texts = [s.text_ids for s in chosen]
                perm = rng.permutation(len(chosen))
                chosen = [type(s)(key=s.key, codes=s.codes, text_ids=texts[perm[j]], meta={**s.meta, "caption": ""})
                          for j, s in enumerate(chosen)]
            n_held = max(8, len(chosen) // 10)
            for part, part_samples in (("heldout", chosen[:n_held]), ("train", chosen[n_held:])):
                out = tokens / task / name / part
                cat = []
                for si in range(0, len(part_samples), 200):
                    path = f"{name}-{si // 200:05d}.tar"
                    with TokenShardWriter(str(out / path)) as w:
                        for s in part_samples[si:si + 200]:
                            w.write(s)
                        pub = w.publish()
                    cat.append({**{k: rows[0][k] for k in ("vq_model", "codebook_size", "fold", "text_tokenizer", "vocab_hash",
                                                          "pipeline_version") if k in rows[0]},
                                "path": path, "source": f"{task}_{name}", "task": task, "samples": w.n_samples,
                                "image_tokens": w.n_image_tokens, "codes": w.n_codes, "text_tokens": w.n_text_tokens, **pub})
                write_catalog(str(out), cat)
                counts.setdefault(f"{task}_{name}", {})[part] = len(part_samples)
    return counts


def manifest(part: str, reweight: dict | None = None) -> dict:
    tasks = {}
    for task in TASKS:
        tasks[task] = {"global_batch": 8, "weighting": "natural", "unit": "tokens" if task == "gen" else "samples",
                       "sources": {f"{task}_{n}": {"catalogs": [f"{task}/{n}/{part}"]} for n in ("clean", "shuffled")}}
        if reweight:
            tasks[task]["reweight"] = reweight
    return {"name": f"reweight-{part}", "stage": "1", "seq_len": 512, "max_tiles": 1, "thumbnail": False, "uncond_prob": 0.1,
            "tasks": tasks}


def heldout_losses(model_dir: Path, tokens: Path, mixture: Path, cfg: DemoConfig, steps: int = 12) -> dict[str, float]:
    """Each source's mean per-target loss over its held-out samples (the loader builds them as in training)."""
    from model.modeling import SynerGenVLForCausalLM
    from pipeline.text_tokenizer import load_text_tokenizer
    from train.data import LoaderConfig, ModelDataSpec, StreamingMixture
    from train.metrics import loss_by_source
    from train.mixture import MixtureManifest

    model = SynerGenVLForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = load_text_tokenizer(cfg.tokenizer)
    spec = ModelDataSpec(model.config.fold_geometry, model.config.codebook_size, vocab_hash(tok))
    ds = StreamingMixture(MixtureManifest.load(str(mixture), data_root=str(tokens)), spec, tok,
                          LoaderConfig(seed=123, max_steps=steps, cache_dir=str(tokens.parent / "cache")))
    total: dict[str, list[float]] = {}
    with torch.no_grad():
        for sb in ds:
            for batch in sb.batches.values():
                for src, (s, n) in loss_by_source(batch, model(batch).token_loss).items():
                    acc = total.setdefault(src, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += n
    return {src: s / n for src, (s, n) in sorted(total.items()) if n}


def run(name: str, mixture: Path, out: Path, cfg: DemoConfig, steps: int) -> Path:
    from train.config import TrainConfig
    from train.trainer import train

    tc = TrainConfig(model="tiny", model_overrides=model_overrides(cfg), tokenizer=cfg.tokenizer, vq=cfg.vq, stage="sft",
                     mixture=str(mixture), data_root=str(out / "tokens"), data_options={"cache_dir": str(out / "cache")},
                     deepspeed=cfg.deepspeed, precision="auto", lr=cfg.lr, schedule="cosine", warmup_steps=cfg.warmup_steps,
                     steps=steps, seed=cfg.seed, output_dir=str(out / "runs" / name), save_every=steps, log_every=1)
    return train(tc, resume=True).export_dir


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.metrics import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for ax, task in zip(axes[:2], TASKS):
        for name, r in results.items():
            recs = read_metrics(Path(r["metrics"]))
            key = f"weight/{task}/{task}_shuffled"
            ax.plot([x["step"] for x in recs], [x.get(key, math.nan) for x in recs], label=name)
        ax.set_title(f"{task}: weight of the shuffled-caption source")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    names = list(results)
    sources = sorted(next(iter(results.values()))["heldout"])
    x = np.arange(len(sources))
    for i, name in enumerate(names):
        axes[2].bar(x + (i - 1) * 0.27, [results[name]["heldout"][s] for s in sources], 0.27, label=name)
    axes[2].set_xticks(x, sources, rotation=20)
    axes[2].set_title("held-out loss per source at the end")
    axes[2].legend()
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_reweight")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default="static,exp3,doremi")
    ap.add_argument("--eta", type=float, default=10.0, help="both policies' step size (1 barely moves the weights here)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    cfg = DemoConfig(out=str(out), n_images=args.images)
    eval_file = out / "eval_rows.json"
    if not eval_file.exists():
        eval_file.write_text(json.dumps(prepare_data(cfg, out, {})))
    if not (out / "tokens" / "gen" / "shuffled").exists():
        print("sources:", split_sources(out / "tokens"), flush=True)
    eval_rows = json.loads(eval_file.read_text())
    (out / "heldout.yaml").write_text(yaml.safe_dump(manifest("heldout")))
    policies = {
        "static": None,
        "exp3": {"policy": "exp3", "every": 10, "warmup": 30, "lag": 2, "floor": 0.05, "max_change": 0.1, "eta": args.eta},
        "doremi": {"policy": "doremi", "every": 10, "warmup": 30, "lag": 2, "floor": 0.05, "max_change": 0.1, "eta": args.eta,
                   "reference": str(out / "runs" / "static" / "metrics.jsonl")},
    }
    results_file = out / "reweight.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.policies.split(","):
        if name in results:
            continue
        mix = out / f"{name}.yaml"
        mix.write_text(yaml.safe_dump(manifest("train", policies[name])))
        model_dir = run(name, mix, out, cfg, args.steps)
        from train.metrics import read_metrics

        recs = read_metrics(out / "runs" / name / "metrics.jsonl")
        tail = recs[-max(1, len(recs) // 10):]
        ev = evaluate(cfg, model_dir, eval_rows, out / "www", out / "eval" / name)
        results[name] = {
            "metrics": str(out / "runs" / name / "metrics.jsonl"),
            "heldout": heldout_losses(model_dir, out / "tokens", out / "heldout.yaml", cfg),
            "final_weights": {k: v for k, v in recs[-1].items() if k.startswith("weight/")},
            "loss_last": sum(r["loss"] for r in tail) / len(tail),
            "image_match": ev["image_match"], "caption_match": ev["caption_match"], "chance": ev["chance"],
            "step_s": float(np.median([r["time_s"] for r in recs])),
            "policy_s": float(np.mean([r.get("reweight_s", 0.0) for r in recs])),
            "data_wait_fraction": float(np.mean([r["data_wait_fraction"] for r in recs])),
        }
        results_file.write_text(json.dumps(results, indent=1))
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "metrics"}), flush=True)
    plot(results, out / "reweight.png")
    print(f"{'run':8} {'heldout und clean/shuf':>24} {'heldout gen clean/shuf':>24} {'images':>7} {'captions':>8} "
          f"{'policy s/step':>13} {'step s':>7}")
    for name, r in results.items():
        h = r["heldout"]
        print(f"{name:8} {h.get('und_clean', math.nan):11.3f} {h.get('und_shuffled', math.nan):12.3f} "
              f"{h.get('gen_clean', math.nan):11.3f} {h.get('gen_shuffled', math.nan):12.3f} {r['image_match']:7.0%} "
              f"{r['caption_match']:8.0%} {r['policy_s']:13.2e} {r['step_s']:7.3f}")


if __name__ == "__main__":
    main()
