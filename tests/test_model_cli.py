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
from model.modeling import SynerGenVLForCausalLM
from model.special_tokens import PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND
from model.vq import VQTokenizer, tiny_emu3_config
from synergen.cli import app


def test_generate_cli_makes_images_from_captions_and_captions_from_images(tmp_path):
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
    model = SynerGenVLForCausalLM(tiny_config(codebook_size=32, image_grid=[4, 4], fold=[2, 4], **ids))
    model.save_pretrained(tmp_path / "model")
    Image.fromarray(np.full((40, 70, 3), 200, dtype=np.uint8)).save(tmp_path / "in.png")
    common = [str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--vq", str(tmp_path / "vq"), "--top-k", "4"]

    r = CliRunner().invoke(app, ["generate", *common, "--caption", "a red cat", "--caption", "a cat", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert Image.open(tmp_path / "gen" / f"{i:03d}.png").size == (32, 32)

    r = CliRunner().invoke(app, ["generate", *common, "--image", str(tmp_path / "in.png"), "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert f"{tmp_path / 'in.png'}\t" in r.output  # one line per image: path, tab, caption

    r = CliRunner().invoke(app, ["generate", *common])
    assert r.exit_code == 2 and "--caption" in r.output
