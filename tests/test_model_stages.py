"""Progressive stages: what trains in each, proved by real AdamW steps on a mixed batch."""

from __future__ import annotations

import pytest
import torch
from test_model_core import VISION, mixed_docs
from test_model_kit import Doc, pack, tiny_qwen2, single_thread  # noqa: F401

from model.modeling import SynerGenVLForCausalLM
from synergen.errors import SynergenError


def adamw_step(model, batch):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    model.train()
    model(batch).loss.backward()
    opt.step()
    model.eval()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def text_only_batch(model):
    return pack(model.config, [[Doc([1, 5, 6, 7, 8, 9, 2])], [Doc([1, 30, 31, 32, 2])]])


def test_stage1_step_changes_only_image_specific_parameters_and_keeps_text_outputs():
    model = SynerGenVLForCausalLM.from_llm(tiny_qwen2(), **VISION)
    model.set_stage(1)
    text = text_only_batch(model)
    with torch.no_grad():
        before_logits = model.text_logits(text)
    before = snapshot(model)
    # The batch uses <boi>/<eoi>/<img>, so the special-token table gets gradients too.
    adamw_step(model, pack(model.config, [mixed_docs(model.config)[:2], mixed_docs(model.config)[2:]], T=40))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved <= trainable
    frozen = set(before) - trainable
    assert any(".mlp." in n for n in frozen) and "model.embed_tokens.weight" in frozen and "lm_head.weight" in frozen
    assert not any(".self_attn." in n for n in trainable if n.startswith("model.layers."))
    for part in ("model.fold_embed.", "unfold_head.", ".image_mlp.", "model.special_embed."):
        assert any(part in n for n in moved), part
    with torch.no_grad():
        assert torch.equal(model.text_logits(text), before_logits)


def test_stage2_step_moves_attention_but_not_text_ffns_or_embeddings():
    model = SynerGenVLForCausalLM.from_llm(tiny_qwen2(), **VISION)
    model.set_stage(2)
    before = snapshot(model)
    adamw_step(model, pack(model.config, [mixed_docs(model.config)[:2], mixed_docs(model.config)[2:]], T=40))
    changed = lambda n: not torch.equal(dict(model.named_parameters())[n], before[n])  # noqa: E731
    assert changed("model.layers.0.self_attn.q_proj.weight") and changed("model.layers.1.self_attn.o_proj.weight")
    for n in before:
        text_side = (n.startswith("model.layers.") and (".mlp." in n or "layernorm" in n)) or n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
        if text_side:
            assert not changed(n), n


def test_sft_trains_everything_and_bad_stage_is_an_error():
    model = SynerGenVLForCausalLM.from_llm(tiny_qwen2(), **VISION)
    model.set_stage(1)
    model.set_stage("sft")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(SynergenError, match="1, 2 or 'sft'"):
        model.set_stage(3)


def test_every_parameter_gets_a_gradient_in_text_only_and_image_only_batches():
    """DeepSpeed ranks must reduce the same gradients whatever the modality mix of their batch."""
    model = SynerGenVLForCausalLM.from_llm(tiny_qwen2(), **VISION)
    g = torch.Generator().manual_seed(0)
    from test_model_kit import random_codes

    for batch in (text_only_batch(model), pack(model.config, [[Doc([1, 5], random_codes(model.config, g), gen=True)]])):
        model.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == [], missing[:5]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from test_model_kit import tiny_config

    torch.manual_seed(0)
    model = SynerGenVLForCausalLM(tiny_config()).train()
    batch = pack(model.config, [mixed_docs(model.config)])
    model(batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(batch).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
