"""The training run's one config: model, stage, data, DeepSpeed JSON, schedule, outputs (validated pydantic).

Loaded from YAML by `TrainConfig.load(path)`; an unknown key or a bad value fails at load time with the
file, the key and the fix. Unset optimizer fields take the stage's defaults from the paper's Table 8
(`STAGE_DEFAULTS`), so a stage-1 config needs to name only the model, the data and the output.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synergen.errors import SynergenError, explain_validation


class TrainConfigError(SynergenError):
    """A train config (YAML) or the DeepSpeed JSON it names is invalid: names the file, the key and the fix."""


Stage = Literal[1, 2, "sft"]

# SynerGen-VL Table 8 (S.1, S.2) and the instruction-tuning row (DESIGN.md "Model facts"). The 200 warm-up
# steps are the table's for S.1; the paper gives none for S.2/SFT, so we reuse 200 (our choice).
STAGE_DEFAULTS: dict[Any, dict[str, Any]] = {
    1: {"lr": 1e-4, "schedule": "constant", "warmup_steps": 200, "weight_decay": 0.05},
    2: {"lr": 5e-5, "schedule": "cosine", "warmup_steps": 200, "weight_decay": 0.05},
    "sft": {"lr": 2e-5, "schedule": "cosine", "warmup_steps": 200, "weight_decay": 0.01},
}


class DataOptions(BaseModel):
    """What a train config sets of the loader (`data_options:`); `train.data.LoaderConfig` adds the rank, world
    size and seed, which come from the run."""

    model_config = ConfigDict(extra="forbid")

    on_bad_shard: Literal["error", "skip"] = Field("error", description="skip: every rank passes over bad shards, named")
    cache_dir: str | None = Field(None, description="this machine's source tables (default: <tmp>/synergen-shards-<uid>, made 0o700)")
    cache_bytes: int = Field(8 << 30, ge=0, description="bound of the table cache (other runs' tables are evicted)")
    max_steps: int | None = Field(None, ge=0, description="stop after this loader step (None: stream forever)")
    migrate_order: bool = Field(False, description="resume a state saved with another sample order: each source "
                                                   "starts its next epoch in this loader's order")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for remote catalogs and shards")
    max_unread_fraction: float = Field(0.05, ge=0, le=1, description=(
        "on_bad_shard='skip' bound: over the last 20 steps of a loader process (once they hold 32 samples or more, and 8 "
        "unread), the fraction of its samples it could not read (bytes changed, shard gone, access lost) above which it "
        "stops with a ShardError naming the worst shards; a process that read none of its samples in all of those steps "
        "stops too"))


class TrainConfig(BaseModel):
    """Everything one training run needs; `resolved()` fills the stage defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model
    model: str = Field(description="a preset name of model.config (e.g. 'tiny') or a saved model dir / URL")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="config fields to override on a preset")
    tokenizer: str | None = Field(None, description="text tokenizer dir; the loader checks it against the catalogs")
    vq: str | None = Field(None, description="VQ model dir (used by the demo and the benchmark to decode/encode)")
    stage: Stage = 1
    sequence_template: Literal["raw", "chat"] | None = Field(
        None, description="text template around images (model.template); None: the model's (default raw)")
    loss_reduction: Literal["modality_mean", "token_sum"] | None = Field(
        None, description="how text and image losses combine (model.config; token_sum = Eq. 4); None: the model's")

    # --- data
    mixture: str = Field(description="mixture manifest (YAML) naming the sources and their catalogs")
    data_root: str | None = Field(None, description="overrides the mixture's data_root (where its catalogs are)")
    data_options: DataOptions = Field(default_factory=DataOptions, description="the loader's options (cache_dir, on_bad_shard, ...)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes building batches ahead of the step")
    grad_accum: int = Field(1, ge=1, description="loader steps (global batches) per optimizer step (Table 8: none)")

    # --- engine
    deepspeed: str = Field("infra/deepspeed/zero0_cpu.json", description="DeepSpeed JSON (ZeRO stage, precision)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the hardware has it")
    attention: Literal["auto", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="packed attention; auto: flex_attention (no dense mask) on CUDA, sdpa on CPU")

    # --- optimizer and schedule (None: the stage's Table-8 default)
    lr: float | None = Field(None, gt=0)
    schedule: Literal["constant", "cosine"] | None = None
    warmup_steps: int | None = Field(None, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float | None = Field(None, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")

    # --- run
    steps: int = Field(gt=0)
    seed: int = 0
    output_dir: str = Field(description="local folder or URL (s3://...): checkpoints, metrics, the exported model")
    local_dir: str | None = Field(None, description="local staging folder when output_dir is remote (default: a temp folder)")
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(3, ge=1, description="checkpoints kept (older ones are deleted after a good save)")
    log_every: int = Field(1, ge=1)
    export: bool = Field(True, description="write the final model in transformers format to OUTPUT/model")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.95]")
        return v

    def resolved(self) -> "TrainConfig":
        """A copy with every None optimizer field set to the stage's Table-8 default."""
        d = STAGE_DEFAULTS[self.stage]
        return self.model_copy(update={k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in d.items()})

    @classmethod
    def load(cls, path: str, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML config; `overrides` (e.g. from the CLI) replace top-level keys."""
        try:
            with fsspec.open(path, "r") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"train config {path}: no such file; see infra/train/*.yaml for examples") from None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"train config {path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise TrainConfigError(f"train config {path}: expected a mapping of keys, got {type(raw).__name__}")
        raw.update(overrides or {})
        try:
            return cls(**raw)
        except ValidationError as e:
            raise TrainConfigError(explain_validation(e, TrainConfig, str(path), "train config")) from None

    def deepspeed_config(self, n_tasks: int, bf16: bool) -> dict[str, Any]:
        """The DeepSpeed JSON with the batch geometry, clipping and precision this run dictates.

        The JSON holds what is about the cluster (ZeRO stage, offload, comms); batch sizes and precision
        come from here so that one JSON serves every run. Each task's batch is its own micro-batch, so
        DeepSpeed's accumulation counts `grad_accum x n_tasks` micro-batches per optimizer step. The rows of
        a micro-batch vary (the mixture's global batch is packed), so DeepSpeed's micro-batch size is
        nominal (1): it only feeds DeepSpeed's own throughput print, which is off.
        """
        try:
            with fsspec.open(self.deepspeed, "r") as f:
                ds = json.load(f)
        except FileNotFoundError:
            raise TrainConfigError(f"deepspeed: {self.deepspeed} does not exist; pick one of infra/deepspeed/*.json") from None
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"deepspeed: {self.deepspeed} is not valid JSON ({e})") from None
        if "optimizer" in ds or "scheduler" in ds:
            raise TrainConfigError(
                f"deepspeed: {self.deepspeed} has an 'optimizer'/'scheduler' block; remove it: the trainer builds "
                "AdamW and the stage schedule itself (lr, betas, warmup_steps in the train config)"
            )
        ds.pop("train_batch_size", None)
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = self.grad_accum * n_tasks
        ds["gradient_clipping"] = self.grad_clip
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
        ds.pop("fp16", None)
        ds.setdefault("steps_per_print", 10**9)
        ds.setdefault("wall_clock_breakdown", False)
        ds["zero_allow_untested_optimizer"] = True
        return ds


def save_config(cfg: TrainConfig, url: str) -> None:
    """Write the resolved config as YAML to `url` (local or remote); credentials in `data_options.storage_options`
    are written as `REDACTED` (the run folder is shared; the trainer's own config file keeps them)."""
    from pipeline.netguard import redact_options
    from synergen import storage

    raw = json.loads(cfg.model_dump_json())
    raw["data_options"]["storage_options"] = redact_options(raw["data_options"]["storage_options"])
    storage.write_bytes(str(url), yaml.safe_dump(raw, sort_keys=False).encode())
