"""What `synergen inspect` takes (`pipeline.inspection.inspect_dataset`): validated options (pydantic), light to
import, so the CLI derives its arguments from these fields and never restates a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class InspectConfig(BaseModel):
    """A token dataset (or one token shard) to summarise, and optionally a page of decoded samples."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="A token dataset's _catalog.parquet (or its folder), or one token shard")
    html: str | None = Field(None, description="Write an HTML page of N samples here")
    n: int = Field(8, ge=1, description="Samples on the page")
    vq: str | None = Field(None, description="VQ checkpoint that made the codes (default: the demo VQ, checked against "
                                             "the catalog)")
