"""Real files a user starts from: a tiny saved Qwen2 checkpoint and a Qwen2-style tokenizer folder.

The tokenizer is like Qwen2's where it matters here: a byte-level BPE, no BOS token, `<|endoftext|>` as EOS,
`<|im_start|>`/`<|im_end|>` chat markers; `chat=True` gives it InternLM2's chat template (the paper's format).
No tests here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.special_tokens import PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND

# InternLM2-chat's template (tokenizer_config.json of internlm/internlm2-chat-1_8b).
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "a red blue green yellow circle square triangle on the left right top bottom and two in center photo of".split()


def qwen_style_tokenizer(out: Path, chat: bool = False):
    """Save a Qwen2-style tokenizer folder at `out`; return it reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [PROMPT_UND, PROMPT_GEN, PROMPT_UNCOND, "user assistant"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        fast.chat_template = INTERNLM2_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out))


def tiny_qwen2_folder(out: Path, vocab_size: int, tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    """Save a tiny random Qwen2 checkpoint at `out` (fp32; `tied`: shared embedding and LM head); return it."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, eos_token_id=0, max_position_embeddings=512)
    llm = Qwen2ForCausalLM(cfg).eval()
    llm.save_pretrained(str(out))
    return llm
