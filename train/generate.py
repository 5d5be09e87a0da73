"""A trained SynerGen-VL used as it was trained: `synergen generate` (`run_generate`) and the demo's evaluation.

Everything that made the training data is reused, never re-derived: the tokenizer is checked against the
model (`model.template.check_model_tokenizer`), prompts are the loader's own sequences cut where the answer
starts (`train.sequence.*_prompt`, in the model's template), and an image to caption is tiled exactly as
`synergen tokenize` tiled the model's last stage (`pipeline.tiling.tile_image` with the `max_tiles` and
`thumbnail` the trainer recorded in the model config from the mixture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import fsspec
import torch

from model.folding import fold_codes
from model.template import LayoutIds, check_model_tokenizer
from synergen.errors import ConfigMismatchError, SynergenError
from train.generate_config import GenerateConfig
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
                 generator: torch.Generator | None = None, batch_size: int = 16) -> list[str]:
        """Image-to-text for PIL images, `batch_size` images per forward."""
        out = []
        for i in range(0, len(images), batch_size):
            encoded = [self.encode_image(im) for im in images[i:i + batch_size]]
            codes = torch.cat([c for c, _ in encoded]).to(next(self.model.parameters()).device)
            out += self.model.generate_text([p for _, p in encoded], codes, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_k=top_k, generator=generator, stop_id=self.ids.end[0])
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    def images(self, captions: list[str], cfg_scale: float | None = None, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 16) -> list:
        """Text-to-image: one PIL RGB image per caption (needs the VQ), `batch_size` captions per forward."""
        from pipeline.tiling import to_images

        enc = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        uncond = generation_prompt(self.ids, [], uncond=True).tolist()
        out = []
        for i in range(0, len(captions), batch_size):
            prompts = [generation_prompt(self.ids, enc(c)).tolist() for c in captions[i:i + batch_size]]
            _, pixels = self.model.generate_images(prompts, uncond_prompt=uncond, cfg_scale=cfg_scale, temperature=temperature,
                                                   top_k=top_k, generator=generator, vq=self.vq)
            out += to_images(pixels)
        return out


def open_image(path: str):
    """A local or remote (fsspec) image file as PIL RGB, or SynergenError naming the file."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        return Image.open(io.BytesIO(data)).convert("RGB")
    except FileNotFoundError:
        raise SynergenError(f"image {path}: no such file; give the path of an image file") from None
    except (OSError, UnidentifiedImageError) as e:
        raise SynergenError(f"image {path}: not a readable image ({e}); give a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses more than ~179M pixels
        raise SynergenError(f"image {path}: too many pixels to decode ({e}); give a smaller image") from None


def run_generate(cfg: GenerateConfig) -> list[tuple[str, str]]:
    """`synergen generate`: text-to-image writes `cfg.out/NNN.png` per caption and returns (png path, caption);
    image-to-text returns (image file, generated caption), in the order given. Images are read first, so a bad
    file fails before any model loads."""
    pictures = [open_image(f) for f in cfg.image]
    tm = TrainedModel.load(cfg.model, cfg.tokenizer, cfg.vq, device=cfg.device)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    if cfg.caption:
        images = tm.images(cfg.caption, cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
                           generator=gen, batch_size=cfg.batch_size)
        fs, root = fsspec.core.url_to_fs(cfg.out)
        fs.makedirs(root, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            paths.append(f"{cfg.out.rstrip('/')}/{i:03d}.png")
            with fsspec.open(paths[-1], "wb") as f:
                im.save(f, format="PNG")
        log.info("generate: %d images -> %s", len(paths), cfg.out)
        return list(zip(paths, cfg.caption))
    texts = tm.captions(pictures, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                        generator=gen, batch_size=cfg.batch_size)
    return list(zip(cfg.image, texts))
