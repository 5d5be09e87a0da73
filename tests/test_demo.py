"""The demo's steps end to end at a smaller size: corpus -> local web -> Ray ingest -> tokenize with the tiny
trained VQ -> DeepSpeed stage 1 then all parameters -> generation both ways -> learning check -> HTML report."""

from __future__ import annotations

import json

from synergen.demo.run import DemoConfig, named_object, run_demo
from train.metrics import read_metrics


def test_named_object_reads_the_first_colour_and_shape():
    assert named_object("two red circles, on the left and on the right") == ("red", "circle")
    assert named_object("a blue square at the top and a green triangle at the bottom") == ("blue", "square")
    assert named_object("square the") == (None, "square")


def test_demo_runs_end_to_end_at_a_small_size(tmp_path, ray_cluster):
    cfg = DemoConfig(out=str(tmp_path / "demo"), n_images=200, n_eval=8, steps=24, stage1_share=0.25, warmup_steps=4)
    lines: list[str] = []
    report = run_demo(cfg, echo=lines.append)
    out = tmp_path / "demo"
    stats = json.loads((out / "demo_stats.json").read_text())

    # Counts reconcile from the URL list to the token shards.
    ing = stats["ingest"]
    assert ing["rows_in"] == 192 == ing["ok"] + ing["failed"] + ing["filtered"]
    assert ing["ok"] > 150  # the local web serves every file; only filters may drop some
    for task in ("gen", "und"):
        tok = stats["tokenize"][task]
        assert tok["tokenized"] + sum(tok["filtered"].values()) == ing["ok"]
        assert tok["flagged_shards"] == []  # the trained VQ passes the quality gate

    # Both stages trained through DeepSpeed, their losses went down, the export loads.
    s1, s2 = stats["train"]["stage1"], stats["train"]["all"]
    assert (s1["steps"], s2["steps"]) == (6, 18)
    recs = read_metrics(out / "train/all/metrics.jsonl")
    assert recs[-1]["loss"] < read_metrics(out / "train/stage1/metrics.jsonl")[0]["loss"]
    assert (out / "train/all/model/config.json").exists() and (out / "train/all/checkpoints").is_dir()

    # The learning check ran on every held-out sample, both ways, and the report shows it.
    ev = stats["eval"]
    assert ev["n"] == 8 and len(ev["samples"]) == 8
    assert 0 <= ev["image_match"] <= 1 and 0 <= ev["caption_match"] <= 1 and abs(ev["chance"] - 1 / 12) < 1e-9
    for s in ev["samples"]:
        assert (out / "report/samples" / s["generated_image"]).stat().st_size > 100
        assert isinstance(s["generated_caption"], str)
    page = report.read_text()
    assert report == out / "report/index.html"
    assert "Learning check" in page and "loss.png" in page and ev["samples"][0]["caption"] in page
    assert (out / "report/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("learning check" in line for line in lines)
