"""Token unfolding, output side: a shallow causal transformer that predicts a block's `fh*fw` codes one by one.

Input sequence of one block (our choice of how h enters, the Block-Transformer/MEGABYTE prefix pattern;
the paper does not say): `[proj(h), emb(c_1), ..., emb(c_{k-1})] + pe[0..k-1]`; output j predicts c_{j+1}.
`h` is the LLM's final hidden state at the position *before* the block (`<boi>` for the first block).
Layers are transformers' Qwen2 decoder layers (the LLM's block design), with their own code embedding,
in-block position embedding and classifier over the codebook (SynerGen-VL §3.1, Eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from model.chunked_ce import chunked_cross_entropy
from model.config import SynerGenVLConfig


class UnfoldHead(nn.Module):
    """`h [N, D]` + teacher codes `[N, k]` -> code logits `[N, k, codebook]` (or, in training, their per-code
    nll via `code_nll`, chunked over blocks); `sample` draws codes autoregressively."""

    def __init__(self, config: SynerGenVLConfig):
        super().__init__()
        hc = config.head_config()
        self.k = config.fold_geometry.size
        self.in_proj = nn.Linear(config.hidden_size, hc.hidden_size)
        self.code_embed = nn.Embedding(config.codebook_size, hc.hidden_size)
        self.pos_embed = nn.Embedding(self.k, hc.hidden_size)  # in-block position
        self.layers = nn.ModuleList([Qwen2DecoderLayer(hc, i) for i in range(hc.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(hc.hidden_size, eps=hc.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=hc)
        self.classifier = nn.Linear(hc.hidden_size, config.codebook_size, bias=False)
        self.head_config = hc

    def _trunk(self, x: torch.Tensor, start: int, cache: DynamicCache | None) -> torch.Tensor:
        """`x [N, L, Dh]` at in-block positions start..start+L-1 -> final-norm states `[N, L, Dh]`."""
        pos = torch.arange(start, start + x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        x = x + self.pos_embed(pos)
        pe = self.rotary_emb(x, pos)
        for layer in self.layers:
            # attention_mask None + sdpa -> is_causal for L > 1; one query against its cached prefix otherwise.
            x = layer(x, attention_mask=None, position_ids=pos, cache=cache, use_cache=cache is not None, position_embeddings=pe)
        return self.norm(x)

    def _run(self, x: torch.Tensor, start: int, cache: DynamicCache | None) -> torch.Tensor:
        """`x [N, L, Dh]` -> logits `[N, L, V]`."""
        return self.classifier(self._trunk(x, start, cache))

    def _teacher_states(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`h [N, D]`, `codes [N, k]` -> states `[N, k, Dh]`; state j predicts codes[:, j]."""
        x = torch.cat([self.in_proj(h).unsqueeze(1), self.code_embed(codes[:, :-1])], dim=1)  # [N, k, Dh]
        return self._trunk(x, 0, None)

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: `h [N, D]`, `codes [N, k]` -> logits `[N, k, V]` (position j predicts codes[:, j])."""
        return self.classifier(self._teacher_states(h, codes))

    def code_nll(self, h: torch.Tensor, codes: torch.Tensor, chunk_blocks: int) -> torch.Tensor:
        """Teacher forcing: `h [N, D]`, `codes [N, k]` -> per-code nll `[N, k]` float32, the classifier and
        cross-entropy run `chunk_blocks` blocks at a time so the `[N, k, V]` logits never exist at once."""
        states = self._teacher_states(h, codes)  # [N, k, Dh]
        nll = chunked_cross_entropy(self.classifier, states.flatten(0, 1), codes.flatten(), chunk_blocks * self.k)  # [N*k]
        return nll.view(codes.shape)

    @torch.no_grad()
    def sample(self, h: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`h [N, D]` -> codes `[M, k]`, drawing each code with `pick(logits [N, V]) -> codes [M]` (M = N or N/2 under CFG).

        `pick` sees the logits of all N rows; under classifier-free guidance the rows are
        [cond; uncond] and it returns one code per pair, fed back to both branches.
        """
        cache = DynamicCache(config=self.head_config)
        x = self.in_proj(h).unsqueeze(1)  # [N, 1, Dh]
        out = []
        for j in range(self.k):
            logits = self._run(x, j, cache)[:, -1]  # [N, V]
            code = pick(logits)  # [M]
            out.append(code)
            x = self.code_embed(code.repeat(h.shape[0] // code.shape[0])).unsqueeze(1)
        return torch.stack(out, dim=1)  # [M, k]
