"""Chunked losses: the code classifier and the LM head never hold all their logits, yet losses and gradients
equal the unchunked computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


PAPER_LAMBDA = 2.0  # SynerGen-VL Eq. 4: image-loss weight


def test_both_loss_reductions_weight_image_codes_by_the_papers_lambda(model_and_batch):
    model, batch = model_and_batch
    k = model.config.fold_geometry.size
    with torch.no_grad():
        out = model(batch)
        is_txt, is_img = batch.labels[:, 1:] != -100, batch.image_targets[:, 1:]
        text_sum = out.token_loss[:, 1:][is_txt].sum()
        image_sum = out.token_loss[:, 1:][is_img].sum() * k  # token_loss holds the mean over a block's k codes
        n_t, n_i = int(is_txt.sum()), int(is_img.sum()) * k
        assert (out.n_text_targets, out.n_image_targets) == (n_t, n_i) and n_t and n_i
        assert torch.allclose(out.loss, text_sum / n_t + PAPER_LAMBDA * image_sum / n_i, rtol=1e-5)
        model.config.loss_reduction = "token_sum"
        try:
            eq4 = model(batch)
        finally:
            model.config.loss_reduction = "modality_mean"
    assert torch.allclose(eq4.loss, (text_sum + PAPER_LAMBDA * image_sum) / batch.input_ids.numel(), rtol=1e-5)
    with pytest.raises(SynergenError, match="loss_reduction"):
        tiny_config(loss_reduction="sum")


def test_loss_chunk_logits_must_be_positive():
    with pytest.raises(SynergenError, match="loss_chunk_logits"):
        tiny_config(loss_chunk_logits=0)


ZERO3_SCRIPT = r'''
import json, os, socket, sys
import torch, deepspeed
from deepspeed.utils import safe_get_full_grad
from test_model_kit import Doc, pack, random_codes, tiny_config
from test_model_core import mixed_docs
from model.modeling import SynerGenVLForCausalLM

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed()
torch.manual_seed(0)
model = SynerGenVLForCausalLM(tiny_config())
cfg = json.load(open(sys.argv[1]))
cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)
g = torch.Generator().manual_seed(1)
docs = mixed_docs(model.config)
batch = pack(model.config, [[docs[0], Doc([1, 20, 21], random_codes(model.config, g), [], gen=True)], [docs[1], docs[2]]])
res = []
for chunk in (2**40, 3 * model.config.vocab_size):
    model.config.loss_chunk_logits = chunk
    out = engine(batch)
    engine.backward(out.loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    res.append((out, grads))
    engine.optimizer.zero_grad()
(a, ga), (b, gb) = res
print(json.dumps({"loss": [a.loss.item(), b.loss.item()], "token_loss_diff": (a.token_loss - b.token_loss).abs().max().item(),
                  "n_grads": len(ga), "grad_diff": max((ga[n] - gb[n]).abs().max().item() for n in ga),
                  "classifier_grad_norm": ga["unfold_head.classifier.weight"].norm().item()}))
'''


def test_chunked_loss_under_deepspeed_zero3_equals_unchunked(tmp_path):
    """ZeRO-3 partitions parameters and gathers them only when their module is called: the chunked loss calls
    the classifiers as modules, in the recomputation too, so it trains under ZeRO-3 exactly as unchunked."""
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "zero3_loss.py"
    script.write_text(ZERO3_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{repo}:{repo / 'tests'}")
    proc = subprocess.run([sys.executable, str(script), str(repo / "infra/deepspeed/zero3_cpu.json")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    full, chunked = res["loss"]
    assert full > 0 and abs(full - chunked) < 1e-6 and res["token_loss_diff"] < 1e-5
    assert res["n_grads"] == sum(1 for _ in SynerGenVLForCausalLM(tiny_config()).parameters())
    assert res["grad_diff"] < 1e-6 and res["classifier_grad_norm"] > 0
