"""A module imported without its package's `__init__` (what shard tasks do with img2dataset and webdataset): the
package's heavy imports do not run, and the package works in full afterwards in the same process."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, tempfile
from synergen.imports import submodule_alone
writer = submodule_alone("webdataset.writer")
downloader = submodule_alone("img2dataset.downloader")
heavy = sorted(m for m in ("torch", "albumentations") if m in sys.modules)
path = os.path.join(tempfile.mkdtemp(), "x.tar")
with open(path, "wb") as f, writer.TarWriter(f) as tw:  # as ingest's staging writes a shard
    tw.write({"__key__": "a", "txt": "alone"})
import threading, time
import webdataset as wds  # later, the whole package: the same modules, and what its __init__ binds
first = callable(wds.gopen)  # the first name asked: what __init__ binds (the function), not the submodule
got = {}
def ask(name, delay):  # two threads at once: the second waits for __init__, as on an import's module lock
    time.sleep(delay)
    got[name] = getattr(wds, name).__name__
threads = [threading.Thread(target=ask, args=("WebDataset", 0)), threading.Thread(target=ask, args=("ShardWriter", 0.01))]
[t.start() for t in threads]; [t.join() for t in threads]
with wds.TarWriter(path) as tw:  # a path: needs the gopen function, not the gopen module
    tw.write({"__key__": "b", "txt": "whole"})
from img2dataset import download
print(heavy, [s["txt"] for s in wds.WebDataset(path, shardshuffle=False)], wds.writer is writer,
      callable(download), sys.modules["img2dataset.downloader"] is downloader, first, sorted(got.items()))
"""


def test_a_module_imported_alone_skips_its_packages_heavy_imports_and_the_package_still_works_in_full():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == ("[] [b'whole'] True True True True "
                                                   "[('ShardWriter', 'ShardWriter'), ('WebDataset', 'WebDataset')]")
