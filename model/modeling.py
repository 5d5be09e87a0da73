"""SynerGen-VL as a transformers model: MMoE Qwen2 decoder, token folding in, unfolding head out, losses, stages.

Read top to bottom: the attention mask for packed documents, the backbone (`SynerGenVLModel`), then the
causal-LM wrapper (`SynerGenVLForCausalLM`) with the losses, the progressive stages, initialisation
from a pretrained Qwen2 and fsspec (local or S3) save/load. Generation lives in `model.generation`.

Special-token embeddings (our decision; the paper is silent): the input embeddings of `<boi>`, `<eoi>`,
`<img>`, `<UNCOND>`, `<tile>`, `<thumbnail>` live in their own small table `model.special_embed`
(initialised to the mean of the LLM's embedding rows), which is image-specific and trains in every
stage. The LLM's embedding matrix (and the LM head) stays untouched in stages 1 and 2, bit for bit:
a shared matrix with some rows trainable could not be, since AdamW's weight decay moves every row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM
from transformers import initialization as init
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

from model.batch import PackedBatch
from model.chunked_ce import chunked_cross_entropy, rows_per_chunk
from model.config import SPECIAL_KEYS, SynerGenVLConfig
from model.fold_embed import FoldEmbed
from model.folding import fold_codes
from model.mmoe import MMoEDecoderLayer
from model.special_tokens import MODEL_SPECIAL_TOKENS
from model.unfold_head import UnfoldHead
from synergen import storage
from synergen.errors import SynergenError

log = logging.getLogger(__name__)

STAGES = (1, 2, "sft")


# ---- attention over packed documents --------------------------------------------------------------


def packed_attention_mask(q_docs: torch.Tensor, k_docs: torch.Tensor, impl: str, dtype: torch.dtype):
    """Block-diagonal causal mask. `q_docs [B, Tq]` are the last Tq of the `k_docs [B, Tk]` slots (cache-aware).

    flex_attention gets a BlockMask (no dense [T, T] tensor); sdpa a dense bool mask; eager a dense
    float additive mask (eager adds the mask to the scores, so a bool mask would mask nothing).
    Empty slots (document -1) attend to themselves only, so no row is fully masked (NaN in sdpa).
    """
    B, Tq = q_docs.shape
    Tk = k_docs.shape[1]
    offset = Tk - Tq
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            qa = q + offset
            same = (q_docs[b, q] == k_docs[b, kv]) & (k_docs[b, kv] >= 0) & (kv <= qa)
            return same | (kv == qa)

        return create_block_mask(mask_mod, B, None, Tq, Tk, device=q_docs.device)
    q_idx = torch.arange(Tq, device=q_docs.device)[:, None] + offset  # [Tq, 1]
    k_idx = torch.arange(Tk, device=q_docs.device)[None, :]  # [1, Tk]
    allowed = (q_docs[:, :, None] == k_docs[:, None, :]) & (k_docs[:, None, :] >= 0) & (k_idx <= q_idx)
    allowed = (allowed | (k_idx == q_idx)).unsqueeze(1)  # [B, 1, Tq, Tk]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def packed_attention_for(device: "torch.device | str") -> str:
    """The attention implementation for packed training on `device`.

    flex_attention takes a BlockMask (no dense [T, T] mask per row) and has a backward on CUDA; on CPU
    torch 2.13's flex_attention has no backward, so training falls back to sdpa with a dense block mask.
    """
    return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"


def image_block_index(image_mask: torch.Tensor) -> torch.Tensor:
    """Block index of every image position within its image: `[B, T]` bool -> `[N_img]` (row-major over (b, t)).

    An image is a run of consecutive image positions (each image sits between `<boi>` and `<eoi>`).
    """
    B, T = image_mask.shape
    idx = torch.arange(T, device=image_mask.device).expand(B, T)
    prev = F.pad(image_mask[:, :-1], (1, 0), value=False)
    starts = torch.where(image_mask & ~prev, idx, torch.full_like(idx, -1))
    return (idx - starts.cummax(dim=1).values)[image_mask]


# ---- the model ------------------------------------------------------------------------------------


@dataclass
class SynerGenVLOutput:
    """Losses of one packed batch. `token_loss[b, t]`: nll of the target at `t` (text: the token; image
    target block: mean over its codes), 0 where `t` is no target; counts are text tokens and image codes."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    token_loss: torch.Tensor  # [B, T] float32
    n_text_targets: int
    n_image_targets: int
    hidden_states: torch.Tensor | None = None  # [B, T, D] final-norm LLM states


class SynerGenVLPreTrainedModel(PreTrainedModel):
    config_class = SynerGenVLConfig
    config: SynerGenVLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MMoEDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FoldEmbed):
            gh, gw = self.config.image_grid
            cells = torch.arange(gh * gw).reshape(gh, gw)
            init.copy_(module.cell_index, fold_codes(cells, self.config.fold_geometry))
        if isinstance(module, SynerGenVLModel):
            init.copy_(module.special_ids, torch.tensor([self.config.token_id(t) for t in MODEL_SPECIAL_TOKENS]))


class SynerGenVLModel(SynerGenVLPreTrainedModel):
    """The MMoE decoder: token + special + folded-image embeddings in, final-norm hidden states out."""

    def __init__(self, config: SynerGenVLConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.special_embed = nn.Embedding(len(MODEL_SPECIAL_TOKENS), config.hidden_size)
        self.fold_embed = FoldEmbed(config)
        self.layers = nn.ModuleList([MMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        special_ids = [config.token_id(t) for t in MODEL_SPECIAL_TOKENS]
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, image_codes: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
        """`input_ids [B, T]` -> `[B, T, D]`: text rows, special-token rows, folded image rows."""
        x = self.embed_tokens(input_ids)  # [B, T, D]
        match = input_ids.unsqueeze(-1) == self.special_ids  # [B, T, n_special]
        is_special = match.any(-1, keepdim=True)
        x = torch.where(is_special, self.special_embed(match.long().argmax(-1)).to(x.dtype), x)
        n_img = int(image_mask.sum())
        if image_codes.shape[0] != n_img:
            raise SynergenError(f"batch has {n_img} image positions but image_codes has {image_codes.shape[0]} rows: the loader must give one fold group per image position")
        if n_img:
            img = self.fold_embed(image_codes, block_index).to(x.dtype)  # [N_img, D]
            x = x.masked_scatter(image_mask.unsqueeze(-1).expand_as(x), img)
        elif torch.is_grad_enabled():
            # No image position: a zero-weight call keeps every parameter in the graph (uniform DeepSpeed reduction).
            dummy = self.fold_embed(image_codes.new_zeros(1, image_codes.shape[1]), image_codes.new_zeros(1))
            x = x + 0 * dummy.to(x.dtype).sum()
        return x

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        document_ids: torch.Tensor,  # [B, past + T] (the cached slots too)
        image_mask: torch.Tensor,  # [B, T] bool
        image_codes: torch.Tensor,  # [N_img, k]
        block_index: torch.Tensor | None = None,  # [N_img]; derived from image_mask runs when None
        cache=None,
    ) -> torch.Tensor:
        if block_index is None:
            block_index = image_block_index(image_mask)
        x = self.embed(input_ids, image_mask, image_codes, block_index)
        mask = packed_attention_mask(document_ids[:, -input_ids.shape[1]:], document_ids, self.config._attn_implementation, x.dtype)
        pe = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, image_mask, attention_mask=mask, position_embeddings=pe, cache=cache)
        return self.norm(x)  # [B, T, D]


class SynerGenVLForCausalLM(SynerGenVLPreTrainedModel):
    """SynerGen-VL: `model(batch: PackedBatch) -> SynerGenVLOutput`; `set_stage`, `from_llm`, generation."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SynerGenVLConfig):
        super().__init__(config)
        self.model = SynerGenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.unfold_head = UnfoldHead(config)
        self.stage: int | str = "sft"
        self.post_init()

    # -- forward and losses --

    def forward(self, batch: PackedBatch, return_hidden: bool = False) -> SynerGenVLOutput:
        B, T = batch.input_ids.shape
        if batch.image_targets.any() and batch.image_targets[:, 0].any():
            raise SynergenError("an image target block sits at t=0 with no preceding position to condition on: start each sequence with <s> ... <boi>")
        h = self.model(batch.input_ids, batch.position_ids, batch.document_ids, batch.image_mask, batch.image_codes)  # [B, T, D]
        token_loss = torch.zeros(B, T, dtype=torch.float32, device=h.device)

        # Text: position t-1 predicts labels[t].
        tgt = batch.labels[:, 1:]
        is_txt = tgt != -100  # [B, T-1]
        # Logits only at positions with a target, in chunks of at most `loss_chunk_logits` elements.
        chunk = self.config.loss_chunk_logits
        txt_nll = chunked_cross_entropy(self.lm_head, h[:, :-1][is_txt], tgt[is_txt], rows_per_chunk(chunk, self.config.vocab_size))  # [Nt]
        n_txt = int(is_txt.sum())
        text_sum = txt_nll.sum()
        token_loss[:, 1:] = token_loss[:, 1:].masked_scatter(is_txt, txt_nll.detach())

        # Image: the state at t-1 conditions the unfolding head predicting block t's codes.
        is_img = batch.image_targets[:, 1:]  # [B, T-1]
        codes = batch.image_codes[batch.image_targets[batch.image_mask]]  # [Ni, k]
        n_img = int(codes.numel())
        if n_img:
            chunk_blocks = rows_per_chunk(chunk, codes.shape[1] * self.config.codebook_size)
            img_nll = self.unfold_head.code_nll(h[:, :-1][is_img], codes, chunk_blocks)  # [Ni, k]
            image_sum = img_nll.sum()
        else:
            # No image targets: run the head on one zero block at weight 0, so that every parameter still
            # gets a (zero) gradient and DeepSpeed ranks with and without image targets reduce alike.
            img_nll = h.new_zeros(0, codes.shape[1], dtype=torch.float32)
            dummy = self.unfold_head(h[:1, 0] * 0, codes.new_zeros(1, codes.shape[1]))
            image_sum = dummy.float().sum() * 0
        token_loss[:, 1:] = token_loss[:, 1:].masked_scatter(is_img, img_nll.detach().mean(1))

        text_loss, image_loss = text_sum / max(n_txt, 1), image_sum / max(n_img, 1)  # per-modality means (reported)
        lam = self.config.image_loss_weight
        if self.config.loss_reduction == "token_sum":  # Eq. 4's sums over a fixed scale, the batch's slots (model.config)
            loss = (text_sum + lam * image_sum) / (B * T)
        else:
            loss = text_loss + lam * image_loss
        return SynerGenVLOutput(loss, text_loss, image_loss, token_loss, n_txt, n_img, h if return_hidden else None)

    def text_logits(self, batch: PackedBatch) -> torch.Tensor:
        """LM-head logits at every position `[B, T, V]` (for checks and scoring, not training)."""
        h = self.model(batch.input_ids, batch.position_ids, batch.document_ids, batch.image_mask, batch.image_codes)
        return self.lm_head(h)

    # -- progressive stages (SynerGen-VL §3.2, Table 8) --

    IMAGE_SPECIFIC = ("model.fold_embed.", "model.special_embed.", ".image_mlp.", "unfold_head.")

    def set_stage(self, stage: int | str) -> None:
        """1: image-specific parameters only; 2: + self-attention; "sft": everything. Text FFNs, text
        embeddings, norms and the LM head stay frozen in stages 1 and 2."""
        if stage not in STAGES:
            raise SynergenError(f"unknown training stage {stage!r}: use 1, 2 or 'sft'")
        for name, p in self.named_parameters():
            image = any(k in name or name.startswith(k) for k in self.IMAGE_SPECIFIC)
            attn = ".self_attn." in name and name.startswith("model.layers.")
            p.requires_grad_(stage == "sft" or image or (stage == 2 and attn))
        self.stage = stage
        n = sum(p.numel() for p in self.trainable_parameters())
        log.info("stage %s: %d trainable parameters", stage, n)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- initialisation from a pretrained Qwen2 --

    @classmethod
    def from_llm(cls, llm: str | Qwen2ForCausalLM, **vision_kwargs) -> "SynerGenVLForCausalLM":
        """Build from a pretrained Qwen2/Qwen2.5 (a path, an s3:// URL or a model): its weights, its text
        FFN copied into each image FFN, our modules fresh. `vision_kwargs` are SynerGenVLConfig fields."""
        if not isinstance(llm, Qwen2ForCausalLM):
            with storage.local_copy(str(llm)) as path:
                llm = Qwen2ForCausalLM.from_pretrained(path)
        llm_cfg = llm.config
        base = {k: getattr(llm_cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
            "rope_parameters", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size",
        )}
        if llm_cfg.use_sliding_window:
            raise SynergenError("the LLM uses sliding-window attention, which packed-document masks do not support: use a full-attention Qwen2")
        cfg = SynerGenVLConfig(**{**base, **vision_kwargs})
        if cfg.vocab_size < llm_cfg.vocab_size:
            raise SynergenError(f"vocab_size {cfg.vocab_size} is smaller than the LLM's {llm_cfg.vocab_size}: leave it unset or use len(tokenizer)")
        model = cls(cfg).to(llm.dtype)
        sd = llm.state_dict()
        emb = sd["model.embed_tokens.weight"]
        mean = emb.mean(0, keepdim=True)
        extra = cfg.vocab_size - emb.shape[0]  # rows for tokens the tokenizer gained: the mean row
        sd["model.embed_tokens.weight"] = torch.cat([emb, mean.expand(extra, -1)])
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # the head is the (grown) embedding, tied below
        elif "lm_head.weight" in sd:
            head = sd["lm_head.weight"]
            sd["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
        missing, unexpected = model.load_state_dict(sd, strict=False)
        ours = ("image_mlp", "fold_embed", "special_embed", "unfold_head") + (("lm_head",) if cfg.tie_word_embeddings else ())
        if unexpected or [m for m in missing if not any(o in m for o in ours)]:
            raise SynergenError(f"LLM checkpoint does not match Qwen2's layout: unexpected {unexpected[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.image_mlp.load_state_dict(layer.mlp.state_dict())
            model.model.special_embed.weight.copy_(mean.expand_as(model.model.special_embed.weight))
        if cfg.tie_word_embeddings:
            model.tie_weights()
        return model

    # -- generation (see model.generation) --

    def generate_text(self, *args, **kwargs):
        from model.generation import generate_text

        return generate_text(self, *args, **kwargs)

    def generate_images(self, *args, **kwargs):
        from model.generation import generate_images

        return generate_images(self, *args, **kwargs)

    # -- save/load, local or remote (synergen.storage) --

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Like transformers', to a local path (in place) or any fsspec URL (written locally, then uploaded).
        To publish a folder atomically, or with other files (the tokenizer), write into `storage.staged_dir`."""
        url = str(save_directory)
        if storage.is_local(url):
            return super().save_pretrained(storage.local_path(url), *args, **kwargs)
        with storage.staged_dir(url) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like transformers', from a local path or any fsspec URL (downloaded to a temporary directory)."""
        with storage.local_copy(str(pretrained_model_name_or_path)) as path:
            return super().from_pretrained(path, *args, **kwargs)


AutoConfig.register(SynerGenVLConfig.model_type, SynerGenVLConfig, exist_ok=True)
AutoModelForCausalLM.register(SynerGenVLConfig, SynerGenVLForCausalLM, exist_ok=True)

__all__ = ["SynerGenVLConfig", "SynerGenVLForCausalLM", "SynerGenVLModel", "SynerGenVLOutput", "SPECIAL_KEYS", "Qwen2Config"]
