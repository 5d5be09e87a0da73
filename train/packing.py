"""Packing documents into rows of `seq_len` slots for block-diagonal attention.

First-fit decreasing over one rank's documents of one step, each written straight into its row (no
per-document arrays). Rows never carry documents across steps, so a step's batch is exactly its
samples (which keeps resume and the per-batch mixture exact), at the cost of at most one part-filled
row per rank and task. Documents longer than `seq_len` never reach
here: `train.sequence.plan_layout` falls back to fewer tiles or drops them, counted.
"""

from __future__ import annotations

from typing import Callable

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


# PackedBatch's arrays as pack writes them: (field, dtype, fill, narrowest dtype that holds every value written:
# token ids come from int32 text and the tokenizer, positions and document numbers are below seq_len); image_codes
# [n_codes, fold size] comes after them (int64, narrowest: the samples' own code dtype)
ROW_ARRAYS = (("input_ids", np.int64, None, np.int32), ("position_ids", np.int64, 0, np.int32),
              ("document_ids", np.int64, -1, np.int32), ("labels", np.int64, IGNORE, np.int32),
              ("image_mask", np.bool_, False, np.bool_), ("image_targets", np.bool_, False, np.bool_))

Shapes = list[tuple[tuple[int, ...], np.dtype, np.dtype]]  # per array: (shape, dtype, narrowest dtype that holds it)


def pack(docs: list[tuple[TokenSample, Layout, bool, str]], seq_len: int, ids: LayoutIds, task: str,
         alloc: Callable[[Shapes], list[np.ndarray]] | None = None) -> PackedBatch:
    """Documents (sample, layout, uncond, source) -> one PackedBatch [rows, seq_len], each written in place once.

    rows = 0 when there are no documents. `alloc` gives the arrays to write into, one per (shape, dtype, narrowest
    dtype) of ROW_ARRAYS then image_codes, each of the dtype or the narrowest (default: new arrays of the dtype; a
    DataLoader worker passes views of a shared-memory slot, narrowed, which the main process widens)."""
    rows = first_fit_decreasing([lay.length for _, lay, _, _ in docs], seq_len)
    B, T = len(rows), seq_len
    fold_size = int(docs[0][0].codes.shape[2]) if docs else 0
    n_codes = sum(len(lay.images) * int(s.codes.shape[1]) for s, lay, _, _ in docs)
    codes_dt = np.result_type(*(s.codes.dtype for s, _, _, _ in docs)) if docs else np.dtype(np.uint16)
    shapes = [((B, T), np.dtype(dt), np.dtype(narrow)) for _, dt, _, narrow in ROW_ARRAYS] + \
        [((n_codes, fold_size), np.dtype(np.int64), codes_dt)]
    arrays = alloc(shapes) if alloc is not None else [np.empty(shape, dt) for shape, dt, _ in shapes]
    for a, (_, _, fill, _) in zip(arrays, ROW_ARRAYS):
        a.fill(ids.pad if fill is None else fill)
    input_ids, position_ids, document_ids, labels, image_mask, image_targets, image_codes = arrays  # codes: [N_img, fh*fw]
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
    return PackedBatch(**{f: torch.from_numpy(a) for (f, _, _, _), a in zip(ROW_ARRAYS, arrays)},
                       image_codes=torch.from_numpy(image_codes), doc_sources=sources, task=task)


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / slots (1.0 for an empty batch)."""
    slots = batch.input_ids.numel()
    return batch.n_real_tokens / slots if slots else 1.0
