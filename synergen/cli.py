"""The `synergen` command: one subcommand per stage. Library code logs; only this module prints.

Each subcommand imports its stage lazily, so `synergen --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import typing

import typer

from pipeline.ingest_config import IngestOptions
from pipeline.tokenization_config import TokenizeConfig
from model.init_config import InitConfig
from synergen.demo.config import DemoConfig, VQTrainConfig
from pipeline.inspection_config import InspectConfig
from train.generate_config import GenerateConfig
from train.mix_config import MixConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="synergen: SynerGen-VL pretraining, from URL lists to a trained model.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which would phone home
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def options_from(model: type, what: str, flags: dict[str, str] | None = None, arguments: tuple[str, ...] = (),
                 hidden: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
    """The command's options are `model`'s fields (pydantic): their types, defaults and descriptions, so no default
    is restated here; a nested model's fields are flat options, a list or tuple field a repeatable option, a field
    in `arguments` a positional argument, one in `hidden` an option left out of --help, one in `exclude` no option
    (its default holds: for values a flag cannot spell, like a dict). `flags` renames a field's
    flag. The command's own parameters after the first (things that are no field: a manifest, an output folder)
    stay as it declares them, before the fields.

    The command receives the validated model (then its own parameters by name); values that do not validate are
    reported like a bad config, each named by its flag (`explain_validation`), with exit code 2."""
    fields = _flat_fields(model)
    unknown = (set(flags or {}) | set(arguments) | set(hidden) | set(exclude)) - {name for _, name, _ in fields}
    fields = [(parent, name, f) for parent, name, f in fields if name not in exclude]
    assert not unknown, f"options_from({model.__name__}): no fields {sorted(unknown)}"
    params, names = [], {}  # names: dotted field path -> what the user typed (flag or ARGUMENT)
    for parent, name, f in fields:
        param, names[f"{parent}.{name}" if parent else name] = _cli_parameter(name, f, (flags or {}).get(name),
                                                                              name in arguments, name in hidden)
        params.append(param)

    def decorate(fn):
        own = list(inspect.signature(fn).parameters.values())[1:]  # after the model
        clash = {p.name for p in own} & {p.name for p in params}
        assert not clash, f"{fn.__name__}: parameters {clash} are also fields of {model.__name__}"

        @functools.wraps(fn)
        def command(**given):
            from synergen.errors import ConfigError, validated

            values: dict = {}
            for parent, name, _ in fields:
                (values.setdefault(parent, {}) if parent else values)[name] = given[name]
            try:
                cfg = validated(model, f"synergen {fn.__name__.removesuffix('_cmd').replace('_', '-')}", what,
                                flags=names, **values)
            except ConfigError as e:
                from rich.console import Console
                from rich.markup import escape

                Console().print(f"[red]error:[/red] {escape(str(e))}")
                raise typer.Exit(2) from None
            return fn(cfg, **{p.name: given[p.name] for p in own})

        command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + params)
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        del command.__wrapped__  # typer reads the signature above, not the wrapped function's
        return command

    return decorate


def _flat_fields(model: type) -> list[tuple[str | None, str, object]]:
    """(parent or None, name, FieldInfo) of a model's fields, a nested model's fields in its place."""
    from pydantic import BaseModel

    fields = []
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            fields += [(name, sub, sf) for sub, sf in f.annotation.model_fields.items()]
        else:
            fields.append((None, name, f))
    return fields


def _cli_type(ann):
    """The type typer parses a field's value as (pydantic then validates it)."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    origin = typing.get_origin(ann)
    if origin is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
        return str  # pydantic checks the choice and names the allowed values
    if origin in (list, tuple):
        return list[args[0]]  # repeatable; pydantic makes the tuple
    return typing.Optional[args[0]] if len(args) == 1 and type(None) in typing.get_args(ann) else ann


def _cli_parameter(name: str, f, flag: str | None, argument: bool, hidden: bool) -> tuple[inspect.Parameter, str]:
    """A field as a typer parameter, and what a user types to set it (`--flag`, or the ARGUMENT's name)."""
    default = ... if f.is_required() else f.get_default(call_default_factory=True)
    if isinstance(default, tuple):
        default = list(default)
    typ = _cli_type(f.annotation)
    if argument:
        info, typed = typer.Argument(default, help=f.description, show_default=default is not ...), name.upper()
    else:
        flag = flag or f"--{name.replace('_', '-')}"
        if f.annotation is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        metavar = f"<{typing.get_args(typ)[0].__name__}>" if typing.get_origin(typ) is list else None  # not `<list[str]>`
        info, typed = typer.Option(default, flag, help=f.description, hidden=hidden, metavar=metavar), flag.split("/")[0]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ, default=info), typed


# ---- stage commands: each block below is owned by its stage; add new commands in their own block ----

# ---- ingest (pipeline/ingest.py): URL lists -> filtered raw WebDataset shards on Ray ----


@app.command()
@options_from(IngestOptions, "ingest options", flags={"download_deadline_s": "--download-deadline"}, hidden=("connect_audit",))
def ingest(
    opts: IngestOptions,
    manifest: str = typer.Argument(..., help="Source manifest, e.g. manifests/sources/laion_aesthetics.yaml"),
    out: str = typer.Option(..., "--out", help="Output folder: local path or s3://bucket/prefix"),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address (default: a local Ray)"),
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
            summary = run_ingest(manifest, out, ray_address=ray_address, **opts.model_dump(),
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

# ---- tokenize, vq-train, inspect (pipeline/tokenization.py, synergen/demo/vq_train.py, pipeline/inspection.py) ----


@app.command("tokenize")
@options_from(TokenizeConfig, "tokenize options", flags={"compress": "--zstd/--no-zstd"})
def tokenize_cmd(cfg: TokenizeConfig) -> None:
    """Tokenize raw shards into VQ-token shards in fold order + _catalog.parquet; re-run to resume."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from pipeline.tokenization import QualityGateError, UnfinishedShardsError, run_tokenize
    from synergen.errors import SynergenError

    console = Console()
    try:
        with Progress(TextColumn("tokenize"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
            job = bar.add_task("shards", total=None)
            summary = run_tokenize(cfg, progress=lambda done, total, _: bar.update(job, completed=done, total=total))
    except QualityGateError as e:
        console.print(f"[red]quality gate:[/red] {e}")
        raise typer.Exit(3) from None
    except UnfinishedShardsError as e:  # a scheduler must not call a partial job a success
        console.print(f"[red]unfinished:[/red] {e}")
        raise typer.Exit(4) from None
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"tokenize -> {cfg.out}")
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
@options_from(VQTrainConfig, "vq-train options")
def vq_train_cmd(
    cfg: VQTrainConfig,
    tokenizer_out: str = typer.Option("model/assets/demo_tokenizer", "--tokenizer-out",
                                      help="Also write the demo BPE here ('' to skip)"),
) -> None:
    """Train the tiny Emu3VQVAE (and the demo BPE) on the demo corpus: minutes on 2 CPU cores."""
    from pipeline.text_tokenizer import write_demo_tokenizer
    from synergen.demo.vq_train import train_demo_vq
    from synergen.errors import SynergenError

    try:
        report = train_demo_vq(cfg)
    except SynergenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"VQ {report['model_id']} -> {cfg.out}: held-out PSNR {report['heldout_psnr_db']} dB, "
               f"{report['heldout_distinct_codes']} distinct codes, {report['train_seconds']} s")
    if tokenizer_out:
        write_demo_tokenizer(tokenizer_out)
        typer.echo(f"demo tokenizer -> {tokenizer_out}")


@app.command("inspect")
@options_from(InspectConfig, "inspect options", arguments=("target",))
def inspect_cmd(cfg: InspectConfig) -> None:
    """Print a token dataset's summary; optionally write an HTML page of decoded samples."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.inspection import inspect_dataset
    from synergen.errors import SynergenError

    console = Console()
    try:
        s, page = inspect_dataset(cfg)
        table = Table(title=f"{cfg.target}: VQ {s['vq_model']}, fold {s['fold']}, tokenizer {s['text_tokenizer']}")
        for col in ("source", "task", "shards", "samples", "image tokens", "text tokens", "bytes", "bytes/sample"):
            table.add_column(col, justify="left" if col in ("source", "task") else "right")
        for g in [*s["groups"], {"source": "total", "task": "", **s["total"]}]:
            table.add_row(str(g["source"]), g["task"] or "", str(g["shards"]), f"{g['samples']:,}", f"{g['image_tokens']:,}",
                          f"{g['text_tokens']:,}", f"{g['bytes']:,}", f"{g['bytes_per_sample']:,.0f}")
        console.print(table)
        if s["flagged"]:
            console.print(f"[yellow]flagged shards: {', '.join(s['flagged'])}[/yellow]")
        if page:
            console.print(f"wrote {page}")
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


# ---- mix (train/mixture.py): the plan of a mixture before any GPU hour is spent ----


@app.command("mix")
@options_from(MixConfig, "mix options", arguments=("mixture",))
def mix(cfg: MixConfig) -> None:
    """Print samples, tokens and epochs per source as the loader will draw them (its own sequence lengths and
    <UNCOND> rate), with warnings (empty, missing, repeating); or, with --run, planned beside realised."""
    from rich.console import Console
    from rich.table import Table

    from synergen.errors import SynergenError
    from train.mixture import mix_report

    console = Console()
    try:
        report = mix_report(cfg)
    except SynergenError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    manifest, steps, plans, rows, run = report.manifest, report.steps, report.plans, report.realised, cfg.run
    table = Table(title=f"{manifest.name} (stage {manifest.stage}): {steps:,} steps, seq {manifest.seq_len}, "
                        f"max tiles {manifest.max_tiles}{' + thumbnail' if manifest.thumbnail else ''}")
    cols = ["task", "source", "size (samples)", "size (tokens)", "samples drawn", "tokens drawn", "epochs"]
    if run is not None:
        cols = ["task", "source", "samples planned", "realised", "tokens planned", "realised", "epochs planned", "realised",
                "worst diff"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("task", "source") else "right")
    if run is None:
        for p in plans:
            epochs = "-" if p.missing or not p.size.samples else f"{p.epochs:.2f}"
            table.add_row(p.task, p.source, f"{p.size.samples:,}", f"{p.size.tokens:,}", f"{p.samples:,.0f}", f"{p.tokens:,.0f}", epochs)
    else:
        for r in rows:
            p = r.plan
            diffs = [abs(got - want) / want for want, got in ((p.samples, r.samples), (p.tokens, r.tokens), (p.epochs, r.epochs)) if want]
            table.add_row(p.task, p.source, f"{p.samples:,.0f}", f"{r.samples:,}", f"{p.tokens:,.0f}", f"{r.tokens:,}",
                          f"{p.epochs:.3f}", f"{r.epochs:.3f}", f"{max(diffs, default=0):.2%}")
    console.print(table)
    for task, spec in manifest.tasks.items():
        online = f", reweighted online ({spec.reweight.policy}; planned at the starting weights)" if spec.reweight else ""
        console.print(f"{task}: {spec.global_batch:,} samples per global batch, weights in {spec.unit} ({spec.weighting}){online}")
    if run is not None:
        console.print(f"plot: {report.plot}")
    for w in report.warnings:
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

        try:
            result = train(cfg, resume=resume, on_step=on_step)
        except SynergenError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    if show:
        typer.echo(f"trained steps {result.first_step}..{result.last_step}; metrics in {result.metrics_url}"
                   + (f"; model in {result.export_dir}" if result.export_dir else ""))


# ---- generate (model/generation.py): text-to-image and image-to-text with a trained SynerGen-VL ----


@app.command("generate")
@options_from(GenerateConfig, "generate options", arguments=("model",))
def generate(cfg: GenerateConfig) -> None:
    """Generate images from captions (--caption) or captions from images (--image); prints one line per output:
    the PNG written and its caption, or the image file and its caption."""
    from synergen.errors import SynergenError
    from train.generate import run_generate

    try:
        for where, text in run_generate(cfg):
            typer.echo(f"{where}\t{text}")
    except SynergenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


# ---- init (model/from_llm.py): a pretrained LLM -> a SynerGen-VL ready for stage 1 ----


@app.command("init")
@options_from(InitConfig, "init options", arguments=("llm",))
def init_cmd(cfg: InitConfig) -> None:
    """Build a SynerGen-VL from a pretrained LLM: tokens added to its tokenizer, weights copied, text logits checked."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from model.from_llm import init_from_config
    from synergen.errors import SynergenError

    console = Console()
    try:
        report = init_from_config(cfg)
    except (SynergenError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    r = asdict(report)
    table = Table(title=f"synergen init: {cfg.llm} -> {cfg.out}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("llm_family", "tied_embeddings", "llm_vocab_size", "vocab_size", "bos", "sequence_template"):
        table.add_row(key, str(r[key]))
    table.add_row("special_token_ids", ", ".join(f"{k}={v}" for k, v in r["special_token_ids"].items()))
    for part, n in r["parameters"].items():
        table.add_row(f"parameters: {part}", f"{n:,}")
    table.add_row("max text-logit difference vs the LLM", f"{r['max_logit_diff']:.2e}")
    console.print(table)


# ---- demo (synergen/demo/run.py): the whole system end to end on the embedded corpus ----


@app.command("demo")
@options_from(DemoConfig, "demo options", exclude=("model_overrides",))
def demo_cmd(cfg: DemoConfig) -> None:
    """Generate the demo corpus, serve it locally, ingest, tokenize, train, generate, and write the report."""
    from synergen.demo.run import run_demo

    report = run_demo(cfg, echo=typer.echo)
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    app()
