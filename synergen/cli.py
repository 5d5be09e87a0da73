"""The `synergen` command: one subcommand per stage. Library code logs; only this module prints.

Each subcommand imports its stage lazily, so `synergen --help` stays fast.
"""

from __future__ import annotations

import logging
import os

import typer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="synergen: SynerGen-VL pretraining, from URL lists to a trained model.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- stage commands: each block below is owned by its stage; add new commands in their own block ----

# ---- ingest (pipeline/ingest.py): URL lists -> filtered raw WebDataset shards on Ray ----


@app.command()
def ingest(
    manifest: str = typer.Argument(..., help="Source manifest, e.g. manifests/sources/laion_aesthetics.yaml"),
    out: str = typer.Option(..., "--out", help="Output folder: local path or s3://bucket/prefix"),
    shard_size: int = typer.Option(1000, "--shard-size", help="Input rows per shard"),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address (default: a local Ray)"),
    allow_private_network: bool = typer.Option(False, "--allow-private-network",
                                               help="Allow loopback and private addresses (local mirrors); link-local stays refused"),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per socket operation of a download"),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Downloads per URL across re-runs for retryable failures"),
    task_retries: int = typer.Option(3, "--task-retries", help="Further attempts of a shard whose attempt died or hung"),
    shard_wall_s: float = typer.Option(None, "--shard-wall-s", help="Abandon a shard attempt running longer (default: 4x the straggler deadline)"),
) -> None:
    """Download a corpus into raw shards; re-run the same command to resume or retry. Exits 1 when shards remain unfinished."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from pipeline.ingest import run_ingest
    from synergen.errors import SynergenError

    console = Console()
    try:
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
            job = bar.add_task("rows", total=None)
            summary = run_ingest(manifest, out, shard_size=shard_size, allow_private_network=allow_private_network,
                                 ray_address=ray_address, timeout=timeout, max_attempts=max_attempts,
                                 task_retries=task_retries, shard_wall_s=shard_wall_s,
                                 progress=lambda done, total: bar.update(job, completed=done, total=total))
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"ingest -> {out}")
    table.add_column("count")
    table.add_column("rows", justify="right")
    for label, n in (("rows in", summary["rows_in"]), ("ok", summary["ok"]), ("failed", summary["failed"]),
                     ("filtered", summary["filtered"])):
        table.add_row(label, f"{n:,}")
    for reason, n in sorted(summary["failed_by_reason"].items()):
        table.add_row(f"  failed: {reason}", f"{n:,}")
    for reason, n in sorted(summary["filtered_by_reason"].items()):
        table.add_row(f"  filtered: {reason}", f"{n:,}")
    table.add_row("shards (total / this run)", f"{summary['shards_total']} / {summary['shards_this_run']}")
    table.add_row("image bytes this run", f"{summary['bytes_this_run']:,}")
    table.add_row("samples/s this run", f"{summary['samples_per_s']:,.1f}")
    console.print(table)
    if summary["shards_failed"]:  # unfinished shards: a failed job for any scheduler (RayJob, CI)
        console.print(f"[red]{len(summary['shards_failed'])} shard(s) failed all retries; re-run the same command to retry them[/red]")
        raise typer.Exit(1)

# ---- tokenize, vq-train, inspect (pipeline/tokenize.py, pipeline/vq_train.py, pipeline/inspect.py) ----


@app.command("tokenize")
def tokenize_cmd(
    raw: str = typer.Option(..., "--raw", help="Raw shards folder (the ingest output): local path or s3://"),
    out: str = typer.Option(..., "--out", help="Token shards folder: local path or s3://"),
    task: str = typer.Option(..., "--task", help="und (tiled, understanding) or gen (one centre crop, generation)"),
    vq: str = typer.Option(..., "--vq", help="Trained VQ checkpoint folder (e.g. model/assets/demo_vq) or s3:// URL"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="The LLM's text tokenizer folder (e.g. model/assets/demo_tokenizer)"),
    fold: str = typer.Option("2x8", "--fold", help="Fold ROWSxCOLS (paper: 2x8)"),
    max_tiles: int = typer.Option(6, "--max-tiles", help="Most dynamic-resolution tiles per image (und)"),
    thumbnail: bool = typer.Option(False, "--thumbnail", help="Append a whole-image thumbnail when tiled (und)"),
    image_size: int = typer.Option(512, "--image-size", help="Tile size (und) or image size (gen) in pixels"),
    source: str = typer.Option(None, "--source", help="Source name for the catalog (default: the raw folder's name)"),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="GPUs per VQ actor (0: encode on CPU)"),
    concurrency: int = typer.Option(1, "--concurrency", help="VQ encoder actors"),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per VQ forward"),
    compress: bool = typer.Option(True, "--zstd/--no-zstd", help="zstd-compress each sample member (README: token shard layout)"),
    min_distinct_codes: int = typer.Option(32, "--min-distinct-codes", help="Quality gate: distinct codes per shard"),
    min_entropy_bits: float = typer.Option(4.0, "--min-entropy-bits", help="Quality gate: code histogram entropy per shard"),
    min_psnr_db: float = typer.Option(14.0, "--min-psnr-db", help="Quality gate: reconstruction PSNR on a small sample"),
    max_flagged_share: float = typer.Option(0.1, "--max-flagged-share", help="Exit non-zero when more shards than this share are flagged"),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address (default: a local Ray)"),
) -> None:
    """Tokenize raw shards into VQ-token shards in fold order + _catalog.parquet; re-run to resume."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from pipeline.tokenize import QualityGateError, QualityThresholds, TokenizeConfig, run_tokenize
    from synergen.errors import SynergenError

    console = Console()
    try:
        cfg = TokenizeConfig(raw=raw, out=out, task=task, vq=vq, tokenizer=tokenizer, fold=fold, max_tiles=max_tiles,
                             thumbnail=thumbnail, image_size=image_size, source=source, gpus_per_actor=gpus_per_actor,
                             concurrency=concurrency, batch_size=batch_size, compress=compress, ray_address=ray_address,
                             quality=QualityThresholds(min_distinct_codes, min_entropy_bits, min_psnr_db, max_flagged_share))
        with Progress(TextColumn("tokenize"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
            job = bar.add_task("shards", total=None)
            summary = run_tokenize(cfg, progress=lambda done, total, _: bar.update(job, completed=done, total=total))
    except QualityGateError as e:
        console.print(f"[red]quality gate:[/red] {e}")
        raise typer.Exit(3) from None
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"tokenize -> {out}")
    table.add_column("count")
    table.add_column("value", justify="right")
    table.add_row("samples in", f"{summary['samples_in']:,}")
    table.add_row("tokenized", f"{summary['tokenized']:,}")
    for reason, n in sorted(summary["filtered"].items()):
        table.add_row(f"  filtered: {reason}", f"{n:,}")
    table.add_row("shards (total / this run / skipped)",
                  f"{summary['shards']} / {summary['shards_written_now']} / {summary['shards_skipped']}")
    table.add_row("bytes (bytes/sample)", f"{summary['bytes']:,} ({summary['bytes'] / max(summary['tokenized'], 1):,.0f})")
    table.add_row("samples/s this run", f"{summary['samples_per_s']:,.1f}")
    table.add_row("encoder busy fraction", f"{summary['encoder_busy_fraction']:.2f}")
    table.add_row("flagged shards", str(len(summary["flagged_shards"])))
    console.print(table)


@app.command("vq-train")
def vq_train_cmd(
    out: str = typer.Option("model/assets/demo_vq", "--out", help="Output folder for the trained VQ"),
    tokenizer_out: str = typer.Option("model/assets/demo_tokenizer", "--tokenizer-out", help="Also write the demo BPE here ('' to skip)"),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps (batch 16)"),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per step"),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (one-cycle)"),
    l1_weight: float = typer.Option(1.0, "--l1-weight", help="Weight of the pixel L1 term"),
    edge_weight: float = typer.Option(1.0, "--edge-weight", help="Weight of the edge (pixel-difference L1) term"),
    init: str = typer.Option(None, "--init", help="Fine-tune this trained VQ folder instead of starting from random weights"),
    image_size: int = typer.Option(64, "--image-size", help="Training image size in pixels"),
    codebook_size: int = typer.Option(512, "--codebook-size", help="VQ codebook entries"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train the tiny Emu3VQVAE (and the demo BPE) on the demo corpus: minutes on 2 CPU cores."""
    from pipeline.text_tokenizer import write_demo_tokenizer
    from pipeline.vq_train import VQTrainConfig, train_demo_vq

    report = train_demo_vq(VQTrainConfig(out=out, steps=steps, image_size=image_size, codebook_size=codebook_size, seed=seed,
                                       batch_size=batch_size, lr=lr, l1_weight=l1_weight, edge_weight=edge_weight, init=init))
    typer.echo(f"VQ {report['model_id']} -> {out}: held-out PSNR {report['heldout_psnr_db']} dB, "
               f"{report['heldout_distinct_codes']} distinct codes, {report['train_seconds']} s")
    if tokenizer_out:
        write_demo_tokenizer(tokenizer_out)
        typer.echo(f"demo tokenizer -> {tokenizer_out}")


@app.command("inspect")
def inspect_cmd(
    target: str = typer.Argument(..., help="A token dataset's _catalog.parquet (or its folder), or one token shard"),
    html_out: str = typer.Option(None, "--html", help="Write an HTML page of N samples here"),
    n: int = typer.Option(8, "--n", help="Samples on the page"),
    vq: str = typer.Option(None, "--vq", help="VQ checkpoint that made the codes (default: the demo VQ, checked against the catalog)"),
) -> None:
    """Print a token dataset's summary; optionally write an HTML page of decoded samples."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.inspect import summarize, write_html
    from synergen.errors import SynergenError

    console = Console()
    try:
        s = summarize(target)
        table = Table(title=f"{target}: VQ {s['vq_model']}, fold {s['fold']}, tokenizer {s['text_tokenizer']}")
        for col in ("source", "task", "shards", "samples", "image tokens", "text tokens", "bytes", "bytes/sample"):
            table.add_column(col, justify="left" if col in ("source", "task") else "right")
        for g in [*s["groups"], {"source": "total", "task": "", **s["total"]}]:
            table.add_row(str(g["source"]), g["task"] or "", str(g["shards"]), f"{g['samples']:,}", f"{g['image_tokens']:,}",
                          f"{g['text_tokens']:,}", f"{g['bytes']:,}", f"{g['bytes_per_sample']:,.0f}")
        console.print(table)
        if s["flagged"]:
            console.print(f"[yellow]flagged shards: {', '.join(s['flagged'])}[/yellow]")
        if html_out:
            console.print(f"wrote {write_html(target, html_out, n=n, vq_url=vq)}")
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


# ---- mix (train/mixture.py): the plan of a mixture before any GPU hour is spent ----


@app.command("mix")
def mix(
    mixture: str = typer.Argument(..., help="Mixture manifest (manifests/mixtures/NAME.yaml, local or s3://)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Training steps to plan for."),
    data_root: str = typer.Option(None, "--data-root", help="Resolve relative catalogs against this instead of the manifest's data_root."),
    max_epochs: float = typer.Option(4.0, "--max-epochs", help="Warn about sources that would repeat more than this many epochs."),
) -> None:
    """Print samples and tokens drawn per source, epochs per source, and warnings (empty, missing, repeating)."""
    from rich.console import Console
    from rich.table import Table

    from synergen.errors import SynergenError
    from train.mixture import MixtureManifest, plan_mixture, plan_warnings

    console = Console()
    try:
        manifest = MixtureManifest.load(mixture, data_root=data_root)
        plans, warnings = plan_mixture(manifest, steps)
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"{manifest.name} (stage {manifest.stage}): {steps:,} steps, seq {manifest.seq_len}, "
                        f"max tiles {manifest.max_tiles}{' + thumbnail' if manifest.thumbnail else ''}")
    for col in ("task", "source", "size (samples)", "size (tokens)", "samples drawn", "tokens drawn (est.)", "epochs"):
        table.add_column(col, justify="left" if col in ("task", "source") else "right")
    for p in plans:
        epochs = "-" if p.missing or not p.size.samples else f"{p.epochs:.2f}"
        table.add_row(p.task, p.source, f"{p.size.samples:,}", f"{p.size.tokens:,}", f"{p.samples:,.0f}", f"{p.tokens:,.0f}", epochs)
    console.print(table)
    for task, spec in manifest.tasks.items():
        console.print(f"{task}: {spec.global_batch:,} samples per global batch, weights in {spec.unit} ({spec.weighting})")
    for w in warnings + plan_warnings(plans, max_epochs):
        console.print(f"[yellow]warning:[/yellow] {w}")

# ---- train (train/trainer.py): DeepSpeed pretraining from token shards ----


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="train config YAML (see infra/train/*.yaml)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest good checkpoint in the output dir"),
    steps: int = typer.Option(None, "--steps", help="override the config's steps"),
    output_dir: str = typer.Option(None, "--output-dir", help="override the config's output_dir"),
) -> None:
    """Train SynerGen-VL on the mixture's token shards: single process, or under the launcher with
    `deepspeed --no_local_rank [--hostfile H] --num_gpus N $(which synergen) train CONFIG` (ranks from the env)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from synergen.errors import SynergenError
    from train.config import TrainConfig
    from train.trainer import train

    overrides = {k: v for k, v in {"steps": steps, "output_dir": output_dir}.items() if v is not None}
    try:
        cfg = TrainConfig.load(config, overrides)
    except SynergenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    show = int(os.environ.get("RANK", "0")) == 0
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                  TimeRemainingColumn(), disable=not show) as bar:
        task = bar.add_task("train", total=cfg.steps, info="")

        def on_step(rec: dict) -> None:
            info = f"loss {rec['loss']:.3f} lr {rec['lr']:.2e} tok/s {rec['tokens_per_s']:.0f} wait {100 * rec['data_wait_fraction']:.1f}%"
            bar.update(task, completed=rec["step"], info=info)

        result = train(cfg, resume=resume, on_step=on_step)
    if show:
        typer.echo(f"trained steps {result.first_step}..{result.last_step}; metrics in {result.output_dir / 'metrics.jsonl'}"
                   + (f"; model in {result.export_dir}" if result.export_dir else ""))


# ---- generate (model/generation.py): text-to-image and image-to-text with a trained SynerGen-VL ----


@app.command("generate")
def generate(
    model_path: str = typer.Argument(..., help="Trained SynerGen-VL directory (save_pretrained; local or s3://)."),
    tokenizer_path: str = typer.Option(..., "--tokenizer", help="Text tokenizer directory (local or s3://), with the model's special tokens."),
    vq_path: str = typer.Option(..., "--vq", help="VQ tokenizer (model.vq.VQTokenizer.from_pretrained; local or s3://)."),
    caption: list[str] = typer.Option(None, "--caption", help="Text-to-image: one image per caption (repeatable)."),
    image: list[str] = typer.Option(None, "--image", help="Image-to-text: caption each image file (repeatable)."),
    out: str = typer.Option("generated", "--out", help="Folder for generated PNGs (text-to-image)."),
    cfg_scale: float = typer.Option(7.5, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the k most likely codes/tokens."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Image-to-text: longest caption in tokens."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Generate images from captions (--caption) or captions from images (--image)."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from model.config import add_special_tokens
    from model.folding import fold_codes
    from model.generation import generation_prompt, understanding_prompt
    from model.modeling import SynerGenVLForCausalLM, local_dir
    from model.special_tokens import PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND
    from model.vq import VQTokenizer
    from synergen.errors import ConfigMismatchError, SynergenError

    if bool(caption) == bool(image):
        typer.echo("error: give --caption (text-to-image) or --image (image-to-text), not both or neither", err=True)
        raise typer.Exit(2)
    try:
        model = SynerGenVLForCausalLM.from_pretrained(model_path).to(device).eval()
        with local_dir(tokenizer_path) as tp:
            tok = AutoTokenizer.from_pretrained(tp)
        ids = add_special_tokens(tok)
        if ids != {k: int(v) for k, v in model.config.special_token_ids.items()}:
            raise ConfigMismatchError(f"tokenizer {tokenizer_path} special-token ids {ids} differ from the model's {model.config.special_token_ids}: use the tokenizer the model was trained with")
        vq = VQTokenizer.from_pretrained(vq_path, device=device)
        cfg = model.config
        gen = torch.Generator(device=device).manual_seed(seed)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        if caption:
            # As the loader builds training sequences: the prompt and the caption tokenized apart, then joined.
            prompts = [generation_prompt(cfg, encode(PROMPT_GEN) + encode(c)) for c in caption]
            _, pixels = model.generate_images(prompts, uncond_prompt=generation_prompt(cfg, encode(PROMPT_UNCOND)), cfg_scale=cfg_scale,
                                              temperature=temperature, top_k=top_k, generator=gen, vq=vq)
            Path(out).mkdir(parents=True, exist_ok=True)
            for i, (c, px) in enumerate(zip(caption, pixels)):
                arr = ((px.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
                path = Path(out) / f"{i:03d}.png"
                Image.fromarray(arr).save(path)
                typer.echo(f"{path}\t{c}")
        else:
            side_h, side_w = cfg.image_grid[0] * vq.downsample, cfg.image_grid[1] * vq.downsample
            groups, prompts = [], []
            for f in image:
                im = Image.open(f).convert("RGB").resize((side_w, side_h), Image.BICUBIC)
                px = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0).to(device)
                g = fold_codes(vq.encode(px)[0], cfg.fold_geometry)  # [n_blocks, k]
                groups.append(g)
                prompts.append(understanding_prompt(cfg, [g.shape[0]], encode(PROMPT_UND)))
            texts = model.generate_text(prompts, torch.cat(groups), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
            for f, t in zip(image, texts):
                typer.echo(f"{f}\t{tok.decode(t, skip_special_tokens=True).strip()}")
    except SynergenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


# ---- demo (train/demo.py): the whole system end to end on the embedded corpus ----


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("demo_out", "--out", help="output folder (corpus, shards, checkpoints, report)"),
    steps: int = typer.Option(None, "--steps", help="training steps (default: the demo's)"),
) -> None:
    """Generate the demo corpus, serve it locally, ingest, tokenize, train, generate, and write the report."""
    from train.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out) if steps is None else DemoConfig(out=out, steps=steps)
    report = run_demo(cfg, echo=typer.echo)
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    app()
