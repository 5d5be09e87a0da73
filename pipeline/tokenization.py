"""`synergen tokenize`: raw shards (img2dataset layout) -> VQ-token shards in fold order + `_catalog.parquet`.

The job, with no sample data in the driver:

    driver: raw shard ids --(a bounded window of shard tasks)--> per-shard stats --> catalog + summary
    shard task N (any node): read raw shard N --PrepareImages (decode, filter, tile/crop)--> image batches
        --EncodeImages (actor pool: one VQ per actor, batched, GPU when given)--> codes in fold order + PSNR
        --> text ids, token shard N written, compressed and published atomically, then N's stats file

Token shard N is made from raw shard N only (names from the ingest stage's `shard_name`, samples sorted
by key), written whole and published atomically, then its stats file (counts, bytes, sha256, quality
figures, the nodes that did the work). The driver holds O(shards) state: ids, the stats each task
returns, never a code. A re-run skips every shard whose stats file exists; a shard published without
stats is redone (same bytes). Fault tolerance: encoder actors restart on any node when theirs dies
(`max_restarts=-1`) and their pending batches are retried (`max_task_retries=-1`); a shard task whose
worker or node dies is retried from its raw shard, and everything it writes is deterministic and
atomic, so a retry can neither lose nor duplicate a sample. A shard that still fails is reported, the
others are published, and the job raises `UnfinishedShardsError` (the CLI exits 4: re-run to finish).
At the end the catalog is rebuilt from all stats files and `_summary.json` is written.

Quality gate, per shard: distinct codes, entropy (bits) of the code histogram, and reconstruction PSNR
of `psnr_images` images decoded by the same actor. A shard below any threshold is flagged in the
catalog; the job fails (`QualityGateError`) when more than `max_flagged_share` of shards are flagged.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import tarfile
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np

from model.folding import Fold, fold_codes
from pipeline.rawshard import shard_name
from pipeline.netguard import redact_url
from pipeline.tokenization_config import QualityThresholds, TokenizeConfig  # noqa: F401 - part of this module's API
from pipeline.tiling import TooSmallError, resize_center_crop, tile_image
from pipeline.token_shards import TokenSample, TokenShardWriter, codes_dtype
from pipeline.catalog import CATALOG_NAME, vocab_hash, write_catalog
from synergen.errors import ShardError, SynergenError
from synergen.local_ray import init_ray

log = logging.getLogger(__name__)

PIPELINE_VERSION = "tokenize-1"
SUMMARY_NAME = "_summary.json"
STATS_SUFFIX = "_stats.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Encoder batches a shard task keeps queued at the actors: one being encoded while the next waits, so an
# actor never idles between a task's batches; bounds the pixels a task holds in the object store.
BATCHES_IN_FLIGHT_PER_SHARD = 2


class QualityGateError(SynergenError):
    """Too many token shards failed the quality gate (near-constant codes or low PSNR: a wrong VQ?)."""


class UnfinishedShardsError(SynergenError):
    """Some shards failed all their retries; the others are published and catalogued. A re-run finishes them."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _shard_id(name: str, suffix: str) -> int | None:
    """The shard id of a file named `shard_name(id) + suffix`, else None."""
    stem = name[: -len(suffix)] if name.endswith(suffix) else ""
    return int(stem) if stem.isdigit() and shard_name(int(stem)) == stem else None


def list_raw_shards(raw: str) -> list[tuple[int, str]]:
    """(id, URL) of the raw (ingest) shards of a folder, by id."""
    fs, path = fsspec.core.url_to_fs(raw)
    if not fs.exists(path):
        raise SynergenError(f"raw folder {raw} does not exist: run `synergen ingest` first or fix --raw")
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(_join(path, "*.tar"))]
    shards = sorted((i, _join(raw, n)) for n in names if (i := _shard_id(n, ".tar")) is not None)
    if not shards:
        raise SynergenError(f"no raw shards ({shard_name(0)}.tar ...) in {raw}: is it the output folder of `synergen ingest`?")
    return shards


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


def read_raw_shard(url: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one raw webdataset shard; a corrupt tar raises ShardError naming it."""
    members: dict[str, dict] = defaultdict(dict)
    try:
        with fsspec.open(url, "rb") as f:
            with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
                for m in tar:
                    if m.isfile() and "." in m.name:
                        key, _, ext = m.name.rpartition("/")[-1].partition(".")
                        members[key][ext] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"raw shard {url}: not a readable tar ({e}); re-ingest it or remove it with its .parquet") from e
    return members


# ---- steps: decode/tile (in the shard task), encode (actor pool) ----

class PrepareImages:
    """Decode, filter, tile (und) or resize+crop (gen) a batch of raw samples (columns) -> one row per image
    [S, S, 3] uint8.

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
    """Encoder actor: one VQ per actor. `encode(pixels [B, S, S, 3] uint8, psnr_rows [B] bool)` -> codes in fold
    order `groups` [B, gh*gw/(fh*fw), fh*fw] (the codebook's dtype), the seconds inside the VQ forward, PSNR of
    the rows marked (decoded by the same VQ, NaN elsewhere) and the actor's node id.

    Stateless between calls (the weights are reloaded on restart), so Ray may restart it on any node and
    retry its pending calls.
    """

    def __init__(self, vq_url: str, fold: str, use_gpu: bool):
        import torch

        from model.vq import VQTokenizer

        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vq = VQTokenizer.from_pretrained(vq_url, device=self.device)
        self.fold = Fold.parse(fold)
        self.dtype = codes_dtype(self.vq.codebook_size)

    def encode(self, pixels: np.ndarray, psnr_rows: np.ndarray) -> dict:
        import ray

        from pipeline.tiling import psnr

        torch = self.torch
        # np.array copies: arguments from the object store are read-only, which torch.from_numpy warns about
        pix = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        t0 = time.perf_counter()
        codes = self.vq.encode(pix.to(self.device))  # [b, gh, gw]
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        codes = codes.cpu().numpy()
        psnrs = np.full(len(codes), np.nan)
        if psnr_rows.any():
            rec = self.vq.decode(torch.from_numpy(codes[psnr_rows]))  # [k, 3, S, S]
            idx = np.nonzero(psnr_rows)[0]
            psnrs[idx] = [psnr(rec[j : j + 1].cpu(), pix[i : i + 1]) for j, i in enumerate(idx)]
        return {"groups": fold_codes(codes, self.fold).astype(self.dtype), "encode_s": elapsed, "psnr": psnrs,
                "node": ray.get_runtime_context().get_node_id()}


def code_stats(hist: np.ndarray) -> tuple[int, float]:
    """(distinct codes, entropy in bits) of a shard's code histogram."""
    n = hist.sum()
    if n == 0:
        return 0, 0.0
    p = hist[hist > 0] / n
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


# ---- the shard task: one raw shard in, one published token shard and its stats out ----

@dataclass
class _Sample:
    """A sample between preparation and writing; `codes[i]` arrives from the encoders."""

    key: str
    meta: dict
    reason: str
    codes: list

    def complete(self) -> bool:
        return all(c is not None for c in self.codes)


@functools.lru_cache(maxsize=2)
def _text_tokenizer(url: str):
    """One text tokenizer per worker process (workers are reused across shard tasks)."""
    from pipeline.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(url)


def stats_url(out: str, shard: int) -> str:
    return _join(out, shard_name(shard) + STATS_SUFFIX)


def _published_stats(out: str, shard: int) -> dict | None:
    """The stats of a shard already published (stats file and tar both present), else None."""
    fs, _ = fsspec.core.url_to_fs(out)
    url = stats_url(out, shard)
    if not (fs.exists(url) and fs.exists(_join(out, shard_name(shard) + ".tar"))):
        return None
    with fs.open(url, "r") as f:
        return json.load(f)


def tokenize_shard(cfg: TokenizeConfig, shard: int, url: str, encoders: list, vq_info: dict) -> dict:
    """Ray task: tokenize raw shard `shard` at `url` into token shard `shard_name(shard).tar`, publish it and its
    stats file, and return the stats. Idempotent: a retry after publishing returns the published stats.

    Long because it is one streaming pipeline whose three closures (`write_ready`, `receive`, `submit`) share
    its state: samples in key order, the open encoder batch, the batches in flight, the code histogram; as a
    class the same lines would only move apart from the loop that drives them."""
    import ray

    done = _published_stats(cfg.out, shard)
    if done is not None:
        return done
    members = read_raw_shard(url)
    keys = sorted(members)
    prep = PrepareImages(cfg.task, cfg.image_size, cfg.max_tiles, cfg.thumbnail, cfg.min_side, cfg.source, cfg.fold,
                         vq_info["downsample"], cfg.psnr_images)
    tokenizer = _text_tokenizer(cfg.tokenizer)
    cb = vq_info["codebook_size"]
    hist = np.zeros(cb, dtype=np.int64)
    filtered: Counter = Counter()
    psnrs: list[float] = []
    nodes = {"task": ray.get_runtime_context().get_node_id(), "encoders": set(), "encoder_s": 0.0}
    order: deque[_Sample] = deque()  # samples in key order, written as soon as the head one is complete
    batch: list[tuple[_Sample, int, bool, np.ndarray]] = []  # image rows waiting for an encoder batch
    in_flight: deque = deque()  # (ObjectRef, rows) in submission order
    n_batches = 0
    name = shard_name(shard) + ".tar"
    writer = TokenShardWriter(_join(cfg.out, name), compress=cfg.compress)

    def write_ready() -> None:
        while order and order[0].complete():
            s = order.popleft()
            if not s.codes:
                filtered[s.reason] += 1
                continue
            codes = np.stack(s.codes)  # [n_images, groups, fh*fw]
            np.add(hist, np.bincount(codes.ravel(), minlength=cb), out=hist)
            text = tokenizer(s.meta["caption"], add_special_tokens=False)["input_ids"]
            writer.write(TokenSample(key=s.key, codes=codes, text_ids=np.asarray(text, dtype=np.int32), meta=s.meta))

    def receive() -> None:
        ref, rows = in_flight.popleft()
        res = ray.get(ref)
        nodes["encoders"].add(res["node"])
        nodes["encoder_s"] += res["encode_s"]
        for (s, idx, _, _), groups, p in zip(rows, res["groups"], res["psnr"]):
            s.codes[idx] = groups
            if not math.isnan(p):
                psnrs.append(float(p))
        write_ready()

    def submit() -> None:
        nonlocal batch, n_batches
        actor = encoders[(shard + n_batches) % len(encoders)]  # round robin, offset per shard to spread the start
        ref = actor.encode.remote(np.stack([r[3] for r in batch]), np.asarray([r[2] for r in batch]))
        in_flight.append((ref, batch))
        batch, n_batches = [], n_batches + 1
        while len(in_flight) > BATCHES_IN_FLIGHT_PER_SHARD:
            receive()

    with writer:
        for start in range(0, len(keys), cfg.batch_size):
            chunk = keys[start : start + cfg.batch_size]
            rows = prep({
                "key": np.asarray(chunk), "rank": np.arange(start, start + len(chunk)),
                "shard": np.full(len(chunk), shard), "shard_samples": np.full(len(chunk), len(keys)),
                "image": [_image_bytes(members[k]) for k in chunk],
                "caption": [members[k].get("txt", b"").decode("utf-8", "replace") for k in chunk],
                "ingest": [members[k].get("json", b"{}").decode("utf-8", "replace") for k in chunk],
            })
            for k in chunk:
                members.pop(k)  # the raw bytes of prepared samples are not needed again
            current: _Sample | None = None
            for i in range(len(rows["key"])):
                if rows["idx"][i] == 0:
                    n = int(rows["n_images"][i])
                    current = _Sample(str(rows["key"][i]), json.loads(str(rows["meta"][i])), str(rows["reason"][i]),
                                      [None] * n)
                    order.append(current)
                if current.codes:
                    batch.append((current, int(rows["idx"][i]), bool(rows["psnr_sample"][i]), rows["pixels"][i]))
                    if len(batch) == cfg.batch_size:
                        submit()
            write_ready()
        if batch:
            submit()
        while in_flight:
            receive()
        published = writer.publish()
        counts = {"samples": writer.n_samples, "image_tokens": writer.n_image_tokens, "codes": writer.n_codes,
                  "text_tokens": writer.n_text_tokens}
    distinct, entropy = code_stats(hist)
    stats = {
        "path": name, "source": cfg.source, "task": cfg.task, **counts, **published,
        "vq_model": vq_info["model_id"], "codebook_size": cb, "fold": str(Fold.parse(cfg.fold)),
        "text_tokenizer": vq_info["text_tokenizer"], "vocab_hash": vq_info["vocab_hash"],
        "pipeline_version": PIPELINE_VERSION, "code_entropy": entropy, "distinct_codes": distinct,
        "psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
        "filtered": dict(filtered), "samples_in": len(keys), "raw_successes": raw_successes(url),
        "node": nodes["task"], "encoder_nodes": sorted(nodes["encoders"]), "encoder_s": nodes["encoder_s"],
    }
    reasons = flag_reasons(stats, cfg.quality)
    stats["flagged"], stats["flag_reasons"] = bool(reasons), reasons
    with fsspec.open(stats_url(cfg.out, shard), "w") as f:
        json.dump(stats, f, indent=1, allow_nan=True)
    if reasons:
        log.warning("token shard %s flagged by the quality gate: %s", name, "; ".join(reasons))
    return stats


def _image_bytes(member: dict[str, bytes]) -> bytes:
    ext = next((e for e in IMAGE_EXTS if e in member), None)
    return member[ext] if ext else b""


# ---- the driver: a window of shard tasks, per-shard stats, catalog and summary ----

def _read_all_stats(out: str) -> dict[int, dict]:
    """Stats of every published shard of `out` (stats file and tar both present), read concurrently."""
    fs, path = fsspec.core.url_to_fs(out)
    if not fs.exists(path):
        return {}
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    ids = [i for n in names if (i := _shard_id(n, STATS_SUFFIX)) is not None and shard_name(i) + ".tar" in names]
    blobs = fs.cat([_join(path, shard_name(i) + STATS_SUFFIX) for i in ids]) if ids else {}
    return {i: json.loads(blobs[_join(path, shard_name(i) + STATS_SUFFIX)]) for i in ids}


def _window(cfg: TokenizeConfig) -> int:
    import ray

    if cfg.shards_in_flight > 0:
        return cfg.shards_in_flight
    free = ray.cluster_resources().get("CPU", 0) - cfg.concurrency * cfg.cpus_per_actor
    return max(2 * cfg.concurrency, int(free / cfg.cpus_per_prepare))


def run_tokenize(cfg: TokenizeConfig, progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Run the job; returns the summary (also written to `<out>/_summary.json`). Raises QualityGateError, or
    UnfinishedShardsError (after publishing and cataloguing every other shard) when shards failed."""
    t0 = time.time()
    cfg.source = cfg.source or cfg.raw.rstrip("/").rsplit("/", 1)[-1]
    shards = list_raw_shards(cfg.raw)
    stats = _read_all_stats(cfg.out)
    todo = [(i, u) for i, u in shards if i not in stats]
    log.info("%d raw shards in %s: %d already tokenized, %d to do", len(shards), cfg.raw, len(shards) - len(todo), len(todo))

    vq_info = _checked_checkpoints(cfg)
    busy, encoder_s, failed, now = float("nan"), 0.0, {}, []
    if todo:
        failed, now, encoder_s, wall = _run_shard_tasks(cfg, todo, vq_info, progress)
        busy = encoder_s / (wall * cfg.concurrency) if wall > 0 else float("nan")
        stats.update({i: st for i, st in now})

    rows = [stats[i] for i in sorted(stats)]
    write_catalog(cfg.out, rows)
    flagged = [r["path"] for r in rows if r["flagged"]]
    summary = _job_summary(cfg, rows, now, failed, len(shards) - len(todo), vq_info, time.time() - t0)
    summary |= {"encoder_busy_fraction": busy, "encoder_seconds": encoder_s}
    with fsspec.open(_join(cfg.out, SUMMARY_NAME), "w") as f:
        json.dump(summary, f, indent=1)
    if failed:
        listed = "; ".join(f"{shard_name(i)}.tar: {why}" for i, why in sorted(failed.items())[:10])
        more = f" (and {len(failed) - 10} more, listed in {_join(cfg.out, SUMMARY_NAME)})" if len(failed) > 10 else ""
        raise UnfinishedShardsError(
            f"{len(failed)} of {len(shards)} shards of {cfg.raw} are unfinished: {listed}{more}. The other shards are "
            "published and catalogued; fix any input named above, then re-run the same command to finish them", summary)
    if rows and len(flagged) > cfg.quality.max_flagged_share * len(rows):
        raise QualityGateError(
            f"{len(flagged)}/{len(rows)} token shards in {cfg.out} failed the quality gate ({flagged[:5]}...): the VQ "
            f"checkpoint {cfg.vq} gives near-constant codes or poor reconstructions; check it is a trained VQ that "
            "matches these images, or relax --min-* thresholds"
        )
    return summary


def _checked_checkpoints(cfg: TokenizeConfig) -> dict:
    """What the shard tasks need of the VQ and the text tokenizer, loaded once here before any Ray work, so a bad
    path or a fold that does not tile the VQ's grid fails at once with a clear message."""
    from model.vq import VQTokenizer
    from pipeline.text_tokenizer import load_text_tokenizer, tokenizer_id

    vq = VQTokenizer.from_pretrained(cfg.vq)
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    Fold.parse(cfg.fold).check_grid(*vq.grid(cfg.image_size, cfg.image_size))
    return {"model_id": vq.model_id, "codebook_size": vq.codebook_size, "downsample": vq.downsample,
            "text_tokenizer": tokenizer_id(cfg.tokenizer), "vocab_hash": vocab_hash(tokenizer)}


def _job_summary(cfg: TokenizeConfig, rows: list[dict], now: list, failed: dict, skipped: int, vq_info: dict,
                 wall_s: float) -> dict:
    """The job's `_summary.json` over every published shard's stats (`rows`) and this run's (`now`)."""
    filtered: Counter = Counter()
    for r in rows:
        filtered.update(r["filtered"])
    successes = [r.get("raw_successes") for r in rows]
    return {
        "raw": cfg.raw, "out": cfg.out, "task": cfg.task, "source": cfg.source,
        "samples_in": sum(r["samples_in"] for r in rows),
        "raw_successes": None if failed or None in successes else sum(successes),
        "tokenized": sum(r["samples"] for r in rows),
        "filtered": dict(filtered),
        "shards": len(rows), "shards_written_now": len(now), "shards_skipped": skipped,
        "unfinished_shards": [shard_name(i) + ".tar" for i in sorted(failed)],
        "bytes": sum(r["bytes"] for r in rows),
        "image_tokens": sum(r["image_tokens"] for r in rows), "text_tokens": sum(r["text_tokens"] for r in rows),
        "samples_per_s": (sum(st["samples_in"] for _, st in now) / wall_s) if now else 0.0,
        "wall_s": wall_s, "shards_by_node": dict(Counter(st.get("node") for _, st in now)),
        "flagged_shards": [r["path"] for r in rows if r["flagged"]], "vq_model": vq_info["model_id"], "fold": cfg.fold,
        "catalog": _join(cfg.out, CATALOG_NAME), "config": cfg.model_dump(exclude={"quality"}),
        "quality": cfg.quality.model_dump(),
    }


def _run_shard_tasks(cfg: TokenizeConfig, todo: list[tuple[int, str]], vq_info: dict,
                     progress: Callable[[int, int, dict], None] | None) -> tuple[dict, list, float, float]:
    """Start the encoder pool and keep a window of shard tasks in flight until every shard is done or failed.
    Returns ({shard: why it failed}, [(shard, stats)], encoder seconds, wall seconds since the pool started)."""
    import ray

    init_ray(cfg.ray_address)
    t_pool = time.time()
    # SPREAD: the VQ replicas land on different nodes, so one node's loss takes the fewest of them.
    encoder = ray.remote(EncodeImages).options(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=-1,
                                               max_task_retries=-1, scheduling_strategy="SPREAD")
    encoders = [encoder.remote(cfg.vq, cfg.fold, cfg.gpus_per_actor > 0) for _ in range(cfg.concurrency)]
    task = ray.remote(tokenize_shard).options(num_cpus=cfg.cpus_per_prepare, max_retries=cfg.task_retries)
    window = _window(cfg)
    queue, pending = deque(todo), {}
    failed: dict[int, str] = {}
    now: list[tuple[int, dict]] = []
    encoder_s = 0.0
    try:
        while queue or pending:
            while queue and len(pending) < window:
                shard, url = queue.popleft()
                pending[task.remote(cfg, shard, url, encoders, vq_info)] = shard
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            try:
                st = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                failed[shard] = str(cause) if isinstance(cause, SynergenError) else f"{type(e).__name__}: {str(e)[:300]}"
                log.error("shard %s failed: %s", shard_name(shard), failed[shard])
                continue
            now.append((shard, st))
            encoder_s += st["encoder_s"]
            log.info("published %s: %d samples, %d bytes", st["path"], st["samples"], st["bytes"])
            if progress:
                progress(len(now), len(todo), st)
        wall = time.time() - t_pool
    finally:
        for a in encoders:
            ray.kill(a)
    return failed, now, encoder_s, wall
