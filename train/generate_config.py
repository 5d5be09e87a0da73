"""What `synergen generate` takes (`train.generate.run_generate`): validated options (pydantic), light to import, so
the CLI derives its arguments from these fields and never restates a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerateConfig(BaseModel):
    """A trained model, its tokenizer and VQ, and one direction: captions to draw, or images to caption."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Trained SynerGen-VL directory (save_pretrained; local or s3://)")
    tokenizer: str | None = Field(None, description="Text tokenizer directory (local or s3://); default: the model's folder")
    vq: str = Field(description="VQ tokenizer (model.vq.VQTokenizer.from_pretrained; local or s3://)")
    caption: list[str] = Field([], description="Text-to-image: one image per caption (repeatable)")
    image: list[str] = Field([], validate_default=True, description="Image-to-text: caption each image file (repeatable); tiled as tokenize did")
    out: str = Field("generated", description="Folder for generated PNGs (text-to-image)")
    cfg_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale (1 = none)")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy)")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely codes/tokens")
    max_new_tokens: int = Field(48, ge=1, description="Image-to-text: longest caption in tokens")
    batch_size: int = Field(16, ge=1, description="Captions or images per forward")
    seed: int = Field(0, description="Sampling seed")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")

    @field_validator("image")
    @classmethod
    def _one_direction(cls, image: list[str], info) -> list[str]:
        if bool(image) == bool(info.data.get("caption")):
            raise ValueError("give captions to draw (caption, --caption) or images to caption (image, --image), "
                             "not both or neither")
        return image
