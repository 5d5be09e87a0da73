"""InternLM2 checkpoint -> transformers Qwen2 checkpoint, so the paper's own LLM (InternLM2-1.8B) can be the backbone.

Layout mapping (InternLM2's remote-code `modeling_internlm2.py`):
  model.tok_embeddings            -> model.embed_tokens
  layers.N.attention.wqkv         -> self_attn.{q,k,v}_proj; rows grouped per KV head as
                                     [q_0 .. q_{g-1}, k, v] (g = heads / kv_heads), each head_dim rows
  layers.N.attention.wo           -> self_attn.o_proj
  layers.N.feed_forward.w1/w3/w2  -> mlp.gate_proj / up_proj / down_proj   (SwiGLU: w2(silu(w1 x) * w3 x))
  layers.N.attention_norm/ffn_norm-> input_layernorm / post_attention_layernorm
  model.norm, output              -> model.norm, lm_head
Qwen2 has q/k/v biases and InternLM2 none: they are written as zeros, which is the same function.
"""

from __future__ import annotations

import json
import logging
import re

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from transformers import Qwen2Config

from synergen.errors import SynergenError

log = logging.getLogger(__name__)

_RENAMES = [
    (r"^model\.tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^model\.norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.attention\.wo\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^model\.layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
]
_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.weight$")


def split_wqkv(wqkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused `[(H + 2 Hkv) * d, D]` in grouped order -> q `[H d, D]`, k `[Hkv d, D]`, v `[Hkv d, D]`."""
    groups = n_heads // n_kv_heads
    rows, dim = wqkv.shape
    head_dim = rows // (n_heads + 2 * n_kv_heads)
    if head_dim * (n_heads + 2 * n_kv_heads) != rows or n_heads % n_kv_heads:
        raise SynergenError(f"wqkv of shape {tuple(wqkv.shape)} does not fit {n_heads} heads / {n_kv_heads} KV heads: check the config")
    w = wqkv.reshape(n_kv_heads, groups + 2, head_dim, dim)
    q = w[:, :groups].reshape(n_heads * head_dim, dim)  # query head h*g+i uses KV head h, as repeat_kv expects
    return q.contiguous(), w[:, -2].reshape(-1, dim).contiguous(), w[:, -1].reshape(-1, dim).contiguous()


def convert_state_dict(sd: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if m := _WQKV.match(name):
            q, k, v = split_wqkv(t, n_heads, n_kv_heads)
            p = f"model.layers.{m.group(1)}.self_attn"
            out.update({f"{p}.q_proj.weight": q, f"{p}.k_proj.weight": k, f"{p}.v_proj.weight": v})
            for proj, w in (("q", q), ("k", k), ("v", v)):
                out[f"{p}.{proj}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = t
                break
        else:
            raise SynergenError(f"unknown InternLM2 tensor {name!r}: is this an InternLM2 checkpoint?")
    return out


def qwen2_config_from_internlm2(cfg: dict) -> Qwen2Config:
    if cfg.get("bias", False):
        raise SynergenError("InternLM2 config has bias=true; only the bias-free layout (all released InternLM2 models) is supported")
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope = {**rope, **{k: v for k, v in scaling.items() if k != "type"}, "rope_type": scaling.get("rope_type", scaling.get("type"))}
    return Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]), hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=rope, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def _read_state_dict(fs, root: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in fs.ls(root, detail=False) if f.endswith(".safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_safetensors(fs.cat_file(f)))
        return sd
    files = sorted(f for f in fs.ls(root, detail=False) if re.search(r"pytorch_model.*\.bin$", f))
    if not files:
        raise SynergenError(f"no *.safetensors or pytorch_model*.bin under {root}: point at an InternLM2 checkpoint directory")
    sd = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            sd.update(torch.load(fh, map_location="cpu", weights_only=True))
    return sd


def convert_internlm2(src: str, dst: str) -> Qwen2Config:
    """Convert the InternLM2 checkpoint directory `src` (local or fsspec URL) into a Qwen2 one at `dst` (local)."""
    fs, root = fsspec.core.url_to_fs(src)
    cfg = json.loads(fs.cat_file(f"{root.rstrip('/')}/config.json"))
    qcfg = qwen2_config_from_internlm2(cfg)
    sd = convert_state_dict(_read_state_dict(fs, root), qcfg.num_attention_heads, qcfg.num_key_value_heads)
    if qcfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    fsspec.filesystem("file").makedirs(dst, exist_ok=True)
    qcfg.architectures = ["Qwen2ForCausalLM"]
    qcfg.save_pretrained(dst)
    save_file(sd, f"{dst}/model.safetensors", metadata={"format": "pt"})
    log.info("converted %s -> %s: %d tensors", src, dst, len(sd))
    return qcfg
