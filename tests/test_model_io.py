"""Save/load (local and S3), Auto classes, presets' parameter counts, the InternLM2 converter, tokenizer ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_model_core import VISION, mixed_docs
from test_model_kit import pack, single_thread, tiny_config, tiny_qwen2  # noqa: F401
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2ForCausalLM

from model.config import PRESETS, add_special_tokens, config_ids_from_tokenizer, parameter_counts, preset_config
from model.convert_internlm2 import convert_internlm2
from model.modeling import SynerGenVLForCausalLM
from model.special_tokens import BOI, MODEL_SPECIAL_TOKENS
from synergen.errors import SynergenError


def losses(model, batch):
    with torch.no_grad():
        return model(batch).token_loss


def test_save_then_from_pretrained_reproduces_outputs_locally_and_via_auto(tmp_path):
    model = SynerGenVLForCausalLM.from_llm(tiny_qwen2(), **VISION).eval()
    batch = pack(model.config, [mixed_docs(model.config)[:2], mixed_docs(model.config)[2:]], T=40)
    model.save_pretrained(tmp_path / "m")
    again = SynerGenVLForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(losses(again, batch), losses(model, batch))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(auto, SynerGenVLForCausalLM) and AutoConfig.from_pretrained(tmp_path / "m").fold == [2, 4]
    assert torch.equal(losses(auto, batch), losses(model, batch))


def test_save_and_load_through_s3(s3):
    model = SynerGenVLForCausalLM(tiny_config()).eval()
    batch = pack(model.config, [mixed_docs(model.config)])
    url = f"{s3}/models/tiny"
    model.save_pretrained(url)
    again = SynerGenVLForCausalLM.from_pretrained(url).eval()
    assert torch.equal(losses(again, batch), losses(model, batch))
    with pytest.raises(SynergenError, match="no files"):
        SynerGenVLForCausalLM.from_pretrained(f"{s3}/models/absent")


def test_from_llm_loads_a_qwen2_checkpoint_directory_with_tied_embeddings(tmp_path):
    llm = tiny_qwen2()
    llm.config.tie_word_embeddings = True
    tied = Qwen2ForCausalLM(llm.config).eval()
    tied.save_pretrained(tmp_path / "qwen")
    model = SynerGenVLForCausalLM.from_llm(str(tmp_path / "qwen"), **VISION).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 6, 7]])
    from test_model_kit import Doc

    with torch.no_grad():
        assert torch.allclose(model.text_logits(pack(model.config, [[Doc(ids[0].tolist())]])), tied(ids).logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_report_total_and_activated_parameters_matching_a_meta_model(name):
    cfg = preset_config(name)
    counts = parameter_counts(cfg)
    with torch.device("meta"):
        model = SynerGenVLForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    image_ffn = sum(p.numel() for n, p in model.named_parameters() if ".image_mlp." in n)
    assert counts["total"] == total and counts["activated"] == total - image_ffn
    if name == "paper":  # SynerGen-VL §4.1: 3.6B total, 2.4B activated
        assert abs(counts["total"] / 3.6e9 - 1) < 0.05, counts
        assert abs(counts["activated"] / 2.4e9 - 1) < 0.05, counts


def test_internlm2_checkpoint_converts_to_exact_qwen2_weights(tmp_path):
    H, Hkv, d, D, F, L, V = 4, 2, 8, 32, 48, 2, 64
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = [r(H * d, D) for _ in range(L)], [r(Hkv * d, D) for _ in range(L)], [r(Hkv * d, D) for _ in range(L)]
    sd = {"model.tok_embeddings.weight": r(V, D), "model.norm.weight": r(D), "output.weight": r(V, D)}
    groups = H // Hkv
    for i in range(L):
        # InternLM2's grouped order: per KV head, its query heads, then its key, then its value.
        parts = []
        for h in range(Hkv):
            parts += [q[i][(h * groups + j) * d:(h * groups + j + 1) * d] for j in range(groups)]
            parts += [k[i][h * d:(h + 1) * d], v[i][h * d:(h + 1) * d]]
        p = f"model.layers.{i}"
        sd |= {f"{p}.attention.wqkv.weight": torch.cat(parts), f"{p}.attention.wo.weight": r(D, H * d),
               f"{p}.feed_forward.w1.weight": r(F, D), f"{p}.feed_forward.w3.weight": r(F, D), f"{p}.feed_forward.w2.weight": r(D, F),
               f"{p}.attention_norm.weight": r(D), f"{p}.ffn_norm.weight": r(D)}
    src = tmp_path / "internlm2"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": Hkv, "rms_norm_eps": 1e-5, "rope_theta": 1000000, "bias": False,
        "max_position_embeddings": 256, "tie_word_embeddings": False}))
    convert_internlm2(str(src), str(tmp_path / "qwen2"))
    out = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2").state_dict()
    for i in range(L):
        p = f"model.layers.{i}"
        assert torch.equal(out[f"{p}.self_attn.q_proj.weight"], q[i])
        assert torch.equal(out[f"{p}.self_attn.k_proj.weight"], k[i])
        assert torch.equal(out[f"{p}.self_attn.v_proj.weight"], v[i])
        assert torch.equal(out[f"{p}.self_attn.q_proj.bias"], torch.zeros(H * d))
        assert torch.equal(out[f"{p}.self_attn.o_proj.weight"], sd[f"{p}.attention.wo.weight"])
        assert torch.equal(out[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.feed_forward.w1.weight"])
        assert torch.equal(out[f"{p}.mlp.up_proj.weight"], sd[f"{p}.feed_forward.w3.weight"])
        assert torch.equal(out[f"{p}.mlp.down_proj.weight"], sd[f"{p}.feed_forward.w2.weight"])
        assert torch.equal(out[f"{p}.input_layernorm.weight"], sd[f"{p}.attention_norm.weight"])
        assert torch.equal(out[f"{p}.post_attention_layernorm.weight"], sd[f"{p}.ffn_norm.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], sd["model.tok_embeddings.weight"])
    assert torch.equal(out["lm_head.weight"], sd["output.weight"])
    # The converted LLM is a valid backbone.
    model = SynerGenVLForCausalLM.from_llm(str(tmp_path / "qwen2"), codebook_size=16, image_grid=[4, 8], fold=[2, 4], head_layers=1,
                                          special_token_ids={"boi": 58, "eoi": 59, "img": 60, "uncond": 61, "tile": 62, "thumbnail": 63})
    assert model.config.num_key_value_heads == Hkv


def test_tokenizer_special_tokens_make_the_config_ids():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "a": 4, "cat": 5}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(SynergenError, match="lacks the model's special tokens"):
        config_ids_from_tokenizer(tok)  # never silently: `synergen init` adds them and saves the tokenizer
    add_special_tokens(tok)
    ids = config_ids_from_tokenizer(tok)
    assert ids["vocab_size"] == 6 + len(MODEL_SPECIAL_TOKENS) and ids["bos_token_id"] == 1 and ids["pad_token_id"] == 3
    assert sorted(ids["special_token_ids"].values()) == list(range(6, 12))
    cfg = tiny_config(**ids)
    assert cfg.token_id(BOI) == tok.convert_tokens_to_ids(BOI)
    assert tok(f"a {BOI} cat")["input_ids"] == [4, cfg.token_id(BOI), 5]
    with pytest.raises(SynergenError, match="outside vocab_size"):
        tiny_config(**{**ids, "vocab_size": 8})
