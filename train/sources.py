"""Mixture sources and their shards, from the catalogs, checked against the model.

A source's identity is its content: the sha256 of each shard (in catalog order) and its sample count, never
where the shards are stored, so the same shards moved from local disk to S3 or to another bucket resume.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from model.folding import Fold
from pipeline.catalog import read_catalog
from synergen.errors import ConfigMismatchError, SynergenError
from train.mixture import MixtureManifest, SourceSize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDataSpec:
    """What the model expects of its data; every catalog row must agree."""

    fold: Fold
    codebook_size: int
    vocab_hash: str


@dataclass(frozen=True)
class Shard:
    """One catalog row: where the shard is, and what its per-sample index must add up to."""

    url: str
    samples: int
    bytes: int
    sha256: str  # of the whole tar: for audits, and for an index rebuilt from the tar
    index_sha256: str | None  # of its `.idx.npy` sidecar (None in catalogs written before it was recorded)
    image_tokens: int  # sum of n_images * groups over its samples
    text_tokens: int
    codes: int  # sum of n_images * groups * fold_size
    fold_size: int
    codebook_size: int = 1 << 16  # codes read from it are below this (the model's codebook, checked against the catalog)

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclass
class Source:
    name: str
    task: str
    shards: list[Shard]

    @property
    def size(self) -> SourceSize:
        return SourceSize(sum(s.samples for s in self.shards), sum(s.tokens for s in self.shards))

    @property
    def fingerprint(self) -> str:
        """The source's content (shard sha256s and counts, in order): a changed list would map positions to other samples."""
        blob = "\n".join(f"{s.sha256}:{s.samples}" for s in self.shards).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


MIN_SAMPLE_BYTES = 1024  # a tar member: a 512-byte header and at least one 512-byte block


def _check_row(row: dict, catalog: str, spec: ModelDataSpec) -> None:
    shard = f"{catalog} shard {row['path']}"
    samples, size = int(row["samples"]), int(row["bytes"])
    if samples < 0 or samples > size // MIN_SAMPLE_BYTES:
        raise ConfigMismatchError(f"{shard}: {samples} samples in {size} bytes, but a sample takes at least "
                                  f"{MIN_SAMPLE_BYTES} bytes of a tar; the catalog row is wrong: rewrite the catalog "
                                  "(synergen tokenize writes it) or restore it")
    if str(Fold.parse(row["fold"])) != str(spec.fold):
        raise ConfigMismatchError(f"{shard}: fold {row['fold']} but the model config folds {spec.fold}; "
                                  "use catalogs tokenized with the model's fold or change model.fold")
    if int(row["codebook_size"]) != spec.codebook_size:
        raise ConfigMismatchError(f"{shard}: codebook {row['codebook_size']} ({row.get('vq_model')}) but the model config has "
                                  f"{spec.codebook_size}; use the VQ model the catalog names or re-tokenize")
    if row["vocab_hash"] != spec.vocab_hash:
        raise ConfigMismatchError(f"{shard}: text tokenizer {row.get('text_tokenizer')} with vocab hash {row['vocab_hash']} "
                                  f"but the run's tokenizer hashes to {spec.vocab_hash}; load the tokenizer the catalog "
                                  "names or re-tokenize the captions")


def resolve_sources(manifest: MixtureManifest, spec: ModelDataSpec, storage_options: dict | None = None) -> dict[str, Source]:
    """Every source of every task -> its checked shard list (catalog order)."""
    sources: dict[str, Source] = {}
    for task, tspec in manifest.tasks.items():
        for name, src in tspec.sources.items():
            if name in sources:
                raise SynergenError(f"mixture {manifest.name!r}: source {name!r} appears in two tasks; name them apart")
            shards = []
            for url in manifest.catalog_urls(src):
                folder = url.rsplit("/", 1)[0] if url.endswith(".parquet") else url.rstrip("/")
                for row in read_catalog(url, storage_options):
                    if src.select is not None and row["source"] != src.select:
                        continue
                    if row["task"] != task:
                        raise ConfigMismatchError(f"catalog {url} shard {row['path']}: task {row['task']!r} but the mixture "
                                                  f"uses source {name!r} for task {task!r}; fix the manifest")
                    _check_row(row, url, spec)
                    shards.append(Shard(f"{folder}/{row['path']}", int(row["samples"]), int(row["bytes"]), row["sha256"],
                                        row.get("index_sha256"), int(row["image_tokens"]), int(row["text_tokens"]),
                                        int(row["codes"]), spec.fold.size, spec.codebook_size))
            sources[name] = Source(name, task, shards)
            if not shards:
                log.warning("source %s (task %s) lists no shards; it is left out of the mixture", name, task)
    return sources
