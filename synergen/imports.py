"""Importing one module of a package without the package's `__init__`.

A shard task uses `img2dataset.downloader` and `webdataset.writer`. Importing either the ordinary way first runs
its package's `__init__`: img2dataset's imports its command line (its writers import webdataset, its resizer
albumentations), webdataset's imports its torch integration. That is ~3.5 s of CPU in every Ray worker, for code a
shard task never runs; alone, the two modules take ~0.6 s (measured: README, "Ingest").
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def submodule_alone(name: str) -> ModuleType:
    """`package.module` imported without running `package/__init__.py` where nothing imported the package yet. A
    later `import package` in the same process still runs its `__init__` and gets the whole package (reusing this
    module)."""
    if name in sys.modules:
        return sys.modules[name]
    package = name.partition(".")[0]
    if package in sys.modules:  # the whole package is there already
        return importlib.import_module(name)
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"{package} is not installed: `make test` (or pip install -e .) installs it")
    sys.modules[package] = importlib.util.module_from_spec(spec)  # the package with its path, __init__ not run
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules[package]
