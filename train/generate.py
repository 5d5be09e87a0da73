"""A trained SynerGen-VL used as it was trained: `synergen generate` and the demo's evaluation.

Everything that made the training data is reused, never re-derived: the tokenizer is checked against the
model (`model.template.check_model_tokenizer`), prompts are the loader's own sequences cut where the answer
starts (`train.sequence.*_prompt`, in the model's template), and an image to caption is tiled exactly as
`synergen tokenize` tiled the model's last stage (`pipeline.tiling.tile_image` with the `max_tiles` and
`thumbnail` the trainer recorded in the model config from the mixture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.folding import fold_codes
from model.template import LayoutIds, check_model_tokenizer
from synergen.errors import ConfigMismatchError
from train.sequence import generation_prompt, understanding_prompt

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model, its tokenizer (checked against it), their LayoutIds and, for images, the VQ."""

    model: object
    tokenizer: object
    ids: LayoutIds
    vq: object | None = None

    @classmethod
    def load(cls, model_url: str, tokenizer_url: str | None = None, vq_url: str | None = None, device: str = "cpu") -> "TrainedModel":
        """Model and tokenizer (default: the model's folder, where init and the trainer save it), local or URL."""
        from model.modeling import SynerGenVLForCausalLM
        from pipeline.text_tokenizer import load_text_tokenizer

        model = SynerGenVLForCausalLM.from_pretrained(model_url).to(device).eval()
        tok_url = tokenizer_url or model_url
        tok = load_text_tokenizer(tok_url)
        ids = check_model_tokenizer(model.config, tok, model_url, tok_url)
        vq = None
        if vq_url:
            from model.vq import VQTokenizer

            vq = VQTokenizer.from_pretrained(vq_url, device=device)
            if vq.codebook_size != model.config.codebook_size:
                raise ConfigMismatchError(f"VQ {vq_url} has {vq.codebook_size} codes but model {model_url} has codebook_size "
                                          f"{model.config.codebook_size}: pass the VQ the model was trained with")
        return cls(model, tok, ids, vq)

    @property
    def image_size(self) -> int:
        """Pixels of one tile / image side: the model's code grid times the VQ's downsample."""
        return int(self.model.config.image_grid[0] * self.vq.downsample)

    def encode_image(self, image) -> tuple[torch.Tensor, list[int]]:
        """A PIL image -> fold groups of its tiles [+ thumbnail] `[n_images * groups, k]` and its prompt ids,
        tiled as `synergen tokenize` does for the model's stage."""
        from pipeline.tiling import tile_image, to_pixels

        cfg = self.model.config
        tiling = tile_image(image.convert("RGB"), self.image_size, int(cfg.max_tiles), bool(cfg.thumbnail))
        grids = self.vq.encode(to_pixels(tiling.images).to(self.vq.device))  # [n, gh, gw]
        groups = fold_codes(grids, cfg.fold_geometry)  # [n, groups, k]
        prompt = understanding_prompt(self.ids, groups.shape[0], groups.shape[1], cfg.fold_geometry, (tiling.rows, tiling.cols),
                                      tiling.thumbnail, max_tiles=int(cfg.max_tiles))
        return groups.reshape(-1, groups.shape[-1]), prompt.tolist()

    def captions(self, images: list, max_new_tokens: int = 48, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> list[str]:
        """Image-to-text for PIL images."""
        encoded = [self.encode_image(im) for im in images]
        codes = torch.cat([c for c, _ in encoded]).to(next(self.model.parameters()).device)
        out = self.model.generate_text([p for _, p in encoded], codes, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, generator=generator, stop_id=self.ids.end[0])
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    def images(self, captions: list[str], cfg_scale: float | None = None, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Text-to-image: pixels `[B, 3, H, W]` in [-1, 1] (needs the VQ)."""
        enc = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        prompts = [generation_prompt(self.ids, enc(c)).tolist() for c in captions]
        uncond = generation_prompt(self.ids, [], uncond=True).tolist()
        _, pixels = self.model.generate_images(prompts, uncond_prompt=uncond, cfg_scale=cfg_scale, temperature=temperature,
                                               top_k=top_k, generator=generator, vq=self.vq)
        return pixels
