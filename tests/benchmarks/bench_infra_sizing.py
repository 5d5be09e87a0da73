"""Sizing for tokenization clusters: CPU images/s per core of the decode+prepare step vs VQ images/s per GPU.

    .venv/bin/python tests/benchmarks/bench_infra_sizing.py [--n 48] [--gpu-images-per-s 180]

Measures, on one core (torch and PIL single-threaded), `pipeline.tokenization.PrepareImages` (decode, filter,
resize+crop for `gen`, InternVL tiling with 6 tiles + thumbnail for `und`, 512 px) on web-like JPEGs of
typical LAION sizes, against a baseline of bare JPEG decode (the floor any pipeline pays). Where CUDA is
present it also times the full-size Emu3 VQ encoder (random weights: the cost does not depend on them)
at 512 px; otherwise pass the GPU figure measured on your GPU (the same script run there prints it).
Prints CPU cores per GPU = VQ images/s per GPU / prepared images/s per core, for both tasks.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from PIL import Image

# Typical web image sizes (LAION's median is ~ 500-700 px on the short side; many are larger).
SIZES = [(640, 480), (1024, 768), (800, 800), (1280, 853), (1500, 1000), (512, 768)]


def web_like_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """Smooth structure plus fine texture, JPEG q90: decodes like a photo (flat synthetic images decode faster)."""
    w, h = size
    coarse = rng.integers(0, 255, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-24, 24, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def per_s(fn, n: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def bench_cpu(n: int) -> dict:
    import torch

    from pipeline.tokenization import PrepareImages

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = [web_like_jpeg(rng, SIZES[i % len(SIZES)]) for i in range(n)]
    batch = {"key": np.array([f"{i:09d}" for i in range(n)]), "image": np.array(jpegs, dtype=object),
             "caption": np.array(["a photo"] * n), "ingest": np.array(["{}"] * n), "rank": np.arange(n) + 100,
             "shard": np.zeros(n, int), "shard_samples": np.full(n, n)}

    def decode_only():
        for b in jpegs:
            Image.open(io.BytesIO(b)).convert("RGB")

    out = {"n": n, "mean_jpeg_kib": sum(map(len, jpegs)) / n / 1024, "decode_only": per_s(decode_only, n)}
    for task, tiles, thumb in (("gen", 1, False), ("und", 6, True)):
        prep = PrepareImages(task, 512, tiles, thumb, 256, "bench", "2x8", 8, 0)
        rows = {}

        def run():
            rows["out"] = prep(batch)

        out[task] = per_s(run, n)  # samples/s; an und sample is several 512-px images
        out[f"{task}_images_per_sample"] = len(rows["out"]["key"]) / n
    return out


def bench_gpu(batch: int = 16, iters: int = 5) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from model.vq import VQTokenizer

    res = {}
    for dtype in (torch.bfloat16, torch.float32):
        vq = VQTokenizer(Emu3VQVAE(Emu3VQVAEConfig()).to("cuda", dtype=dtype).eval())
        x = torch.rand(batch, 3, 512, 512, device="cuda", dtype=dtype) * 2 - 1
        vq.encode(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            vq.encode(x)
        torch.cuda.synchronize()
        res[str(dtype).split(".")[-1]] = batch * iters / (time.perf_counter() - t0)
        del vq
    res["device"] = torch.cuda.get_device_name()
    return res


# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets) for the estimate when no GPU is at hand.
GPU_PEAK_TFLOPS = {"H100 SXM": 989, "A100": 312, "L40S": 362, "A10G": 125}
ASSUMED_UTILIZATION = 0.4  # convolution-heavy encoders reach roughly this share of peak; an assumption, not a figure


def vq_encode_tflops_512() -> float:
    """FLOPs of one full-size Emu3 VQ encode at 512 px, counted on the meta device (no compute, no weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    with torch.device("meta"):
        model = Emu3VQVAE(Emu3VQVAEConfig()).eval()
        x = torch.empty(1, 3, 512, 512)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode(x, image_sizes=torch.tensor([[512, 512]]))
    return counter.get_total_flops() / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="images per measurement")
    ap.add_argument("--gpu-images-per-s", type=float, default=None,
                    help="VQ encode images/s of one GPU at 512 px, when this machine has no GPU")
    args = ap.parse_args()
    cpu = bench_cpu(args.n)
    gpu = bench_gpu()
    print(f"CPU, one core, {cpu['n']} web-like JPEGs (mean {cpu['mean_jpeg_kib']:.0f} KiB, sizes {SIZES}):")
    print(f"  baseline JPEG decode only         {cpu['decode_only']:8.1f} images/s/core")
    for task in ("gen", "und"):
        ratio = cpu[task] / cpu["decode_only"]
        print(f"  PrepareImages {task} (512 px)        {cpu[task]:8.1f} samples/s/core "
              f"({cpu[f'{task}_images_per_sample']:.2f} images/sample; {ratio:.2f}x of decode-only)")
    gpu_rate = None
    if gpu:
        print(f"GPU {gpu['device']}: Emu3 VQ encode 512 px, batch 16: bf16 {gpu['bfloat16']:.1f} images/s, "
              f"fp32 {gpu['float32']:.1f} images/s")
        gpu_rate = gpu["bfloat16"]
    elif args.gpu_images_per_s:
        gpu_rate = args.gpu_images_per_s
        print(f"GPU: not present here; using --gpu-images-per-s {gpu_rate:g}")
    else:
        print("GPU: not present here; run this script on a GPU node (or pass --gpu-images-per-s) for cores per GPU")
    tflops = vq_encode_tflops_512()
    print(f"Emu3 VQ encode at 512 px: {tflops:.1f} TFLOPs per image (counted; the image is repeated over the "
          "temporal axis). ESTIMATE, not measured, at "
          f"{ASSUMED_UTILIZATION:.0%} of dense bf16 peak:")
    for name, peak in GPU_PEAK_TFLOPS.items():
        rate = peak * ASSUMED_UTILIZATION / tflops
        cores = {t: rate / (cpu[t] * cpu[f"{t}_images_per_sample"]) for t in ("gen", "und")}
        print(f"  {name:9s} ~{rate:5.1f} images/s -> cores per GPU: gen {cores['gen']:.1f}, und {cores['und']:.1f}")
    if gpu_rate:
        for task in ("gen", "und"):
            imgs_per_core = cpu[task] * cpu[f"{task}_images_per_sample"]
            print(f"  {task}: CPU cores per GPU to keep the encoder busy = {gpu_rate / imgs_per_core:.1f}")
    print("RESULT " + json.dumps({"cpu": cpu, "gpu": gpu, "vq_encode_tflops_512": tflops}))


if __name__ == "__main__":
    main()
