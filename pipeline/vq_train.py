"""`synergen vq-train`: train the tiny Emu3VQVAE on the demo corpus (minutes on 2 CPU cores).

The trained weights are the demo's and the tests' image tokenizer (model/assets/demo_vq). Training is a
plain VQ-VAE objective through transformers' own Emu3 modules: encoder -> quant_conv -> nearest code
(the same squared-L2 argmin as `Emu3VQVAEVectorQuantizer`, so `Emu3VQVAE.encode` picks the codes we
trained) with a straight-through gradient -> post_quant_conv -> decoder. Loss: pixel MSE + codebook
loss + 0.25 x commitment. Unused codes are re-seeded from encoder outputs every `restart_every` steps
(no codebook collapse). Images are the demo corpus's 256-px JPEGs resized like the tokenize stage does
(`pipeline.tiling.resize_center_crop`); the last `holdout` images are held out for the PSNR report.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model.vq import VQTokenizer, tiny_emu3_config
from pipeline.democorpus import write_demo_corpus
from pipeline.tiling import psnr, resize_center_crop, to_pixels

log = logging.getLogger(__name__)


@dataclass
class VQTrainConfig:
    """What `synergen vq-train` trains; the defaults made model/assets/demo_vq."""

    out: str = "model/assets/demo_vq"
    image_size: int = 64
    codebook_size: int = 512
    n_images: int = 2400
    holdout: int = 200
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    beta: float = 0.25
    restart_every: int = 50
    seed: int = 0
    threads: int = 2


def load_demo_pixels(n: int, seed: int, image_size: int) -> torch.Tensor:
    """Render the demo corpus and return it as [n, 3, S, S] pixels in [-1, 1]."""
    with tempfile.TemporaryDirectory(prefix="synergen-vqtrain-") as tmp:
        rows = write_demo_corpus(tmp, n=n, seed=seed, size=256)
        images = [resize_center_crop(Image.open(Path(tmp) / r["file"]).convert("RGB"), image_size) for r in rows]
    return to_pixels(images)


def _quantize_st(model, x: torch.Tensor):
    """Emu3's encode path with a straight-through quantizer. x [B,3,H,W] -> (recon, z, zq, codes)."""
    hidden = model.encoder(x.unsqueeze(1))  # [B, T=1, C, h, w]
    z = model.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)  # [B, T, E, h, w]
    b, t, e, h, w = z.shape
    flat = z.permute(0, 1, 3, 4, 2).reshape(-1, e)  # [N, E]
    emb = model.quantize.embedding.weight  # [K, E]
    dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
    codes = dist.argmin(1)  # [N]
    zq = emb[codes]  # [N, E]
    zq_st = flat + (zq - flat).detach()
    quant = zq_st.view(b, t, h, w, e).permute(0, 4, 1, 2, 3)  # [B, E, T, h, w]
    post = model.post_quant_conv(quant)
    recon = model.decoder(post.permute(0, 2, 1, 3, 4), quant.permute(0, 2, 1, 3, 4))  # [B*T, 3, H, W]
    return recon, flat, zq, codes


def train_demo_vq(cfg: VQTrainConfig) -> dict:
    """Train, save to `cfg.out` (fp16 safetensors + config.json + train_report.json); return the report."""
    from transformers import Emu3VQVAE

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    pixels = load_demo_pixels(cfg.n_images, cfg.seed, cfg.image_size)
    train, held = pixels[: -cfg.holdout], pixels[-cfg.holdout :]
    log.info("demo corpus: %d train, %d held-out images at %d px (%.1fs)", len(train), len(held), cfg.image_size, time.time() - t0)

    model = Emu3VQVAE(tiny_emu3_config(cfg.codebook_size)).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
    t_train = time.time()
    for step in range(cfg.steps):
        x = train[torch.randint(len(train), (cfg.batch_size,), generator=gen)]
        recon, z, zq, codes = _quantize_st(model, x)
        rec = F.mse_loss(recon, x)
        loss = rec + F.mse_loss(zq, z.detach()) + cfg.beta * F.mse_loss(z, zq.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used[codes] = True
        if step == 0 or (step + 1) % cfg.restart_every == 0:
            dead = (~used).nonzero().flatten() if step else torch.arange(cfg.codebook_size)
            if len(dead) and step < cfg.steps * 0.9:
                # Re-seed dead codes at encoder outputs (jittered) so the whole codebook stays in use.
                src = z.detach()[torch.randint(len(z), (len(dead),), generator=gen)]
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = src + 0.01 * torch.randn_like(src)
            log.info("step %d/%d loss %.4f recon psnr %.2f dB, codes used %d, re-seeded %d (%.0fs)", step + 1, cfg.steps,
                     loss.item(), 10 * torch.log10(4 / rec.detach()).item(), int(used.sum()), len(dead), time.time() - t_train)
            used[:] = False

    tok = VQTokenizer(model.eval())
    tok.save_pretrained(cfg.out)
    tok = VQTokenizer.from_pretrained(cfg.out)  # measure what was saved (fp16 weights)
    codes = torch.cat([tok.encode(held[i : i + 50]) for i in range(0, len(held), 50)])
    recon = torch.cat([tok.decode(codes[i : i + 50]) for i in range(0, len(codes), 50)])
    report = {
        "config": asdict(cfg),
        "heldout_psnr_db": round(psnr(recon, held), 2),
        "heldout_distinct_codes": int(codes.unique().numel()),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - t_train, 1),
        "model_id": tok.model_id,
    }
    Path(cfg.out, "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: held-out PSNR %.2f dB", cfg.out, report["heldout_psnr_db"])
    return report
