"""What `synergen mix` takes (`train.mixture.mix_report`): validated options (pydantic), light to import, so the CLI
derives its arguments from these fields and never restates a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MixConfig(BaseModel):
    """Plan a mixture manifest over some loader steps, or a finished run's mixture beside what its loader drew."""

    model_config = ConfigDict(extra="forbid")

    mixture: str | None = Field(None, description="Mixture manifest (manifests/mixtures/NAME.yaml, local or s3://); "
                                                  "not with --run")
    run: str | None = Field(None, validate_default=True,
                            description="A training run's output folder: plan its mixture over the steps it ran and "
                                        "show planned vs realised per source, with a plot (RUN/mix_plan_vs_run.png)")
    steps: int | None = Field(None, ge=1, validate_default=True,
                              description="Loader steps (global batches) to plan for")
    tokenizer: str | None = Field(None, description="The text tokenizer the shards were made with (sets prompt lengths)")
    data_root: str | None = Field(None, description="Resolve relative catalogs against this instead of the manifest's "
                                                    "data_root")
    max_epochs: float = Field(4.0, gt=0, description="Warn about sources that would repeat more than this many epochs")

    @field_validator("run")
    @classmethod
    def _one_mode(cls, run: str | None, info) -> str | None:
        if (run is None) == (info.data.get("mixture") is None):
            raise ValueError("give a mixture manifest (MIXTURE --steps N --tokenizer DIR) or a run (--run OUT), "
                             "one of the two")
        return run

    @field_validator("steps")
    @classmethod
    def _steps_to_plan(cls, steps: int | None, info) -> int | None:
        if steps is None and info.data.get("mixture") is not None and "run" in info.data and info.data["run"] is None:
            raise ValueError("planning a mixture needs the loader steps to plan for: give --steps N")
        return steps
