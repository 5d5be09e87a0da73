"""Checkpoints: DeepSpeed's own, plus what exact resume needs (loader state, RNG states), and export.

Layout under `OUTPUT/checkpoints/` (local or remote, e.g. `s3://bucket/run/checkpoints`): one DeepSpeed tag
per save, `step_00000042/`, holding DeepSpeed's files and our `_complete.json` (step, file sizes), written
by rank 0 only after every rank has saved (and, for a remote folder, after every file is uploaded).
A tag without it is partial (the job died while saving); a tag whose files disagree with it, or that
DeepSpeed cannot load, is corrupt. DeepSpeed reads and writes local folders only: for a remote checkpoint
folder it writes to a local staging folder, which each node's first rank uploads, and a resume downloads
the chosen tag into it first (`synergen.storage`). `load_latest` takes the newest good tag and says clearly which one it
skipped and why. The client state holds the loader state and the RNG states of every rank (DeepSpeed
writes the client state from rank 0 only, so each rank's own states are gathered first).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from synergen import storage
from synergen.errors import SynergenError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "_complete.json"


class CheckpointError(SynergenError):
    """No usable checkpoint where one was asked for, or one that cannot be exported."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and, when present, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def list_tags(ckpt_url: str) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint folder under `ckpt_url` (local or remote), oldest first."""
    return sorted((int(m.group(1)), name) for name in storage.list_dir(str(ckpt_url)) if (m := TAG_RE.match(name)))


def check_tag(ckpt_url: str, tag: str) -> str | None:
    """Why the checkpoint `tag` is unusable, or None when its files match its completion marker."""
    folder = storage.join(str(ckpt_url), tag)
    sizes = storage.file_sizes(folder)
    if MARKER not in sizes:
        return "partial: no completion marker (the run stopped while saving)"
    try:
        expected = json.loads(storage.read_bytes(storage.join(folder, MARKER)))["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"corrupt completion marker ({e})"
    for name, size in expected.items():
        if name not in sizes:
            return f"file {name} is missing"
        if sizes[name] != size:
            return f"file {name} has {sizes[name]} bytes, the marker says {size}"
    return None


def staging_dir(ckpt_url: str, local_dir: str | None) -> str:
    """The local folder DeepSpeed writes to: the checkpoint folder itself when local, else `local_dir`."""
    return storage.local_path(str(ckpt_url)) if storage.is_local(str(ckpt_url)) else str(local_dir)


def save(engine, ckpt_url: str, step: int, loader_state: Any, extra: dict[str, Any] | None = None, keep_last: int = 3,
         local_dir: str | None = None) -> str:
    """Save a DeepSpeed checkpoint for `step` with every rank's loader and RNG states; prune old ones.

    A remote `ckpt_url` is written to `local_dir` first, uploaded by each node's first rank, and marked complete
    by rank 0 once every node's files are up; the local copy is then deleted."""
    ckpt_url = str(ckpt_url)
    remote = not storage.is_local(ckpt_url)
    stage = staging_dir(ckpt_url, local_dir)
    tag = tag_for(step)
    client_state = {
        "step": step,
        "loader_states": _gather(loader_state),
        "rng_states": _gather(rng_state()),
        **(extra or {}),
    }
    engine.save_checkpoint(stage, tag=tag, client_state=client_state)
    _barrier()
    files: dict[str, int] = {}
    folder = os.path.join(stage, tag)
    if _local_rank() == 0:  # one rank per node lists (and uploads) what this node's ranks wrote
        files = storage.file_sizes(folder)
        files.pop(MARKER, None)
        if remote:
            storage.publish_dir(folder, storage.join(ckpt_url, tag), skip=(MARKER,))
    files = {k: v for per_node in _gather(files) for k, v in per_node.items()}
    _barrier()
    if _rank() == 0:
        storage.write_bytes(storage.join(ckpt_url, tag, MARKER), json.dumps({"step": step, "files": files}, indent=1).encode())
        for old_step, old_tag in list_tags(ckpt_url)[:-keep_last]:
            if old_step < step:
                storage.remove(storage.join(ckpt_url, old_tag))
        log.info("saved checkpoint %s (%d files)", storage.join(ckpt_url, tag), len(files))
    _barrier()
    if remote and _local_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return tag


def _fetch(ckpt_url: str, tag: str, stage: str) -> None:
    """Bring a remote checkpoint tag into the local staging folder (each node's first rank downloads)."""
    if _local_rank() == 0:
        target = os.path.join(stage, tag)
        shutil.rmtree(target, ignore_errors=True)
        storage.download_dir(storage.join(ckpt_url, tag), target)
    _barrier()


def load_latest(engine, ckpt_url: str, local_dir: str | None = None) -> dict[str, Any] | None:
    """Load the newest good checkpoint into `engine`; return its client state (None when there is none).

    A partial or corrupt newest checkpoint is skipped with a warning naming it and the reason, and the one
    before it is loaded. Every rank checks the same files, so all ranks agree on the tag. A remote checkpoint
    is downloaded into `local_dir` first.
    """
    ckpt_url = str(ckpt_url)
    tags = list_tags(ckpt_url)
    if not tags:
        return None
    remote = not storage.is_local(ckpt_url)
    stage = staging_dir(ckpt_url, local_dir)
    skipped = []
    for step, tag in reversed(tags):
        where = storage.join(ckpt_url, tag)
        reason = check_tag(ckpt_url, tag)
        if reason is None:
            try:
                if remote:
                    _fetch(ckpt_url, tag, stage)
                path, client_state = engine.load_checkpoint(stage, tag=tag, load_module_strict=True)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means "try the one before"
                path, client_state, reason = None, None, f"DeepSpeed could not load it ({type(e).__name__}: {e})"
            else:
                if path is None:
                    reason = "DeepSpeed found no model states in it"
        if reason is None:
            if skipped:
                log.warning("resuming from %s (step %d) in %s instead of the newest checkpoint: %s", tag, step, ckpt_url,
                            "; ".join(skipped))
            else:
                log.info("resuming from %s (step %d) in %s", tag, step, ckpt_url)
            return client_state
        msg = f"{where} is unusable ({reason})"
        log.warning("%s; falling back to the checkpoint before it", msg)
        skipped.append(msg)
    raise CheckpointError(
        f"no usable checkpoint in {ckpt_url}: " + "; ".join(skipped) + ". Delete the folder to start from scratch."
    )


def restore_client_state(client_state: dict[str, Any], rank: int, world_size: int) -> Any:
    """Set this rank's RNG states from a loaded client state; return the loader state for this rank.

    On the same number of ranks each rank gets back its own states. On a different number the RNG states
    stay as seeded and the loader gets rank 0's state: the loader state describes the global stream (equal
    on every rank), so it continues the epoch's remaining samples on any number of ranks.
    """
    rngs = client_state["rng_states"]
    loaders = client_state["loader_states"]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
        return loaders[rank]
    log.warning("checkpoint was written by %d ranks, resuming on %d: RNG states re-seeded", len(rngs), world_size)
    return loaders[0]


def export_model(engine, out_url: str, tokenizer=None) -> str:
    """Publish the engine's model in transformers format (`save_pretrained`), with `tokenizer` beside it, at
    `out_url` (local or remote; rank 0 writes; the folder appears whole: `storage.staged_dir`)."""
    module = engine.module
    if not hasattr(module, "save_pretrained"):
        raise CheckpointError(f"cannot export {type(module).__name__}: it has no save_pretrained (not a transformers model)")

    def write() -> None:
        with storage.staged_dir(str(out_url)) as tmp:
            module.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if _rank() == 0:
                write()
    elif _rank() == 0:
        write()
    _barrier()
    return str(out_url)
