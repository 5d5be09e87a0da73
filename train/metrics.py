"""Training metrics: what one step measured, reduced over ranks, written to JSONL and TensorBoard.

Per step: loss per task (and its text/image parts), loss per source, tokens/s, samples/s, the share of
step time spent waiting for data, lr, grad norm, the loader's realised mixture and the weights it sampled with. Rank 0 writes
`OUTPUT/metrics.jsonl` (one JSON object per logged step) and TensorBoard events under `OUTPUT/tb/`.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.batch import PackedBatch

log = logging.getLogger(__name__)


def loss_by_document(batch: PackedBatch, token_loss: torch.Tensor) -> list[tuple[str, float, int]]:
    """(source, summed loss, n targets) of each document of the batch.

    `token_loss[b, t]` is the model's per-target loss placed at the target's slot (0 elsewhere); a slot is
    a target when it has a text label or is an image target. Documents map to sources by
    `batch.doc_sources[b][document_id]`.
    """
    if not batch.doc_sources:
        return []
    tl = token_loss.detach().float().cpu()  # [B, T]
    targets = ((batch.labels != -100) | batch.image_targets).cpu()  # [B, T]
    doc = batch.document_ids.cpu()
    out = []
    for b, sources in enumerate(batch.doc_sources):
        for d, source in enumerate(sources):
            sel = (doc[b] == d) & targets[b]
            out.append((source, float(tl[b][sel].sum()), int(sel.sum())))
    return out


def loss_by_source(batch: PackedBatch, token_loss: torch.Tensor) -> dict[str, list[float]]:
    """{source: [summed loss, n targets]} over the batch's documents (`loss_by_document`)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for source, s, n in loss_by_document(batch, token_loss):
        out[source][0] += s
        out[source][1] += n
    return dict(out)


class StepMeter:
    """Accumulates one optimizer step's measurements on one rank; `reduce()` merges all ranks.

    Per-source losses are kept per document and summed once, over all ranks, by `math.fsum` (the correctly
    rounded sum, whatever the order): the numbers the reweighting policies read depend only on which
    documents the step trained and their losses, not on how the global batch was split over ranks, micro-steps
    or rows, so a run resumed on another number of ranks feeds its policy the same floats for the same losses."""

    def __init__(self) -> None:
        self.task_loss: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # task: [sum of losses, n micro-batches]
        self.task_parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # text sum, n, image sum, n
        self.source_docs: dict[str, list[float]] = defaultdict(list)  # source: each document's summed loss
        self.source_targets: dict[str, int] = defaultdict(int)
        self.tokens = 0
        self.slots = 0
        self.samples = 0
        self.data_wait = 0.0

    def add(self, batch: PackedBatch, out: Any) -> None:
        task = batch.task or "all"
        self.task_loss[task][0] += float(out.loss.detach())
        self.task_loss[task][1] += 1
        parts = self.task_parts[task]
        n_text = float(getattr(out, "n_text_targets", 0) or 0)
        n_img = float(getattr(out, "n_image_targets", 0) or 0)
        if getattr(out, "text_loss", None) is not None and n_text:
            parts[0] += float(out.text_loss.detach()) * n_text
            parts[1] += n_text
        if getattr(out, "image_loss", None) is not None and n_img:
            parts[2] += float(out.image_loss.detach()) * n_img
            parts[3] += n_img
        if getattr(out, "token_loss", None) is not None:
            self.add_documents(loss_by_document(batch, out.token_loss))
        self.tokens += batch.n_real_tokens
        self.slots += int(batch.document_ids.numel())
        self.samples += sum(len(s) for s in batch.doc_sources) if batch.doc_sources else int(batch.input_ids.shape[0])

    def add_documents(self, docs: list[tuple[str, float, int]]) -> None:
        """Record documents' losses: (source, summed loss, n targets) each."""
        for source, s, n in docs:
            self.source_docs[source].append(s)
            self.source_targets[source] += n

    def mine(self) -> dict[str, Any]:
        """This rank's measurements, as `merge` takes them."""
        return {
            "task_loss": dict(self.task_loss), "task_parts": dict(self.task_parts), "source_docs": dict(self.source_docs),
            "source_targets": dict(self.source_targets), "tokens": self.tokens, "slots": self.slots, "samples": self.samples,
            "data_wait": self.data_wait,
        }

    def reduce(self) -> dict[str, Any]:
        """Sums over ranks (every rank must call it); returns plain numbers."""
        mine = self.mine()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return self.merge(everyone)

    @staticmethod
    def merge(everyone: list[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's `mine()` merged: sums, `source_loss` {source: [summed loss, n targets]}, the slowest data wait."""
        total: dict[str, Any] = {"task_loss": defaultdict(lambda: [0.0, 0.0]), "task_parts": defaultdict(lambda: [0.0] * 4),
                                 "tokens": 0, "slots": 0, "samples": 0, "data_wait": 0.0}
        docs: dict[str, list[float]] = defaultdict(list)
        targets: dict[str, int] = defaultdict(int)
        for m in everyone:
            for key in ("task_loss", "task_parts"):
                for k, v in m[key].items():
                    total[key][k] = [a + b for a, b in zip(total[key][k], v)]
            for k, v in m["source_docs"].items():
                docs[k] += v
            for k, v in m["source_targets"].items():
                targets[k] += v
            for key in ("tokens", "slots", "samples"):
                total[key] += m[key]
            total["data_wait"] = max(total["data_wait"], m["data_wait"])  # the slowest rank's wait holds up the step
        total["source_loss"] = {k: [math.fsum(docs[k]), float(targets[k])] for k in sorted(docs)}
        return total


def step_record(step: int, reduced: dict[str, Any], step_time: float, lr: float, grad_norm: float | None,
                mixture: dict[str, Any] | None, reweight: Any = None) -> dict[str, Any]:
    """The flat JSON record of one step (what goes to JSONL and, numbers only, to TensorBoard).

    `weight/TASK/SOURCE` are the weights the loader sampled the step's batch with (static, scheduled or online);
    with online reweighting (`reweight`, a `train.reweight.ReweightHook`) `reweight_s` is the time the policies
    took after this step (their overhead)."""
    rec: dict[str, Any] = {"step": step, "time_s": step_time, "lr": lr, "grad_norm": grad_norm}
    losses = []
    for task, (s, n) in sorted(reduced["task_loss"].items()):
        rec[f"loss/{task}"] = s / n
        losses.append(s / n)
        t_sum, t_n, i_sum, i_n = reduced["task_parts"][task]
        if t_n:
            rec[f"text_loss/{task}"] = t_sum / t_n
        if i_n:
            rec[f"image_loss/{task}"] = i_sum / i_n
    rec["loss"] = sum(losses) / max(len(losses), 1)
    for source, (s, n) in sorted(reduced["source_loss"].items()):
        if n:
            rec[f"source_loss/{source}"] = s / n
    rec["tokens_per_s"] = reduced["tokens"] / step_time if step_time > 0 else 0.0
    rec["samples_per_s"] = reduced["samples"] / step_time if step_time > 0 else 0.0
    rec["packing_efficiency"] = reduced["tokens"] / reduced["slots"] if reduced["slots"] else 0.0
    rec["data_wait_fraction"] = reduced["data_wait"] / step_time if step_time > 0 else 0.0
    if mixture:
        rec["mixture"] = mixture
        for task, t in sorted(mixture.get("tasks", {}).items()):
            for source, w in sorted(t.get("weights", {}).items()):
                rec[f"weight/{task}/{source}"] = w
    if reweight is not None:
        rec["reweight_s"] = reweight.seconds
    return rec


def _numbers(prefix: str, obj: Any):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield prefix, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(f"{prefix}/{k}" if prefix else str(k), v)


class MetricsWriter:
    """JSONL + TensorBoard on rank 0; a no-op elsewhere. Appends, so a resumed run continues the same files."""

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            # Drop records of steps after the checkpoint we resumed from: they will be run again.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif not resume_step:
            self.path.write_text("")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in _numbers("", {k: v for k, v in record.items() if k != "step"}):
            if value == value:  # skip NaN
                self._tb.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
