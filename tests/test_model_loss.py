"""Chunked losses: the code classifier and the LM head never hold all their logits, yet losses and gradients
equal the unchunked computation."""

from __future__ import annotations

import pytest
import torch
from test_model_core import mixed_docs
from test_model_kit import Doc, pack, random_codes, tiny_config, single_thread  # noqa: F401

from model.modeling import SynerGenVLForCausalLM
from synergen.errors import SynergenError

UNCHUNKED = 2**40


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = SynerGenVLForCausalLM(tiny_config()).train()
    g = torch.Generator().manual_seed(1)
    docs = mixed_docs(model.config)
    # Row 0: two generation images (8 code-target blocks); row 1: understanding docs (10 text targets).
    extra = Doc([1, 20, 21], random_codes(model.config, g), [], gen=True)
    batch = pack(model.config, [[docs[0], extra], [docs[1], docs[2]]])
    return model, batch


def loss_and_grads(model, batch, chunk_logits: int):
    model.config.loss_chunk_logits = chunk_logits
    try:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
    finally:
        model.config.loss_chunk_logits = UNCHUNKED
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("target", ["image", "text"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_loss_and_gradients_equal_the_unchunked(model_and_batch, target, chunk):
    model, batch = model_and_batch
    cfg = model.config
    # `chunk` blocks (image) or target rows (text) per chunk: 1, 3 (uneven over 8 blocks, 10 rows) and more than there are.
    per_row = cfg.fold_geometry.size * cfg.codebook_size if target == "image" else cfg.vocab_size
    ref, ref_grads = loss_and_grads(model, batch, UNCHUNKED)
    out, grads = loss_and_grads(model, batch, chunk * per_row)
    assert ref.n_image_targets == 8 * cfg.fold_geometry.size and ref.n_text_targets == 10
    assert (out.n_text_targets, out.n_image_targets) == (ref.n_text_targets, ref.n_image_targets)
    for name in ("loss", "text_loss", "image_loss"):
        assert torch.allclose(getattr(out, name), getattr(ref, name), rtol=1e-6, atol=1e-6), name
    assert torch.allclose(out.token_loss, ref.token_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads) and "unfold_head.classifier.weight" in grads and "lm_head.weight" in grads
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-5, atol=1e-7), (n, (g - ref_grads[n]).abs().max())


def test_classifiers_see_at_most_one_chunk_of_rows_in_forward_and_backward(model_and_batch):
    model, batch = model_and_batch
    cfg = model.config
    k = cfg.fold_geometry.size
    rows: dict[str, list[int]] = {"code": [], "text": []}
    hooks = [
        model.unfold_head.classifier.register_forward_hook(lambda m, i, o: rows["code"].append(o.shape[0])),
        model.lm_head.register_forward_hook(lambda m, i, o: rows["text"].append(o.shape[0])),
    ]
    # 3 text target rows per chunk; 3 * V_text // (k * codebook) = 1 block of k codes per chunk.
    cfg.loss_chunk_logits = 3 * cfg.vocab_size
    try:
        out = model(batch)
        fwd = {n: list(r) for n, r in rows.items()}
        out.loss.backward()
        with torch.no_grad():
            model(batch)
    finally:
        cfg.loss_chunk_logits = UNCHUNKED
        for h in hooks:
            h.remove()
    assert fwd == {"code": [k] * 8, "text": [3, 3, 3, 1]}
    # Backward recomputes each chunk once, one at a time; no-grad forward runs the chunks once, no recompute.
    assert sorted(rows["code"]) == [k] * 24 and sorted(rows["text"]) == [1] * 3 + [3] * 9


def test_loss_chunk_logits_must_be_positive():
    with pytest.raises(SynergenError, match="loss_chunk_logits"):
        tiny_config(loss_chunk_logits=0)
