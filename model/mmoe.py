"""The MMoE decoder layer: Qwen2's shared attention and norms, a text FFN and an image FFN, routed by modality.

Routing is static (no learned router, SynerGen-VL Eq. 2): positions where `image_mask` is True go to the
image FFN, all others to the text FFN. Each FFN runs only on its own rows (gather, compute, scatter), in
training and in cached decoding alike; Mono-InternVL's blend (both FFNs on every row, mixed by the mask)
costs twice the FFN compute and is kept here only as the benchmark baseline (`blend_ffn`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm

from model.config import SynerGenVLConfig


def route_ffn(hidden: torch.Tensor, image_mask: torch.Tensor, text_ffn: nn.Module, image_ffn: nn.Module) -> torch.Tensor:
    """`hidden [B, T, D]`, `image_mask [B, T]` -> `[B, T, D]`, each FFN computed on its own rows only.

    Both FFNs are always called (on zero rows if need be) so every parameter gets a gradient, which
    keeps DeepSpeed's gradient reduction uniform across ranks whose batches differ in modality.
    """
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1])  # [B*T, D]
    is_img = image_mask.reshape(-1)
    img_rows = is_img.nonzero().squeeze(1)
    txt_rows = (~is_img).nonzero().squeeze(1)
    out = flat.new_zeros(flat.shape)
    out = out.index_copy(0, txt_rows, text_ffn(flat.index_select(0, txt_rows)))
    out = out.index_copy(0, img_rows, image_ffn(flat.index_select(0, img_rows)))
    return out.reshape(shape)


def blend_ffn(hidden: torch.Tensor, image_mask: torch.Tensor, text_ffn: nn.Module, image_ffn: nn.Module) -> torch.Tensor:
    """Mono-InternVL's mask blending (both FFNs on every row); the benchmark baseline, not used by the model."""
    m = image_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return text_ffn(hidden) * (1 - m) + image_ffn(hidden) * m


class MMoEDecoderLayer(GradientCheckpointingLayer):
    """Qwen2 decoder layer whose FFN is split by modality; parameter names match Qwen2's (`mlp` = text FFN)."""

    def __init__(self, config: SynerGenVLConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config=config, layer_idx=layer_idx)
        self.mlp = Qwen2MLP(config)  # text FFN: the pretrained one
        self.image_mlp = Qwen2MLP(config)  # image FFN: copied from `mlp` when initialised from an LLM
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, D]
        image_mask: torch.Tensor,  # [B, T] bool
        attention_mask=None,  # dense [B, 1, T, S] (bool for sdpa, float for eager) or a flex BlockMask
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
    ) -> torch.Tensor:
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache)
        hidden_states = residual + h
        residual = hidden_states
        h = self.post_attention_layernorm(hidden_states)
        return residual + route_ffn(h, image_mask, self.mlp, self.image_mlp)  # [B, T, D]
