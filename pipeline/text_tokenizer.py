"""The text tokenizer: load the LLM's tokenizer from a path (local or fsspec URL), and train the demo's BPE.

The demo BPE (model/assets/demo_tokenizer) is trained on the demo corpus's captions with the model's
special tokens (`model.special_tokens.ALL_SPECIAL_TOKENS`) and saved as a transformers
`PreTrainedTokenizerFast` folder, so the same loading code serves the demo and a real LLM tokenizer.
`vocab_hash` (defined once, in `pipeline.token_shards`) fingerprints the vocabulary for the catalog.
"""

from __future__ import annotations

import logging
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model.special_tokens import ALL_SPECIAL_TOKENS, BOS, EOS, PAD
from pipeline.catalog import vocab_hash
from synergen.errors import SynergenError

log = logging.getLogger(__name__)

__all__ = ["train_demo_tokenizer", "load_text_tokenizer", "tokenizer_id", "vocab_hash"]


def train_demo_tokenizer(captions: list[str], vocab_size: int = 384):
    """A byte-level BPE over `captions` with the model's special tokens, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(ALL_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[t for t in ALL_SPECIAL_TOKENS if t not in (BOS, EOS, PAD)])


def load_text_tokenizer(url: str):
    """A transformers tokenizer from a local folder or an fsspec URL (copied to a temp dir first)."""
    from transformers import AutoTokenizer

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise SynergenError(f"no text tokenizer at {url}: pass the LLM's tokenizer folder (or model/assets/demo_tokenizer)")
    try:
        if isinstance(fs, LocalFileSystem):
            return AutoTokenizer.from_pretrained(path)
        with tempfile.TemporaryDirectory(prefix="synergen-tok-") as tmp:
            fs.get(f"{path.rstrip('/')}/", f"{tmp}/", recursive=True)
            return AutoTokenizer.from_pretrained(tmp)
    except (OSError, ValueError) as e:
        raise SynergenError(f"text tokenizer at {url} does not load ({e}); pass a transformers tokenizer folder") from e


def tokenizer_id(url: str) -> str:
    """The catalog's `text_tokenizer` field: the folder's name (the vocab hash pins the exact vocabulary)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def write_demo_tokenizer(out: str, n_captions: int = 3000, seed: int = 0, vocab_size: int = 384) -> str:
    """Train the demo BPE on the demo corpus's captions and save it to `out` (a local folder)."""
    import random

    from synergen.demo.corpus import caption, sample_scene

    rng = random.Random(seed)
    captions = [caption(sample_scene(rng)) for _ in range(n_captions)]
    tok = train_demo_tokenizer(captions, vocab_size)
    tok.save_pretrained(out)
    log.info("demo tokenizer: %d tokens, vocab hash %s -> %s", len(tok), vocab_hash(tok), out)
    return out
