"""The VQ interface over transformers' Emu3VQVAE (the trained demo weights) and JanusVQVAE."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.vq import VQTokenizer, tiny_emu3_config
from synergen.demo.corpus import render, sample_scene
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
    from synergen.demo.corpus import BACKGROUND, COLOURS

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


# ---- Emu3's published layouts and the 2D-once encode ---------------------------------------------------------


def tiny_video_vq_config():
    """A tiny Emu3VQVAE with every part Emu3's release has: attention in a down/up level and in the middle,
    two temporal downsamples (factor 4) and temporal residual blocks."""
    from transformers import Emu3VQVAEConfig

    return Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                           num_res_blocks=1, attn_resolutions=[1], temporal_downsample_factor=4, hidden_size=64)


def random_vq(config, seed=0):
    from transformers import Emu3VQVAE

    torch.manual_seed(seed)
    model = Emu3VQVAE(config).eval()
    with torch.no_grad():  # BatchNorm3d statistics too, so that a mix-up of tensors shows in the codes
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return model


def to_release_layout(state):
    """transformers' Emu3VQVAE names -> BAAI/Emu3-VisionTokenizer's (modeling_emu3visionvq.py): `down_block.down`
    is `down`, `up_block.up` is `up`, `middle_block` is `mid`; attention norms live inside the attention block as
    `norm`; projections `q, k, v, proj_out` are 1x1 Conv2d."""
    out = {}
    for key, t in state.items():
        key = key.replace("down_block.down.", "down.").replace("up_block.up.", "up.").replace("middle_block.", "mid.")
        key = key.replace("mid.attn_norm.", "mid.attn_1.norm.")
        for level_attn in ("attn_norms.",):
            if level_attn in key:  # down.L.attn_norms.B.x -> down.L.attn.B.norm.x
                head, tail = key.split(level_attn)
                block, rest = tail.split(".", 1)
                key = f"{head}attn.{block}.norm.{rest}"
        for new, old in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "proj_out")):
            if f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith(".weight"):
                    t = t[:, :, None, None]
        out[key] = t.contiguous()
    return out


def save_release_layout(model, folder):
    """A folder as BAAI/Emu3-VisionTokenizer publishes it: its config.json keys and model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ",
        "auto_map": {"AutoConfig": "configuration_emu3visionvq.Emu3VisionVQConfig", "AutoModel": "modeling_emu3visionvq.Emu3VisionVQModel"},
        "attn_resolutions": list(c.attn_resolutions), "ch": c.base_channels, "ch_mult": list(c.channel_multiplier),
        "codebook_size": c.codebook_size, "double_z": False, "dropout": 0.0, "embed_dim": c.embed_dim, "in_channels": 3,
        "num_res_blocks": c.num_res_blocks, "out_channels": 3, "temporal_downsample_factor": c.temporal_downsample_factor,
        "torch_dtype": "float32", "transformers_version": "4.44.0", "z_channels": c.latent_channels,
    }))
    state = to_release_layout(model.state_dict())
    save_file(state, str(folder / "model.safetensors"))
    return state


def assert_same_vq(loaded, reference):
    ref = reference.state_dict()
    got = loaded.model.state_dict()
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    torch.manual_seed(1)
    pix = torch.rand(2, 3, 32, 32) * 2 - 1
    ref_codes = torch.stack(list(reference.encode(pix, image_sizes=torch.tensor([[32, 32]] * 2)).image_tokens))
    assert torch.equal(loaded.encode(pix), ref_codes)
    assert torch.equal(loaded.decode(ref_codes), reference.decode(ref_codes).clamp(-1, 1))


def test_emu3_vision_tokenizer_release_layout_loads_tensor_for_tensor(tmp_path):
    reference = random_vq(tiny_video_vq_config())
    state = save_release_layout(reference, tmp_path / "Emu3-VisionTokenizer")
    # The release's own names, as modeling_emu3visionvq.py builds them (a renaming slip would not produce these).
    c = reference.config.base_channels * reference.config.channel_multiplier[-1]
    for key, shape in {"encoder.mid.attn_1.q.weight": (c, c, 1, 1), "encoder.mid.attn_1.norm.weight": (c,),
                       "encoder.down.1.attn.0.proj_out.weight": (c, c, 1, 1), "encoder.down.1.attn.0.norm.bias": (c,),
                       "decoder.up.1.attn.1.norm.conv_y.weight": (c, 4, 1, 1), "decoder.mid.block_1.norm1.norm_layer.weight": (c,),
                       "encoder.time_conv.1.conv.conv.weight": (4, 4, 4, 3, 3), "quant_conv.conv.weight": (4, 4, 3, 1, 1),
                       "encoder.time_res_stack.0.norm1.running_var": (4,)}.items():
        assert tuple(state[key].shape) == shape, key
    vq = VQTokenizer.from_pretrained(str(tmp_path / "Emu3-VisionTokenizer"))
    assert vq.kind == "emu3_vqgan" and vq.codebook_size == 64 and vq.downsample == 2
    assert vq.model.config.temporal_downsample_factor == 4 and vq.model.config.hidden_size == c
    assert vq.model_id.startswith("Emu3-VisionTokenizer@")
    assert_same_vq(vq, reference)


def test_release_layout_with_a_config_that_does_not_fit_its_weights_is_refused(tmp_path):
    folder = tmp_path / "vq"
    save_release_layout(random_vq(tiny_video_vq_config()), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "attn_resolutions": []}))
    with pytest.raises(SynergenError, match=r"Emu3VisionVQ layout.*unexpected.*attn"):
        VQTokenizer.from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "ch": 64}))
    with pytest.raises(SynergenError, match=r"does not match its config.*size mismatch"):
        VQTokenizer.from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "Emu3VisionVQv2"}))
    with pytest.raises(SynergenError, match="model_type 'Emu3VisionVQv2'"):
        VQTokenizer.from_pretrained(str(folder))


def tiny_emu3_checkpoint(vq_config):
    """transformers' Emu3ForConditionalGeneration (a 1-layer LLM + the VQ)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    n = vq_config.codebook_size
    cfg = Emu3Config(vq_config=vq_config.to_dict(), vocabulary_map={f"<|visual token {i:06d}|>": 100 + i for i in range(n)},
                     text_config=dict(vocab_size=100 + n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    return Emu3ForConditionalGeneration(cfg).eval()


def test_vq_inside_transformers_emu3_checkpoints_loads_alone(tmp_path, s3):
    """Both key layouts of Emu3 checkpoints: sharded `vqmodel.*` (what save_pretrained and the hub's Emu3-*-hf
    hold) and `model.vqmodel.*` (the in-memory names, e.g. a torch-level save); transformers reads both."""
    import fsspec
    from safetensors.torch import save_file
    from transformers import Emu3ForConditionalGeneration

    emu3 = tiny_emu3_checkpoint(tiny_video_vq_config())
    reference = emu3.model.vqmodel
    with torch.no_grad():
        for name, buf in reference.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    sharded = tmp_path / "Emu3-Chat-hf"
    emu3.save_pretrained(str(sharded), max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("vqmodel.encoder.") for k in index) and any(k.startswith("text_model.") for k in index)
    flat = tmp_path / "emu3-flat"
    flat.mkdir()
    (flat / "config.json").write_text((sharded / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in emu3.state_dict().items()}, str(flat / "model.safetensors"))
    for folder in (sharded, flat):  # the layouts are transformers' own: it loads them
        again = Emu3ForConditionalGeneration.from_pretrained(str(folder))
        assert torch.equal(again.model.vqmodel.quantize.embedding.weight, reference.quantize.embedding.weight)

    a = VQTokenizer.from_pretrained(str(sharded))
    b = VQTokenizer.from_pretrained(str(flat))
    assert_same_vq(a, reference)
    assert_same_vq(b, reference)
    # The id names the VQ's tensors, not the files: the same VQ in both layouts has one digest.
    assert a.model_id.split("@")[1] == b.model_id.split("@")[1] and a.model_id.startswith("Emu3-Chat-hf@")

    fs = fsspec.filesystem("s3")
    fs.put(f"{sharded}/", "synergen-test/emu3/Emu3-Chat-hf/", recursive=True)
    remote = VQTokenizer.from_pretrained(f"{s3}/emu3/Emu3-Chat-hf")
    assert remote.model_id == a.model_id
    assert_same_vq(remote, reference)

    (flat / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in emu3.state_dict().items() if "vqmodel" not in k}, str(flat / "model.safetensors"))
    with pytest.raises(SynergenError, match="no VQ tensors"):
        VQTokenizer.from_pretrained(str(flat))


@pytest.fixture(scope="module")
def real_size_emu3():
    """Emu3's VQ at full size (271 M parameters, random weights): the configuration BAAI publishes."""
    from transformers import Emu3VQVAEConfig

    torch.manual_seed(0)
    return VQTokenizer(random_vq(Emu3VQVAEConfig()))


def test_2d_once_encode_gives_the_reference_codes_at_real_size(real_size_emu3):
    """transformers' encode runs the 2D encoder on 4 copies of each image; ours once, with equal codes."""
    from model.vq import emu3_encoder_states

    vq = real_size_emu3
    assert vq.model.config.temporal_downsample_factor == 4 and vq.codebook_size == 32768
    torch.manual_seed(2)
    # A scene and noise, 32x40 px (not square: height and width must not be mixed up).
    pix = torch.cat([to_pixels(held_out_images(1))[:, :, 16:48, 8:48], torch.rand(1, 3, 32, 40) * 2 - 1])
    with torch.no_grad():
        ref = vq.model.encode(pix, image_sizes=torch.tensor([[32, 40]] * 2))
        ours = emu3_encoder_states(vq.model, pix)  # [B, C, 1, 4, 5]
    ref_states = ref.last_hidden_state.permute(0, 2, 1, 3, 4)
    assert ours.shape == ref_states.shape == (2, 4, 1, 4, 5)
    diff = float((ours - ref_states).abs().max())
    scale = float(ref_states.abs().max())
    print(f"2D-once vs reference encoder states: max |diff| {diff:.3g} of max |state| {scale:.3g}")
    assert diff <= 1e-5 * max(scale, 1.0)
    codes = vq.encode(pix)
    assert codes.shape == (2, 4, 5)
    assert torch.equal(codes, torch.stack(list(ref.image_tokens)))
    # Pixels straight from HWC arrays are channels-last in memory: the same codes.
    assert torch.equal(vq.encode(pix.contiguous(memory_format=torch.channels_last)), codes)


def test_2d_once_encode_gives_the_demo_vqs_reference_codes(vq):
    """The trained demo VQ (temporal factor 1) on 32 scenes as tokenize gives them (channels-last from HWC arrays)."""
    pix = to_pixels(held_out_images(32, seed=7))
    assert not pix.is_contiguous()
    with torch.no_grad():
        ref = torch.stack(list(vq.model.encode(pix, image_sizes=torch.tensor([[64, 64]] * 32)).image_tokens))
    assert torch.equal(vq.encode(pix), ref)
