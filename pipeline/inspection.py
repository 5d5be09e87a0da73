"""`synergen inspect CATALOG_OR_SHARD [--html OUT]`: what a token dataset holds, and what its codes look like.

`summarize` gives the catalog summary (samples, image and text tokens by source and task, bytes, bytes
per sample, flagged shards). `write_html` renders N samples on one self-contained page: the image
decoded from its VQ codes (tiles re-assembled into their grid, tile borders in red, fold groups as a
thin grid), the thumbnail, the caption, the metadata, and the shard's quality figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import defaultdict

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from model.folding import Fold, unfold_codes
from pipeline.token_shards import iter_token_shard
from pipeline.catalog import CATALOG_NAME, read_catalog
from pipeline.inspection_config import InspectConfig
from synergen.errors import ConfigMismatchError, SynergenError

log = logging.getLogger(__name__)

DEFAULT_VQ = "model/assets/demo_vq"
VIEW_TILE = 192  # px per tile on the page (decoded tiles are upscaled with NEAREST to show codes sharply)


def _catalog_and_shards(target: str) -> tuple[list[dict], list[str]]:
    """(catalog rows, shard URLs) for a catalog file, its folder, or a single shard (then rows come from
    the catalog beside it when there is one)."""
    base = target.rstrip("/")
    if base.endswith(".tar"):
        folder = base.rsplit("/", 1)[0]
        name = base.rsplit("/", 1)[-1]
        fs, p = fsspec.core.url_to_fs(f"{folder}/{CATALOG_NAME}")
        rows = [r for r in read_catalog(folder) if r["path"] == name] if fs.exists(p) else []
        return rows, [base]
    folder = base[: -len(CATALOG_NAME) - 1] if base.endswith(CATALOG_NAME) else base
    rows = read_catalog(folder)
    return rows, [f"{folder}/{r['path']}" for r in rows]


def summarize(target: str) -> dict:
    """Catalog summary: totals and per-(source, task) groups."""
    rows, shards = _catalog_and_shards(target)
    if not rows:
        samples = list(iter_token_shard(shards[0]))
        fs, p = fsspec.core.url_to_fs(shards[0])
        rows = [{"path": shards[0].rsplit("/", 1)[-1], "source": samples[0].meta.get("source") if samples else None,
                 "task": samples[0].meta.get("task") if samples else None, "samples": len(samples),
                 "image_tokens": sum(s.n_image_tokens for s in samples), "text_tokens": sum(len(s.text_ids) for s in samples),
                 "bytes": fs.size(p), "flagged": False}]
    groups = defaultdict(lambda: {"shards": 0, "samples": 0, "image_tokens": 0, "text_tokens": 0, "bytes": 0})
    for r in rows:
        g = groups[(r["source"], r["task"])]
        g["shards"] += 1
        for k in ("samples", "image_tokens", "text_tokens", "bytes"):
            g[k] += int(r[k] or 0)
    for g in groups.values():
        g["bytes_per_sample"] = g["bytes"] / g["samples"] if g["samples"] else 0.0
    total = {k: sum(g[k] for g in groups.values()) for k in ("shards", "samples", "image_tokens", "text_tokens", "bytes")}
    total["bytes_per_sample"] = total["bytes"] / total["samples"] if total["samples"] else 0.0
    first = rows[0]
    return {
        "target": target, "total": total,
        "groups": [{"source": s, "task": t, **g} for (s, t), g in sorted(groups.items(), key=lambda kv: str(kv[0]))],
        "flagged": [r["path"] for r in rows if r.get("flagged")],
        "vq_model": first.get("vq_model"), "fold": first.get("fold"), "text_tokenizer": first.get("text_tokenizer"),
        "vocab_hash": first.get("vocab_hash"),
    }


def _png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_sample(vq, sample) -> tuple[Image.Image, Image.Image | None]:
    """Decode a sample's codes; return (tiles re-assembled with tile and fold-group lines, thumbnail or None)."""
    import torch

    from pipeline.tiling import to_images

    meta = sample.meta
    fold = Fold.parse(meta["fold"])
    gh, gw = meta["grid"]
    codes = unfold_codes(np.asarray(sample.codes, dtype=np.int64), fold, gh, gw)  # [n_images, gh, gw]
    images = to_images(vq.decode(torch.from_numpy(codes)))
    rows, cols = meta.get("tiles", [1, 1])
    thumb = images[rows * cols] if meta.get("thumbnail") and len(images) > rows * cols else None
    t = VIEW_TILE
    canvas = Image.new("RGB", (cols * t, rows * t), "white")
    for i, im in enumerate(images[: rows * cols]):
        canvas.paste(im.resize((t, t), Image.NEAREST), ((i % cols) * t, (i // cols) * t))
    draw = ImageDraw.Draw(canvas)
    # Fold groups: fh code rows x fw code columns -> a block of (t*fh/gh) x (t*fw/gw) view pixels.
    bh, bw = t * fold.fh / gh, t * fold.fw / gw
    for y in np.arange(0, rows * t, bh):
        draw.line([(0, y), (cols * t, y)], fill=(150, 150, 150), width=1)
    for x in np.arange(0, cols * t, bw):
        draw.line([(x, 0), (x, rows * t)], fill=(150, 150, 150), width=1)
    for r in range(rows + 1):
        draw.line([(0, r * t), (cols * t, r * t)], fill=(230, 0, 0), width=3)
    for c in range(cols + 1):
        draw.line([(c * t, 0), (c * t, rows * t)], fill=(230, 0, 0), width=3)
    if thumb is not None:
        thumb = thumb.resize((t, t), Image.NEAREST)
    return canvas, thumb


def load_vq_for(rows: list[dict], vq_url: str | None):
    """The VQ that made these codes: `vq_url`, or the demo VQ when the catalog names it."""
    from model.vq import VQTokenizer

    vq = VQTokenizer.from_pretrained(vq_url or DEFAULT_VQ)
    want = rows[0].get("vq_model") if rows else None
    if want and want != vq.model_id:
        raise ConfigMismatchError(
            f"the catalog's codes were made by VQ {want!r} but {vq_url or DEFAULT_VQ} is {vq.model_id!r}: "
            "pass --vq with the checkpoint the catalog names"
        )
    return vq


def inspect_dataset(cfg: InspectConfig) -> tuple[dict, str | None]:
    """`synergen inspect`: the summary, and the page's path when `cfg.html` asks for one."""
    return summarize(cfg.target), (write_html(cfg.target, cfg.html, n=cfg.n, vq_url=cfg.vq) if cfg.html else None)


def write_html(target: str, out: str, n: int = 8, vq_url: str | None = None) -> str:
    """Write the inspection page for the first `n` samples of the dataset (or shard) to `out`."""
    rows, shards = _catalog_and_shards(target)
    if not shards:
        raise SynergenError(f"{target} lists no token shards; nothing to inspect")
    vq = load_vq_for(rows, vq_url)
    by_path = {r["path"]: r for r in rows}
    summary = summarize(target)
    parts = []
    for url in shards:
        q = by_path.get(url.rsplit("/", 1)[-1], {})
        for s in iter_token_shard(url):
            if len(parts) >= n:
                break
            canvas, thumb = render_sample(vq, s)
            meta = {k: v for k, v in s.meta.items() if k != "caption"}
            quality = {k: q.get(k) for k in ("distinct_codes", "code_entropy", "psnr", "flagged")}
            thumb_html = f'<figure><img class="thumb" src="{_png_data_url(thumb)}"><figcaption>thumbnail</figcaption></figure>' if thumb else ""
            parts.append(
                f'<section class="sample" id="{html.escape(s.key)}"><div class="images">'
                f'<figure><img class="decoded" src="{_png_data_url(canvas)}"><figcaption>decoded from VQ codes: '
                f'tiles {meta.get("tiles")}, fold groups {meta.get("fold")}</figcaption></figure>{thumb_html}</div>'
                f'<div class="text"><p class="caption">{html.escape(s.meta.get("caption", ""))}</p>'
                f'<p>{s.codes.shape[0]} image(s) x {s.codes.shape[1]} positions, {len(s.text_ids)} text tokens</p>'
                f'<pre>{html.escape(json.dumps(meta, indent=1))}</pre>'
                f'<p class="quality">shard {html.escape(url.rsplit("/", 1)[-1])} quality: '
                f'{html.escape(json.dumps(quality))}</p></div></section>'
            )
        if len(parts) >= n:
            break
    t = summary["total"]
    groups = "".join(
        f"<tr><td>{html.escape(str(g['source']))}</td><td>{g['task']}</td><td>{g['shards']}</td><td>{g['samples']}</td>"
        f"<td>{g['image_tokens']}</td><td>{g['text_tokens']}</td><td>{g['bytes']}</td><td>{g['bytes_per_sample']:.0f}</td></tr>"
        for g in summary["groups"]
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>synergen inspect</title><style>
body{{font-family:sans-serif;margin:16px;background:#fff}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px}}
.sample{{display:flex;gap:16px;border-top:1px solid #ddd;padding:8px 0}} .images{{display:flex;gap:8px}} figure{{margin:0}}
.caption{{font-size:18px;font-weight:bold}} pre{{font-size:11px;background:#f6f6f6;max-width:520px;white-space:pre-wrap}}
</style></head><body><h1>{html.escape(target)}</h1>
<p>{t['samples']} samples in {t['shards']} shards, {t['bytes']} bytes ({t['bytes_per_sample']:.0f} bytes/sample);
VQ {html.escape(str(summary['vq_model']))}, fold {summary['fold']}, tokenizer {html.escape(str(summary['text_tokenizer']))}
({summary['vocab_hash']}); flagged shards: {len(summary['flagged'])}</p>
<table><tr><th>source</th><th>task</th><th>shards</th><th>samples</th><th>image tokens</th><th>text tokens</th><th>bytes</th><th>bytes/sample</th></tr>{groups}</table>
{''.join(parts)}</body></html>"""
    with fsspec.open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
