"""Generation: understanding (images + prompt -> text) and text-to-image (caption -> code grid -> pixels).

Both run the MMoE decoder with a KV cache over a left-padded batch; each step passes its own image mask,
so generated image positions go through the image FFN in cached decoding too. Text-to-image runs the
conditional and the unconditional prompt as one batch of 2B rows; classifier-free guidance mixes the
unfolding head's code logits, `l = l_u + s (l_c - l_u)` (SynerGen-VL §4.1, s = 7.5 by default).

Prompts are ids: the training sequences cut where the answer starts, built by `train.sequence`'s
`understanding_prompt` / `generation_prompt` with the loader's own layout code.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from transformers import DynamicCache

from model.folding import unfold_codes
from model.special_tokens import IMG
from synergen.errors import SynergenError

log = logging.getLogger(__name__)


class VQDecoder(Protocol):
    """What generation needs of a VQ tokenizer (`model.vq.VQTokenizer`)."""

    codebook_size: int

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...  # [B, gh, gw] -> [B, 3, H, W]


def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids `[N, T]`, document ids (0 real, -1 pad) `[N, T]`, position ids `[N, T]`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    docs = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.tensor(s)
            docs[i, T - len(s):] = 0
    pos = ((docs >= 0).cumsum(1) - 1).clamp(min=0)
    return ids.to(device), docs.to(device), pos.to(device)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """`[N, V]` -> `[N]`: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def cfg_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows `[cond; uncond]` `[2B, V]` -> guided `[B, V]`: `l_u + s (l_c - l_u)`."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


class _Decoder:
    """A cached decoding session over N rows: prefill, then steps that append one position per row."""

    def __init__(self, model, seqs: list[list[int]], image_codes: torch.Tensor | None):
        self.model = model
        cfg = model.config
        dev = next(model.parameters()).device
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        ids, self.docs, pos = _left_pad(seqs, pad, dev)
        self.cache = DynamicCache(config=cfg)
        img_mask = ids == cfg.token_id(IMG)
        k = cfg.fold_geometry.size
        codes = image_codes.to(dev) if image_codes is not None else torch.zeros(0, k, dtype=torch.long, device=dev)
        self.last_pos = pos[:, -1:]
        self.hidden = model.model(ids, pos, self.docs, img_mask, codes, cache=self.cache)[:, -1]  # [N, D]

    def step(self, ids: torch.Tensor, image_mask: torch.Tensor, codes: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
        """`ids [N]`, `image_mask [N]`, `codes [N_img, k]`, `block_index [N_img]` -> last hidden `[N, D]`."""
        self.last_pos = self.last_pos + 1
        self.docs = torch.cat([self.docs, torch.zeros_like(self.docs[:, :1])], dim=1)
        self.hidden = self.model.model(ids[:, None], self.last_pos, self.docs, image_mask[:, None], codes, block_index, cache=self.cache)[:, -1]
        return self.hidden


@torch.no_grad()
def generate_text(
    model,
    prompts: list[list[int]],
    image_codes: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[list[int]]:
    """Understanding: prompts (ids with `<img>` placeholders, e.g. from `train.sequence.understanding_prompt`) +
    the fold groups of all their image positions in order `[N_img, k]` -> generated ids per prompt, up to
    `stop_id` (excluded; default the config's EOS; the template's first END id: `LayoutIds.end[0]`)."""
    cfg = model.config
    model.eval()
    dec = _Decoder(model, prompts, image_codes)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) or cfg.eos_token_id is None else cfg.eos_token_id[0]
    eos = stop_id if stop_id is not None else eos
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool, device=dec.hidden.device)
    out: list[list[int]] = [[] for _ in range(B)]
    k = cfg.fold_geometry.size
    no_codes = torch.zeros(0, k, dtype=torch.long, device=dec.hidden.device)
    no_blocks = torch.zeros(0, dtype=torch.long, device=dec.hidden.device)
    for _ in range(max_new_tokens):
        tok = sample_logits(model.lm_head(dec.hidden), temperature, top_k, generator)  # [B]
        for i in range(B):
            if not done[i] and (eos is None or int(tok[i]) != eos):
                out[i].append(int(tok[i]))
        done |= tok == eos if eos is not None else done
        if bool(done.all()):
            break
        dec.step(tok, torch.zeros_like(tok, dtype=torch.bool), no_codes, no_blocks)
    return out


@torch.no_grad()
def generate_images(
    model,
    prompts: list[list[int]],
    uncond_prompt: list[int] | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    vq: VQDecoder | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-to-image for a batch: prompts (ids from `train.sequence.generation_prompt`, ending in `<boi>`) -> code
    grids `[B, gh, gw]` and, with a VQ, pixels `[B, 3, H, W]`. `uncond_prompt` (`generation_prompt(..., uncond=True)`)
    is needed unless `cfg_scale` is 1 (no guidance, no uncond branch)."""
    cfg = model.config
    model.eval()
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    guided = scale != 1.0
    if guided and uncond_prompt is None:
        raise SynergenError("classifier-free guidance needs uncond_prompt (train.sequence.generation_prompt(ids, [], uncond=True)); or pass cfg_scale=1")
    B = len(prompts)
    seqs = list(prompts) + ([list(uncond_prompt)] * B if guided else [])
    N = len(seqs)
    dec = _Decoder(model, seqs, None)
    fold, (gh, gw) = cfg.fold_geometry, cfg.image_grid
    n_blocks = fold.groups(gh, gw)
    dev = dec.hidden.device
    img_id = torch.full((N,), cfg.token_id(IMG), dtype=torch.long, device=dev)
    is_img = torch.ones(N, dtype=torch.bool, device=dev)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [B]
        return sample_logits(cfg_logits(logits, scale) if guided else logits, temperature, top_k, generator)

    blocks = []
    for j in range(n_blocks):
        codes = model.unfold_head.sample(dec.hidden, pick)  # [B, k]
        blocks.append(codes)
        if j + 1 < n_blocks:
            dec.step(img_id, is_img, codes.repeat(N // B, 1), torch.full((N,), j, dtype=torch.long, device=dev))
    grid = unfold_codes(torch.stack(blocks, dim=1), fold, gh, gw)  # [B, gh, gw]
    pixels = None
    if vq is not None:
        if vq.codebook_size != cfg.codebook_size:
            raise SynergenError(f"VQ codebook {vq.codebook_size} != model codebook_size {cfg.codebook_size}: pass the VQ the model was trained with")
        pixels = vq.decode(grid)
    return grid, pixels
