"""`synergen init` over real files (a saved tiny Qwen2, a Qwen2-style tokenizer folder), and the special-token,
BOS and template rules it sets up, shared by the loader and generation."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import yaml
from llm_kit import qwen_style_tokenizer, tiny_qwen2_folder
from test_model_kit import single_thread  # noqa: F401
from transformers import AutoTokenizer
from typer.testing import CliRunner

from model.from_llm import CHECK_PROMPTS, text_batch
from model.modeling import SynerGenVLForCausalLM
from model.special_tokens import MODEL_SPECIAL_TOKENS, PROMPT_UND
from model.template import check_model_tokenizer
from pipeline.token_shards import TokenSample
from synergen.cli import app
from synergen.errors import ConfigMismatchError
from train.sequence import IGNORE, SequenceSpec, build_sequence, generation_prompt, plan_layout, understanding_prompt

VISION = ["--image-size", "64", "--fold", "2x4", "--head-layers", "1"]


def run_init(llm: str, out: str, *extra: str) -> str:
    r = CliRunner().invoke(app, ["init", llm, "--out", out, *VISION, *extra])
    assert r.exit_code == 0, r.output
    return r.output


def logits_match(llm, model, tok, start: list[int]) -> float:
    worst = 0.0
    with torch.no_grad():
        for p in CHECK_PROMPTS:
            seq = start + tok.encode(p, add_special_tokens=False)
            ref = llm(torch.tensor([seq])).logits
            ours = model.text_logits(text_batch(seq, model.config.fold_geometry.size))[..., : ref.shape[-1]]
            worst = max(worst, float((ours - ref).abs().max()))
    return worst


@pytest.mark.parametrize("tied", [False, True])
def test_init_gives_the_tokenizers_special_ids_and_the_llms_text_logits_for_a_full_vocabulary(tmp_path, tied):
    tok = qwen_style_tokenizer(tmp_path / "llm")
    llm = tiny_qwen2_folder(tmp_path / "llm", vocab_size=len(tok), tied=tied)  # every row in use: the vocabulary must grow
    output = run_init(str(tmp_path / "llm"), str(tmp_path / "init"))
    assert "max text-logit difference" in output and "parameters: total" in output
    model = SynerGenVLForCausalLM.from_pretrained(tmp_path / "init").eval()
    saved = AutoTokenizer.from_pretrained(tmp_path / "init")
    assert model.config.vocab_size == len(tok) + len(MODEL_SPECIAL_TOKENS) == len(saved)
    for t in MODEL_SPECIAL_TOKENS:  # the model's ids are the saved tokenizer's, none of the LLM's text rows
        assert model.config.token_id(t) == saved.convert_tokens_to_ids(t) >= len(tok)
    assert model.config.tie_word_embeddings == tied
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert logits_match(llm, model, saved, [saved.bos_token_id]) < 1e-4
    printed = re.search(r"parameters: total\D*([\d,]+)", output).group(1)
    assert sum(p.numel() for p in model.parameters()) == int(printed.replace(",", ""))


def test_init_reads_the_llm_from_s3_and_writes_model_and_tokenizer_there(tmp_path, s3):
    from synergen import storage

    tok = qwen_style_tokenizer(tmp_path / "llm")
    tiny_qwen2_folder(tmp_path / "llm", vocab_size=len(tok) + 10, tied=True)  # spare rows: the special tokens fit in them
    storage.publish_dir(str(tmp_path / "llm"), f"{s3}/init-test/llm")
    run_init(f"{s3}/init-test/llm", f"{s3}/init-test/out")
    model = SynerGenVLForCausalLM.from_pretrained(f"{s3}/init-test/out")
    with storage.local_copy(f"{s3}/init-test/out") as path:
        saved = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) + 10  # no growth: the LLM's spare rows hold the new tokens
    check_model_tokenizer(model.config, saved, "model", "tokenizer")


def test_documents_start_with_the_same_bos_in_the_loader_and_in_generation(tmp_path):
    qwen_style_tokenizer(tmp_path / "llm", chat=True)  # Qwen2-style: no BOS of its own
    tiny_qwen2_folder(tmp_path / "llm", vocab_size=400, tied=False)
    for template in ("raw", "chat"):
        run_init(str(tmp_path / "llm"), str(tmp_path / template), "--template", template)
        model = SynerGenVLForCausalLM.from_pretrained(tmp_path / template)
        tok = AutoTokenizer.from_pretrained(tmp_path / template)
        ids = check_model_tokenizer(model.config, tok, "model", "tokenizer")
        assert tok.bos_token == "<|endoftext|>" and model.config.bos_token_id == tok.bos_token_id == ids.bos
        fold = model.config.fold_geometry
        groups = model.config.blocks_per_image
        caption = tok.encode("a red circle", add_special_tokens=False)
        spec = SequenceSpec(512, 1, False, fold)
        und = TokenSample("k", np.zeros((1, groups, fold.size), np.int64), np.array(caption), {"tiles": [1, 1], "thumbnail": False})
        seq = build_sequence(und, "und", False, plan_layout(und, "und", False, spec, ids), ids)
        prompt = understanding_prompt(ids, 1, groups, fold)
        # Generation's prompt is the training sequence up to the caption, BOS first, in either template.
        assert seq.input_ids[0] == prompt[0] == model.config.bos_token_id
        assert seq.input_ids[: len(prompt)].tolist() == prompt.tolist()
        assert seq.input_ids[len(prompt): len(prompt) + len(caption)].tolist() == caption
        gen = build_sequence(und, "gen", False, plan_layout(und, "gen", False, spec, ids), ids)
        gprompt = generation_prompt(ids, caption)
        assert gen.input_ids[: len(gprompt)].tolist() == gprompt.tolist() and gprompt[-1] == ids.boi
        assert generation_prompt(ids, [], uncond=True)[0] == model.config.bos_token_id
        text = tok.decode(seq.input_ids[~seq.image_mask])
        if template == "chat":  # InternLM2's chat format, as the paper trains
            assert text.startswith("<|endoftext|><|im_start|>user\n<boi><eoi>" + PROMPT_UND + "<|im_end|>\n<|im_start|>assistant\n")
            assert text.endswith("a red circle<|im_end|>\n")
        else:
            assert text == "<|endoftext|><boi><eoi>" + PROMPT_UND + "a red circle<|endoftext|>"
        targets = seq.labels[seq.labels != IGNORE].tolist()
        assert targets == caption + list(ids.end)


def test_train_and_generate_refuse_a_tokenizer_that_disagrees_with_the_model(tmp_path):
    tok = qwen_style_tokenizer(tmp_path / "llm")
    tiny_qwen2_folder(tmp_path / "llm", vocab_size=len(tok), tied=False)
    run_init(str(tmp_path / "llm"), str(tmp_path / "init"))
    model = SynerGenVLForCausalLM.from_pretrained(tmp_path / "init")
    # The LLM's own tokenizer has no BOS and lacks the special tokens; placeholder ids disagree with the tokenizer's.
    with pytest.raises(ConfigMismatchError, match="tokenizer llm has no BOS.*synergen init"):
        check_model_tokenizer(model.config, tok, "init", "llm")
    tok.bos_token = "<|endoftext|>"
    with pytest.raises(ConfigMismatchError, match="tokenizer llm lacks the model's special tokens.*synergen init"):
        check_model_tokenizer(model.config, tok, "init", "llm")
    saved = AutoTokenizer.from_pretrained(tmp_path / "init")
    placeholder = copy.deepcopy(model.config)  # what from_llm gave without the tokenizer's ids: the top rows
    placeholder.special_token_ids = {k: placeholder.vocab_size - 6 + i for i, k in enumerate(model.config.special_token_ids)}
    with pytest.raises(ConfigMismatchError, match=r"model placeholder and tokenizer init disagree \(<\w+>: model \d+ vs tokenizer \d+"):
        check_model_tokenizer(placeholder, saved, "placeholder", "init")
    other_bos = AutoTokenizer.from_pretrained(tmp_path / "init", bos_token="<|im_start|>")
    with pytest.raises(ConfigMismatchError, match="BOS: model"):
        check_model_tokenizer(model.config, other_bos, "init", "other")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "init"), "--tokenizer", str(tmp_path / "llm"), "--vq", str(tmp_path / "vq"),
                                 "--caption", "a red circle"])
    assert r.exit_code == 2 and "synergen init" in r.output and str(tmp_path / "llm") in r.output
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model": str(tmp_path / "init"), "tokenizer": str(tmp_path / "llm"), "mixture": "never-read.yaml", "steps": 1,
        "output_dir": str(tmp_path / "run")}))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert r.exit_code == 2 and "synergen init" in r.output and str(tmp_path / "llm") in r.output, r.output


def test_init_refuses_a_folder_that_is_not_an_llm_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["init", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "config.json" in r.output and not (tmp_path / "o").exists()


def test_init_converts_an_internlm2_checkpoint_and_keeps_its_text_logits(tmp_path):
    from safetensors.torch import save_file

    tok = qwen_style_tokenizer(tmp_path / "tok", chat=True)
    llm = tiny_qwen2_folder(tmp_path / "qwen", vocab_size=len(tok) + 8, tied=False)
    H, Hkv, sd = llm.config.num_attention_heads, llm.config.num_key_value_heads, {}
    d = llm.config.hidden_size // H
    for name, t in llm.state_dict().items():  # Qwen2 -> InternLM2's layout (the converter's inverse), zero q/k/v biases
        if name.endswith("_proj.bias"):
            t.zero_()
    for i, layer in enumerate(llm.model.layers):
        a, m, p = layer.self_attn, layer.mlp, f"model.layers.{i}"
        q, k, v = a.q_proj.weight.view(Hkv, H // Hkv, d, -1), a.k_proj.weight.view(Hkv, 1, d, -1), a.v_proj.weight.view(Hkv, 1, d, -1)
        sd |= {f"{p}.attention.wqkv.weight": torch.cat([q, k, v], 1).reshape(-1, q.shape[-1]), f"{p}.attention.wo.weight": a.o_proj.weight,
               f"{p}.feed_forward.w1.weight": m.gate_proj.weight, f"{p}.feed_forward.w3.weight": m.up_proj.weight,
               f"{p}.feed_forward.w2.weight": m.down_proj.weight, f"{p}.attention_norm.weight": layer.input_layernorm.weight,
               f"{p}.ffn_norm.weight": layer.post_attention_layernorm.weight}
    sd |= {"model.tok_embeddings.weight": llm.model.embed_tokens.weight, "model.norm.weight": llm.model.norm.weight,
           "output.weight": llm.lm_head.weight}
    (tmp_path / "internlm2").mkdir()
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp_path / "internlm2" / "model.safetensors"))
    c = llm.config
    (tmp_path / "internlm2" / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": H, "num_key_value_heads": Hkv, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"], "bias": False, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "eos_token_id": 0}))
    output = run_init(str(tmp_path / "internlm2"), str(tmp_path / "init"), "--tokenizer", str(tmp_path / "tok"), "--template", "chat")
    assert "internlm2" in output
    model = SynerGenVLForCausalLM.from_pretrained(tmp_path / "init").eval()
    saved = AutoTokenizer.from_pretrained(tmp_path / "init")
    assert logits_match(llm, model, saved, [saved.bos_token_id]) < 1e-4  # the same function as the Qwen2 it came from
