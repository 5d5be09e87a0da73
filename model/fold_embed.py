"""Token folding, input side: `x = MLP(fold(code_embed(codes) + pos_embed))` (SynerGen-VL Eq. 1).

Each code is embedded, a learnable per-code position embedding (one per cell of the image's code grid)
is added, the `fh*fw` embeddings of a fold group are concatenated and an MLP maps them to the LLM width.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import SynerGenVLConfig
from model.folding import fold_codes
from synergen.errors import SynergenError


class FoldEmbed(nn.Module):
    """Fold groups `[N, fh*fw]` + their block index in the image `[N]` -> LLM inputs `[N, D]`."""

    def __init__(self, config: SynerGenVLConfig):
        super().__init__()
        gh, gw = config.image_grid
        fold = config.fold_geometry
        k, dc = fold.size, config.code_embed_dim
        self.code_embed = nn.Embedding(config.codebook_size, dc)
        self.pos_embed = nn.Embedding(gh * gw, dc)  # one per code cell of the grid
        # Our choice (the paper gives no MLP shape): Mono-InternVL's projector, LN -> Linear -> GELU -> Linear.
        self.mlp = nn.Sequential(
            nn.LayerNorm(k * dc),
            nn.Linear(k * dc, config.fold_mlp_hidden),
            nn.GELU(),
            nn.Linear(config.fold_mlp_hidden, config.hidden_size),
        )
        # Grid cell of each code of each block, in fold order: [n_blocks, k].
        cells = torch.arange(gh * gw).reshape(gh, gw)
        self.register_buffer("cell_index", fold_codes(cells, fold).contiguous(), persistent=False)
        self.codebook_size = config.codebook_size

    def forward(self, codes: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
        """`codes [N, k]` int64, `block_index [N]` int64 -> `[N, D]`."""
        n_blocks = self.cell_index.shape[0]
        if codes.numel() and (int(codes.max()) >= self.codebook_size or int(codes.min()) < 0):
            raise SynergenError(f"image codes outside [0, {self.codebook_size}): check the VQ model matches the config's codebook_size")
        if block_index.numel() and int(block_index.max()) >= n_blocks:
            raise SynergenError(
                f"an image has more than {n_blocks} fold groups (block index {int(block_index.max())}): the config's image_grid "
                f"is smaller than the images' code grid; set image_grid to the tile's code grid"
            )
        e = self.code_embed(codes) + self.pos_embed(self.cell_index[block_index])  # [N, k, dc]
        return self.mlp(e.flatten(1))  # [N, D]
