"""What `synergen demo` and `synergen vq-train` take: validated options (pydantic), light to import, so the CLI
derives its flags from these fields and never restates a default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.tokenization_config import FoldSpec

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "model" / "assets"


class DemoConfig(BaseModel):
    """Sizes and knobs of the demo; the defaults make `make demo` (well under 15 minutes on 2 cores)."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("demo_out", description="Output folder (corpus, shards, checkpoints, report)")
    n_images: int = Field(1600, ge=2, description="Rendered scenes, held-out ones included")
    n_eval: int = Field(48, ge=0, description="Scenes held out of ingest and training, used by the learning check")
    image_size: int = Field(64, gt=0, description="Image size in pixels (the tiny VQ's training size: an 8x8 code grid)")
    fold: FoldSpec = Field("2x4", description="Token folding ROWSxCOLS (2x4: 8 LLM positions per image)")
    vq: str = Field(str(ASSETS / "demo_vq"), description="Trained VQ folder")
    tokenizer: str = Field(str(ASSETS / "demo_tokenizer"), description="Text tokenizer folder")
    mixture: str = Field(str(REPO / "manifests" / "mixtures" / "demo.yaml"), description="Mixture manifest")
    source_manifest: str = Field(str(REPO / "manifests" / "sources" / "demo.yaml"), description="Source manifest")
    deepspeed: str = Field(str(REPO / "infra" / "deepspeed" / "zero0_cpu.json"), description="DeepSpeed config")
    # With 600 steps the older demo VQ gave 12% right images, with 1,200 21%; the current VQ 44% at 1,200 (chance 8%).
    steps: int = Field(1200, ge=2, description="Total optimizer steps: stage 1 takes --stage1-share of them, then all "
                                               "parameters")
    stage1_share: float = Field(0.25, gt=0, lt=1, description="Share of the steps spent in stage 1 (image-side parameters)")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate")
    warmup_steps: int = Field(30, ge=0, description="Learning-rate warmup steps per stage")
    model_overrides: dict[str, Any] = Field(default_factory=lambda: {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_layers": 2,
    }, description="The tiny model's sizes (train config model_overrides)")
    # The paper's 7.5 suits a large model; the tiny one's samples are cleaner with mild guidance, low temperature.
    cfg_scale: float = Field(2.0, ge=0, description="Classifier-free guidance scale of the evaluation's images")
    temperature: float = Field(0.2, ge=0, description="Sampling temperature of the evaluation's images")
    top_k: int | None = Field(4, ge=1, description="Top-k of the evaluation's images")
    seed: int = Field(0, description="Seed of the corpus, training and sampling")
    threads: int = Field(2, ge=1, description="torch threads")
    loss_reduction: Literal["modality_mean", "token_sum"] = Field(
        "modality_mean", description="modality_mean (default; model.config says why) or token_sum (Eq. 4)")

    @field_validator("n_eval")
    @classmethod
    def _some_left_to_train(cls, n_eval: int, info) -> int:
        n_images = info.data.get("n_images")
        if n_images is not None and n_eval >= n_images:
            raise ValueError(f"n_eval {n_eval} holds out every one of the {n_images} images; give fewer than n_images")
        return n_eval


class VQTrainConfig(BaseModel):
    """What `synergen vq-train` trains; model/assets/demo_vq/README.md lists the runs that made the demo VQ."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("model/assets/demo_vq", description="Output folder for the trained VQ")
    image_size: int = Field(64, gt=0, description="Training image size in pixels")
    codebook_size: int = Field(512, ge=2, description="VQ codebook entries")
    n_images: int = Field(2400, ge=2, description="Demo corpus images rendered, held-out ones included")
    holdout: int = Field(200, ge=1, description="Images held out for the PSNR report")
    steps: int = Field(1000, ge=1, description="Optimizer steps")
    batch_size: int = Field(16, ge=1, description="Images per step")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (one-cycle)")
    l1_weight: float = Field(1.0, ge=0, description="Weight of the pixel L1 term")
    edge_weight: float = Field(1.0, ge=0, description="Weight of the edge (pixel-difference L1) term")
    beta: float = Field(0.25, ge=0, description="Weight of the commitment term")
    restart_every: int = Field(50, ge=1, description="Re-seed unused codes every this many steps")
    seed: int = Field(0, description="Seed of the corpus and the training")
    threads: int = Field(2, ge=1, description="torch threads")
    init: str | None = Field(None, description="Fine-tune this trained VQ folder instead of starting from random weights")

    @field_validator("holdout")
    @classmethod
    def _some_left_to_train(cls, holdout: int, info) -> int:
        n_images = info.data.get("n_images")
        if n_images is not None and holdout >= n_images:
            raise ValueError(f"holdout {holdout} holds out every one of the {n_images} images; give fewer than n_images")
        return holdout
