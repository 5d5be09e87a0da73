"""Generation: guidance, code grids, VQ decode, and a tiny model that memorises pairs both ways."""

from __future__ import annotations

import pytest
import torch
from test_model_kit import Doc, pack, tiny_config, single_thread  # noqa: F401
from transformers import Emu3VQVAE, Emu3VQVAEConfig

from model.generation import cfg_logits
from model.modeling import SynerGenVLForCausalLM
from model.special_tokens import BOI, EOI, IMG, UNCOND
from synergen.errors import SynergenError

PROMPT_GEN, PROMPT_UND = 50, 51


def generation_prompt(cfg, ids: list[int]) -> list[int]:
    """`<s> ids <boi>` (the raw template's text-to-image prompt, written out as the test's oracle)."""
    return [cfg.bos_token_id, *ids, cfg.token_id(BOI)]


def understanding_prompt(cfg, n_blocks: int, ids: list[int]) -> list[int]:
    """`<s> <boi> <img>*n <eoi> ids`."""
    return [cfg.bos_token_id, cfg.token_id(BOI), *[cfg.token_id(IMG)] * n_blocks, cfg.token_id(EOI), *ids]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SynerGenVLForCausalLM(tiny_config()).eval()


def test_cfg_with_scale_one_equals_the_conditional_distribution(model):
    logits = torch.randn(6, 32)
    assert torch.allclose(cfg_logits(logits, 1.0).softmax(-1), logits[:3].softmax(-1), atol=1e-6)
    assert torch.allclose(cfg_logits(logits, 7.5), logits[3:] + 7.5 * (logits[:3] - logits[3:]))
    # End to end: guided sampling at scale 1 draws what unguided sampling draws from the same seed.
    cfg = model.config
    prompts = [generation_prompt(cfg, [PROMPT_GEN, 7, 8]), generation_prompt(cfg, [PROMPT_GEN, 9])]
    uncond = generation_prompt(cfg, [cfg.token_id(UNCOND)])
    plain, _ = model.generate_images(prompts, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    head_calls = []
    model.unfold_head.register_forward_hook(lambda *a: None)
    orig = model.unfold_head.sample

    def spy(h, pick):
        head_calls.append(h.shape[0])
        return orig(h, pick)

    model.unfold_head.sample = spy
    try:
        guided, _ = model.generate_images(prompts, uncond_prompt=uncond, cfg_scale=1.0 + 1e-7, generator=torch.Generator().manual_seed(1))
    finally:
        del model.unfold_head.sample
    assert set(head_calls) == {4}  # cond and uncond rows batched together
    assert torch.equal(plain, guided)
    with pytest.raises(SynergenError, match="uncond_prompt"):
        model.generate_images(prompts, cfg_scale=7.5)


def test_generated_code_grids_are_valid_and_decode_to_images_of_the_right_size(model):
    cfg = model.config
    vq_cfg = Emu3VQVAEConfig(codebook_size=cfg.codebook_size, embed_dim=8, latent_channels=8, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                             num_res_blocks=1, attn_resolutions=[], double_latent=False, hidden_size=32, num_attention_heads=1)
    torch.manual_seed(0)
    emu = Emu3VQVAE(vq_cfg).eval()

    class TinyVQ:  # the VQTokenizer interface over a real (random-weight) Emu3VQVAE
        codebook_size = cfg.codebook_size
        downsample = 8

        @torch.no_grad()
        def decode(self, codes):
            return emu.decode(codes)

    prompts = [generation_prompt(cfg, [PROMPT_GEN, 7]), generation_prompt(cfg, [PROMPT_GEN, 9, 10, 11])]
    uncond = generation_prompt(cfg, [cfg.token_id(UNCOND)])
    grid, pixels = model.generate_images(prompts, uncond_prompt=uncond, top_k=8, temperature=1.0, generator=torch.Generator().manual_seed(0), vq=TinyVQ())
    gh, gw = cfg.image_grid
    assert grid.shape == (2, gh, gw) and grid.dtype == torch.long
    assert int(grid.min()) >= 0 and int(grid.max()) < cfg.codebook_size
    assert pixels.shape == (2, 3, gh * 8, gw * 8)


def test_tiny_model_memorises_pairs_and_generates_them_both_ways():
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, intermediate_size=128, codebook_size=16)
    model = SynerGenVLForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    captions = [[10, 11, 12], [13, 14], [15, 16, 17], [18, 11]]
    images = [torch.randint(0, cfg.codebook_size, (cfg.blocks_per_image, cfg.fold_geometry.size), generator=g) for _ in captions]
    gen = [Doc([1, PROMPT_GEN, *c], im, gen=True) for c, im in zip(captions, images)]
    und = [Doc([1], im, [PROMPT_UND, *c, 2]) for c, im in zip(captions, images)]
    batch = pack(cfg, [gen[:2] + und[:2], gen[2:] + und[2:]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(150):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.text_loss.item() < 0.05 and out.image_loss.item() < 0.05, (out.text_loss.item(), out.image_loss.item())

    grids, _ = model.generate_images([generation_prompt(cfg, [PROMPT_GEN, *c]) for c in captions], cfg_scale=1.0, temperature=0.0)
    from model.folding import unfold_codes

    want = torch.stack([unfold_codes(im, cfg.fold_geometry, *cfg.image_grid) for im in images])
    assert torch.equal(grids, want)

    n = cfg.blocks_per_image
    text = model.generate_text([understanding_prompt(cfg, n, [PROMPT_UND]) for _ in captions], torch.cat(images), max_new_tokens=6)
    assert text == captions
