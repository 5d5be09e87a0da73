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

if __name__ == "__main__":
    app()
