"""Benchmark: a training step over precomputed token shards vs encoding the raw images with the VQ inside the loop.

Same model, same batches, same trainer: the baseline wraps the model so that each micro-batch first decodes
its samples' raw JPEGs, resizes them as the tokenize stage does and VQ-encodes them (what a trainer without
offline tokenization does every step), then runs the same forward (with the shards' codes, so both paths
compute the same losses). Prints the median step time of each path,
the ratio, and the trainer's data-wait fraction of step time (goal: under 1%).

    .venv/bin/python tests/benchmarks/bench_train.py [--images 600] [--steps 40] [--out /tmp/bench_train]

The data is the demo's: corpus -> local web -> Ray ingest -> tokenize (synergen.demo.run.prepare_data), tiny VQ at
64 px, the demo model. At paper scale the gap grows: Emu3's full VQ takes ~30 s per 256-px image on 2 CPU
cores (research/stack.md section 9), far more than the LLM step it would feed.
"""

from __future__ import annotations

import argparse
import io
import logging
import queue
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.folding import Fold, fold_codes  # noqa: E402
from model.vq import VQTokenizer  # noqa: E402
from pipeline.tiling import resize_center_crop, to_pixels  # noqa: E402
from synergen.demo.run import DemoConfig, model_overrides, prepare_data, train_config  # noqa: E402
from train.trainer import LoaderSteps, build_data, build_model, train  # noqa: E402


def raw_jpegs(raw_dir: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(raw_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".jpg"):
                    out[m.name.split(".")[0]] = t.extractfile(m).read()
    return out


class RawImageSteps(LoaderSteps):
    """The same loader steps, also queueing the raw JPEGs of each task batch's samples for the model wrapper."""

    def __init__(self, loader, jpegs: dict[str, bytes], pending: queue.Queue):
        super().__init__(loader.loader)
        self.jpegs, self.pending = jpegs, pending

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        sb = next(self._it)
        for task in self.tasks:
            self.pending.put([self.jpegs[key] for _, _, key in sb.samples[task]])
        return sb.batches, sb.report


class EncodeInLoop(torch.nn.Module):
    """The model, preceded in every forward by JPEG decode + resize + VQ encode + fold of the batch's images."""

    def __init__(self, model, vq: VQTokenizer, fold: Fold, size: int, pending: queue.Queue):
        super().__init__()
        self.model = model
        self.config = model.config
        self._vq = [vq]  # a list: the VQ is no parameter of the engine's module
        self.fold, self.size, self.pending = fold, size, pending
        self.encode_s = 0.0

    def set_stage(self, stage) -> None:
        self.model.set_stage(stage)

    def trainable_parameters(self):
        return self.model.trainable_parameters()

    def forward(self, batch):
        from PIL import Image

        t0 = time.perf_counter()
        images = [resize_center_crop(Image.open(io.BytesIO(b)).convert("RGB"), self.size) for b in self.pending.get()]
        with torch.no_grad():
            codes = fold_codes(self._vq[0].encode(to_pixels(images)), self.fold)  # [N, groups, k]
        self.encode_s += time.perf_counter() - t0
        assert codes.shape[0] * codes.shape[1] == batch.image_codes.shape[0]  # the batch's images, all of them
        return self.model(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps of each run left out of the medians")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each path")
    ap.add_argument("--out", default="/tmp/bench_train")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    cfg = DemoConfig(out=args.out, n_images=args.images, n_eval=0)
    out = Path(args.out).resolve()
    t0 = time.time()
    if not (out / "tokens" / "und" / "demo" / "_catalog.parquet").exists():
        prepare_data(cfg, out, {})
        print(f"data prepared in {time.time() - t0:.0f} s (demo corpus -> ingest -> tokenize)")
    overrides = model_overrides(cfg)

    def config(name: str):
        tc = train_config(cfg, out, "sft", "tiny", args.steps, overrides)
        return tc.model_copy(update={"output_dir": str(out / "bench" / name), "export": False, "save_every": 10**9})

    from train.trainer import seed_everything

    def ours(name: str):
        return train(config(name))

    def baseline(name: str):
        tc = config(name)
        pending: queue.Queue = queue.Queue()
        seed_everything(tc.seed)  # the same initial weights as `train` builds
        model = build_model(tc.resolved())
        wrapped = EncodeInLoop(model, VQTokenizer.from_pretrained(cfg.vq), Fold.parse(cfg.fold), cfg.image_size, pending)
        data = RawImageSteps(build_data(tc.resolved(), model, 0, 1), raw_jpegs(out / "raw" / "demo"), pending)
        result = train(tc, model=wrapped, data=data)
        result.encode_s = wrapped.encode_s
        return result

    # Alternate the two paths (the cores are shared: load drifts), pool the steps after warm-up of each run.
    runs: dict[str, list] = {"shards": [], "vq_in_loop": []}
    for r in range(args.rounds):
        runs["shards"].append(ours(f"shards_{r}"))
        runs["vq_in_loop"].append(baseline(f"vq_in_loop_{r}"))

    def pooled(results, key):
        return [rec[key] for res in results for rec in res.records[args.warmup:]]

    t_s = statistics.median(pooled(runs["shards"], "time_s"))
    t_b = statistics.median(pooled(runs["vq_in_loop"], "time_s"))
    print(f"\n{'path':<34}{'median step s':>14}{'tokens/s':>10}{'data-wait':>11}")
    for name, label, t in (("shards", "token shards (ours)", t_s), ("vq_in_loop", "raw images + VQ encode in loop", t_b)):
        tok = statistics.median(pooled(runs[name], "tokens_per_s"))
        wait = statistics.mean(pooled(runs[name], "data_wait_fraction"))
        print(f"{label:<34}{t:>14.4f}{tok:>10.0f}{wait:>10.2%}")
    n_steps = sum(len(res.records) for res in runs["vq_in_loop"])
    enc = sum(res.encode_s for res in runs["vq_in_loop"]) / n_steps
    print(f"step time ratio (baseline / ours): {t_b / t_s:.2f}x; JPEG decode + resize + VQ encode per step in the "
          f"baseline: {enc:.4f} s ({args.rounds} alternating rounds of {args.steps} steps, first {args.warmup} of each left out)")
    same = all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(runs["shards"][0].records, runs["vq_in_loop"][0].records))
    print(f"same batches, same losses per step: {same}")


if __name__ == "__main__":
    main()
