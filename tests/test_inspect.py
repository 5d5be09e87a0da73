"""`synergen inspect`: the catalog summary, and the HTML page checked in headless Chromium."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from model.folding import Fold, unfold_codes
from model.vq import VQTokenizer
from pipeline.inspection import render_sample, summarize, write_html
from pipeline.tiling import to_images
from pipeline.token_shards import iter_token_shard
from synergen.cli import app
from tokenize_helpers import REPO_TOKENIZER, REPO_VQ


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A one-shard token dataset written through the shard contract (the Ray job is tested in test_tokenize)."""
    import random

    from model.folding import fold_codes
    from synergen.demo.corpus import caption, render, sample_scene
    from pipeline.text_tokenizer import load_text_tokenizer
    from pipeline.tiling import tile_image, to_pixels
    from pipeline.token_shards import TokenSample, TokenShardWriter
    from pipeline.catalog import vocab_hash, write_catalog

    root = tmp_path_factory.mktemp("inspect")
    vq, tok, rng = VQTokenizer.from_pretrained(REPO_VQ), load_text_tokenizer(REPO_TOKENIZER), random.Random(7)
    with TokenShardWriter(str(root / "tok" / "00000.tar")) as w:
        for i in range(3):
            scene = sample_scene(rng)
            t = tile_image(render(scene, 256), 64, 4, thumbnail=True)
            codes = fold_codes(vq.encode(to_pixels(t.images)).numpy(), Fold(2, 4)).astype(np.uint16)
            meta = {"key": f"{i:05d}", "source": "demo", "task": "und", "caption": caption(scene), "size": [256, 256],
                    "tiles": [t.rows, t.cols], "thumbnail": t.thumbnail, "grid": [8, 8], "fold": [2, 4]}
            ids = np.asarray(tok(meta["caption"], add_special_tokens=False)["input_ids"], dtype=np.int32)
            w.write(TokenSample(meta["key"], codes, ids, meta))
        pub = w.publish()
        row = {"path": "00000.tar", "source": "demo", "task": "und", "samples": w.n_samples, "image_tokens": w.n_image_tokens,
               "codes": w.n_codes, "text_tokens": w.n_text_tokens, **pub, "vq_model": vq.model_id, "codebook_size": 512,
               "fold": "2x4", "text_tokenizer": "demo_tokenizer", "vocab_hash": vocab_hash(tok), "distinct_codes": 100,
               "code_entropy": 6.0, "psnr": 20.0, "flagged": False}
    write_catalog(str(root / "tok"), [row])
    return root


def test_summary_counts(dataset):
    s = summarize(str(dataset / "tok" / "_catalog.parquet"))
    assert s["total"]["samples"] == 3 and s["total"]["shards"] == 1
    g = s["groups"][0]
    assert (g["source"], g["task"]) == ("demo", "und")
    assert g["bytes_per_sample"] == s["total"]["bytes"] / 3 and s["fold"] == "2x4"
    one = summarize(str(dataset / "tok" / "00000.tar"))  # a single shard works too
    assert one["total"]["samples"] == 3


def test_cli_prints_summary(dataset, tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(dataset / "tok"), "--html", str(tmp_path / "p.html"), "--n", "2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "bytes/sample" in res.output and (tmp_path / "p.html").exists()


def dominant_colour(img: Image.Image) -> np.ndarray:
    """Mean colour of the most saturated pixels (the drawn object, not the grey background)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    sat = a.max(1) - a.min(1)
    return a[sat >= np.quantile(sat, 0.9)].mean(0)


def test_page_renders_in_headless_chromium(dataset, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "install Debian's chromium (apt-get install -y --no-install-recommends chromium); .ci/run does"
    page = write_html(str(dataset / "tok"), str(tmp_path / "page.html"), n=1)
    html = open(page).read()
    sample = next(iter_token_shard(str(dataset / "tok" / "00000.tar")))
    assert sample.meta["caption"] in html and "quality" in html and "fold groups" in html
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    "--window-size=1000,700", f"--screenshot={shot}", f"file://{page}"],
                   check=True, timeout=60, capture_output=True)
    png = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)  # [H, W, 3]
    # The decoded image's dominant colour covers as many screenshot pixels as the drawn canvas holds.
    vq = VQTokenizer.from_pretrained(REPO_VQ)
    canvas, _ = render_sample(vq, sample)
    codes = unfold_codes(sample.codes.astype(np.int64), Fold(2, 4), 8, 8)
    colour = dominant_colour(to_images(vq.decode(torch.from_numpy(codes)))[0])
    expected = (np.abs(np.asarray(canvas, dtype=np.float32) - colour).max(-1) < 40).sum()
    near = np.abs(png - colour).max(-1) < 40
    assert expected > 200 and near.sum() >= 0.5 * expected, (colour, expected, near.sum())
    # ...and it sits where the page draws the image (left part, below the header), not in the text.
    ys, xs = np.nonzero(near)
    assert np.median(xs) < 500 and np.median(ys) > 150
