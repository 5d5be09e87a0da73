"""A small token corpus for the trainer's tests and benchmark: real token shards + catalogs, a real BPE.

Shards hold synthetic samples shaped for the `tiny` model preset (codebook 64, 8x8 code grid, fold 2x4),
written with the production shard writer and catalog, so the real loader streams them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from model.special_tokens import ALL_SPECIAL_TOKENS, PROMPT_GEN, PROMPT_UND
from pipeline.token_shards import TokenSample, TokenShardWriter
from pipeline.catalog import vocab_hash, write_catalog

CODEBOOK = 64
GRID = (8, 8)
FOLD = (2, 4)
WORDS = "a red blue green yellow circle square triangle on the left right top bottom and two in center".split()


def make_tokenizer(out_dir: Path):
    """Train a tiny BPE on caption-like text, add the special tokens, save it; return the reloaded tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)] + [PROMPT_UND, PROMPT_GEN, "Here is a random image"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                             "additional_special_tokens": [t for t in ALL_SPECIAL_TOKENS if t not in ("<s>", "</s>", "<pad>")]})
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def write_source(root: Path, source: str, task: str, shard_sizes: list[int], tokenizer, seed: int) -> None:
    """Shards of samples whose codes depend on the caption (so a model can learn), and their catalog."""
    rng = np.random.default_rng(seed)
    groups = (GRID[0] // FOLD[0]) * (GRID[1] // FOLD[1])
    k = FOLD[0] * FOLD[1]
    rows = []
    for si, n in enumerate(shard_sizes):
        path = f"{source}-{si:05d}.tar"
        with TokenShardWriter(str(root / source / path)) as w:
            for i in range(n):
                words = rng.choice(WORDS, int(rng.integers(2, 6)))
                cap = " ".join(words)
                base = sum(WORDS.index(x) for x in words) % CODEBOOK
                codes = (base + rng.integers(0, 4, (1, groups, k))) % CODEBOOK
                w.write(TokenSample(
                    key=f"{source}-{si:03d}-{i:04d}",
                    codes=codes.astype(np.uint16),
                    text_ids=np.array(tokenizer.encode(cap, add_special_tokens=False), np.int32),
                    meta={"source": source, "task": task, "caption": cap, "tiles": [1, 1], "thumbnail": False,
                          "grid": list(GRID), "fold": list(FOLD)},
                ))
            pub = w.publish()
            rows.append({"path": path, "source": source, "task": task, "samples": w.n_samples, "image_tokens": w.n_image_tokens,
                         "codes": w.n_codes, "text_tokens": w.n_text_tokens, **pub, "vq_model": "synthetic",
                         "codebook_size": CODEBOOK, "fold": f"{FOLD[0]}x{FOLD[1]}", "text_tokenizer": "tiny-bpe",
                         "vocab_hash": vocab_hash(tokenizer), "pipeline_version": "test"})
    write_catalog(str(root / source), rows)


def make_corpus(root: Path, batch: int = 4, seq_len: int = 96, tokenizer_dir: Path | None = None) -> dict[str, str]:
    """Tokenizer (made, or the one in `tokenizer_dir`), two und and one gen source, a mixture manifest; returns their paths."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_dir or root / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tokenizer_dir else make_tokenizer(tok_dir)
    write_source(root, "cap_a", "und", [12, 12], tokenizer, seed=1)
    write_source(root, "cap_b", "und", [10], tokenizer, seed=2)
    write_source(root, "gen_a", "gen", [12, 12], tokenizer, seed=3)
    mixture = {
        "name": "train-test", "stage": "1", "data_root": str(root), "seq_len": seq_len, "max_tiles": 1, "thumbnail": False,
        "tasks": {
            "und": {"global_batch": batch, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 2},
                                                         "cap_b": {"catalogs": ["cap_b"], "weight": 1}}},
            "gen": {"global_batch": batch, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}},
        },
    }
    (root / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    return {"tokenizer": str(tok_dir), "mixture": str(root / "mixture.yaml")}


def write_train_config(path: Path, corpus: dict[str, str], out: Path, **over) -> Path:
    cfg = {
        "model": "tiny", "tokenizer": corpus["tokenizer"], "stage": 1, "mixture": corpus["mixture"],
        "deepspeed": str(Path(__file__).resolve().parents[1] / "infra/deepspeed/zero0_cpu.json"),
        "precision": "fp32", "steps": 6, "seed": 3, "output_dir": str(out), "save_every": 3, "lr": 1e-3,
        "warmup_steps": 2, "export": False, "data_options": {"cache_dir": str(out / "cache")},
    }
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path
