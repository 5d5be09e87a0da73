"""Catalogs: `<out>/_catalog.parquet`, one row per published token shard (CATALOG_SCHEMA), the only list the trainer
streams. Each row holds the sha256 of the whole shard (audits) and of its per-sample index sidecar (whose rows
hold the xxh3 of each sample's bytes, checked on every read), the VQ, fold and tokenizer the codes were made
with, and the shard's quality figures. Written after its shards, atomically (temporary name, then a move).
"""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from synergen.errors import ShardError

CATALOG_NAME = "_catalog.parquet"

CATALOG_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to the catalog's folder
        ("source", pa.string()),
        ("task", pa.string()),
        ("samples", pa.int64()),
        ("image_tokens", pa.int64()),  # LLM positions of images (fold groups)
        ("codes", pa.int64()),
        ("text_tokens", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("index_sha256", pa.string()),  # of the `.idx.npy` sidecar (null in catalogs written before it existed)
        ("vq_model", pa.string()),
        ("codebook_size", pa.int64()),
        ("fold", pa.string()),  # "2x8"
        ("text_tokenizer", pa.string()),
        ("vocab_hash", pa.string()),
        ("pipeline_version", pa.string()),
        ("code_entropy", pa.float64()),  # quality gate: bits of the shard's code histogram
        ("distinct_codes", pa.int64()),
        ("psnr", pa.float64()),  # reconstruction PSNR on a small sample (NaN if not measured)
        ("flagged", pa.bool_()),
    ]
)


def write_catalog(out_url: str, rows: list[dict], storage_options: dict | None = None) -> str:
    """Write `<out>/_catalog.parquet` atomically from rows (missing quality fields default to null)."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in CATALOG_SCHEMA.names} for r in rows], schema=CATALOG_SCHEMA)
    fs, path = fsspec.core.url_to_fs(out_url.rstrip("/"), **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    tmp = f"{path}/_tmp.{uuid.uuid4().hex}.parquet"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, f"{path}/{CATALOG_NAME}")
    return f"{out_url.rstrip('/')}/{CATALOG_NAME}"


def read_catalog(url: str, storage_options: dict | None = None) -> list[dict]:
    """Rows of a catalog; `url` is the catalog file or its folder."""
    if not url.endswith(".parquet"):
        url = f"{url.rstrip('/')}/{CATALOG_NAME}"
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return pq.read_table(f).to_pylist()
    except FileNotFoundError:
        raise ShardError(f"no catalog at {url}: run `synergen tokenize` for this dataset first") from None


def vocab_hash(tokenizer) -> str:
    """Fingerprint of a text tokenizer's vocabulary (token -> id, special tokens included): 16 hex digits.

    The catalog stores it per shard and the loader compares it with the run's tokenizer, so text ids
    written under one vocabulary are never read under another. Accepts a transformers tokenizer or a
    `tokenizers.Tokenizer` (anything with `get_vocab()`).
    """
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
