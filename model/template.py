"""The text side of a sequence, decided once: the ids a layout needs, how a document starts, the template.

`LayoutIds.from_tokenizer(tokenizer, template)` is the only place that reads token ids from a tokenizer for
a sequence; the loader (`train.sequence`) and generation (`train.generate`) both build sequences from it.

How a document starts: with the tokenizer's BOS token, always. A tokenizer without one (Qwen2's) gets one
from `synergen init` (`ensure_document_tokens`): its `<|endoftext|>`, the token Qwen2 separates pretraining
documents with, so a sequence starts the way the LLM saw documents start. The model config's
`bos_token_id` must be that id (`check_model_tokenizer`).

Templates (`SynerGenVLConfig.sequence_template`):
  raw:  start = <bos>,                    turn = (nothing),                     end = <eos>
  chat: start = the LLM's chat template up to the user's message (after <bos>), turn = the end of the user
        message and the assistant header, end = the end of the assistant message. With InternLM2's template
        (the paper's format):  <s><|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n ... <|im_end|>\n
The user's part is the image(s) and PROMPT_UND (understanding) or PROMPT_GEN + caption (generation); the
assistant's is the caption or the image. Default `raw` (our choice): pretraining pairs are captions, not
conversations; it works with every tokenizer (base LLMs and the demo BPE have no chat template) and costs
no template tokens per sample. Pick `chat` to follow the paper, or for an instruction-tuned LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.special_tokens import BOI, EOI, IMG, MODEL_SPECIAL_TOKENS, PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND, THUMBNAIL, TILE
from synergen.errors import ConfigMismatchError

TEMPLATES = ("raw", "chat")
DEFAULT_TEMPLATE = "raw"
# Qwen2's document separator, which becomes the BOS of a Qwen2 tokenizer (see the module docstring).
DOCUMENT_SEPARATOR = "<|endoftext|>"
_USER, _ASSISTANT = "@@SYNERGEN_USER@@", "@@SYNERGEN_ASSISTANT@@"


def token_ids(tokenizer, tokens: list[str], where: str) -> dict[str, int]:
    """Ids of `tokens` in `tokenizer`; raises naming the missing ones and the fix."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out, missing = {}, []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or (unk is not None and i == unk and t != tokenizer.unk_token) or i < 0:
            missing.append(t)
        else:
            out[t] = int(i)
    if missing:
        raise ConfigMismatchError(f"text tokenizer {where} lacks the model's special tokens {missing}: "
                                  "make it with `synergen init` (it adds them and saves the tokenizer with the model)")
    return out


def ensure_document_tokens(tokenizer) -> None:
    """Give a tokenizer without BOS one (`DOCUMENT_SEPARATOR`, else its EOS) and a PAD (its EOS); in place."""
    if tokenizer.eos_token_id is None:
        raise ConfigMismatchError("the LLM's tokenizer has no EOS token: a document's end cannot be marked; pass its tokenizer folder")
    if tokenizer.bos_token_id is None:
        sep = DOCUMENT_SEPARATOR if DOCUMENT_SEPARATOR in tokenizer.get_vocab() else tokenizer.eos_token
        tokenizer.bos_token = sep
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _chat_pieces(tokenizer, where: str) -> tuple[str, str, str]:
    """(start, turn, end) strings of the tokenizer's chat template around one user and one assistant message."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigMismatchError(f"sequence_template 'chat' needs a chat template, and tokenizer {where} has none: "
                                  "use sequence_template 'raw', or a tokenizer with a chat template (e.g. InternLM2's)")
    user = [{"role": "user", "content": _USER}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _ASSISTANT}], tokenize=False)
    if head.count(_USER) != 1 or full.count(_ASSISTANT) != 1:
        raise ConfigMismatchError(f"tokenizer {where}: its chat template does not render one user and one assistant message; use 'raw'")
    start, turn = head.split(_USER)
    return start, turn, full.split(_ASSISTANT)[1]


@dataclass(frozen=True)
class LayoutIds:
    """The token ids a sequence layout needs, taken once from the run's text tokenizer (see module docstring)."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    img: int
    tile: int
    thumbnail: int
    prompt_und: tuple[int, ...]
    prompt_gen: tuple[int, ...]
    prompt_uncond: tuple[int, ...]
    start: tuple[int, ...]  # a document's first tokens: <bos> [+ the chat template's user header]
    turn: tuple[int, ...]  # between the user's part and the assistant's (empty for raw)
    end: tuple[int, ...]  # after the assistant's part (text targets); its first id stops text generation
    template: str = DEFAULT_TEMPLATE

    @classmethod
    def from_tokenizer(cls, tokenizer, template: str = DEFAULT_TEMPLATE, where: str = "") -> "LayoutIds":
        """Ids from a tokenizer made by `synergen init` (BOS, EOS and the model's special tokens present)."""
        where = where or getattr(tokenizer, "name_or_path", "") or "(in memory)"
        if template not in TEMPLATES:
            raise ConfigMismatchError(f"sequence_template {template!r}: use one of {TEMPLATES}")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigMismatchError(f"text tokenizer {where} has no BOS/EOS token (bos {tokenizer.bos_token!r}, eos "
                                      f"{tokenizer.eos_token!r}): make it with `synergen init`, which decides how documents start")
        special = token_ids(tokenizer, list(MODEL_SPECIAL_TOKENS), where)
        bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)

        def enc(text: str) -> tuple[int, ...]:
            return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))

        if template == "raw":
            start, turn, end = (bos,), (), (eos,)
        else:
            s, t, e = _chat_pieces(tokenizer, where)
            start, turn, end = enc(s), enc(t), enc(e)
            if start[:1] != (bos,):  # every document starts with BOS, whether or not the template writes it
                start = (bos, *start)
            if not end:
                end = (eos,)
        return cls(bos=bos, eos=eos, pad=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
                   boi=special[BOI], eoi=special[EOI], img=special[IMG], tile=special[TILE], thumbnail=special[THUMBNAIL],
                   prompt_und=enc(PROMPT_UND), prompt_gen=enc(PROMPT_GEN), prompt_uncond=enc(PROMPT_UNCOND),
                   start=start, turn=turn, end=end, template=template)


def check_model_tokenizer(config, tokenizer, model_name: str, tokenizer_name: str) -> LayoutIds:
    """The model's LayoutIds, after checking that the model config and the tokenizer agree on every special
    token id and on BOS/EOS; a disagreement raises naming both sides and their ids."""
    ids = LayoutIds.from_tokenizer(tokenizer, config.sequence_template, tokenizer_name)
    theirs = token_ids(tokenizer, list(MODEL_SPECIAL_TOKENS), tokenizer_name)
    diff = [f"{t}: model {config.token_id(t)} vs tokenizer {theirs[t]}" for t in MODEL_SPECIAL_TOKENS
            if config.token_id(t) != theirs[t]]
    for name, tid in (("BOS", ids.bos), ("EOS", ids.eos)):
        own = getattr(config, f"{name.lower()}_token_id")
        own = own[0] if isinstance(own, list) else own
        if own != tid:
            diff.append(f"{name}: model {own} vs tokenizer {tid}")
    if max(theirs.values()) >= config.vocab_size:
        diff.append(f"vocab_size: model {config.vocab_size} vs tokenizer ids up to {max(theirs.values())}")
    if diff:
        raise ConfigMismatchError(f"model {model_name} and tokenizer {tokenizer_name} disagree ({'; '.join(diff)}): "
                                  "use the tokenizer saved with the model "
                                  "by `synergen init` (or the trained model's folder)")
    return ids
