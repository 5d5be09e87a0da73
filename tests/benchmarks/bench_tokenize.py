"""Tokenization throughput and the encoder's busy fraction (time inside the VQ forward / job wall time),
for the tiny demo VQ and the real-size Emu3 VQ configuration, on CPU, over a few batch sizes.

The real-size VQ here has random weights: it is timed, never used to make tokens anyone reads (its
quality gate is disabled for the run). The baseline is the bare VQ forward on the same images in one
process (no Ray, no decoding): job throughput / bare throughput says what the CPU work around the
encoder costs.

Run: .venv/bin/python tests/benchmarks/bench_tokenize.py [--tiny-samples 96] [--batch-sizes 4,16,64]
                                                        [--real-images 2] [--real-size 256] [--skip-real]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from model.vq import VQTokenizer  # noqa: E402
from pipeline.tokenization import QualityThresholds, TokenizeConfig, run_tokenize  # noqa: E402
from tokenize_helpers import write_raw_shards  # noqa: E402

VQ = str(REPO / "model/assets/demo_vq")
TOK = str(REPO / "model/assets/demo_tokenizer")
NO_GATE = QualityThresholds(min_distinct_codes=0, min_entropy_bits=0.0, min_psnr_db=-1e9, max_flagged_share=1.0)


def bare_rate(vq: VQTokenizer, size: int, batch: int, n: int) -> float:
    x = torch.rand(batch, 3, size, size) * 2 - 1
    vq.encode(x)  # warm-up
    t = time.perf_counter()
    for _ in range(max(1, n // batch)):
        vq.encode(x)
    return max(1, n // batch) * batch / (time.perf_counter() - t)


def job(raw: str, out: str, vq: str, size: int, batch: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = TokenizeConfig(raw=raw, out=out, task="gen", vq=vq, tokenizer=TOK, fold="2x8" if size >= 128 else "2x4",
                         image_size=size, batch_size=batch, quality=NO_GATE, psnr_images=0)
    return run_tokenize(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-samples", type=int, default=96)
    ap.add_argument("--batch-sizes", default="4,16,64")
    ap.add_argument("--real-images", type=int, default=2)
    ap.add_argument("--real-size", type=int, default=256)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from synergen.local_ray import init_ray

    init_ray(num_cpus=2, log_to_driver=False)  # loopback only, no cloud metadata probe
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        raw = f"{tmp}/raw"
        write_raw_shards(raw, 4, args.tiny_samples // 4, seed=5, failed_rows=0)
        tiny = VQTokenizer.from_pretrained(VQ)
        print(f"tiny VQ {tiny.model_id}: {sum(p.numel() for p in tiny.model.parameters()):,} params, 64 px gen images, "
              f"{args.tiny_samples} samples in 4 shards, 1 encoder actor (1 CPU) + decode tasks, 2 CPUs")
        print(f"{'batch':>6}{'job samples/s':>15}{'bare VQ img/s':>15}{'busy fraction':>15}{'wall s':>8}")
        for b in (int(x) for x in args.batch_sizes.split(",")):
            s = job(raw, f"{tmp}/tok", VQ, 64, b)
            print(f"{b:>6}{s['samples_per_s']:>15.1f}{bare_rate(tiny, 64, b, 256):>15.1f}"
                  f"{s['encoder_busy_fraction']:>15.2f}{s['wall_s']:>8.1f}")
        if args.skip_real:
            return
        from transformers import Emu3VQVAE, Emu3VQVAEConfig

        real_dir = f"{tmp}/emu3_real_size"
        real = VQTokenizer(Emu3VQVAE(Emu3VQVAEConfig()))  # the paper's tokenizer's shape: 32,768 codes, downsample 8
        real.save_pretrained(real_dir)
        real = VQTokenizer.from_pretrained(real_dir)
        raw_real = f"{tmp}/raw_real"
        write_raw_shards(raw_real, 1, args.real_images, seed=6, failed_rows=0)
        print(f"\nreal-size Emu3 VQ: {sum(p.numel() for p in real.model.parameters()):,} params, {args.real_size} px, "
              f"{args.real_images} images (random weights: timing only)")
        print(f"{'batch':>6}{'job samples/s':>15}{'bare VQ img/s':>15}{'busy fraction':>15}{'wall s':>8}")
        for b in sorted({1, args.real_images}):
            s = job(raw_real, f"{tmp}/tok_real", real_dir, args.real_size, b)
            bare = bare_rate(real, args.real_size, b, b)
            print(f"{b:>6}{s['samples_per_s']:>15.3f}{bare:>15.3f}{s['encoder_busy_fraction']:>15.2f}{s['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
