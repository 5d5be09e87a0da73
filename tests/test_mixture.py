"""Mixture manifests, weight resolution, the shipped manifests, `synergen mix`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.tokenshard import write_catalog
from synergen.cli import app
from synergen.errors import ManifestError
from train.mixture import MixtureManifest, SourceSize, plan_mixture, plan_warnings, resolve_weights

REPO = Path(__file__).resolve().parents[1]


def _manifest(**task) -> MixtureManifest:
    return MixtureManifest.model_validate({"name": "m", "tasks": {"und": {"global_batch": 10, **task}}})


def test_natural_temperature_and_schedule_weights():
    sizes = {"big": SourceSize(900, 9000), "small": SourceSize(100, 4000)}
    srcs = {"big": {"catalogs": ["big"]}, "small": {"catalogs": ["small"]}}
    nat = resolve_weights(_manifest(weighting="natural", sources=srcs), "und", 0, sizes)
    assert nat == pytest.approx({"big": 0.9, "small": 0.1})
    nat_tok = resolve_weights(_manifest(weighting="natural", unit="tokens", sources=srcs), "und", 0, sizes)
    assert nat_tok == pytest.approx({"big": 9 / 13, "small": 4 / 13})
    temp = resolve_weights(_manifest(weighting="temperature", alpha=0.5, sources=srcs), "und", 0, sizes)
    assert temp == pytest.approx({"big": 30 / 40, "small": 10 / 40})
    m = MixtureManifest.model_validate({"name": "s", "tasks": {"und": {"global_batch": 4, "sources": {
        "big": {"catalogs": ["big"], "weight": 1}, "small": {"catalogs": ["small"], "weight": 1}}}},
        "schedule": [{"at_step": 100, "weights": {"und": {"small": 3}}}]})
    assert resolve_weights(m, "und", 99, sizes) == pytest.approx({"big": 0.5, "small": 0.5})
    assert resolve_weights(m, "und", 100, sizes) == pytest.approx({"big": 0.25, "small": 0.75})
    assert m.mixture_id(99) != m.mixture_id(100)
    # an empty source is left out instead of starving the sampler
    assert resolve_weights(m, "und", 0, {"big": SourceSize(5, 50), "small": SourceSize(0, 0)}) == {"big": 1.0}


@pytest.mark.parametrize("bad, match", [
    ({"tasks": {"und": {"global_batch": 4, "sources": {"a": {"catalogs": ["a"], "weight": 1, "wieght": 2}}}}}, "wieght"),
    ({"tasks": {"und": {"global_batch": 0, "sources": {"a": {"catalogs": ["a"], "weight": 1}}}}}, "global_batch"),
    ({"tasks": {"und": {"global_batch": 4, "sources": {"a": {"catalogs": ["a"], "weight": 1}}}},
      "schedule": [{"at_step": 5, "weights": {"und": {"b": 1}}}]}, "unknown sources"),
])
def test_bad_manifest_names_file_and_key(tmp_path, bad, match):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "bad", **bad}))
    with pytest.raises(ManifestError, match=rf"bad\.yaml.*{match}"):
        MixtureManifest.load(str(p))


def test_shipped_manifests_mirror_the_paper():
    s1 = MixtureManifest.load(str(REPO / "manifests/mixtures/stage1.yaml"))
    s2 = MixtureManifest.load(str(REPO / "manifests/mixtures/stage2.yaml"))
    demo = MixtureManifest.load(str(REPO / "manifests/mixtures/demo.yaml"))
    assert (s1.seq_len, s1.max_tiles, s1.thumbnail, s1.tasks["gen"].global_batch) == (4096, 1, False, 6988)
    assert (s2.seq_len, s2.max_tiles, s2.thumbnail, s2.tasks["und"].global_batch) == (8192, 6, True, 5090)
    assert {"laion_aesthetics", "megalith", "sam_gen", "objects365_gen", "imagenet1k"} == set(s1.tasks["gen"].sources)
    assert {"laion_en", "coyo", "sam_und"} == set(s1.tasks["und"].sources)
    assert len(s2.tasks["und"].sources) == 26 and "journeydb" in s2.tasks["gen"].sources
    assert set(demo.tasks) == {"und", "gen"}


def _catalog(root: str, name: str, task: str, samples: list[int], groups: int = 256) -> None:
    rows = [{"path": f"{name}-{i}.tar", "source": name, "task": task, "samples": n, "image_tokens": n * groups, "codes": n * groups * 16,
             "text_tokens": n * 20, "bytes": 1, "sha256": "0" * 64, "vq_model": "emu3", "codebook_size": 32768, "fold": "2x8",
             "text_tokenizer": "t", "vocab_hash": "h"} for i, n in enumerate(samples)]
    write_catalog(f"{root}/{task}/{name}", rows)


def test_mix_plan_counts_epochs_and_warns(tmp_path):
    root = str(tmp_path / "tokens")
    _catalog(root, "big", "gen", [1000, 1000])
    _catalog(root, "small", "gen", [50])
    _catalog(root, "empty", "gen", [])
    m = MixtureManifest.model_validate({"name": "p", "data_root": root, "tasks": {"gen": {"global_batch": 100, "sources": {
        "big": {"catalogs": ["gen/big"], "weight": 1}, "small": {"catalogs": ["gen/small"], "weight": 1},
        "empty": {"catalogs": ["gen/empty"], "weight": 1}, "gone": {"catalogs": ["gen/gone"], "weight": 1}}}}})
    plans, warnings = plan_mixture(m, steps=40)
    by = {p.source: p for p in plans}
    assert by["big"].samples == pytest.approx(2000) and by["big"].epochs == pytest.approx(1.0)
    assert by["small"].samples == pytest.approx(2000) and by["small"].epochs == pytest.approx(40.0)
    text = "\n".join(plan_warnings(plans, max_epochs=4))
    assert "small: will repeat 40.0 times" in text and "empty: empty" in text and "gone: catalog missing" in text
    assert "big" not in text

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(m.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["mix", str(p), "--steps", "40"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "2,000" in result.output and "40.00" in result.output and "will repeat" in result.output


def test_mix_plan_in_tokens_draws_fewer_long_samples(tmp_path):
    root = str(tmp_path / "tokens")
    _catalog(root, "long", "gen", [1000], groups=256)
    _catalog(root, "short", "gen", [1000], groups=4)
    m = MixtureManifest.model_validate({"name": "t", "data_root": root, "tasks": {"gen": {"global_batch": 100, "unit": "tokens",
        "sources": {"long": {"catalogs": ["gen/long"], "weight": 1}, "short": {"catalogs": ["gen/short"], "weight": 1}}}}})
    plans, _ = plan_mixture(m, steps=10)
    by = {p.source: p for p in plans}
    assert by["long"].tokens == pytest.approx(by["short"].tokens) and by["short"].samples > 5 * by["long"].samples
    assert by["long"].samples + by["short"].samples == pytest.approx(1000)
