"""Importing one module of a package without the package's `__init__`.

A shard task uses `img2dataset.downloader` and `webdataset.writer`. Importing either the ordinary way first runs
its package's `__init__`: img2dataset's imports its command line (its writers import webdataset, its resizer
albumentations), webdataset's imports its torch integration. That is ~3.5 s of CPU in every Ray worker, for code a
shard task never runs; alone, the two modules take ~0.6 s (measured: README, "Ingest"). The rest of the package
is imported the first time anything asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType


def submodule_alone(name: str) -> ModuleType:
    """`package.module` imported without running `package/__init__.py` where nothing imported the package yet.

    The package stays in `sys.modules` with only its submodules; the first attribute anything asks of it later
    (`import package; package.X`, `from package import X`) runs its `__init__` then, in place, as a normal import
    would have: the same module objects, the same names."""
    if name in sys.modules:
        return sys.modules[name]
    package = name.partition(".")[0]
    if package in sys.modules:  # the whole package is there already (or half, from an earlier call)
        return importlib.import_module(name)
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"{package} is not installed: `make test` (or pip install -e .) installs it")
    pkg = importlib.util.module_from_spec(spec)  # the package with its path, __init__ not run
    completer = _Completer(pkg, spec)
    pkg.__getattr__ = completer
    sys.modules[package] = pkg
    try:
        module = importlib.import_module(name)
    except BaseException:
        del sys.modules[package]
        raise
    _bind_reexports(module, package, spec.origin)
    # the submodules' names stay off the package until __init__ runs: asking for one (`package.gopen`) completes the
    # package and gets what __init__ binds to it (the function `gopen`), not the submodule
    for attr, value in list(vars(pkg).items()):
        if isinstance(value, ModuleType) and value.__name__ == f"{package}.{attr}":
            completer.subs[attr] = pkg.__dict__.pop(attr)
    completer.ready = True
    return module


class _Completer:
    """Module `__getattr__` (PEP 562) of a half-imported package: on the first name asked, run its `__init__` (once,
    under a lock: other threads asking meanwhile wait for it, as they would on an import's module lock), then
    answer."""

    def __init__(self, pkg: ModuleType, spec):
        self.pkg, self.spec, self.name = pkg, spec, spec.name
        self.subs: dict[str, ModuleType] = {}
        self.ready = False  # False while the submodule imports (`from . import x` probes: as if __init__ had not run)
        self.running = self.done = False

    def __call__(self, attr: str):
        pkg = self.pkg
        if not self.ready:
            raise AttributeError(f"module {self.name!r} has no attribute {attr!r}")
        with _LOCK:
            if not self.done:
                if self.running:  # asked by __init__ itself, still running: not bound yet
                    raise AttributeError(f"module {self.name!r} has no attribute {attr!r}")
                self.running = True
                try:
                    self.spec.loader.exec_module(pkg)
                except BaseException:
                    sys.modules.pop(self.name, None)  # a later import tries again, as after any failed import
                    raise
                finally:
                    self.running = False
                self.done = True
                if pkg.__dict__.get("__getattr__") is self:  # unless __init__ defined its own
                    del pkg.__dict__["__getattr__"]
                for sub, mod in self.subs.items():  # a submodule where __init__ bound nothing of that name
                    pkg.__dict__.setdefault(sub, mod)
        if attr in pkg.__dict__:
            return pkg.__dict__[attr]
        own = pkg.__dict__.get("__getattr__")
        if own is not None and own is not self:
            return own(attr)
        raise AttributeError(f"module {self.name!r} has no attribute {attr!r}")


_LOCK = threading.RLock()


def _bind_reexports(module: ModuleType, package: str, init_path: str | None) -> None:
    """What the package's `__init__` would have bound: a module doing `from . import gopen` gets the submodule
    when `__init__` did not run, where the package would hand it the function its `__init__` re-exports
    (`from .gopen import gopen`). Rebind such names to what `__init__` re-exports, so this module works for a later
    `import package` in the same process too."""
    import re

    try:
        with open(init_path or "", encoding="utf-8") as f:
            init = f.read()
    except OSError:
        return
    for attr, value in list(vars(module).items()):
        if isinstance(value, ModuleType) and value.__name__ == f"{package}.{attr}" and hasattr(value, attr):
            if re.search(rf"^from \.{attr} import [^\n]*\b{attr}\b", init, re.M):
                setattr(module, attr, getattr(value, attr))
