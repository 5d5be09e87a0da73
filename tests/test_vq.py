"""The VQ interface over transformers' Emu3VQVAE (the trained demo weights) and JanusVQVAE."""

import numpy as np
import pytest
import torch
from PIL import Image

from model.vq import VQTokenizer, tiny_emu3_config
from pipeline.democorpus import render, sample_scene
from pipeline.tiling import psnr, resize_center_crop, to_images, to_pixels
from synergen.errors import ConfigMismatchError, SynergenError
from tokenize_helpers import REPO_VQ


@pytest.fixture(scope="module")
def vq():
    return VQTokenizer.from_pretrained(REPO_VQ)


def held_out_images(n, seed=12345):
    import random

    rng = random.Random(seed)  # not the training seed: unseen scenes
    return [resize_center_crop(render(sample_scene(rng), 256), 64) for _ in range(n)]


def test_demo_vq_facts_and_shapes(vq):
    assert vq.kind == "emu3_vqgan" and vq.codebook_size == 512 and vq.downsample == 8
    assert vq.model_id.startswith("demo_vq@") and len(vq.model_id) == len("demo_vq@") + 12
    pix = to_pixels(held_out_images(3))
    codes = vq.encode(pix)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 512
    out = vq.decode(codes)
    assert out.shape == (3, 3, 64, 64) and float(out.min()) >= -1 and float(out.max()) <= 1
    # Any multiple of the downsample encodes (the VQ is convolutional): 128 px -> 16x16 codes.
    assert vq.encode(torch.zeros(1, 3, 128, 128)).shape == (1, 16, 16)
    with pytest.raises(SynergenError, match="multiple of the VQ downsample"):
        vq.encode(torch.zeros(1, 3, 60, 60))


def colour_of(img):
    """Nearest palette colour with the most pixels (the corpus's classifier, minus its shape heuristics)."""
    from pipeline.democorpus import BACKGROUND, COLOURS

    x = np.asarray(img.convert("RGB"), dtype=np.float32)  # [64, 64, 3]
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    label = ((x[:, :, None] - palette) ** 2).sum(-1).argmin(-1)
    return list(COLOURS)[int(np.bincount(label.ravel(), minlength=5)[1:].argmax())]


def test_demo_vq_reconstructs_colours_and_shapes(vq):
    images = held_out_images(24)
    pix = to_pixels(images)
    rec = vq.decode(vq.encode(pix))
    assert psnr(rec, pix) > 15.0
    # The corpus's own judge agrees on the dominant colour of nearly every reconstruction.
    agree = sum(colour_of(a) == colour_of(b) for a, b in zip(images, to_images(rec)))
    assert agree >= 15


def test_untrained_vq_is_not_a_tokenizer(vq):
    from transformers import Emu3VQVAE

    torch.manual_seed(0)
    pix = to_pixels(held_out_images(8))
    random_vq = VQTokenizer(Emu3VQVAE(tiny_emu3_config()))
    assert psnr(random_vq.decode(random_vq.encode(pix)), pix) < 12 < psnr(vq.decode(vq.encode(pix)), pix)


def test_round_trip_through_s3_and_save(vq, s3, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(f"{REPO_VQ}/", "synergen-test/vqs/demo_vq/", recursive=True)
    remote = VQTokenizer.from_pretrained(f"{s3}/vqs/demo_vq")
    assert remote.model_id == vq.model_id
    pix = to_pixels(held_out_images(2))
    assert torch.equal(remote.encode(pix), vq.encode(pix))
    vq.save_pretrained(str(tmp_path / "again"))  # fp16 weights: the same bytes as the asset
    assert VQTokenizer.from_pretrained(str(tmp_path / "again")).model_id.split("@")[1] == vq.model_id.split("@")[1]
    with pytest.raises(SynergenError, match="config.json"):
        VQTokenizer.from_pretrained(str(tmp_path / "missing"))


def test_codes_from_another_codebook_are_refused(vq):
    with pytest.raises(ConfigMismatchError, match="another VQ"):
        vq.decode(torch.full((1, 8, 8), 4096))


def test_janus_behind_the_same_interface(tmp_path):
    from transformers import JanusVQVAE, JanusVQVAEConfig

    cfg = JanusVQVAEConfig(base_channels=32, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1, latent_channels=32,
                           embed_dim=8, num_embeddings=1024, num_patches=4)
    VQTokenizer(JanusVQVAE(cfg)).save_pretrained(str(tmp_path / "janus"))
    j = VQTokenizer.from_pretrained(str(tmp_path / "janus"))
    assert j.kind == "janus_vqgan" and j.codebook_size == 1024 and j.downsample == 16
    codes = j.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.int64
    assert j.decode(codes).shape == (2, 3, 64, 64)
    with pytest.raises(SynergenError, match="num_patches"):
        j.decode(torch.zeros(1, 2, 2, dtype=torch.long))
