"""`synergen vq-train`: train the tiny Emu3VQVAE on the demo corpus (minutes on 2 CPU cores).

The trained weights are the demo's and the tests' image tokenizer (model/assets/demo_vq). Training is a
plain VQ-VAE objective through transformers' own Emu3 modules: encoder -> quant_conv -> nearest code
(the same squared-L2 argmin as `Emu3VQVAEVectorQuantizer`, so `Emu3VQVAE.encode` picks the codes we
trained) with a straight-through gradient -> post_quant_conv -> decoder. Loss: pixel MSE + L1 + an
edge term (L1 between the images' horizontal/vertical pixel differences, so shape outlines are not
blurred away) + codebook loss + 0.25 x commitment. Unused codes are re-seeded from encoder outputs
every `restart_every` steps (no codebook collapse). `init` fine-tunes a trained VQ instead of starting
from random weights (the demo VQ is a chain of three runs: model/assets/demo_vq/README.md). Images are the demo corpus's 256-px JPEGs resized like the tokenize stage does
(`pipeline.tiling.resize_center_crop`); the last `holdout` images are held out for the PSNR report.
The report also states the round-trip accuracy of `synergen.demo.corpus.classify_image` on unseen
single-object scenes (the demo's learning-check ceiling) next to its accuracy on the originals.
"""

from __future__ import annotations

import json
import logging
import io
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model.vq import VQTokenizer, tiny_emu3_config
from synergen.demo.config import VQTrainConfig
from synergen.errors import ConfigMismatchError
from synergen.demo.corpus import SHAPES, COLOURS, POSITIONS, Scene, SceneObject, classify_image, render, write_demo_corpus
from pipeline.tiling import psnr, resize_center_crop, to_images, to_pixels

log = logging.getLogger(__name__)


def load_demo_pixels(n: int, seed: int, image_size: int) -> torch.Tensor:
    """Render the demo corpus and return it as [n, 3, S, S] pixels in [-1, 1]."""
    with tempfile.TemporaryDirectory(prefix="synergen-vqtrain-") as tmp:
        rows = write_demo_corpus(tmp, n=n, seed=seed, size=256)
        images = [resize_center_crop(Image.open(Path(tmp) / r["file"]).convert("RGB"), image_size) for r in rows]
    return to_pixels(images)


def _edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of a and b ([B,3,H,W]): penalises blurred outlines."""
    dx_a, dx_b = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]  # [B, 3, H, W-1]
    dy_a, dy_b = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]  # [B, 3, H-1, W]
    return F.l1_loss(dx_a, dx_b) + F.l1_loss(dy_a, dy_b)


def roundtrip_accuracy(tok: VQTokenizer, n: int = 120, seed: int = 12345, image_size: int = 64) -> dict:
    """classify_image's shape/colour accuracy on `n` unseen single-object scenes, before and after a VQ round trip.

    Scenes are rendered like the corpus (256-px JPEG, quality 92, resized to `image_size`), cycling
    shape x colour x position so every class is equally represented.
    """
    rng = random.Random(seed)
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
    rng.shuffle(combos)
    scenes = [Scene((SceneObject(*combos[i % len(combos)]),)) for i in range(n)]
    images = []
    for sc in scenes:
        buf = io.BytesIO()
        render(sc, 256).save(buf, format="JPEG", quality=92)
        images.append(resize_center_crop(Image.open(buf).convert("RGB"), image_size))
    with torch.no_grad():
        recon = to_images(tok.decode(tok.encode(to_pixels(images))))
    out = {}
    for name, ims in (("original", images), ("roundtrip", recon)):
        pred = [classify_image(im) for im in ims]
        out[f"{name}_shape_acc"] = round(sum(p[0] == sc.dominant.shape for p, sc in zip(pred, scenes)) / n, 3)
        out[f"{name}_colour_acc"] = round(sum(p[1] == sc.dominant.colour for p, sc in zip(pred, scenes)) / n, 3)
        out[f"{name}_both_acc"] = round(sum(p == (sc.dominant.shape, sc.dominant.colour) for p, sc in zip(pred, scenes)) / n, 3)
    return out


def write_reconstruction_sheet(tok: VQTokenizer, pixels: torch.Tensor, path: str | Path, cols: int = 12, scale: int = 2) -> None:
    """PNG of `pixels` ([N,3,S,S], N a multiple of `cols`): rows of originals, each above its reconstructions."""
    with torch.no_grad():
        recon = tok.decode(tok.encode(pixels))
    s = pixels.shape[-1] * scale
    rows = len(pixels) // cols
    sheet = Image.new("RGB", (cols * s, 2 * rows * s))
    for i, (a, b) in enumerate(zip(to_images(pixels), to_images(recon))):
        r, c = divmod(i, cols)
        sheet.paste(a.resize((s, s), Image.NEAREST), (c * s, 2 * r * s))
        sheet.paste(b.resize((s, s), Image.NEAREST), (c * s, (2 * r + 1) * s))
    sheet.save(path)


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


def _initial_model(cfg: VQTrainConfig):
    """The Emu3VQVAE to train: `cfg.init`'s weights (fine-tune) or random ones, in training mode, fp32."""
    from transformers import Emu3VQVAE

    if cfg.init:
        model = VQTokenizer.from_pretrained(cfg.init).model.float().train()
        if model.config.codebook_size != cfg.codebook_size:
            raise ConfigMismatchError(f"--init {cfg.init} has codebook {model.config.codebook_size}, not --codebook-size {cfg.codebook_size}")
        return model
    return Emu3VQVAE(tiny_emu3_config(cfg.codebook_size)).train()


def _report_saved(cfg: VQTrainConfig, held: torch.Tensor, train_seconds: float) -> dict:
    """The report of the VQ as saved in `cfg.out` (fp16 weights): held-out PSNR and codes, round-trip accuracy;
    also writes its held-out reconstruction sheet there."""
    tok = VQTokenizer.from_pretrained(cfg.out)
    write_reconstruction_sheet(tok, held[:24], Path(cfg.out, "heldout_reconstructions.png"))
    codes = torch.cat([tok.encode(held[i : i + 50]) for i in range(0, len(held), 50)])
    recon = torch.cat([tok.decode(codes[i : i + 50]) for i in range(0, len(codes), 50)])
    return {
        "config": cfg.model_dump(),
        "heldout_psnr_db": round(psnr(recon, held), 2),
        "heldout_distinct_codes": int(codes.unique().numel()),
        "params": sum(p.numel() for p in tok.model.parameters()),
        "train_seconds": train_seconds,
        "model_id": tok.model_id,
        **roundtrip_accuracy(tok, image_size=cfg.image_size),
    }


def train_demo_vq(cfg: VQTrainConfig) -> dict:
    """Train, save to `cfg.out` (fp16 safetensors + config.json + train_report.json); return the report."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    pixels = load_demo_pixels(cfg.n_images, cfg.seed, cfg.image_size)
    train, held = pixels[: -cfg.holdout], pixels[-cfg.holdout :]
    log.info("demo corpus: %d train, %d held-out images at %d px (%.1fs)", len(train), len(held), cfg.image_size, time.time() - t0)

    model = _initial_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
    t_train = time.time()
    for step in range(cfg.steps):
        x = train[torch.randint(len(train), (cfg.batch_size,), generator=gen)]
        recon, z, zq, codes = _quantize_st(model, x)
        rec = F.mse_loss(recon, x)
        loss = rec + cfg.l1_weight * F.l1_loss(recon, x) + cfg.edge_weight * _edge_l1(recon, x)
        loss = loss + F.mse_loss(zq, z.detach()) + cfg.beta * F.mse_loss(z, zq.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used[codes] = True
        if step == 0 or (step + 1) % cfg.restart_every == 0:
            # Step 0 seeds the whole random codebook from encoder outputs; a fine-tuned (--init) codebook is kept.
            dead = (~used).nonzero().flatten() if step or cfg.init else torch.arange(cfg.codebook_size)
            if len(dead) and step < cfg.steps * 0.9:
                # Re-seed dead codes at encoder outputs (jittered) so the whole codebook stays in use.
                src = z.detach()[torch.randint(len(z), (len(dead),), generator=gen)]
                with torch.no_grad():
                    model.quantize.embedding.weight[dead] = src + 0.01 * torch.randn_like(src)
            log.info("step %d/%d loss %.4f recon psnr %.2f dB, codes used %d, re-seeded %d (%.0fs)", step + 1, cfg.steps,
                     loss.item(), 10 * torch.log10(4 / rec.detach()).item(), int(used.sum()), len(dead), time.time() - t_train)
            used[:] = False

    train_seconds = round(time.time() - t_train, 1)
    VQTokenizer(model.eval()).save_pretrained(cfg.out)
    report = _report_saved(cfg, held, train_seconds)
    Path(cfg.out, "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: held-out PSNR %.2f dB, round-trip shape %.2f colour %.2f", cfg.out, report["heldout_psnr_db"],
             report["roundtrip_shape_acc"], report["roundtrip_colour_acc"])
    return report
