"""The image tokenizer: one small interface over transformers' VQ-VAEs (Emu3VQVAE, the paper's; JanusVQVAE).

`VQTokenizer.encode(pixels [B,3,H,W] in [-1,1]) -> codes [B,gh,gw] int64` and
`decode(codes [B,gh,gw]) -> pixels [B,3,H,W] in [-1,1]`, with `codebook_size`, `downsample` and a
`model_id` that names the weights (folder name + sha256 prefix of the weights file), so a catalog
records exactly which checkpoint made its codes. Weights load from a local folder or any fsspec URL
(`s3://...`: the folder is copied to a temporary directory first).

A randomly initialised VQ is not a tokenizer: user-facing code loads trained weights with
`from_pretrained`; `tiny_emu3_config()` exists for training the demo VQ (`synergen vq-train`) and tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from synergen.errors import ConfigMismatchError, SynergenError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
_KINDS = ("emu3_vqgan", "janus_vqgan")


def tiny_emu3_config(codebook_size: int = 512):
    """A ~0.8 M-parameter Emu3VQVAE: downsample 8 (4 stages), no temporal axis (images only).

    Constraints of transformers' Emu3 code (checked by running it): GroupNorm has 32 groups, so
    `base_channels * m` must be multiples of 32; the decoder concatenates `post_quant` and `quant`, so
    `latent_channels == embed_dim`; `temporal_downsample_factor=1` avoids encoding each image 4 times.
    """
    from transformers import Emu3VQVAEConfig

    return Emu3VQVAEConfig(
        codebook_size=codebook_size,
        embed_dim=8,
        latent_channels=8,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        temporal_downsample_factor=1,
        hidden_size=64,
    )


def _weights_digest(folder: Path) -> str:
    f = folder / WEIGHTS_NAME
    if not f.exists():
        return "noweights"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:12]


class VQTokenizer:
    """Encode images to a code grid and decode codes back, whatever the VQ-VAE class behind it."""

    def __init__(self, model, model_id: str = "unsaved"):
        kind = getattr(model.config, "model_type", "")
        if kind not in _KINDS:
            raise SynergenError(f"VQ model type {kind!r} is not supported; use one of {_KINDS} (Emu3VQVAE or JanusVQVAE)")
        self.model = model.eval()
        self.kind = kind
        self.model_id = model_id

    # ---- facts ----
    @property
    def codebook_size(self) -> int:
        c = self.model.config
        return int(c.codebook_size if self.kind == "emu3_vqgan" else c.num_embeddings)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.channel_multiplier) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "VQTokenizer":
        self.model.to(device)
        return self

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Code grid of an image of this size (raises if the size is not a multiple of the downsample)."""
        d = self.downsample
        if height % d or width % d:
            raise SynergenError(f"image size {height}x{width} is not a multiple of the VQ downsample {d}; resize it first")
        return height // d, width // d

    # ---- the two calls ----
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float in [-1, 1] -> [B, H/d, W/d] int64 codes."""
        b, _, h, w = pixels.shape
        gh, gw = self.grid(h, w)
        pixels = pixels.to(self.device, self.model.dtype)
        if self.kind == "emu3_vqgan":
            sizes = torch.tensor([[h, w]] * b)
            out = self.model.encode(pixels, image_sizes=sizes)
            return torch.stack(list(out.image_tokens)).long()  # [B, gh, gw]
        out = self.model.encode(pixels)
        return out.image_tokens.view(b, gh, gw).long()  # Janus returns a flat [B*gh*gw]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, gh, gw] int codes -> [B, 3, gh*d, gw*d] float pixels in [-1, 1]."""
        codes = torch.as_tensor(codes).long().to(self.device)
        if codes.ndim != 3:
            raise SynergenError(f"decode takes codes [B, gh, gw], got shape {list(codes.shape)}")
        if int(codes.max()) >= self.codebook_size or int(codes.min()) < 0:
            raise ConfigMismatchError(
                f"codes reach {int(codes.max())} but VQ {self.model_id} has {self.codebook_size} codes: "
                "these codes were made by another VQ; decode them with the checkpoint their catalog names"
            )
        if self.kind == "emu3_vqgan":
            pix = self.model.decode(codes)  # [B, 3, H, W]
        else:
            b, gh, gw = codes.shape
            n = self.model.config.num_patches
            if gh * gw != n * n:
                raise SynergenError(f"JanusVQVAE {self.model_id} decodes {n}x{n} grids only (config num_patches), got {gh}x{gw}")
            pix = self.model.decode(codes.view(b, -1))
        return pix.float().clamp(-1, 1)

    # ---- weights ----
    def save_pretrained(self, path: str, half: bool = True) -> None:
        """Write config.json + model.safetensors to a local folder (fp16 by default: half the bytes, same codes)."""
        model = self.model
        if half:
            import copy

            model = copy.deepcopy(self.model).half()
        model.save_pretrained(path, safe_serialization=True)
        self.model_id = f"{Path(path).name}@{_weights_digest(Path(path))}"

    @classmethod
    def from_pretrained(cls, url: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "VQTokenizer":
        """Load trained weights from a local folder or an fsspec URL (s3://bucket/path/to/vq)."""
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(f"{path.rstrip('/')}/config.json"):
            raise SynergenError(
                f"no VQ checkpoint at {url} (config.json missing): pass a folder written by "
                "`synergen vq-train` or a transformers Emu3VQVAE/JanusVQVAE save_pretrained folder"
            )
        if isinstance(fs, LocalFileSystem):
            return cls._load_local(Path(path), url, device, dtype)
        with tempfile.TemporaryDirectory(prefix="synergen-vq-") as tmp:
            fs.get(f"{path.rstrip('/')}/", f"{tmp}/", recursive=True)
            return cls._load_local(Path(tmp), url, device, dtype)

    @classmethod
    def _load_local(cls, folder: Path, url: str, device, dtype) -> "VQTokenizer":
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        if kind == "emu3_vqgan":
            from transformers import Emu3VQVAE as Model
        elif kind == "janus_vqgan":
            from transformers import JanusVQVAE as Model
        else:
            raise SynergenError(f"VQ checkpoint {url} has model_type {kind!r}; supported: {_KINDS}")
        model = Model.from_pretrained(str(folder), dtype=dtype).to(device)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        return cls(model, model_id=f"{name}@{_weights_digest(folder)}")
