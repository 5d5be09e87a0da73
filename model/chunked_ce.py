"""Cross-entropy through a large classifier without materialising all the logits at once.

The code classifier (codebook 32,768, 16 codes per block: ~0.5 GB of fp32 logits per 64x64-code image)
and the LM head (a 150k vocabulary over thousands of text targets: gigabytes) would otherwise hold
`[M, V]` logits, their fp32 copy and the log-softmax for backward. Here rows are processed in chunks,
each chunk's `classifier -> float -> cross_entropy` under non-reentrant activation checkpointing: the
forward keeps only the chunk's inputs, and backward recomputes one chunk's logits at a time. The ops
per row are the unchunked ones, so per-row losses and gradients equal the unchunked computation to
float tolerance; the price is one extra classifier matmul per chunk in backward.

The classifier is called as a module (not through its `.weight`), so DeepSpeed ZeRO-3's parameter
gathering hooks fire on every call, the recomputation included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _nll(classifier: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`x [M, D]`, `targets [M]` -> per-row nll `[M]` float32 (logits upcast before the softmax)."""
    return F.cross_entropy(classifier(x).float(), targets, reduction="none")


def chunked_cross_entropy(classifier: nn.Module, x: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """`x [M, D]`, `targets [M]` -> per-row nll `[M]` float32, with at most `chunk_rows` rows of logits alive.

    One chunk (M <= chunk_rows, M = 0 included) runs plainly: no recomputation when chunking buys nothing.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    M = x.shape[0]
    if M <= chunk_rows:
        return _nll(classifier, x, targets)
    grad = torch.is_grad_enabled()
    out = []
    for s in range(0, M, chunk_rows):
        xs, ts = x[s:s + chunk_rows], targets[s:s + chunk_rows]
        if grad:
            # RNG state need not be preserved: a linear classifier and cross-entropy draw no random numbers.
            out.append(checkpoint(_nll, classifier, xs, ts, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(_nll(classifier, xs, ts))
    return torch.cat(out)  # [M]


def rows_per_chunk(max_logits: int, logits_per_row: int) -> int:
    """Rows whose logits fit in `max_logits` elements (at least one row)."""
    return max(1, max_logits // logits_per_row)
