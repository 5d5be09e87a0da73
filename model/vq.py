"""The image tokenizer: one small interface over transformers' VQ-VAEs (Emu3VQVAE, the paper's; JanusVQVAE).

`VQTokenizer.encode(pixels [B,3,H,W] in [-1,1]) -> codes [B,gh,gw] int64` and
`decode(codes [B,gh,gw]) -> pixels [B,3,H,W] in [-1,1]`, with `codebook_size`, `downsample` and a
`model_id` that names the weights (folder name + sha256 prefix of the weights), so a catalog
records exactly which checkpoint made its codes. Weights load from a local folder or any fsspec URL
(`s3://...`: the files needed are copied to a temporary directory first), in three layouts, told apart
by config.json's `model_type`:
- `emu3_vqgan` / `janus_vqgan`: a transformers `save_pretrained` folder of the VQ-VAE itself (ours);
- `Emu3VisionVQ`: Emu3's standalone release (BAAI/Emu3-VisionTokenizer: its own module names, `ch`,
  `ch_mult`, `z_channels`, 1x1-conv attention projections), renamed into transformers' Emu3VQVAE;
- `emu3`: a transformers Emu3 checkpoint (Emu3ForConditionalGeneration, e.g. Emu3-Chat-hf): only its
  `vqmodel.` (older saves) or `model.vqmodel.` tensors are read, from the shards that hold them.

Emu3 encodes a still image by repeating it `temporal_downsample_factor` (4) times and running the 2D
encoder on every copy; `encode` runs the 2D part once and feeds the temporal layers the repeated features
(the same codes, a quarter of the 2D work; `emu3_encoder_states`).

A randomly initialised VQ is not a tokenizer: user-facing code loads trained weights with
`from_pretrained`; `tiny_emu3_config()` exists for training the demo VQ (`synergen vq-train`) and tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from synergen.errors import ConfigMismatchError, SynergenError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_KINDS = ("emu3_vqgan", "janus_vqgan")
ORIGINAL_EMU3 = "Emu3VisionVQ"  # model_type of BAAI/Emu3-VisionTokenizer's config.json
FULL_EMU3 = "emu3"  # model_type of transformers' Emu3 (LLM + VQ) checkpoints
_LAYOUTS = (*_KINDS, ORIGINAL_EMU3, FULL_EMU3)

# BAAI/Emu3-VisionTokenizer's module names -> transformers' Emu3VQVAE, applied in order to every key.
# Its attention blocks hold their norm inside (`attn.N.norm`, `mid.attn_1.norm`) and project with 1x1
# convolutions `q, k, v, proj_out`; transformers keeps the norms beside them and uses Linear `*_proj`.
_ORIGINAL_RENAMES = (
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.middle_block.attn_norm."),
    (r"^(encoder|decoder)\.mid\.", r"\1.middle_block."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.norm\.", r"encoder.down_block.down.\1.attn_norms.\2."),
    (r"^decoder\.up\.(\d+)\.attn\.(\d+)\.norm\.", r"decoder.up_block.up.\1.attn_norms.\2."),
    (r"^encoder\.down\.", "encoder.down_block.down."),
    (r"^decoder\.up\.", "decoder.up_block.up."),
    (r"\.(attn_1|attn\.\d+)\.(q|k|v)\.", r".\1.\2_proj."),
    (r"\.(attn_1|attn\.\d+)\.proj_out\.", r".\1.out_proj."),
)
# Its config names -> Emu3VQVAEConfig's (the others are the same; `dropout` has no use at inference).
_ORIGINAL_CONFIG = {"ch": "base_channels", "ch_mult": "channel_multiplier", "z_channels": "latent_channels",
                    "double_z": "double_latent"}
_SAME_CONFIG = ("codebook_size", "embed_dim", "in_channels", "out_channels", "temporal_downsample_factor",
                "num_res_blocks", "attn_resolutions")
_FULL_PREFIXES = ("model.vqmodel.", "vqmodel.")  # transformers >= 5 saves, then the hub's 4.x saves


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
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 prefix over names, dtypes, shapes and bytes: names the VQ inside a larger checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def emu3_encoder_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """Emu3VQVAE's encoder output for still images, the 2D part run once: [B, 3, H, W] -> [B, C, T', H/d, W/d].

    transformers' `Emu3VQVAE.encode` repeats an image `temporal_downsample_factor` times and runs conv_in ..
    conv_out on every copy. That part is per frame: frames are folded into the batch dimension, GroupNorm
    normalises each sample over (channels of a group, H, W) and attention runs over one frame's H*W
    positions. So the copies' features are equal, and computing them once and repeating them along time
    before the temporal layers (causal Conv3d, BatchNorm3d with running statistics in eval) gives the
    reference's result with a quarter of the 2D work (tests/test_vq.py measures the float difference).
    """
    enc = model.encoder
    # Contiguous NCHW as in the reference (its repeat copies): a channels-last input (e.g. from an HWC
    # array) would take other convolution kernels and round differently.
    h = enc.conv_in(pixels.contiguous())
    h = enc.down_block(h)
    h = enc.middle_block(h)
    h = enc.norm_out(h)
    h = h * torch.sigmoid(h)
    h = enc.conv_out(h)  # [B, C, h, w]
    # [B, T, C, h, w] copies seen as [B, C, T, h, w]: the reference's memory layout, so that the temporal
    # layers' kernels (layout-dependent in their float rounding) compute exactly what they compute there.
    h = h.unsqueeze(1).repeat(1, model.config.temporal_downsample_factor, 1, 1, 1).permute(0, 2, 1, 3, 4)
    for conv in enc.time_conv:
        h = conv(h)
        h = h * torch.sigmoid(h)
    for layer in enc.time_res_stack:
        h = layer(h)
    return h  # [B, C, T', h, w]; T' = 1 for a still image


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
            states = self.model.quant_conv(emu3_encoder_states(self.model, pixels))  # [B, E, 1, gh, gw]
            return self.model.quantize(states.permute(0, 2, 1, 3, 4))[:, 0].long()  # [B, gh, gw]
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
        """Load trained weights from a local folder or an fsspec URL (s3://bucket/path/to/vq), in any of the
        layouts of the module docstring."""
        fs, path = fsspec.core.url_to_fs(url)
        root = path.rstrip("/")
        if not fs.exists(f"{root}/config.json"):
            raise SynergenError(
                f"no VQ checkpoint at {url} (config.json missing): pass a folder written by `synergen vq-train`, "
                "a transformers Emu3VQVAE/JanusVQVAE save_pretrained folder, BAAI/Emu3-VisionTokenizer or a "
                "transformers Emu3 checkpoint (Emu3-Chat-hf, Emu3-Gen-hf)"
            )
        if isinstance(fs, LocalFileSystem):
            return cls._load_local(Path(root), url, device, dtype)
        with tempfile.TemporaryDirectory(prefix="synergen-vq-") as tmp:
            # config and index first: they say which (of possibly many, large) weight files hold the VQ.
            for name in ("config.json", INDEX_NAME):
                if fs.exists(f"{root}/{name}"):
                    fs.get_file(f"{root}/{name}", f"{tmp}/{name}")
            for name in _weight_files(Path(tmp), url):
                fs.get_file(f"{root}/{name}", f"{tmp}/{name}")
            return cls._load_local(Path(tmp), url, device, dtype)

    @classmethod
    def _load_local(cls, folder: Path, url: str, device, dtype) -> "VQTokenizer":
        config = _read_config(folder, url)
        kind = config.get("model_type")
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if kind in _KINDS:
            if kind == "emu3_vqgan":
                from transformers import Emu3VQVAE as Model
            else:
                from transformers import JanusVQVAE as Model
            model = Model.from_pretrained(str(folder), dtype=dtype).to(device)
            return cls(model, model_id=f"{name}@{_weights_digest(folder)}")
        from transformers import Emu3VQVAE, Emu3VQVAEConfig

        if kind == ORIGINAL_EMU3:
            vq_config = _config_from_original(config)
            state = _read_tensors(folder, url, _rename_original)
        else:  # FULL_EMU3
            vq_config = Emu3VQVAEConfig.from_dict(config.get("vq_config") or {})
            state = _read_tensors(folder, url, _strip_full_prefix)
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = Emu3VQVAE(vq_config)
        mismatch = "is config.json the one published with these weights?"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # shapes that differ from the config's
            raise SynergenError(f"VQ checkpoint {url} ({kind} layout) does not match its config: {' '.join(str(e).split())[:500]}; {mismatch}") from None
        if missing or unexpected:
            raise SynergenError(
                f"VQ checkpoint {url} ({kind} layout) does not match its config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} ({len(missing)} and {len(unexpected)} in all); {mismatch}"
            )
        model = model.to(device, dtype).eval()
        # The file's digest when the VQ is the whole file; else one over the VQ's own tensors as stored.
        single = (folder / WEIGHTS_NAME).exists() and kind == ORIGINAL_EMU3
        digest = _weights_digest(folder) if single else _tensors_digest(state)
        log.info("loaded the %s-layout VQ %s (%d tensors)", kind, url, len(state))
        return cls(model, model_id=f"{name}@{digest}")


def _read_config(folder: Path, url: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SynergenError(f"VQ checkpoint {url}: config.json is not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in _LAYOUTS:
        raise SynergenError(f"VQ checkpoint {url} has model_type {kind!r} in config.json; supported: {_LAYOUTS}")
    if kind == FULL_EMU3 and not isinstance(config.get("vq_config"), dict):
        raise SynergenError(f"VQ checkpoint {url}: an Emu3 config.json without a vq_config mapping; re-save it with transformers")
    return config


def _config_from_original(config: dict):
    """Emu3VQVAEConfig of a BAAI/Emu3-VisionTokenizer config.json (absent keys take Emu3's defaults)."""
    from transformers import Emu3VQVAEConfig

    kwargs = {new: config[old] for old, new in _ORIGINAL_CONFIG.items() if old in config}
    kwargs.update({k: config[k] for k in _SAME_CONFIG if k in config})
    cfg = Emu3VQVAEConfig(**kwargs)
    # transformers' attention width is a config field; the original's is the last level's channels.
    cfg.hidden_size = cfg.base_channels * cfg.channel_multiplier[-1]
    cfg.num_attention_heads = 1
    return cfg


def _rename_original(key: str) -> str:
    for pattern, repl in _ORIGINAL_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _strip_full_prefix(key: str) -> str | None:
    for prefix in _FULL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None  # the LLM's tensors: not read


def _weight_files(folder: Path, url: str) -> list[str]:
    """The weight files to read: all of a single-file checkpoint, or the shards holding VQ tensors."""
    if (folder / INDEX_NAME).exists():
        weight_map = json.loads((folder / INDEX_NAME).read_text()).get("weight_map", {})
        full = _read_config(folder, url).get("model_type") == FULL_EMU3
        files = sorted({f for k, f in weight_map.items() if not full or _strip_full_prefix(k) is not None})
        if not files:
            raise SynergenError(f"VQ checkpoint {url}: {INDEX_NAME} lists no VQ tensors (keys under {' or '.join(_FULL_PREFIXES)})")
        return files
    return [WEIGHTS_NAME]


def _read_tensors(folder: Path, url: str, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint's safetensors files under their Emu3VQVAE names (`rename` -> None: skip)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for name in _weight_files(folder, url):
        if not (folder / name).exists():
            raise SynergenError(f"VQ checkpoint {url}: weights file {name} is missing (the layouts read are safetensors: "
                                f"{WEIGHTS_NAME} or {INDEX_NAME} with its shards)")
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                new = rename(key)
                if new is None:
                    continue
                t = f.get_tensor(key)
                if new.endswith("_proj.weight") and t.ndim == 4:
                    t = t[:, :, 0, 0]  # a 1x1 convolution is a Linear layer
                state[new] = t
    if not state:
        raise SynergenError(f"VQ checkpoint {url}: no VQ tensors found (keys under {' or '.join(_FULL_PREFIXES)} for an Emu3 checkpoint)")
    return state
