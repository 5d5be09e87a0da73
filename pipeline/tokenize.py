"""`synergen tokenize`: raw shards (img2dataset layout) -> VQ-token shards in fold order + `_catalog.parquet`.

The job, as one visible list of steps (Ray Data):

    raw shard urls --ReadRawShard (flat_map)--> raw samples --PrepareImages (tasks)--> one row per image
      --EncodeImages (actor pool: one VQ per actor, batched, GPU when given)--> codes in fold order + PSNR sample
      --ShardAssembler (driver)--> text ids, token shard NNNNN.tar

Token shard N is made from raw shard N only (names are deterministic, samples sorted by key), written
whole and published atomically, then its `NNNNN_stats.json` (counts, bytes, sha256, quality figures).
A re-run skips every shard whose stats file exists; a shard published without stats is redone (same
bytes). An actor killed mid-run is restarted by Ray and its batch retried; rows are keyed by
(shard, key, image index), so a retried batch can neither lose nor duplicate a sample. At the end the
catalog is rebuilt from all stats files and `_summary.json` is written.

Quality gate, per shard: distinct codes, entropy (bits) of the code histogram, and reconstruction PSNR
of `psnr_images` images decoded by the same actor. A shard below any threshold is flagged in the
catalog; the job fails (`QualityGateError`) when more than `max_flagged_share` of shards are flagged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import fsspec
import numpy as np

from model.folding import Fold, fold_codes
from pipeline.tiling import TooSmallError, resize_center_crop, tile_image
from pipeline.tokenshard import (
    CATALOG_NAME,
    TokenSample,
    TokenShardWriter,
    codes_dtype,
    vocab_hash,
    write_catalog,
)
from pipeline.netguard import redact_url
from synergen.errors import SynergenError
from synergen.local_ray import init_ray

log = logging.getLogger(__name__)

PIPELINE_VERSION = "tokenize-1"
SUMMARY_NAME = "_summary.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class QualityGateError(SynergenError):
    """Too many token shards failed the quality gate (near-constant codes or low PSNR: a wrong VQ?)."""


@dataclass
class QualityThresholds:
    """A shard is flagged when any figure is below its threshold (psnr only where measured)."""

    min_distinct_codes: int = 32
    min_entropy_bits: float = 4.0
    min_psnr_db: float = 14.0
    max_flagged_share: float = 0.1


@dataclass
class TokenizeConfig:
    """Everything `synergen tokenize` takes; defaults follow the paper (512-px tiles/images, fold 2x8)."""

    raw: str
    out: str
    task: str  # "und" | "gen"
    vq: str
    tokenizer: str
    fold: str = "2x8"
    max_tiles: int = 6
    thumbnail: bool = False
    image_size: int = 512
    min_side: int | None = None  # None: image_size // 2 (a smaller image would be upscaled more than 2x)
    source: str | None = None  # None: the raw folder's name
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # CPU share of each decode/tile task. Differing from the actor's resources also keeps Ray Data from
    # fusing decoding into the encoder actor, where it would stall the VQ forward.
    cpus_per_prepare: float = 0.5
    concurrency: int = 1
    batch_size: int = 16
    compress: bool = True  # zstd per sample member: 0.28x the payload at 512 px (README: token shard layout)
    psnr_images: int = 4
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.task not in ("und", "gen"):
            raise SynergenError(f"--task {self.task!r}: use 'und' (understanding, tiled) or 'gen' (generation, one crop)")
        Fold.parse(self.fold)
        if self.min_side is None:
            self.min_side = self.image_size // 2


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def list_raw_shards(raw: str) -> list[str]:
    """Sorted `NNNNN.tar` URLs of a raw (ingest) folder."""
    fs, path = fsspec.core.url_to_fs(raw)
    if not fs.exists(path):
        raise SynergenError(f"raw folder {raw} does not exist: run `synergen ingest` first or fix --raw")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(_join(path, "*.tar")))
    if not names:
        raise SynergenError(f"no raw shards (NNNNN.tar) in {raw}: is it the output folder of `synergen ingest`?")
    return [_join(raw, n) for n in names]


def raw_successes(tar_url: str) -> int | None:
    """Successes the ingest stage recorded for a shard (its NNNNN.parquet `status` column), or None."""
    import pyarrow.parquet as pq

    pq_url = tar_url[: -len(".tar")] + ".parquet"
    fs, path = fsspec.core.url_to_fs(pq_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
    return sum(s == "success" for s in status)


# ---- steps (each a small callable that Ray Data takes as it is) ----

class ReadRawShard:
    """flat_map step: {"shard": id, "url": tar} -> one row per sample (image bytes, caption, ingest json)."""

    def __call__(self, row: dict) -> list[dict]:
        members: dict[str, dict] = defaultdict(dict)
        with fsspec.open(row["url"], "rb") as f:
            with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
                for m in tar:
                    if m.isfile() and "." in m.name:
                        key, _, ext = m.name.rpartition("/")[-1].partition(".")
                        members[key][ext] = tar.extractfile(m).read()
        out = []
        for rank, key in enumerate(sorted(members)):
            mem = members[key]
            img_ext = next((e for e in IMAGE_EXTS if e in mem), None)
            out.append({
                "shard": row["shard"], "shard_samples": len(members), "key": key, "rank": rank,
                "image": mem.get(img_ext, b"") if img_ext else b"",
                "caption": mem.get("txt", b"").decode("utf-8", "replace"),
                "ingest": mem.get("json", b"{}").decode("utf-8", "replace"),
            })
        return out


class PrepareImages:
    """map_batches step: decode, filter, tile (und) or resize+crop (gen) -> one row per image [S, S, 3] uint8.

    A sample that cannot be encoded yields a single row with `n_images == 0` and its filter reason.
    The first `psnr_images` images of each shard (by key order) are marked for the PSNR sample.
    """

    def __init__(self, task: str, image_size: int, max_tiles: int, thumbnail: bool, min_side: int, source: str,
                 fold: str, downsample: int, psnr_images: int):
        self.task, self.size, self.max_tiles, self.thumbnail = task, image_size, max_tiles, thumbnail
        self.min_side, self.source, self.fold, self.down, self.psnr_images = min_side, source, fold, downsample, psnr_images

    def _sample(self, key: str, image_bytes: bytes, caption: str, ingest: str) -> tuple[list, dict, str]:
        from PIL import Image, UnidentifiedImageError

        try:
            info = json.loads(ingest or "{}")
        except json.JSONDecodeError:
            info = {}
        meta = {"key": key, "source": self.source, "task": self.task, "caption": caption,
                "url": redact_url(info["url"]) if info.get("url") else None,  # no credentials or signed queries in shards
                "sha256": hashlib.sha256(image_bytes).hexdigest() if image_bytes else None}
        if not image_bytes:
            return [], meta, "missing_image"
        try:
            img = Image.open(io.BytesIO(image_bytes))
            img.load()
            img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return [], meta, "decode_error"
        meta["size"] = [img.width, img.height]
        try:
            if self.task == "und":
                t = tile_image(img, self.size, self.max_tiles, self.thumbnail, self.min_side)
                images, meta["tiles"], meta["thumbnail"] = t.images, [t.rows, t.cols], t.thumbnail
            else:
                images = [resize_center_crop(img, self.size, self.min_side)]
                meta["tiles"], meta["thumbnail"] = [1, 1], False
        except TooSmallError:
            return [], meta, "too_small"
        g = self.size // self.down
        meta["grid"] = [g, g]
        meta["fold"] = [int(x) for x in self.fold.split("x")]
        return images, meta, ""

    def __call__(self, batch: dict) -> dict:
        out = defaultdict(list)
        for i in range(len(batch["key"])):
            images, meta, reason = self._sample(str(batch["key"][i]), bytes(batch["image"][i]), str(batch["caption"][i]),
                                                str(batch["ingest"][i]))
            rank = int(batch["rank"][i])
            arrays = [np.asarray(im, dtype=np.uint8) for im in images] or [np.zeros((self.size, self.size, 3), np.uint8)]
            for idx, arr in enumerate(arrays):
                out["shard"].append(int(batch["shard"][i]))
                out["shard_samples"].append(int(batch["shard_samples"][i]))
                out["key"].append(meta["key"])
                out["idx"].append(idx)
                out["n_images"].append(len(images))
                out["reason"].append(reason)
                out["meta"].append(json.dumps(meta, ensure_ascii=False))
                out["psnr_sample"].append(bool(images) and rank < self.psnr_images and idx == 0)
                out["pixels"].append(arr)
        return {k: (np.stack(v) if k == "pixels" else np.asarray(v)) for k, v in out.items()}


class EncodeImages:
    """Actor-pool step: one VQ per actor; `pixels` [B, S, S, 3] -> `groups` [B, gh*gw/(fh*fw), fh*fw] (codes in
    fold order, `model.folding`), per-row forward seconds, PSNR.

    Time spent inside the VQ forward is recorded per row (`encode_s`, the batch time split evenly) for the
    job's encoder busy fraction. PSNR is measured on rows marked `psnr_sample` (decoded by the same VQ).
    """

    def __init__(self, vq_url: str, fold: str, use_gpu: bool):
        import torch

        from model.vq import VQTokenizer

        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vq = VQTokenizer.from_pretrained(vq_url, device=self.device)
        self.fold = Fold.parse(fold)

    def __call__(self, batch: dict) -> dict:
        from pipeline.tiling import psnr

        torch = self.torch
        keep = batch["n_images"] > 0
        n = len(keep)
        pix = torch.from_numpy(np.ascontiguousarray(batch["pixels"][keep])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        g = batch["pixels"].shape[1] // self.vq.downsample
        codes = np.zeros((n, g, g), dtype=np.int64)
        psnrs = np.full(n, np.nan)
        t0 = time.perf_counter()
        if len(pix):
            enc = self.vq.encode(pix.to(self.device))  # [b, gh, gw]
            if self.device == "cuda":
                torch.cuda.synchronize()
            codes[keep] = enc.cpu().numpy()
        elapsed = time.perf_counter() - t0
        sample = keep & batch["psnr_sample"]
        if sample.any():
            idx = np.nonzero(sample[keep])[0]
            rec = self.vq.decode(torch.from_numpy(codes[sample]))  # [k, 3, S, S]
            psnrs[sample] = [psnr(rec[j : j + 1].cpu(), pix[i : i + 1]) for j, i in enumerate(idx)]
        del batch["pixels"]
        return {**batch, "groups": fold_codes(codes, self.fold), "encode_s": np.full(n, elapsed / max(n, 1)), "psnr": psnrs,
                "vq_model": np.asarray([self.vq.model_id] * n), "codebook_size": np.full(n, self.vq.codebook_size)}


# ---- driver side: assemble samples into shards, publish, catalog ----

def code_stats(codes: np.ndarray, codebook_size: int) -> tuple[int, float]:
    """(distinct codes, entropy in bits of the code histogram) of a shard's codes."""
    if codes.size == 0:
        return 0, 0.0
    hist = np.bincount(codes.ravel().astype(np.int64), minlength=codebook_size)
    p = hist[hist > 0] / codes.size
    return int((hist > 0).sum()), max(0.0, float(-(p * np.log2(p)).sum()))


def flag_reasons(stats: dict, q: QualityThresholds) -> list[str]:
    reasons = []
    if stats["samples"] == 0:
        return reasons
    if stats["distinct_codes"] < q.min_distinct_codes:
        reasons.append(f"distinct codes {stats['distinct_codes']} < {q.min_distinct_codes}")
    if stats["code_entropy"] < q.min_entropy_bits:
        reasons.append(f"code entropy {stats['code_entropy']:.2f} < {q.min_entropy_bits} bits")
    if stats["psnr"] is not None and not math.isnan(stats["psnr"]) and stats["psnr"] < q.min_psnr_db:
        reasons.append(f"PSNR {stats['psnr']:.1f} < {q.min_psnr_db} dB")
    return reasons


class ShardAssembler:
    """Collects image rows per raw shard; when every sample of a shard has arrived, writes and publishes it."""

    def __init__(self, cfg: TokenizeConfig, tokenizer, tok_id: str, vhash: str):
        self.cfg, self.tokenizer, self.tok_id, self.vhash = cfg, tokenizer, tok_id, vhash
        self.fold = Fold.parse(cfg.fold)
        self.pending: dict[int, dict] = defaultdict(lambda: {"samples": {}, "expected": None})
        self.published: list[dict] = []
        self.encode_s = 0.0

    def add(self, row: dict) -> dict | None:
        """Add one image row; returns the shard's stats when this row completed (and published) a shard."""
        shard = int(row["shard"])
        p = self.pending[shard]
        p["expected"] = int(row["shard_samples"])
        key = str(row["key"])
        if key not in p["samples"]:
            p["samples"][key] = {"meta": json.loads(str(row["meta"])), "n": int(row["n_images"]),
                                 "reason": str(row["reason"]), "images": {}, "psnr": []}
            p["done"] = p.get("done", 0) + (int(row["n_images"]) == 0)  # a filtered sample is complete as it is
        s = p["samples"][key]
        if s["n"] > 0 and int(row["idx"]) not in s["images"]:  # a retried batch repeats nothing
            s["images"][int(row["idx"])] = np.asarray(row["groups"])
            self.encode_s += float(row["encode_s"])
            if not math.isnan(float(row["psnr"])):
                s["psnr"].append(float(row["psnr"]))
            p["vq_model"], p["codebook_size"] = str(row["vq_model"]), int(row["codebook_size"])
            p["done"] = p.get("done", 0) + (len(s["images"]) == s["n"])
        if p.get("done") == p["expected"]:
            return self.publish(shard, self.pending.pop(shard))
        return None

    def publish(self, shard: int, p: dict) -> dict:
        cfg = self.cfg
        name = f"{shard:05d}.tar"
        filtered = Counter(v["reason"] for v in p["samples"].values() if v["n"] == 0)
        kept = sorted(k for k, v in p["samples"].items() if v["n"] > 0)
        cb = p.get("codebook_size", 1)
        dtype = codes_dtype(cb)
        captions = [p["samples"][k]["meta"]["caption"] for k in kept]
        ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"] if captions else []
        all_codes, psnrs = [], []
        with TokenShardWriter(_join(cfg.out, name), compress=cfg.compress) as w:
            for k, text in zip(kept, ids):
                s = p["samples"][k]
                codes = np.stack([s["images"][i] for i in range(s["n"])]).astype(dtype)  # [n_images, groups, fh*fw]
                all_codes.append(codes.ravel())
                psnrs += s["psnr"]
                w.write(TokenSample(key=k, codes=codes, text_ids=np.asarray(text, dtype=np.int32), meta=s["meta"]))
            published = w.publish()
            counts = {"samples": w.n_samples, "image_tokens": w.n_image_tokens, "codes": w.n_codes,
                      "text_tokens": w.n_text_tokens}
        distinct, entropy = code_stats(np.concatenate(all_codes) if all_codes else np.zeros(0), cb)
        stats = {
            "path": name, "source": cfg.source, "task": cfg.task, **counts, **published,
            "vq_model": p.get("vq_model"), "codebook_size": cb, "fold": str(self.fold),
            "text_tokenizer": self.tok_id, "vocab_hash": self.vhash, "pipeline_version": PIPELINE_VERSION,
            "code_entropy": entropy, "distinct_codes": distinct,
            "psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
            "filtered": dict(filtered), "samples_in": len(p["samples"]),
        }
        reasons = flag_reasons(stats, cfg.quality)
        stats["flagged"], stats["flag_reasons"] = bool(reasons), reasons
        with fsspec.open(_join(cfg.out, f"{shard:05d}_stats.json"), "w") as f:
            json.dump(stats, f, indent=1, allow_nan=True)
        if reasons:
            log.warning("token shard %s flagged by the quality gate: %s", name, "; ".join(reasons))
        self.published.append(stats)
        return stats


def _read_stats(out: str) -> dict[str, dict]:
    fs, path = fsspec.core.url_to_fs(out)
    if not fs.exists(path):
        return {}
    stats = {}
    for p in sorted(fs.glob(_join(path, "*_stats.json"))):
        with fs.open(p, "r") as f:
            s = json.load(f)
        if fs.exists(_join(path, s["path"])):
            stats[s["path"]] = s
    return stats


def run_tokenize(cfg: TokenizeConfig, progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Run the job; returns the summary (also written to `<out>/_summary.json`). Raises QualityGateError."""
    import ray

    from model.vq import VQTokenizer
    from pipeline.text_tokenizer import load_text_tokenizer, tokenizer_id

    t0 = time.time()
    cfg.source = cfg.source or cfg.raw.rstrip("/").rsplit("/", 1)[-1]
    shards = list_raw_shards(cfg.raw)
    done = _read_stats(cfg.out)
    todo = [(int(u.rsplit("/", 1)[-1][:-4]), u) for u in shards if u.rsplit("/", 1)[-1] not in done]
    log.info("%d raw shards in %s: %d already tokenized, %d to do", len(shards), cfg.raw, len(shards) - len(todo), len(todo))

    # Check the checkpoints before starting Ray work: a bad path fails here with a clear message.
    vq = VQTokenizer.from_pretrained(cfg.vq)
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    Fold.parse(cfg.fold).check_grid(*vq.grid(cfg.image_size, cfg.image_size))
    assembler = ShardAssembler(cfg, tokenizer, tokenizer_id(cfg.tokenizer), vocab_hash(tokenizer))

    busy = float("nan")
    if todo:
        init_ray(cfg.ray_address)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        prepare = PrepareImages(cfg.task, cfg.image_size, cfg.max_tiles, cfg.thumbnail, cfg.min_side, cfg.source,
                                cfg.fold, vq.downsample, cfg.psnr_images)
        ds = (
            ray.data.from_items([{"shard": s, "url": u} for s, u in todo], override_num_blocks=len(todo))
            .flat_map(ReadRawShard())
            .map_batches(prepare, batch_size=8, batch_format="numpy", num_cpus=cfg.cpus_per_prepare)
            .map_batches(EncodeImages, fn_constructor_kwargs={"vq_url": cfg.vq, "fold": cfg.fold,
                                                              "use_gpu": cfg.gpus_per_actor > 0},
                         compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), batch_size=cfg.batch_size,
                         batch_format="numpy", num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor)
        )
        t_job = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                stats = assembler.add({k: v[i] for k, v in batch.items()})
                if stats is not None:
                    log.info("published %s: %d samples, %d bytes", stats["path"], stats["samples"], stats["bytes"])
                    if progress:
                        progress(len(assembler.published), len(todo), stats)
        wall = time.time() - t_job
        busy = assembler.encode_s / (wall * cfg.concurrency) if wall > 0 else float("nan")
        # A raw shard whose every row was filtered at ingest yields no rows here: publish it empty, so the
        # catalog lists it and a re-run does not take it up again.
        done = {int(st["path"].split(".")[0]) for st in assembler.published} | set(assembler.pending)
        for shard, _ in todo:
            if int(shard) not in done:
                assembler.publish(int(shard), {"samples": {}, "expected": 0, "vq_model": vq.model_id,
                                               "codebook_size": vq.codebook_size})
        if assembler.pending:
            raise SynergenError(f"tokenize: shards {sorted(assembler.pending)} did not complete; re-run to finish them")

    all_stats = _read_stats(cfg.out)
    rows = [all_stats[k] for k in sorted(all_stats)]
    write_catalog(cfg.out, rows)
    flagged = [r["path"] for r in rows if r["flagged"]]
    filtered = Counter()
    for r in rows:
        filtered.update(r["filtered"])
    now = assembler.published
    wall_all = time.time() - t0
    summary = {
        "raw": cfg.raw, "out": cfg.out, "task": cfg.task, "source": cfg.source,
        "samples_in": sum(r["samples_in"] for r in rows),
        "raw_successes": _sum_successes([u for u in shards]),
        "tokenized": sum(r["samples"] for r in rows),
        "filtered": dict(filtered),
        "shards": len(rows), "shards_written_now": len(now), "shards_skipped": len(shards) - len(todo),
        "bytes": sum(r["bytes"] for r in rows),
        "image_tokens": sum(r["image_tokens"] for r in rows), "text_tokens": sum(r["text_tokens"] for r in rows),
        "samples_per_s": (sum(r["samples_in"] for r in now) / wall_all) if now else 0.0,
        "encoder_busy_fraction": busy, "encoder_seconds": assembler.encode_s, "wall_s": wall_all,
        "flagged_shards": flagged, "vq_model": vq.model_id, "fold": cfg.fold,
        "catalog": _join(cfg.out, CATALOG_NAME), "config": {k: v for k, v in asdict(cfg).items() if k != "quality"},
        "quality": asdict(cfg.quality),
    }
    with fsspec.open(_join(cfg.out, SUMMARY_NAME), "w") as f:
        json.dump(summary, f, indent=1)
    if rows and len(flagged) > cfg.quality.max_flagged_share * len(rows):
        raise QualityGateError(
            f"{len(flagged)}/{len(rows)} token shards in {cfg.out} failed the quality gate ({flagged[:5]}...): the VQ "
            f"checkpoint {cfg.vq} gives near-constant codes or poor reconstructions; check it is a trained VQ that "
            "matches these images, or relax --min-* thresholds"
        )
    return summary


def _sum_successes(shards: list[str]) -> int | None:
    counts = [raw_successes(u) for u in shards]
    return None if any(c is None for c in counts) else sum(counts)
