"""Checkpoints: DeepSpeed's own, plus what exact resume needs (loader state, RNG states), and export.

Layout under `OUTPUT/checkpoints/`: one DeepSpeed tag per save, `step_00000042/`, holding DeepSpeed's
files and our `_complete.json` (step, file sizes), written by rank 0 only after every rank has saved.
A tag without it is partial (the job died while saving); a tag whose files disagree with it, or that
DeepSpeed cannot load, is corrupt. `load_latest` takes the newest good tag and says clearly which one it
skipped and why. The client state holds the loader state and the RNG states of every rank (DeepSpeed
writes the client state from rank 0 only, so each rank's own states are gathered first).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

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


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found)


def check_tag(ckpt_dir: Path, tag: str) -> str | None:
    """Why the checkpoint `tag` is unusable, or None when its files match its completion marker."""
    folder = ckpt_dir / tag
    marker = folder / MARKER
    if not marker.is_file():
        return "partial: no completion marker (the run stopped while saving)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"corrupt completion marker ({e})"
    for name, size in expected.items():
        f = folder / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, the marker says {size}"
    return None


def save(engine, ckpt_dir: Path, step: int, loader_state: Any, extra: dict[str, Any] | None = None, keep_last: int = 3) -> str:
    """Save a DeepSpeed checkpoint for `step` with every rank's loader and RNG states; prune old ones."""
    tag = tag_for(step)
    client_state = {
        "step": step,
        "loader_states": _gather(loader_state),
        "rng_states": _gather(rng_state()),
        **(extra or {}),
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    _barrier()
    if _rank() == 0:
        folder = ckpt_dir / tag
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
        tmp = folder / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
        tmp.rename(folder / MARKER)
        for old_step, old_tag in list_tags(ckpt_dir)[:-keep_last]:
            if old_step < step:
                shutil.rmtree(ckpt_dir / old_tag, ignore_errors=True)
        log.info("saved checkpoint %s (%d files)", folder, len(files))
    _barrier()
    return tag


def load_latest(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Load the newest good checkpoint into `engine`; return its client state (None when there is none).

    A partial or corrupt newest checkpoint is skipped with a warning naming it and the reason, and the one
    before it is loaded. Every rank checks the same files, so all ranks agree on the tag.
    """
    tags = list_tags(ckpt_dir)
    if not tags:
        return None
    skipped = []
    for step, tag in reversed(tags):
        reason = check_tag(ckpt_dir, tag)
        if reason is None:
            try:
                path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means "try the one before"
                path, client_state, reason = None, None, f"DeepSpeed could not load it ({type(e).__name__}: {e})"
            else:
                if path is None:
                    reason = "DeepSpeed found no model states in it"
        if reason is None:
            if skipped:
                log.warning("resuming from %s (step %d) instead of the newest checkpoint: %s", tag, step, "; ".join(skipped))
            else:
                log.info("resuming from %s (step %d)", tag, step)
            return client_state
        msg = f"{ckpt_dir / tag} is unusable ({reason})"
        log.warning("%s; falling back to the checkpoint before it", msg)
        skipped.append(msg)
    raise CheckpointError(
        f"no usable checkpoint in {ckpt_dir}: " + "; ".join(skipped) + ". Delete the folder to start from scratch."
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


def export_model(engine, out_dir: Path) -> Path:
    """Write the engine's model in transformers format (`save_pretrained`) to `out_dir` (rank 0 writes)."""
    module = engine.module
    if not hasattr(module, "save_pretrained"):
        raise CheckpointError(f"cannot export {type(module).__name__}: it has no save_pretrained (not a transformers model)")
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if _rank() == 0:
                module.save_pretrained(str(out_dir), safe_serialization=True)
    elif _rank() == 0:
        module.save_pretrained(str(out_dir), safe_serialization=True)
    _barrier()
    return out_dir
