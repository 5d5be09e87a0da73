"""Packing documents into rows of `seq_len` slots for block-diagonal attention.

First-fit decreasing over one rank's documents of one step, each written straight into its row (no
per-document arrays). Rows never carry documents across steps, so a step's batch is exactly its
samples (which keeps resume and the per-batch mixture exact), at the cost of at most one part-filled
row per rank and task. Documents longer than `seq_len` never reach
here: `train.sequence.plan_layout` falls back to fewer tiles or drops them, counted.
"""

from __future__ import annotations

import numpy as np
import torch

from model.batch import PackedBatch
from synergen.errors import SynergenError
from pipeline.token_shards import TokenSample
from train.sequence import IGNORE, Layout, LayoutIds, write_sequence


def first_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Rows of document indices; longest documents placed first, each in the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > seq_len:
            raise SynergenError(f"document {i} has {lengths[i]} tokens, more than seq_len={seq_len}; "
                                "train.sequence.plan_layout must drop or shrink it first")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(seq_len - lengths[i])
    return rows


def pack(docs: list[tuple[TokenSample, Layout, bool, str]], seq_len: int, ids: LayoutIds, task: str) -> PackedBatch:
    """Documents (sample, layout, uncond, source) -> one PackedBatch [rows, seq_len], each written in place once.

    rows = 0 when there are no documents."""
    rows = first_fit_decreasing([lay.length for _, lay, _, _ in docs], seq_len)
    B, T = len(rows), seq_len
    input_ids = np.full((B, T), ids.pad, np.int64)
    position_ids = np.zeros((B, T), np.int64)
    document_ids = np.full((B, T), -1, np.int64)
    labels = np.full((B, T), IGNORE, np.int64)
    image_mask = np.zeros((B, T), bool)
    image_targets = np.zeros((B, T), bool)
    fold_size = int(docs[0][0].codes.shape[2]) if docs else 0
    n_codes = sum(len(lay.images) * int(s.codes.shape[1]) for s, lay, _, _ in docs)
    image_codes = np.empty((n_codes, fold_size), np.int64)  # [N_img, fh*fw], row-major over (b, t)
    arange = np.arange(T)
    sources: list[list[str]] = []
    c = 0
    for b, row in enumerate(rows):
        t = 0
        sources.append([])
        for j, i in enumerate(row):
            sample, lay, uncond, source = docs[i]
            n, k = lay.length, len(lay.images) * int(sample.codes.shape[1])
            write_sequence(sample, task, uncond, lay, ids, input_ids[b, t:t + n], labels[b, t:t + n], image_mask[b, t:t + n],
                           image_targets[b, t:t + n], image_codes[c:c + k])
            position_ids[b, t:t + n] = arange[:n]
            document_ids[b, t:t + n] = j
            sources[-1].append(source)
            t += n
            c += k
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        document_ids=torch.from_numpy(document_ids),
        labels=torch.from_numpy(labels),
        image_mask=torch.from_numpy(image_mask),
        image_codes=torch.from_numpy(image_codes),
        image_targets=torch.from_numpy(image_targets),
        doc_sources=sources,
        task=task,
    )


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / slots (1.0 for an empty batch)."""
    slots = batch.input_ids.numel()
    return batch.n_real_tokens / slots if slots else 1.0
