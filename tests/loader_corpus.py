"""Shared by the loader's tests: a tiny BPE, token shards of synthetic samples written with TokenShardWriter, a
two-task mixture manifest, and a helper that streams it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.folding import Fold
from model.special_tokens import ALL_SPECIAL_TOKENS, PROMPT_UND
from pipeline.token_shards import TokenSample, TokenShardWriter
from pipeline.catalog import vocab_hash, write_catalog
from train.data import LoaderConfig, ModelDataSpec, StreamingLoader, StreamingMixture
from train.mixture import MixtureManifest

FOLD = Fold(2, 2)
CODEBOOK = 64
WORDS = "a red blue green yellow circle square triangle on the left right top bottom and two in center".split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)] + [PROMPT_UND, "Generate an image of: Here is a random image"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                             "additional_special_tokens": [t for t in ALL_SPECIAL_TOKENS if t not in ("<s>", "</s>", "<pad>")]})
    return fast


def model_spec(tokenizer) -> ModelDataSpec:
    return ModelDataSpec(FOLD, CODEBOOK, vocab_hash(tokenizer))


def write_source(root: str, source: str, task: str, shard_sizes: list[int], tokenizer, seed: int = 0, tiles: bool = False,
                 groups: int = 4) -> list[dict]:
    """Shards of synthetic samples + catalog under root/source; keys name source, shard and index."""
    rng = np.random.default_rng(seed)
    rows = []
    for si, n in enumerate(shard_sizes):
        path = f"{source}-{si:05d}.tar"
        with TokenShardWriter(f"{root}/{source}/{path}") as w:
            for i in range(n):
                grid = [[1, 1], [1, 2], [2, 2]][rng.integers(0, 3)] if tiles else [1, 1]
                n_tiles = grid[0] * grid[1]
                n_img = n_tiles + (n_tiles > 1)
                cap = " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
                w.write(TokenSample(
                    key=f"{source}-{si:03d}-{i:04d}",
                    codes=rng.integers(0, CODEBOOK, (n_img, groups, FOLD.size)).astype(np.uint16),
                    text_ids=np.array(tokenizer.encode(cap, add_special_tokens=False), np.int32),
                    meta={"source": source, "task": task, "caption": cap, "tiles": grid, "thumbnail": n_tiles > 1,
                          "grid": [4, 4], "fold": [2, 2]},
                ))
            pub = w.publish()
            rows.append({"path": path, "source": source, "task": task, "samples": w.n_samples, "image_tokens": w.n_image_tokens,
                         "codes": w.n_codes, "text_tokens": w.n_text_tokens, **pub, "vq_model": "tiny-emu3",
                         "codebook_size": CODEBOOK, "fold": "2x2", "text_tokenizer": "tiny-bpe", "vocab_hash": vocab_hash(tokenizer),
                         "pipeline_version": "test"})
    write_catalog(f"{root}/{source}", rows)
    return rows


def manifest(root: str, **over) -> MixtureManifest:
    raw = {
        "name": "t", "data_root": root, "seq_len": 64, "max_tiles": 4, "thumbnail": True,
        "tasks": {
            "und": {"global_batch": 6, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 2}, "cap_b": {"catalogs": ["cap_b"], "weight": 1}}},
            "gen": {"global_batch": 4, "unit": "tokens", "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1},
                                                                      "gen_b": {"catalogs": ["gen_b"], "weight": 1}}},
        },
    }
    for k, v in over.items():
        raw[k] = v
    return MixtureManifest.model_validate(raw)


def make_corpus(root: str, tokenizer) -> str:
    write_source(root, "cap_a", "und", [7, 5, 9, 6], tokenizer, seed=1, tiles=True)
    write_source(root, "cap_b", "und", [4, 6, 3], tokenizer, seed=2, tiles=True)
    write_source(root, "gen_a", "gen", [8, 8, 8], tokenizer, seed=3, groups=4)
    write_source(root, "gen_b", "gen", [10, 10], tokenizer, seed=4, groups=12)  # 3x the image tokens of gen_a
    return root


def stream(root, tokenizer, steps, state=None, workers=0, rank=0, world=1, mf=None, **cfg) -> tuple[list, StreamingLoader]:
    ds = StreamingMixture(mf or manifest(root), model_spec(tokenizer), tokenizer,
                          LoaderConfig(rank=rank, world_size=world, seed=7, max_steps=steps, **cfg))
    loader = StreamingLoader(ds, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    return list(loader), loader


def as_bytes(sb) -> bytes:
    parts = [json.dumps(sb.samples, sort_keys=True).encode()]
    for task in sorted(sb.batches):
        b = sb.batches[task]
        for name in ("input_ids", "position_ids", "document_ids", "labels", "image_mask", "image_codes", "image_targets"):
            parts.append(getattr(b, name).numpy().tobytes())
    return b"".join(parts)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    return make_corpus(str(tmp_path_factory.mktemp("tokens")), tokenizer)

