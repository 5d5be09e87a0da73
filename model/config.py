"""SynerGen-VL's configuration: a Qwen2 config plus the vision fields, the presets, and parameter counts.

`SynerGenVLConfig` subclasses `Qwen2Config`, so the backbone's attention, norms and rotary embedding are
transformers' own Qwen2 modules built from this very config. Paper numbers are defaults (DESIGN.md
"Model facts"; SynerGen-VL §3.1, §4.1); where the paper is silent the field says "our choice".
"""

from __future__ import annotations

import logging
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from model.folding import Fold
from model.special_tokens import BOI, EOI, IMG, MODEL_SPECIAL_TOKENS, THUMBNAIL, TILE, UNCOND
from model.template import TEMPLATES, ensure_document_tokens, token_ids
from synergen.errors import SynergenError

log = logging.getLogger(__name__)

# Config keys of the special-token ids, in MODEL_SPECIAL_TOKENS order.
LOSS_REDUCTIONS = ("modality_mean", "token_sum")

SPECIAL_KEYS = {BOI: "boi", EOI: "eoi", IMG: "img", UNCOND: "uncond", TILE: "tile", THUMBNAIL: "thumbnail"}


@strict
class SynerGenVLConfig(Qwen2Config):
    """Qwen2 backbone fields + image tokenizer geometry, fold, unfolding head, loss weight, special-token ids."""

    model_type = "synergen_vl"

    codebook_size: int = 32768  # Emu3 VQ (DESIGN.md)
    vq_downsample: int = 8  # Emu3 VQ: 512 px -> 64x64 codes
    image_grid: list[int] | None = None  # [gh, gw] code grid of one image/tile; default 64x64 (512 px)
    fold: list[int] | None = None  # [fh, fw]; paper default 2x8 (§3.1)
    code_embed_dim: int | None = None  # our choice: LLM width (fits the paper's 3.6B, research/paper.md §2)
    fold_mlp_hidden: int | None = None  # our choice: LN -> Linear(k*dc, H) -> GELU -> Linear(H, D), H = D
    head_layers: int = 4  # unfolding head depth (§3.1: "e.g., 4")
    head_hidden_size: int | None = None  # our choice: LLM width
    head_intermediate_size: int | None = None
    head_num_attention_heads: int | None = None
    head_num_key_value_heads: int | None = None
    image_loss_weight: float = 2.0  # lambda of Eq. 4
    # Our choice: the most logits (elements) the LM head and the code classifier hold at once in the loss,
    # forward and backward (model.chunked_ce). 2**25 = 128 MiB in fp32: 64 blocks of 16 codes x 32,768,
    # or 220 text targets x a 151,936 vocabulary. Chunks are whole blocks / whole target rows.
    loss_chunk_logits: int = 2**25
    cfg_scale: float = 7.5  # classifier-free guidance at inference (§4.1)
    # Ids of <boi>, <eoi>, <img>, <UNCOND>, <tile>, <thumbnail> (keys: SPECIAL_KEYS values), from the tokenizer.
    special_token_ids: dict | None = None
    # How text is wrapped around the images (model.template): "raw" (default; reasons there) or "chat".
    sequence_template: str = "raw"
    # How the two losses combine (Eq. 4's lambda is image_loss_weight):
    #   "modality_mean" (default, our choice): mean text NLL + lambda * mean image-code NLL per batch. A 512-px image
    #     has 4,096 codes and its caption ~20 tokens; under Eq. 4's sums captions would carry ~0.25% of the loss at
    #     lambda 2 and understanding would barely train. Per-modality means keep the 1:lambda ratio between the
    #     two objectives whatever the sequence lengths.
    #   "token_sum": Eq. 4 as written: sum of text NLL + lambda * sum of code NLL, divided by the batch's slots
    #     (rows x sequence length), a scale independent of what the batch holds, so understanding and generation
    #     batches (separate micro-batches here) weigh by their token counts exactly as in one Eq. 4 sum.
    loss_reduction: str = "modality_mean"
    # Image preprocessing of the stage the model was last trained for (set by the trainer from the mixture;
    # `synergen generate --image` tiles as `synergen tokenize` did): tiles at most, whole-image thumbnail.
    max_tiles: int = 1
    thumbnail: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.image_grid is None:
            self.image_grid = [64, 64]
        if self.fold is None:
            self.fold = [2, 8]
        self.image_grid = [int(x) for x in self.image_grid]
        fold = Fold.parse(self.fold)
        self.fold = [fold.fh, fold.fw]
        if self.code_embed_dim is None:
            self.code_embed_dim = self.hidden_size
        if self.fold_mlp_hidden is None:
            self.fold_mlp_hidden = self.hidden_size
        if self.head_hidden_size is None:
            self.head_hidden_size = self.hidden_size
        if self.head_intermediate_size is None:
            self.head_intermediate_size = self.intermediate_size
        if self.head_num_attention_heads is None:
            self.head_num_attention_heads = self.num_attention_heads
        if self.head_num_key_value_heads is None:
            self.head_num_key_value_heads = self.num_key_value_heads or self.head_num_attention_heads
        if self.special_token_ids is None:
            # Placeholder ids at the top of the vocabulary; `add_special_tokens` gives the real ones.
            self.special_token_ids = {SPECIAL_KEYS[t]: self.vocab_size - len(MODEL_SPECIAL_TOKENS) + i for i, t in enumerate(MODEL_SPECIAL_TOKENS)}
        super().__post_init__(**kwargs)
        self.validate_vision()

    def validate_vision(self) -> None:
        missing = [k for k in SPECIAL_KEYS.values() if k not in self.special_token_ids]
        if missing:
            raise SynergenError(f"config special_token_ids lacks {missing}: build it with model.config.add_special_tokens(tokenizer)")
        bad = {k: v for k, v in self.special_token_ids.items() if not 0 <= int(v) < self.vocab_size}
        if bad:
            raise SynergenError(f"config special_token_ids {bad} outside vocab_size {self.vocab_size}: raise vocab_size to the tokenizer's length")
        self.fold_geometry.check_grid(*self.image_grid)
        if self.sequence_template not in TEMPLATES:
            raise SynergenError(f"config sequence_template {self.sequence_template!r}: use one of {TEMPLATES} (see model.template)")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise SynergenError(f"config loss_reduction {self.loss_reduction!r}: use one of {LOSS_REDUCTIONS} (see model.config)")
        if int(self.loss_chunk_logits) < 1:
            raise SynergenError(f"config loss_chunk_logits {self.loss_chunk_logits} must be >= 1 (logits held at once in the loss; default 2**25)")
        if self.head_hidden_size % self.head_num_attention_heads:
            raise SynergenError(f"head_hidden_size {self.head_hidden_size} not divisible by head_num_attention_heads {self.head_num_attention_heads}")

    @property
    def fold_geometry(self) -> Fold:
        return Fold(*self.fold)

    @property
    def blocks_per_image(self) -> int:
        """LLM positions of one image (fold groups of the `image_grid`)."""
        return self.fold_geometry.groups(*self.image_grid)

    def token_id(self, token: str) -> int:
        """Id of one of MODEL_SPECIAL_TOKENS (e.g. `BOI`)."""
        return int(self.special_token_ids[SPECIAL_KEYS[token]])

    def head_config(self) -> Qwen2Config:
        """The unfolding head's own Qwen2 config: the LLM's block design, `head_layers` deep, sdpa attention."""
        cfg = Qwen2Config(
            vocab_size=self.codebook_size,
            hidden_size=self.head_hidden_size,
            intermediate_size=self.head_intermediate_size,
            num_hidden_layers=self.head_layers,
            num_attention_heads=self.head_num_attention_heads,
            num_key_value_heads=self.head_num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=max(self.fold_geometry.size, 16),
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters),
            initializer_range=self.initializer_range,
        )
        # The head's sequences are short, dense and causal: sdpa's is_causal path needs no mask.
        cfg._attn_implementation = "sdpa"
        return cfg


def add_special_tokens(tokenizer) -> None:
    """Prepare an LLM's tokenizer for SynerGen-VL, in place: a BOS and PAD where it has none (model.template
    decides how documents start), then MODEL_SPECIAL_TOKENS. Used once, by `synergen init`."""
    ensure_document_tokens(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(MODEL_SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    token_ids(tokenizer, list(MODEL_SPECIAL_TOKENS), getattr(tokenizer, "name_or_path", "") or "(in memory)")


def config_ids_from_tokenizer(tokenizer, min_vocab_size: int = 0) -> dict[str, Any]:
    """Config kwargs from a prepared tokenizer (`add_special_tokens`): the special-token ids, bos/eos/pad and
    vocab_size = len(tokenizer), or `min_vocab_size` when larger (an LLM's embedding may have spare rows)."""
    where = getattr(tokenizer, "name_or_path", "") or "(in memory)"
    ids = token_ids(tokenizer, list(MODEL_SPECIAL_TOKENS), where)
    out: dict[str, Any] = {"special_token_ids": {SPECIAL_KEYS[t]: i for t, i in ids.items()},
                           "vocab_size": max(len(tokenizer), int(min_vocab_size))}
    for name in ("bos", "eos", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            out[f"{name}_token_id"] = int(tid)
    return out


# ---- presets -------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: seconds on CPU.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, codebook_size=64, vq_downsample=8, image_grid=[8, 8], fold=[2, 4], head_layers=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # The ablation backbone Qwen2-0.5B(-Instruct) (§5), with Emu3's VQ and the 2x8 fold.
    "qwen2-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=32768, tie_word_embeddings=True, codebook_size=32768, image_grid=[64, 64], fold=[2, 8],
        head_layers=4,
    ),
    # The paper's LLM shape, InternLM2-1.8B (24 layers, 2048 wide, FFN 8192, 16 heads / 8 KV heads, vocab 92,544).
    "paper": dict(
        vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=32768, tie_word_embeddings=False, codebook_size=32768, image_grid=[64, 64], fold=[2, 8],
        head_layers=4,
    ),
}


def preset_config(name: str, **overrides: Any) -> SynerGenVLConfig:
    """A preset by name (`tiny`, `qwen2-0.5b`, `paper`), with keyword overrides."""
    if name not in PRESETS:
        raise SynergenError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    return SynerGenVLConfig(**{**PRESETS[name], **overrides})


def parameter_counts(config: SynerGenVLConfig) -> dict[str, int]:
    """Parameters by part, from the config alone (no weights): total and activated per token.

    Activated = total minus one FFN set: each position runs exactly one of the two FFNs of a layer.
    """
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attn = d * q + q + 2 * (d * kv + kv) + q * d  # Qwen2: biases on q, k, v
    ffn = 3 * d * f
    layer_shared = attn + 2 * d  # two RMSNorms
    n_special = len(MODEL_SPECIAL_TOKENS)
    embed = config.vocab_size * d
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * d
    k = config.fold_geometry.size
    dc, hm = config.code_embed_dim, config.fold_mlp_hidden
    fold_embed = config.codebook_size * dc + config.image_grid[0] * config.image_grid[1] * dc + 2 * k * dc + k * dc * hm + hm + hm * d + d
    hh, hf = config.head_hidden_size, config.head_intermediate_size
    hhd = hh // config.head_num_attention_heads
    hq, hkv = config.head_num_attention_heads * hhd, config.head_num_key_value_heads * hhd
    head_layer = hh * hq + hq + 2 * (hh * hkv + hkv) + hq * hh + 3 * hh * hf + 2 * hh
    head = d * hh + hh + config.codebook_size * hh + k * hh + config.head_layers * head_layer + hh + hh * config.codebook_size
    parts = {
        "text_embeddings": embed + lm_head + n_special * d,
        "attention_and_norms": L * layer_shared + d,
        "text_ffn": L * ffn,
        "image_ffn": L * ffn,
        "fold_embed": fold_embed,
        "unfold_head": head,
    }
    parts["total"] = sum(parts.values())
    parts["activated"] = parts["total"] - parts["image_ffn"]
    return parts
