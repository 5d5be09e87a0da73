"""`synergen demo`: the whole system end to end on the embedded shapes corpus, in minutes on a CPU.

The steps, each a real stage of the system:
  1. corpus    render the demo scenes (synergen.demo.corpus); the last `n_eval` are held out of training
  2. web       serve them from a local web server (synergen.demo.localweb) and write a LAION-style URL list
  3. ingest    a local Ray cluster downloads them into raw WebDataset shards (pipeline.ingest)
  4. tokenize  the tiny trained VQ and the demo BPE turn them into token shards for both tasks (pipeline.tokenization)
  5. train     the tiny model through DeepSpeed on the demo mixture: stage 1 (image-side parameters), then
               all parameters (the demo's LLM starts random: there is no language to protect)
  6. evaluate  generate images from held-out captions and captions from held-out images; the learning
               check scores both with the corpus's own classifier (synergen.demo.corpus.classify_image)
  7. report    an HTML page with the loss curves, stage statistics, samples beside targets (synergen.demo.report)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from synergen.demo.config import DemoConfig

log = logging.getLogger(__name__)

def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def prepare_data(cfg: DemoConfig, out: Path, stats: dict[str, Any], echo: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Steps 1-4: corpus, local web, Ray ingest, tokenize both tasks into `out/tokens`; returns the held-out rows."""
    import ray

    from synergen.demo.corpus import write_demo_corpus, write_url_list
    from pipeline.ingest import run_ingest
    from synergen.local_ray import init_ray
    from synergen.demo.localweb import LocalWeb
    from pipeline.tokenization import TokenizeConfig, run_tokenize

    stats.setdefault("timings_s", {})

    def timed(name: str, t0: float) -> None:
        stats["timings_s"][name] = round(time.time() - t0, 1)
        echo(f"[demo] {name}: {stats['timings_s'][name]} s")

    # 1-2. corpus and web
    t0 = time.time()
    rows = write_demo_corpus(out / "www", n=cfg.n_images, seed=cfg.seed)
    train_rows, eval_rows = rows[: len(rows) - cfg.n_eval], rows[len(rows) - cfg.n_eval:]
    web = LocalWeb(out / "www").start()
    urls = write_url_list(train_rows, web.base, str(out / "urls" / "demo.parquet"))
    timed("corpus", t0)
    own_ray = not ray.is_initialized()
    try:
        # 3. ingest on a local Ray cluster
        t0 = time.time()
        if own_ray:
            init_ray(num_cpus=2, log_to_driver=False)  # loopback only, no cloud metadata probe
        stats["ingest"] = run_ingest(cfg.source_manifest, str(out / "raw" / "demo"), shard_size=400,
                                     allow_private_network=True, url_lists=[urls])
        timed("ingest", t0)
    finally:
        web.stop()

    # 4. tokenize for both tasks
    t0 = time.time()
    stats["tokenize"] = {}
    for task in ("gen", "und"):
        tcfg = TokenizeConfig(raw=str(out / "raw" / "demo"), out=str(out / "tokens" / task / "demo"), task=task, vq=cfg.vq,
                              tokenizer=cfg.tokenizer, fold=cfg.fold, max_tiles=1, image_size=cfg.image_size,
                              source=f"demo_{task}", psnr_images=2)
        stats["tokenize"][task] = run_tokenize(tcfg)
    if own_ray:
        ray.shutdown()  # give the cores back to training
    timed("tokenize", t0)
    return eval_rows


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = lambda s: None) -> Path:
    """Run every step into `cfg.out`; return the report's path. Each step logs what it did."""
    _set_threads(cfg.threads)
    out = Path(cfg.out).resolve()
    # A demo run starts clean: the web server's port (part of every URL) changes between runs, so an old
    # ledger would see a new corpus. Resumability is what the stages' own tests prove.
    for old in ("urls", "raw", "tokens", "cache", "train", "report"):
        shutil.rmtree(out / old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"config": cfg.model_dump(), "timings_s": {}}
    t_all = time.time()
    eval_rows = prepare_data(cfg, out, stats, echo)

    # 5. train: stage 1, then everything
    t0 = time.time()
    stats["train"] = train_demo_model(cfg, out)
    stats["timings_s"]["train"] = round(time.time() - t0, 1)
    echo(f"[demo] train: {stats['timings_s']['train']} s")

    # 6. evaluate
    t0 = time.time()
    stats["eval"] = evaluate(cfg, out / "train" / "all" / "model", eval_rows, out / "www", out / "report")
    stats["timings_s"]["evaluate"] = round(time.time() - t0, 1)

    # 7. report
    from synergen.demo.report import write_report

    stats["timings_s"]["total"] = round(time.time() - t_all, 1)
    (out / "demo_stats.json").write_text(json.dumps(stats, indent=1, default=str))
    report = write_report(out, stats)
    ev = stats["eval"]
    echo(f"[demo] learning check: images {ev['image_match']:.0%} and captions {ev['caption_match']:.0%} match the held-out "
         f"shape+colour (chance {ev['chance']:.0%}); {stats['timings_s']['total']} s in all")
    return report


def train_config(cfg: DemoConfig, out: Path, stage, model: str, steps: int, overrides: dict):
    from train.config import TrainConfig

    return TrainConfig(
        model=model, model_overrides=overrides, tokenizer=cfg.tokenizer, vq=cfg.vq, stage=stage, mixture=cfg.mixture,
        data_root=str(out / "tokens"), data_options={"cache_dir": str(out / "cache")}, deepspeed=cfg.deepspeed,
        precision="auto", lr=cfg.lr, schedule="cosine" if stage == "sft" else "constant", warmup_steps=cfg.warmup_steps,
        steps=steps, seed=cfg.seed, output_dir=str(out / "train" / ("stage1" if stage == 1 else "all")),
        save_every=max(50, steps // 4), log_every=1, loss_reduction=cfg.loss_reduction,
    )


def model_overrides(cfg: DemoConfig) -> dict[str, Any]:
    """The demo model's config: the demo sizes plus the VQ's codebook and grid and the fold."""
    from model.vq import VQTokenizer

    vq = VQTokenizer.from_pretrained(cfg.vq)
    fh, fw = (int(x) for x in cfg.fold.split("x"))
    grid = list(vq.grid(cfg.image_size, cfg.image_size))
    return {**cfg.model_overrides, "codebook_size": vq.codebook_size, "image_grid": grid, "fold": [fh, fw]}


def train_demo_model(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Stage 1 from scratch, then all parameters from the stage-1 export; returns per-stage statistics."""
    from train.trainer import train

    overrides = model_overrides(cfg)
    s1 = max(1, int(cfg.steps * cfg.stage1_share))
    results = {}
    r1 = train(train_config(cfg, out, 1, "tiny", s1, overrides), resume=True)
    results["stage1"] = _stage_stats(r1)
    r2 = train(train_config(cfg, out, "sft", str(r1.export_dir), cfg.steps - s1, {}), resume=True)
    results["all"] = _stage_stats(r2)
    return results


def _stage_stats(result) -> dict[str, Any]:
    from train.metrics import read_metrics

    recs = read_metrics(Path(result.metrics_url))
    n = len(recs)
    tail = recs[-max(1, n // 10):]
    head = recs[: max(1, n // 10)]

    def mean(rs, k):
        vals = [r[k] for r in rs if k in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "steps": n, "metrics": result.metrics_url,
        "loss_first": mean(head, "loss"), "loss_last": mean(tail, "loss"),
        "loss_und_last": mean(tail, "loss/und"), "loss_gen_last": mean(tail, "loss/gen"),
        "tokens_per_s": mean(recs, "tokens_per_s"), "samples_per_s": mean(recs, "samples_per_s"),
        "data_wait_fraction": mean(recs, "data_wait_fraction"), "packing_efficiency": mean(recs, "packing_efficiency"),
        "seconds": sum(r["time_s"] for r in recs),
    }


# ---- the learning check -----------------------------------------------------------------------------------

COLOUR_WORDS = ("red", "green", "blue", "yellow")
SHAPE_WORDS = ("circle", "square", "triangle")


def named_object(text: str) -> tuple[str | None, str | None]:
    """The first (colour, shape) a caption names, e.g. 'a red circle on the left' -> ('red', 'circle')."""
    words = re.findall(r"[a-z]+", text.lower())
    colour = next((w for w in words if w in COLOUR_WORDS), None)
    shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPE_WORDS), None)
    return colour, shape


def evaluate(cfg: DemoConfig, model_dir: Path, eval_rows: list[dict], image_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Generate images from held-out captions and captions from held-out images; score both vs the targets."""
    from PIL import Image

    from synergen.demo.corpus import classify_image
    from pipeline.tiling import resize_center_crop, to_images, to_pixels
    from train.generate import TrainedModel, open_image

    tm = TrainedModel.load(str(model_dir), cfg.tokenizer, cfg.vq)
    gen = torch.Generator().manual_seed(cfg.seed)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)

    # Text -> image, then image -> text (each image preprocessed as tokenize did for the stage: TrainedModel).
    images = tm.images([r["caption"] for r in eval_rows], cfg_scale=cfg.cfg_scale, temperature=cfg.temperature,
                       top_k=cfg.top_k, generator=gen)
    pictures = [open_image(str(image_dir / r["file"])) for r in eval_rows]
    # The check's ceiling: how often the classifier names the target itself after a VQ round trip (the
    # tiny VQ blurs 64-px shapes), i.e. the best a perfect generator could score here.
    grid_codes = tm.vq.encode(to_pixels([resize_center_crop(p, cfg.image_size) for p in pictures]))  # [N, gh, gw]
    ceiling = [classify_image(im) for im in to_images(tm.vq.decode(grid_codes))]
    captions = tm.captions(pictures, max_new_tokens=24)

    samples, img_hits, cap_hits, img_colour, img_shape, cap_colour, cap_shape = [], 0, 0, 0, 0, 0, 0
    for i, (r, im, cap) in enumerate(zip(eval_rows, images, captions)):
        shape, colour = classify_image(im)
        c_colour, c_shape = named_object(cap)
        img_ok = (shape, colour) == (r["shape"], r["colour"])
        cap_ok = (c_shape, c_colour) == (r["shape"], r["colour"])
        img_hits += img_ok
        cap_hits += cap_ok
        img_colour += colour == r["colour"]
        img_shape += shape == r["shape"]
        cap_colour += c_colour == r["colour"]
        cap_shape += c_shape == r["shape"]
        name = f"gen_{i:03d}.png"
        im.resize((128, 128), Image.NEAREST).save(samples_dir / name)
        samples.append({"caption": r["caption"], "target": r["file"], "generated_image": name, "classified": [shape, colour],
                        "image_ok": img_ok, "generated_caption": cap, "caption_named": [c_shape, c_colour], "caption_ok": cap_ok,
                        "dominant": [r["shape"], r["colour"]]})
    n = max(1, len(eval_rows))
    ceil_both = sum(c == (r["shape"], r["colour"]) for c, r in zip(ceiling, eval_rows)) / n
    ceil_colour = sum(c[1] == r["colour"] for c, r in zip(ceiling, eval_rows)) / n
    return {
        "vq_ceiling": ceil_both, "vq_ceiling_colour": ceil_colour,
        "n": len(eval_rows), "image_match": img_hits / n, "caption_match": cap_hits / n,
        "image_colour": img_colour / n, "image_shape": img_shape / n, "caption_colour": cap_colour / n, "caption_shape": cap_shape / n,
        "chance": 1 / (len(COLOUR_WORDS) * len(SHAPE_WORDS)), "chance_colour": 1 / len(COLOUR_WORDS),
        "chance_shape": 1 / len(SHAPE_WORDS), "samples": samples,
    }
