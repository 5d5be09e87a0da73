"""Benchmark: a training step over precomputed token shards vs encoding the raw images with the VQ inside the loop.

Same model, same batches, same trainer: the baseline wraps the model so that each micro-batch first decodes
its samples' raw JPEGs, resizes them as the tokenize stage does and VQ-encodes them (what a trainer without
offline tokenization does every step), then runs the same forward. Prints the median step time of each path,
the ratio, and the trainer's data-wait fraction of step time (goal: under 1%).

    .venv/bin/python tests/benchmarks/bench_train.py [--images 600] [--steps 40] [--out /tmp/bench_train]

The data is the demo's: corpus -> local web -> Ray ingest -> tokenize (train.demo.prepare_data), tiny VQ at
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
from train.demo import DemoConfig, model_overrides, prepare_data, train_config  # noqa: E402
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
        self.agree: list[bool] = []

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
        got = sorted(map(tuple, codes.reshape(-1, self.fold.size).tolist()))
        self.agree.append(got == sorted(map(tuple, batch.image_codes.tolist())))
        return self.model(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
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

    # Ours: token shards straight into the step.
    shards = train(config("shards"))
    # Baseline: identical batches, VQ encoding of the raw images inside each step.
    tc = config("vq_in_loop")
    pending: queue.Queue = queue.Queue()
    from train.trainer import seed_everything

    seed_everything(tc.seed)  # the same initial weights as `train` builds
    model = build_model(tc.resolved())
    vq = VQTokenizer.from_pretrained(cfg.vq)
    wrapped = EncodeInLoop(model, vq, Fold.parse(cfg.fold), cfg.image_size, pending)
    data = RawImageSteps(build_data(tc.resolved(), model, 0, 1), raw_jpegs(out / "raw" / "demo"), pending)
    baseline = train(tc, model=wrapped, data=data)

    def summary(res):
        recs = res.records[args.warmup:]
        return (statistics.median(r["time_s"] for r in recs), statistics.mean(r["data_wait_fraction"] for r in recs),
                statistics.median(r["tokens_per_s"] for r in recs))

    t_s, w_s, tok_s = summary(shards)
    t_b, w_b, tok_b = summary(baseline)
    n_steps = len(baseline.records)
    print(f"\n{'path':<34}{'median step s':>14}{'tokens/s':>10}{'data-wait':>11}")
    print(f"{'token shards (ours)':<34}{t_s:>14.4f}{tok_s:>10.0f}{w_s:>10.2%}")
    print(f"{'raw images + VQ encode in loop':<34}{t_b:>14.4f}{tok_b:>10.0f}{w_b:>10.2%}")
    print(f"step time ratio (baseline / ours): {t_b / t_s:.2f}x; VQ work per step in the baseline: "
          f"{wrapped.encode_s / n_steps:.4f} s; baseline codes equal the shards' codes: {all(wrapped.agree)} "
          f"({sum(wrapped.agree)}/{len(wrapped.agree)} micro-batches)")
    losses_equal = all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(shards.records, baseline.records))
    print(f"same batches, same losses per step: {losses_equal}")


if __name__ == "__main__":
    main()
