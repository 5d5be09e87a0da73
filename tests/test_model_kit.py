"""Shared builders for the model tests: tiny configs, a tiny real Qwen2, packed batches from documents.

No tests here: the other `test_model_*.py` files import these builders.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.batch import PackedBatch
from model.config import SynerGenVLConfig, preset_config
from model.special_tokens import BOI, EOI, IMG

VOCAB = 96


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: torch's 2-thread pool costs ~9 ms per attention call on a shared 2-core machine, 1 thread 6 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> SynerGenVLConfig:
    base = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=64,
                num_attention_heads=4, num_key_value_heads=2, codebook_size=32, image_grid=[4, 8], fold=[2, 4], head_layers=2)
    return preset_config("tiny", **{**base, **overrides})


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


@dataclass
class Doc:
    """One document: text ids and images; `gen` makes its image blocks code targets, else its text is the target."""

    prefix: list[int]
    codes: torch.Tensor | None = None  # [n_blocks, k]: one image, placed as <boi> <img>*n <eoi>
    suffix: list[int] = ()
    gen: bool = False


def doc_tokens(cfg: SynerGenVLConfig, d: Doc) -> tuple[list[int], list[bool], list[bool], list[bool]]:
    """-> ids, is_image, is_text_target, is_image_target."""
    ids, img, tt, it = [], [], [], []
    for t in d.prefix:
        ids.append(t); img.append(False); tt.append(not d.gen and len(ids) > 1); it.append(False)
    if d.codes is not None:
        n = d.codes.shape[0]
        ids += [cfg.token_id(BOI)] + [cfg.token_id(IMG)] * n + [cfg.token_id(EOI)]
        img += [False] + [True] * n + [False]
        tt += [False] * (n + 2)
        it += [False] + [d.gen] * n + [False]
    for t in d.suffix:
        ids.append(t); img.append(False); tt.append(True); it.append(False)
    return ids, img, tt, it


def pack(cfg: SynerGenVLConfig, rows: list[list[Doc]], T: int | None = None) -> PackedBatch:
    """Pack documents back to back into rows of T slots (default: the longest row)."""
    toks = [[doc_tokens(cfg, d) for d in row] for row in rows]
    T = T or max(sum(len(t[0]) for t in row) for row in toks)
    B = len(rows)
    ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    img = torch.zeros(B, T, dtype=torch.bool)
    tgt = torch.zeros(B, T, dtype=torch.bool)
    codes = []
    for b, row in enumerate(toks):
        t0 = 0
        for di, (i, m, tt, it) in enumerate(row):
            n = len(i)
            ids[b, t0:t0 + n] = torch.tensor(i)
            pos[b, t0:t0 + n] = torch.arange(n)
            docs[b, t0:t0 + n] = di
            lab = torch.tensor(i)
            labels[b, t0:t0 + n] = torch.where(torch.tensor(tt), lab, torch.full_like(lab, -100))
            img[b, t0:t0 + n] = torch.tensor(m)
            tgt[b, t0:t0 + n] = torch.tensor(it)
            t0 += n
        for d in rows[b]:
            if d.codes is not None:
                codes.append(d.codes)
    k = cfg.fold_geometry.size
    image_codes = torch.cat(codes) if codes else torch.zeros(0, k, dtype=torch.long)
    return PackedBatch(ids, pos, docs, labels, img, image_codes, tgt, [["test"] * len(r) for r in rows], "mixed")


def random_codes(cfg: SynerGenVLConfig, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.codebook_size, (cfg.blocks_per_image, cfg.fold_geometry.size), generator=g)
