"""What `synergen tokenize` takes: validated options (pydantic), light to import, so the CLI derives its flags from
these fields and never restates a default."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _check_fold(fold: str) -> str:
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", fold.strip().lower()):
        raise ValueError(f"fold {fold!r} is not ROWSxCOLS; write it like '2x8'")
    return fold


FoldSpec = Annotated[str, AfterValidator(_check_fold)]  # a fold as configs spell it: ROWSxCOLS, e.g. "2x8"


class QualityThresholds(BaseModel):
    """A shard is flagged when any figure is below its threshold (psnr only where measured)."""

    model_config = ConfigDict(extra="forbid")

    min_distinct_codes: int = Field(32, ge=0, description="Quality gate: distinct codes per shard")
    min_entropy_bits: float = Field(4.0, description="Quality gate: code histogram entropy per shard")
    min_psnr_db: float = Field(14.0, description="Quality gate: reconstruction PSNR on a small sample")
    max_flagged_share: float = Field(0.1, ge=0, le=1, description="Exit non-zero when more shards than this share are flagged")


class TokenizeConfig(BaseModel):
    """Everything `synergen tokenize` takes (its CLI options are these fields); defaults follow the paper
    (512-px tiles/images, fold 2x8)."""

    model_config = ConfigDict(extra="forbid")

    raw: str = Field(description="Raw shards folder (the ingest output): local path or s3://")
    out: str = Field(description="Token shards folder: local path or s3://")
    task: Literal["und", "gen"] = Field(description="und (tiled, understanding) or gen (one centre crop, generation)")
    vq: str = Field(description="Trained VQ checkpoint folder (e.g. model/assets/demo_vq) or s3:// URL")
    tokenizer: str = Field(description="The LLM's text tokenizer folder (e.g. model/assets/demo_tokenizer)")
    fold: FoldSpec = Field("2x8", description="Fold ROWSxCOLS (paper: 2x8)")
    max_tiles: int = Field(6, ge=1, description="Most dynamic-resolution tiles per image (und)")
    thumbnail: bool = Field(False, description="Append a whole-image thumbnail when tiled (und)")
    image_size: int = Field(512, gt=0, description="Tile size (und) or image size (gen) in pixels")
    min_side: int | None = Field(None, description="Smallest image side kept (default: image size / 2, so no image is "
                                                   "upscaled more than 2x)")
    source: str | None = Field(None, description="Source name for the catalog (default: the raw folder's name)")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per VQ actor (0: encode on CPU)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per VQ actor")
    # A task waiting on the encoders gives its CPU back to Ray, so shards_in_flight, not this, bounds how many run.
    cpus_per_prepare: float = Field(0.5, gt=0, description="CPU share of each shard task (read, decode/tile, assemble, "
                                                           "compress, publish)")
    concurrency: int = Field(1, ge=1, description="VQ encoder actors")
    batch_size: int = Field(16, ge=1, description="Images per VQ forward")
    shards_in_flight: int = Field(0, ge=0, description="Shard tasks in flight (0: enough to fill the CPUs beside the "
                                                       "encoders, at least 2 per encoder)")
    task_retries: int = Field(4, ge=0, description="Retries of a shard task whose worker or node died")
    compress: bool = Field(True, description="zstd-compress each sample member (README: token shard layout)")
    psnr_images: int = Field(4, ge=0, description="Images per shard decoded for the PSNR of the quality gate")
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    ray_address: str | None = Field(None, description="Ray cluster address (default: a local Ray)")

    @model_validator(mode="after")
    def _resolve(self) -> "TokenizeConfig":
        if self.min_side is None:
            self.min_side = self.image_size // 2
        return self
