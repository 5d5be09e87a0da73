"""What `synergen mix` takes (`train.mixture.mix_report`): validated options (pydantic), light to import, so the CLI
derives its arguments from these fields and never restates a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MixConfig(BaseModel):
    """Plan a mixture manifest over some loader steps, or a finished run's mixture beside what its loader drew."""

    model_config = ConfigDict(extra="forbid")

    mixture: str | None = Field(None, description="Mixture manifest (manifests/mixtures/NAME.yaml, local or s3://); "
                                                  "not with --run")
    steps: int | None = Field(None, ge=1, description="Loader steps (global batches) to plan for")
    tokenizer: str | None = Field(None, description="The text tokenizer the shards were made with (sets prompt lengths)")
    data_root: str | None = Field(None, description="Resolve relative catalogs against this instead of the manifest's "
                                                    "data_root")
    max_epochs: float = Field(4.0, gt=0, description="Warn about sources that would repeat more than this many epochs")
    run: str | None = Field(None, description="A training run's output folder: plan its mixture over the steps it ran "
                                              "and show planned vs realised per source, with a plot "
                                              "(RUN/mix_plan_vs_run.png)")

    @field_validator("run")
    @classmethod
    def _one_mode(cls, run: str | None, info) -> str | None:
        d = info.data
        if (run is None) == (d.get("mixture") is None):
            raise ValueError("give a mixture manifest (MIXTURE --steps N --tokenizer DIR) or a run (--run OUT), "
                             "one of the two")
        if run is None and d.get("steps") is None:
            raise ValueError("planning a mixture needs --steps N (the loader steps to plan for)")
        return run
