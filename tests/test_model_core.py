"""The MMoE decoder, folding, packing and caching: behaviour against the plain Qwen2 and against itself."""

from __future__ import annotations

import pytest
import torch
from test_model_kit import Doc, pack, random_codes, tiny_config, tiny_qwen2, single_thread  # noqa: F401
from transformers import DynamicCache

from model.fold_embed import FoldEmbed
from model.folding import Fold, fold_codes, unfold_codes
from model.modeling import SynerGenVLForCausalLM, image_block_index, packed_attention_mask
from synergen.errors import SynergenError

SPECIAL = {"boi": 90, "eoi": 91, "img": 92, "uncond": 93, "tile": 94, "thumbnail": 95}
VISION = dict(codebook_size=32, image_grid=[4, 8], fold=[2, 4], head_layers=2, special_token_ids=SPECIAL)


@pytest.fixture(scope="module")
def llm_and_model():
    llm = tiny_qwen2()
    return llm, SynerGenVLForCausalLM.from_llm(llm, **VISION).eval()


def mixed_docs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Doc([1, 5, 6, 7], random_codes(cfg, g), [], gen=True),
        Doc([1, 8, 9], random_codes(cfg, g), [10, 11, 2]),
        Doc([1, 3, 4, 5, 6, 2]),
        Doc([1, 12, 13], random_codes(cfg, g), [], gen=True),
    ]


def test_text_logits_equal_the_underlying_qwen2_at_init(llm_and_model):
    llm, model = llm_and_model
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 40, 41, 42, 43, 44, 45, 46]])
    batch = pack(model.config, [[Doc(r.tolist())] for r in ids])
    with torch.no_grad():
        ours, ref = model.text_logits(batch), llm(ids).logits
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    for layer in model.model.layers:  # image FFN starts as a copy of the text FFN: every projection
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(layer.image_mlp, proj).weight, getattr(layer.mlp, proj).weight), proj
        assert getattr(layer.image_mlp, "up_proj").weight.data_ptr() != layer.mlp.up_proj.weight.data_ptr()  # a copy, not shared


def test_packed_batch_gives_the_per_document_losses_of_one_by_one(llm_and_model):
    _, model = llm_and_model
    docs = mixed_docs(model.config)
    packed = pack(model.config, [docs[:2], docs[2:]], T=40)
    with torch.no_grad():
        out = model(packed)
        alone = [model(pack(model.config, [[d]])) for d in docs]
    assert out.n_text_targets == sum(a.n_text_targets for a in alone)
    assert out.n_image_targets == sum(a.n_image_targets for a in alone)
    for row, pair in enumerate([(0, 1), (2, 3)]):
        t0 = 0
        for di in pair:
            n = alone[di].token_loss.shape[1]
            got = out.token_loss[row, t0:t0 + n]
            assert torch.allclose(got, alone[di].token_loss[0], atol=1e-5), (row, di)
            assert (packed.document_ids[row, t0:t0 + n] == pair.index(di)).all()
            t0 += n
        assert (out.token_loss[row, t0:] == 0).all()  # empty slots carry no loss
    assert out.token_loss.sum() > 0


def test_packed_mask_blocks_cross_document_attention():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = packed_attention_mask(docs, docs, "sdpa", torch.float32)[0, 0]
    assert m[3, 2] and m[3, 3] and not m[3, 1] and not m[2, 3]  # causal, same document only
    assert m[5].tolist() == [False] * 5 + [True]  # an empty slot sees only itself
    f = packed_attention_mask(docs, docs, "eager", torch.float32)[0, 0]
    assert f[3, 1] == torch.finfo(torch.float32).min and f[3, 2] == 0  # eager needs an additive float mask


def test_eager_and_flex_attention_agree_with_sdpa_on_packed_documents(llm_and_model):
    _, model = llm_and_model
    batch = pack(model.config, [mixed_docs(model.config)[:2], mixed_docs(model.config)[2:]], T=40)
    with torch.no_grad():
        ref = model(batch).token_loss
        try:
            for impl in ("eager", "flex_attention"):  # flex: BlockMask, no dense mask (forward only on CPU)
                model.config._attn_implementation = impl
                assert torch.allclose(model(batch).token_loss, ref, atol=1e-4), impl
        finally:
            model.config._attn_implementation = "sdpa"


def test_each_ffn_computes_only_its_own_rows(llm_and_model):
    _, model = llm_and_model
    batch = pack(model.config, [mixed_docs(model.config)[:2], mixed_docs(model.config)[2:]], T=40)
    seen: dict[str, list[int]] = {"text": [], "image": []}
    layer = model.model.layers[0]
    hooks = [
        layer.mlp.register_forward_hook(lambda m, i, o: seen["text"].append(i[0].shape[0])),
        layer.image_mlp.register_forward_hook(lambda m, i, o: seen["image"].append(i[0].shape[0])),
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    n_img = int(batch.image_mask.sum())
    assert seen == {"image": [n_img], "text": [batch.input_ids.numel() - n_img]}


def test_cached_decoding_of_image_tokens_uses_the_image_ffn_and_equals_uncached(llm_and_model):
    _, model = llm_and_model
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    batch = pack(cfg, [[Doc([1, 5, 6], random_codes(cfg, g), [7, 2])]])
    with torch.no_grad():
        full = model.model(batch.input_ids, batch.position_ids, batch.document_ids, batch.image_mask, batch.image_codes)
        prefix = 4  # <s> 5 6 <boi>
        cache = DynamicCache(config=cfg)
        steps = [model.model(batch.input_ids[:, :prefix], batch.position_ids[:, :prefix], batch.document_ids[:, :prefix],
                             batch.image_mask[:, :prefix], batch.image_codes[:0], cache=cache)]
        img_calls = []
        hook = model.model.layers[1].image_mlp.register_forward_hook(lambda m, i, o: img_calls.append(i[0].shape[0]))
        blocks = image_block_index(batch.image_mask)
        n_img_before = 0
        for t in range(prefix, batch.input_ids.shape[1]):
            is_img = batch.image_mask[:, t]
            codes = batch.image_codes[n_img_before:n_img_before + int(is_img.sum())]
            bidx = blocks[n_img_before:n_img_before + int(is_img.sum())]
            n_img_before += int(is_img.sum())
            steps.append(model.model(batch.input_ids[:, t:t + 1], batch.position_ids[:, t:t + 1], batch.document_ids[:, :t + 1],
                                     is_img[:, None], codes, bidx, cache=cache))
        hook.remove()
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()
    assert img_calls == [1 if batch.image_mask[0, t] else 0 for t in range(prefix, batch.input_ids.shape[1])]


def test_block_index_restarts_per_image():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert image_block_index(mask).tolist() == [0, 1, 2, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("fold", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (4, 4), (2, 8), (4, 8), (8, 8)])
def test_fold_then_unfold_is_exact_for_every_dividing_fold(fold):
    f = Fold(*fold)
    codes = torch.randint(0, 32768, (3, 8, 16))
    groups = fold_codes(codes, f)
    assert groups.shape == (3, f.groups(8, 16), f.size)
    assert torch.equal(unfold_codes(groups, f, 8, 16), codes)


def test_fold_embed_uses_each_codes_grid_position():
    cfg = tiny_config(image_grid=[4, 8], fold=[2, 4])
    fe = FoldEmbed(cfg)
    torch.nn.init.zeros_(fe.code_embed.weight)
    codes = torch.zeros(4, 8, dtype=torch.long)
    # Block 1 (top-right) holds cells rows 0-1, cols 4-7 of the 4x8 grid.
    assert fe.cell_index[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    out = fe(codes, torch.arange(4))
    assert out.shape == (4, cfg.hidden_size) and not torch.allclose(out[0], out[1])
    with pytest.raises(SynergenError, match="image_grid"):
        fe(codes[:1], torch.tensor([4]))
    with pytest.raises(SynergenError, match="codebook_size"):
        fe(codes[:1] + 99, torch.tensor([0]))


def test_mismatched_image_codes_is_a_clear_error(llm_and_model):
    _, model = llm_and_model
    batch = pack(model.config, [mixed_docs(model.config)[:1]])
    batch.image_codes = batch.image_codes[:-1]
    with pytest.raises(SynergenError, match="one fold group per image position"):
        model(batch)


def test_packed_training_attention_avoids_a_dense_mask_where_it_can_train():
    from model.modeling import packed_attention_for

    assert packed_attention_for("cuda") == "flex_attention"  # BlockMask, backward on CUDA
    assert packed_attention_for("cpu") == "sdpa"  # flex_attention has no backward on CPU (torch 2.13)
