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

if __name__ == "__main__":
    app()
