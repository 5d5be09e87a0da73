"""The demo's report: one HTML page with the loss curves and the mixture weights per step (PNG), stage statistics,
samples beside targets, and the learning check's figures against chance. Written to `OUT/report/index.html`."""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from train.metrics import read_metrics


def _plot_runs(runs: dict[str, Path], png: Path, height: float, series, ylabel: str, style_axes) -> Path:
    """Each run's metrics.jsonl on one step axis, runs one after the other (a grey line where one ends);
    `series(recs)` names the (key, label, line style) to draw, `style_axes(ax)` finishes the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, height), dpi=100)
    offset = 0
    for name, path in runs.items():
        recs = read_metrics(path)
        steps = [offset + r["step"] for r in recs]
        for key, label, style in series(recs):
            ax.plot(steps, [r.get(key, float("nan")) for r in recs], style, label=f"{name}: {label}")
        if recs:
            offset = steps[-1]
            ax.axvline(offset, color="grey", lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    style_axes(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_losses(runs: dict[str, Path], png: Path) -> Path:
    """Loss per task over the steps of each run, runs placed one after the other on the step axis."""
    def series(recs):
        return [(key, key.split("/")[1], style) for key, style in (("loss/und", "-"), ("loss/gen", "--"))
                if any(key in r for r in recs)]

    def axes(ax):
        ax.set_yscale("log")
        ax.legend()

    return _plot_runs(runs, png, 4, series, "loss (gen: text + 2 x code CE)", axes)


def plot_weights(runs: dict[str, Path], png: Path) -> Path:
    """The weight each source was sampled with at every step (`weight/TASK/SOURCE` of metrics.jsonl), runs one after
    the other on the step axis: static weights are flat lines, a schedule steps, online reweighting moves."""
    def series(recs):
        return [(key, key[len("weight/"):], "-") for key in sorted({k for r in recs for k in r if k.startswith("weight/")})]

    def axes(ax):
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)

    return _plot_runs(runs, png, 3, series, "sampling weight", axes)


def plot_plan_vs_run(rows, png: Path) -> Path:
    """Planned beside realised per source (`train.mixture.compare_run` rows): samples, tokens and epochs, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r.plan.task}/{r.plan.source}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.2 * len(rows) + 3), 3.6), dpi=100)
    for ax, (what, planned, got) in zip(axes, (
            ("samples", [r.plan.samples for r in rows], [r.samples for r in rows]),
            ("tokens", [r.plan.tokens for r in rows], [r.tokens for r in rows]),
            ("epochs", [r.plan.epochs for r in rows], [r.epochs for r in rows]))):
        ax.bar(x - 0.2, planned, 0.4, label="planned")
        ax.bar(x + 0.2, got, 0.4, label="realised")
        ax.set_title(what)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def _table(rows: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return html.escape(str(v))

    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(out: Path, stats: dict[str, Any]) -> Path:
    """Write `out/report/index.html` (+ loss.png, sample images) from the demo's statistics."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    train = stats["train"]
    plot_losses({name: Path(s["metrics"]) for name, s in train.items()}, rep / "loss.png")
    plot_weights({name: Path(s["metrics"]) for name, s in train.items()}, rep / "weights.png")
    ev = stats["eval"]
    targets = rep / "targets"
    targets.mkdir(exist_ok=True)
    for s in ev["samples"]:
        shutil.copy(out / "www" / s["target"], targets / s["target"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>synergen demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}td.ok{background:#dfd}td.bad{background:#fdd}"
        "img.s{width:96px;height:96px;image-rendering:pixelated}</style></head><body>",
        "<h1>synergen demo: shapes corpus, end to end</h1>",
        "<h2>Learning check (held-out captions and images)</h2>",
        _learning_check(ev),
        "<h2>Loss curves</h2><img src='loss.png' alt='loss curves'>",
        "<h2>Mixture weights per step</h2><img src='weights.png' alt='sampling weight of each source per step'>",
        "<h2>Stages</h2>",
        *_stage_sections(stats),
        _samples(ev["samples"]),
        "</body></html>",
    ]
    page = rep / "index.html"
    page.write_text("\n".join(parts))
    return page


def _learning_check(ev: dict[str, Any]) -> str:
    return _table([
        ("held-out samples", ev["n"]),
        ("generated images: dominant shape and colour match", f"{ev['image_match']:.0%} (chance {ev['chance']:.0%})"),
        ("generated images: colour / shape alone", f"{ev['image_colour']:.0%} / {ev['image_shape']:.0%} "
                                                     f"(chance {ev['chance_colour']:.0%} / {ev['chance_shape']:.0%})"),
        ("ceiling: the target itself after a VQ round trip, classified", f"{ev['vq_ceiling']:.0%} "
                                                                          f"(colour alone {ev['vq_ceiling_colour']:.0%})"),
        ("generated captions: name the right shape and colour", f"{ev['caption_match']:.0%} (chance {ev['chance']:.0%})"),
        ("generated captions: colour / shape alone", f"{ev['caption_colour']:.0%} / {ev['caption_shape']:.0%}"),
    ])


def _stage_sections(stats: dict[str, Any]) -> list[str]:
    """A heading and a table per stage: ingest, tokenize per task, train per stage, timings."""
    ing = stats["ingest"]
    parts = ["<h3>Ingest (local web -> raw shards, Ray)</h3>", _table([
        ("rows in", ing.get("rows_in")), ("ok", ing.get("ok")), ("failed", ing.get("failed")),
        ("filtered", ing.get("filtered")), ("shards", ing.get("shards_total")), ("samples/s", ing.get("samples_per_s"))])]
    for task, t in stats["tokenize"].items():
        parts += [f"<h3>Tokenize ({task})</h3>", _table([
            ("samples in", t.get("samples_in")), ("tokenized", t.get("tokenized")), ("filtered", t.get("filtered")),
            ("shards", t.get("shards")), ("bytes", t.get("bytes")), ("image tokens", t.get("image_tokens")),
            ("text tokens", t.get("text_tokens")), ("samples/s", t.get("samples_per_s")),
            ("encoder busy fraction", t.get("encoder_busy_fraction"))])]
    for name, s in stats["train"].items():
        parts += [f"<h3>Train: {html.escape(name)}</h3>", _table([
            ("steps", s["steps"]), ("loss, first 10% of steps", s["loss_first"]), ("loss, last 10%", s["loss_last"]),
            ("und loss, last 10%", s["loss_und_last"]), ("gen loss, last 10%", s["loss_gen_last"]),
            ("tokens/s", s["tokens_per_s"]), ("samples/s", s["samples_per_s"]),
            ("data-wait fraction of step time", s["data_wait_fraction"]), ("packing efficiency", s["packing_efficiency"]),
            ("seconds in steps", s["seconds"])])]
    return parts + ["<h3>Timings (s)</h3>", _table(list(stats["timings_s"].items()))]


def _samples(samples: list[dict[str, Any]]) -> str:
    """Each held-out caption beside its target, the generated image (and its class), the generated caption."""
    rows = ["<h2>Samples</h2><table><tr><th>held-out caption</th><th>target</th><th>generated image</th><th>classified as</th>"
            "<th>generated caption for the target</th></tr>"]
    for s in samples:
        ok_i = "ok" if s["image_ok"] else "bad"
        ok_c = "ok" if s["caption_ok"] else "bad"
        rows.append(
            f"<tr><td>{html.escape(s['caption'])}</td><td><img class='s' src='targets/{html.escape(s['target'])}'></td>"
            f"<td class='{ok_i}'><img class='s' src='samples/{html.escape(s['generated_image'])}'></td>"
            f"<td class='{ok_i}'>{html.escape(' '.join(str(x) for x in s['classified'][::-1]))}</td>"
            f"<td class='{ok_c}'>{html.escape(s['generated_caption'])}</td></tr>")
    return "\n".join([*rows, "</table>"])
