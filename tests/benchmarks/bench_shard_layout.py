"""Token shard layout: bytes per sample and read speed of candidate layouts, on codes of demo images
through the trained demo VQ (codes of real images are far from uniform; random codes would mislead).

Candidates (each with and without zstd):
  three  : KEY.json + KEY.vq.npy + KEY.txt.npy            (the logical fields as three members)
  npz    : KEY.npz holding codes, text ids and the json      (one member, numpy's zip container)
  sgt    : KEY.sgt = magic | header json | raw codes | raw text ids  (one member; pipeline/token_shards.py)
Baselines: the payload (codes as uint16 + text ids as int32 + compact json) and the raw JPEG shard
(KEY.jpg/.txt/.json, as ingest writes it) of the same images.

Run: .venv/bin/python tests/benchmarks/bench_shard_layout.py [--n 256] [--sizes 64,256,512]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import zstandard

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from model.folding import Fold, fold_codes  # noqa: E402
from model.vq import VQTokenizer  # noqa: E402
from synergen.demo.corpus import caption, render, sample_scene  # noqa: E402
from pipeline.text_tokenizer import load_text_tokenizer  # noqa: E402
from pipeline.tiling import resize_center_crop, to_pixels  # noqa: E402
from pipeline.token_shards import TokenSample, decode_token_sample, encode_token_sample  # noqa: E402


def make_samples(n: int, size: int, fold: Fold) -> tuple[list[TokenSample], list[bytes]]:
    import hashlib
    import random

    vq = VQTokenizer.from_pretrained(str(REPO / "model/assets/demo_vq"))
    tok = load_text_tokenizer(str(REPO / "model/assets/demo_tokenizer"))
    rng = random.Random(99)
    samples, jpegs = [], []
    for start in range(0, n, 16):
        scenes = [sample_scene(rng) for _ in range(min(16, n - start))]
        imgs = [render(s, 256) for s in scenes]
        for im in imgs:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=92)
            jpegs.append(buf.getvalue())
        codes = vq.encode(to_pixels([resize_center_crop(im, size) for im in imgs])).numpy()  # [b, gh, gw]
        groups = fold_codes(codes, fold).astype(np.uint16)  # [b, n_groups, fh*fw]
        for j, s in enumerate(scenes):
            key = f"{start + j:09d}"
            cap = caption(s)
            gh = size // vq.downsample
            meta = {"key": key, "source": "demo", "task": "gen", "caption": cap, "url": f"http://127.0.0.1/files/{key}.jpg",
                    "sha256": hashlib.sha256(jpegs[start + j]).hexdigest(), "size": [256, 256], "tiles": [1, 1],
                    "thumbnail": False, "grid": [gh, gh], "fold": [fold.fh, fold.fw]}
            ids = np.asarray(tok(cap, add_special_tokens=False)["input_ids"], dtype=np.int32)
            samples.append(TokenSample(key, groups[j : j + 1], ids, meta))
    return samples, jpegs


def payload_bytes(s: TokenSample) -> int:
    return s.codes.nbytes + s.text_ids.nbytes + len(json.dumps(s.meta, separators=(",", ":")).encode())


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def members(layout: str, zstd: bool, s: TokenSample) -> list[tuple[str, bytes]]:
    z = zstandard.ZstdCompressor(level=3).compress if zstd else (lambda b: b)
    sfx = ".zst" if zstd else ""
    if layout == "three":
        return [(f"{s.key}.json{sfx}", z(json.dumps(s.meta, separators=(",", ":")).encode())),
                (f"{s.key}.vq.npy{sfx}", z(npy(s.codes))), (f"{s.key}.txt.npy{sfx}", z(npy(s.text_ids)))]
    if layout == "npz":
        buf = io.BytesIO()
        np.savez(buf, codes=s.codes, text=s.text_ids, meta=np.frombuffer(json.dumps(s.meta).encode(), np.uint8))
        return [(f"{s.key}.npz{sfx}", z(buf.getvalue()))]
    ext, data = encode_token_sample(s, compress=zstd)
    return [(f"{s.key}.{ext}", data)]


def write_tar(path: str, items: list[tuple[str, bytes]]) -> int:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def read_rate(path: str, layout: str, zstd: bool) -> float:
    """Samples/s of plain webdataset iteration + decode to arrays, one process."""
    dz = zstandard.ZstdDecompressor().decompress
    un = (lambda b: dz(b)) if zstd else (lambda b: b)
    sfx = ".zst" if zstd else ""

    def decode(smp):
        if layout == "three":
            return (json.loads(un(smp[f"json{sfx}"])), np.load(io.BytesIO(un(smp[f"vq.npy{sfx}"]))),
                    np.load(io.BytesIO(un(smp[f"txt.npy{sfx}"]))))
        if layout == "npz":
            z = np.load(io.BytesIO(un(smp[f"npz{sfx}"])))
            return z["codes"], z["text"], json.loads(z["meta"].tobytes())
        return decode_token_sample(smp.get("sgt") or smp["sgt.zst"])

    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for _ in wds.WebDataset(path, shardshuffle=False).map(decode))
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--sizes", default="64,256,512")
    ap.add_argument("--fold", default="2x8")
    args = ap.parse_args()
    torch.set_num_threads(2)
    fold = Fold.parse(args.fold)
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(x) for x in args.sizes.split(",")):
            samples, jpegs = make_samples(args.n, size, fold)
            n = len(samples)
            payload = sum(map(payload_bytes, samples)) / n
            codes = np.concatenate([s.codes.ravel() for s in samples])
            hist = np.bincount(codes, minlength=512)
            p = hist[hist > 0] / codes.size
            raw = []
            for s, jpg in zip(samples, jpegs):
                raw += [(f"{s.key}.jpg", jpg), (f"{s.key}.txt", s.meta["caption"].encode()),
                        (f"{s.key}.json", json.dumps({k: s.meta[k] for k in ("url", "key", "caption")}).encode())]
            raw_bps = write_tar(f"{tmp}/raw.tar", raw) / n
            print(f"\n== {size}px images -> {samples[0].meta['grid']} codes, fold {fold}: {codes.size // n} codes/sample, "
                  f"{(hist > 0).sum()} distinct, entropy {-(p * np.log2(p)).sum():.2f} bits (of 9.00)")
            print(f"payload {payload:,.0f} B/sample; raw JPEG shard {raw_bps:,.0f} B/sample")
            print(f"{'layout':<12}{'B/sample':>10}{'x payload':>11}{'x raw jpeg':>12}{'read samples/s':>16}")
            for layout in ("three", "npz", "sgt"):
                for zstd in (False, True):
                    path = f"{tmp}/{layout}{int(zstd)}.tar"
                    items = [m for s in samples for m in members(layout, zstd, s)]
                    bps = write_tar(path, items) / n
                    name = layout + ("+zstd" if zstd else "")
                    print(f"{name:<12}{bps:>10,.0f}{bps / payload:>11.2f}{bps / raw_bps:>12.3f}{read_rate(path, layout, zstd):>16,.0f}")


if __name__ == "__main__":
    main()
