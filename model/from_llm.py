"""`synergen init`: a pretrained LLM (Qwen2/Qwen2.5 or InternLM2 folder, local or S3) -> a SynerGen-VL to train.

Steps: load the LLM (an InternLM2 checkpoint is converted to Qwen2's layout first), prepare its tokenizer
(`model.config.add_special_tokens`: BOS/PAD where missing, the model's special tokens), build the model
with the tokenizer's ids (`SynerGenVLForCausalLM.from_llm`), check on a few prompts that its text logits
equal the LLM's, and publish model and tokenizer together in one folder (local or S3), which stage 1's
train config names as both `model` and `tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from model.batch import PackedBatch
from model.config import add_special_tokens, config_ids_from_tokenizer, parameter_counts
from model.convert_internlm2 import convert_internlm2
from model.init_config import InitConfig
from model.modeling import SynerGenVLForCausalLM
from model.template import DEFAULT_TEMPLATE, LayoutIds, check_model_tokenizer
from synergen import storage
from synergen.errors import SynergenError

log = logging.getLogger(__name__)

# Text the logit check runs on: plain prose, a caption-like line, digits and punctuation.
CHECK_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "A photo of a red bicycle leaning on a wall.", "1 + 2 = 3; 10 * 10 = 100!")
# fp32 logits of the same weights through transformers' Qwen2 and our MMoE layers (sdpa either way) differ
# by float rounding only (0 measured on the tiny fp32 test models); a wrong id moves them far more (placeholder ids
# over a full vocabulary: 1.01, issue 14).
LOGIT_TOLERANCE = 1e-3


class InitError(SynergenError):
    """The LLM or its tokenizer cannot become a SynerGen-VL as asked; names the input and the fix."""


@dataclass
class InitReport:
    """What `init_from_llm` built and checked."""

    out: str
    llm: str
    tokenizer: str
    llm_family: str  # "qwen2" or "internlm2"
    tied_embeddings: bool
    llm_vocab_size: int
    vocab_size: int
    bos: str
    special_token_ids: dict[str, int]
    sequence_template: str
    parameters: dict[str, int]  # model.config.parameter_counts (by part, total, activated)
    parameters_counted: int  # sum of the built model's tensors (equals parameters["total"])
    max_logit_diff: float  # over CHECK_PROMPTS, LLM vs SynerGen-VL, on the LLM's vocabulary


def _load_llm(llm: str) -> tuple[Qwen2ForCausalLM, str, torch.dtype]:
    """The LLM in fp32 (for the logit check), its family and its stored dtype."""
    with storage.local_copy(llm) as path:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise InitError(f"no config.json in {llm}: point --llm at a Qwen2/Qwen2.5 or InternLM2 checkpoint folder")
        cfg = json.loads(open(cfg_file).read())
        kind = cfg.get("model_type")
        dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"))
        if kind == "internlm2":
            with tempfile.TemporaryDirectory(prefix="synergen-internlm2-") as tmp:
                convert_internlm2(path, tmp)
                return Qwen2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval(), kind, dtype
        if kind not in ("qwen2",):
            raise InitError(f"{llm} has model_type {kind!r}: synergen init takes a Qwen2/Qwen2.5 ('qwen2') or InternLM2 ('internlm2') checkpoint")
        return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), kind, dtype


def _load_tokenizer(url: str):
    with storage.local_copy(url) as path:
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InitError(f"tokenizer at {url} does not load ({e}); pass the LLM's tokenizer folder with --tokenizer") from e


def text_batch(ids: list[int], k: int) -> PackedBatch:
    """One text-only document as a PackedBatch (for logit checks); `k` codes per fold group."""
    t = torch.tensor([ids])
    n = t.shape[1]
    return PackedBatch(input_ids=t, position_ids=torch.arange(n)[None], document_ids=torch.zeros_like(t),
                       labels=torch.full_like(t, -100), image_mask=torch.zeros_like(t, dtype=torch.bool),
                       image_codes=torch.zeros(0, k, dtype=torch.long), image_targets=torch.zeros_like(t, dtype=torch.bool))


@torch.no_grad()
def max_text_logit_diff(llm: Qwen2ForCausalLM, model: SynerGenVLForCausalLM, ids: LayoutIds, tokenizer, prompts=CHECK_PROMPTS) -> float:
    """Largest |logit| difference between the LLM and the model over `prompts` (each laid out as a document
    starts), on the LLM's vocabulary (rows the tokenizer added are new to the model)."""
    worst = 0.0
    for p in prompts:
        seq = list(ids.start) + tokenizer.encode(p, add_special_tokens=False)
        ref = llm(torch.tensor([seq])).logits  # [1, T, V_llm]
        ours = model.text_logits(text_batch(seq, model.config.fold_geometry.size))[..., : ref.shape[-1]]
        worst = max(worst, float((ours.float() - ref.float()).abs().max()))
    return worst


def init_from_config(cfg: InitConfig) -> InitReport:
    """`synergen init`: the vision settings from `cfg` (codebook and downsample from its VQ, else Emu3's), then
    `init_from_llm`."""
    codebook, down = 32768, 8  # Emu3's VQ (DESIGN.md)
    if cfg.vq:
        from model.vq import VQTokenizer

        v = VQTokenizer.from_pretrained(cfg.vq)
        codebook, down = v.codebook_size, v.downsample
    if cfg.image_size % down:
        raise InitError(f"image size {cfg.image_size} is not a multiple of the VQ downsample {down}; "
                        f"give a multiple of {down} (--image-size)")
    vision = {"codebook_size": codebook, "vq_downsample": down, "image_grid": [cfg.image_size // down] * 2,
              "fold": [int(x) for x in cfg.fold.lower().split("x")], "head_layers": cfg.head_layers}
    return init_from_llm(cfg.llm, cfg.out, tokenizer=cfg.tokenizer, vision=vision, sequence_template=cfg.template)


def init_from_llm(llm: str, out: str, tokenizer: str | None = None, vision: dict[str, Any] | None = None,
                  sequence_template: str = DEFAULT_TEMPLATE) -> InitReport:
    """Build a SynerGen-VL from the LLM folder `llm` (+ `tokenizer`, default the LLM folder) and publish model and
    tokenizer at `out`. `vision`: SynerGenVLConfig vision fields (codebook_size, image_grid, fold, head_layers...)."""
    base, kind, dtype = _load_llm(llm)
    tok_url = tokenizer or llm
    tok = _load_tokenizer(tok_url)
    add_special_tokens(tok)
    ids = config_ids_from_tokenizer(tok, min_vocab_size=base.config.vocab_size)
    model = SynerGenVLForCausalLM.from_llm(base, **(vision or {}), **ids, sequence_template=sequence_template).eval()
    layout = check_model_tokenizer(model.config, tok, out, tok_url)
    diff = max_text_logit_diff(base, model, layout, tok)
    if not diff <= LOGIT_TOLERANCE:
        raise InitError(f"text logits of the built model differ from {llm}'s by {diff:.3g} (> {LOGIT_TOLERANCE}): "
                        "the checkpoint's layout is not what SynerGen-VL copies; report it with the LLM's config.json")
    model = model.to(dtype)
    with storage.staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    report = InitReport(out=out, llm=llm, tokenizer=tok_url, llm_family=kind, tied_embeddings=bool(model.config.tie_word_embeddings),
                        llm_vocab_size=int(base.config.vocab_size), vocab_size=int(model.config.vocab_size), bos=tok.bos_token,
                        special_token_ids=dict(model.config.special_token_ids), sequence_template=sequence_template,
                        parameters=parameter_counts(model.config), parameters_counted=sum(p.numel() for p in model.parameters()),
                        max_logit_diff=diff)
    log.info("init: %s -> %s (%d parameters, max text-logit difference %.2g)", llm, out, report.parameters_counted, diff)
    return report
