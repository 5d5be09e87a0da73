"""`synergen generate` end to end on tiny real parts: a saved model, tokenizer and Emu3 VQ, both directions."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from test_model_kit import single_thread, tiny_config  # noqa: F401
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Emu3VQVAE, PreTrainedTokenizerFast
from typer.testing import CliRunner

from model.config import add_special_tokens, config_ids_from_tokenizer
from model.folding import fold_codes
from model.modeling import SynerGenVLForCausalLM
from model.special_tokens import PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND
from model.vq import VQTokenizer, tiny_emu3_config
from synergen.cli import app


def save_parts(tmp_path, **config) -> list[str]:
    """A saved tiny model, tokenizer and Emu3 VQ; returns the common `generate` arguments."""
    words = sorted({w for text in (PROMPT_GEN, PROMPT_UND, PROMPT_UNCOND, "a red cat") for w in text.replace(":", " : ").split()} - {"<UNCOND>"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    add_special_tokens(tok)
    ids = config_ids_from_tokenizer(tok)
    tok.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    vq = VQTokenizer(Emu3VQVAE(tiny_emu3_config(codebook_size=32)))
    vq.save_pretrained(str(tmp_path / "vq"))
    model = SynerGenVLForCausalLM(tiny_config(codebook_size=32, image_grid=[4, 4], fold=[2, 4], **ids, **config))
    model.save_pretrained(tmp_path / "model")
    return [str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--vq", str(tmp_path / "vq")]


def test_generate_cli_makes_images_from_captions_and_captions_from_images(tmp_path):
    common = save_parts(tmp_path) + ["--top-k", "4"]
    Image.fromarray(np.full((40, 70, 3), 200, dtype=np.uint8)).save(tmp_path / "in.png")

    r = CliRunner().invoke(app, ["generate", *common, "--caption", "a red cat", "--caption", "a cat", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert Image.open(tmp_path / "gen" / f"{i:03d}.png").size == (32, 32)

    r = CliRunner().invoke(app, ["generate", *common, "--image", str(tmp_path / "in.png"), "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert f"{tmp_path / 'in.png'}\t" in r.output  # one line per image: path, tab, caption

    r = CliRunner().invoke(app, ["generate", *common])
    assert r.exit_code == 2 and "--caption" in r.output


def test_an_image_to_caption_is_tiled_and_laid_out_as_tokenize_and_the_loader_did(tmp_path):
    from pipeline.tokenization import PrepareImages
    from pipeline.tiling import to_pixels
    from pipeline.token_shards import TokenSample
    from train.generate import TrainedModel
    from train.sequence import SequenceSpec, build_sequence, plan_layout

    save_parts(tmp_path, max_tiles=4, thumbnail=True)  # a stage-2 model: up to 4 tiles + thumbnail
    tm = TrainedModel.load(str(tmp_path / "model"), str(tmp_path / "tok"), str(tmp_path / "vq"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    codes, prompt = tm.encode_image(Image.open(tmp_path / "wide.png"))

    # The oracle: tokenize's own preprocessing step on the same file, and the loader's sequence for its codes.
    step = PrepareImages("und", tm.image_size, 4, True, 0, "s", "2x4", tm.vq.downsample, 0)
    images, meta, reason = step._sample("k", (tmp_path / "wide.png").read_bytes(), "", "")
    assert reason == "" and meta["tiles"] == [1, 2] and len(images) == 3  # 2 tiles side by side + the thumbnail
    want = fold_codes(tm.vq.encode(to_pixels(images)), tm.model.config.fold_geometry)  # [3, groups, k]
    assert torch.equal(codes, want.reshape(-1, want.shape[-1]))
    sample = TokenSample("k", want.numpy(), np.array([5, 6]), meta)
    spec = SequenceSpec(4096, 4, True, tm.model.config.fold_geometry)
    seq = build_sequence(sample, "und", False, plan_layout(sample, "und", False, spec, tm.ids), tm.ids)
    assert seq.input_ids[: len(prompt)].tolist() == prompt
    assert prompt.count(tm.ids.tile) == 2 and prompt.count(tm.ids.thumbnail) == 1
