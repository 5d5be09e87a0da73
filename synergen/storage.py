"""Where files live: one answer to "is this local or remote?", remote folder -> local copy, atomic publish.

Every path is an fsspec URL (a local path, `file://`, `s3://`, ...). Libraries that only read and write
local folders (transformers' `from_pretrained`/`save_pretrained`, DeepSpeed checkpoints) get a local copy
(`local_copy`) or a local staging folder that is published when complete (`publish_dir`, `staged_dir`).

Atomic publish: locally, a folder or file is written under a temporary sibling name and renamed into place,
so a reader never sees half of it. On an object store a single object appears whole when its upload ends;
a folder appears file by file, so a folder whose readers need to know it is complete carries a marker
object written last (as checkpoints do with `_complete.json`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import fsspec

from synergen.errors import SynergenError

log = logging.getLogger(__name__)


class StorageError(SynergenError):
    """A path that should hold files does not, or cannot be written; names the URL and the fix."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) of `url`."""
    return fsspec.core.url_to_fs(str(url))


def is_local(url: str) -> bool:
    """True when `url` names the local filesystem (a plain path or `file://`)."""
    fs, _ = filesystem(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def local_path(url: str) -> str:
    """The local path of a local `url` (strips `file://`); raises for a remote one."""
    if not is_local(url):
        raise StorageError(f"{url} is not a local path")
    return filesystem(url)[1]


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike (no pathlib: it turns `s3://a` into `s3:/a`)."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write one file atomically: a temporary sibling renamed into place (local), one PUT (object store)."""
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under `url`; empty when it does not exist."""
    fs, path = filesystem(url)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def file_sizes(url: str) -> dict[str, int]:
    """Every file under the folder `url`, as relative path -> size in bytes."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root):].lstrip("/"): int(info["size"]) for p, info in found.items() if info.get("type") != "directory"}


def remove(url: str) -> None:
    """Delete the folder or file `url` (nothing when it is absent)."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def download_dir(url: str, dest: str) -> str:
    """Copy every file under the folder `url` into the local folder `dest`; returns `dest`."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    files = fs.find(root)
    if not files:
        raise StorageError(f"no files under {url}: check the URL (and AWS_ENDPOINT_URL / credentials for s3://)")
    for f in files:
        target = os.path.join(dest, f[len(root):].lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f, target)
    return dest


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local folder holding the files under `url`: the path itself when local, else a temporary download."""
    if is_local(url):
        path = local_path(url)
        if not os.path.exists(path):
            raise StorageError(f"no such folder {url}: check the path")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="synergen-copy-") as tmp:
        yield download_dir(url, tmp)


def _replace_dir(tmp: str, dest: str) -> None:
    """Rename the complete folder `tmp` to `dest` (a sibling), replacing what was there."""
    if os.path.exists(dest):
        old = f"{dest}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _sibling_tmp(dest: str) -> str:
    parent, name = os.path.split(dest.rstrip("/"))
    os.makedirs(parent or ".", exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent or ".")


def publish_dir(src: str, url: str, skip: tuple[str, ...] = ()) -> None:
    """Publish the local folder `src` at `url`.

    Local: copied to a temporary sibling, then renamed into place (an existing folder is replaced).
    Remote: each file uploaded (files named in `skip` left out, e.g. a marker the caller writes last).
    """
    if is_local(url):
        dest = local_path(url).rstrip("/")
        tmp = _sibling_tmp(dest)
        try:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip) if skip else None, dirs_exist_ok=True)
            _replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    fs, root = filesystem(url)
    for dirpath, _, names in os.walk(src):
        for name in names:
            if name in skip:
                continue
            local = os.path.join(dirpath, name)
            fs.put_file(local, f"{root.rstrip('/')}/{os.path.relpath(local, src)}")


@contextlib.contextmanager
def staged_dir(url: str) -> Iterator[str]:
    """A local folder to write into, published whole at `url` on a clean exit (nothing published on an error).

    Local: a temporary sibling renamed into place (no copy). Remote: a temporary folder, then uploaded."""
    if is_local(url):
        dest = local_path(url).rstrip("/")
        tmp = _sibling_tmp(dest)
        try:
            yield tmp
            _replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="synergen-stage-") as tmp:
        yield tmp
        publish_dir(tmp, url)
