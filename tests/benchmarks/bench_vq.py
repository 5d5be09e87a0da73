"""Benchmark: Emu3 VQ encoding of still images, transformers' reference vs ours (the 2D encoder run once).

Run: `.venv/bin/python tests/benchmarks/bench_vq.py [--size 128] [--batch 2] [--rounds 3] [--threads 2] [--device cpu]`.
The real-size Emu3VQVAE (Emu3VQVAEConfig's defaults, as BAAI/Emu3-VisionTokenizer: 271 M parameters, random
weights: the work does not depend on their values). Reference: `Emu3VQVAE.encode`, which repeats each image
4 times (temporal_downsample_factor) and runs the whole 2D encoder on every copy. Ours: `VQTokenizer.encode`
(`model.vq.emu3_encoder_states`). Rounds alternate reference and ours on the same images, so that a shared
machine's load falls on both alike; the medians give the ratio. Also checks that the codes are equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each: reference, then ours)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from model.vq import VQTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vq = VQTokenizer(Emu3VQVAE(Emu3VQVAEConfig())).to(args.device)
    n_params = sum(p.numel() for p in vq.model.parameters())
    pix = (torch.rand(args.batch, 3, args.size, args.size) * 2 - 1).to(args.device)
    sizes = torch.tensor([[args.size, args.size]] * args.batch)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def reference() -> torch.Tensor:
        return torch.stack(list(vq.model.encode(pix, image_sizes=sizes).image_tokens))

    def ours() -> torch.Tensor:
        return vq.encode(pix)

    same = torch.equal(reference(), ours())  # also the warm-up of both
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for r in range(args.rounds):
        for name, fn in (("reference", reference), ("ours", ours)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: reference {times['reference'][-1]:.3f} s, ours {times['ours'][-1]:.3f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nEmu3 VQ encode, {n_params / 1e6:.0f} M parameters, {args.batch} x {args.size} px, {args.device}, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds; codes equal: {same}")
    print("| encode | median s per batch | images/s | time vs reference |")
    print("|---|---|---|---|")
    for name in ("reference", "ours"):
        print(f"| {name} | {med[name]:.3f} | {args.batch / med[name]:.3f} | {med[name] / med['reference']:.2f} |")
    print(f"speedup: {med['reference'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
