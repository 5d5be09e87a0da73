"""The packed batch: the one contract between the loader (`train.data`) and the model.

Each row of a batch is one sequence of `T` slots holding one or more documents (samples) back to back;
attention is block-diagonal over documents, and position ids restart at 0 in each document. Targets
use the transformers convention: `labels[b, t]` is the *input* id at `t` when it is a text target and
the model shifts internally (position t-1 predicts it).

Image positions: `image_mask[b, t]` is True at every folded image position; `input_ids` holds the
`<img>` placeholder there. `image_codes` lists the fold groups of all image positions of the batch in
row-major order over (b, t), i.e. `image_codes[i]` belongs to the i-th True of `image_mask.flatten()`.
`image_targets[b, t]` is True where the block at `t` is a code target (generation samples): the LLM
hidden state at `t-1` conditions the unfolding head that predicts the `fh*fw` codes of block `t`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T] int64; <img> at image positions, pad id in empty slots
    position_ids: torch.Tensor  # [B, T] int64; restart at 0 per document
    document_ids: torch.Tensor  # [B, T] int64; 0..n-1 per row by document, -1 in empty slots
    labels: torch.Tensor  # [B, T] int64; text targets (unshifted), -100 elsewhere
    image_mask: torch.Tensor  # [B, T] bool; folded image positions
    image_codes: torch.Tensor  # [N_img, fh*fw] int64; codes of every image position, row-major over (b, t)
    image_targets: torch.Tensor  # [B, T] bool; image positions whose codes are loss targets (subset of image_mask)
    # Per document, in order of (row, document id): who it came from, for per-source metrics.
    doc_sources: list[list[str]] = field(default_factory=list)
    task: str = ""  # "und" or "gen" (the loader builds one batch per task)

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
            for f in fields(self)
        }
        return PackedBatch(**moved)

    @property
    def n_real_tokens(self) -> int:
        return int((self.document_ids >= 0).sum())
