"""What `synergen init` takes (`model.from_llm.init_from_config`): validated options (pydantic), light to import, so
the CLI derives its arguments from these fields and never restates a default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.template import DEFAULT_TEMPLATE, TEMPLATES
from pipeline.tokenization_config import FoldSpec


class InitConfig(BaseModel):
    """A pretrained LLM, where to write the SynerGen-VL built from it, and its vision settings (paper defaults)."""

    model_config = ConfigDict(extra="forbid")

    llm: str = Field(description="Qwen2/Qwen2.5 or InternLM2 checkpoint folder (local or s3://)")
    out: str = Field(description="Where to write model + tokenizer (local or s3://); train configs name it")
    tokenizer: str | None = Field(None, description="The LLM's tokenizer folder (default: the LLM folder)")
    vq: str | None = Field(None, description="VQ folder: take codebook_size and downsample from it "
                                             "(default: Emu3's 32768 / 8)")
    image_size: int = Field(512, gt=0, description="Pixels per image/tile side (paper: 512) -> code grid size / downsample")
    fold: FoldSpec = Field("2x8", description="Token folding ROWSxCOLS (paper: 2x8)")
    head_layers: int = Field(4, ge=1, description="Unfolding head depth (paper: 4)")
    template: Literal[TEMPLATES] = Field(DEFAULT_TEMPLATE, description="Sequence template: raw or chat (the LLM's chat "
                                                                       "template; model.template)")
