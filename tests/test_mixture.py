"""Mixture manifests, weight resolution, the shipped manifests, `synergen mix`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from synergen.cli import app
from synergen.errors import ManifestError
from tests.test_data import tokenizer, write_source  # noqa: F401 - tokenizer is a fixture
from train.mixture import MixtureManifest, SourceSize, plan_mixture, plan_warnings, resolve_weights
from train.sequence import LayoutIds

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
    with pytest.raises(ManifestError, match=rf"bad\.yaml[\s\S]*{match}"):
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


def test_mix_plan_counts_epochs_and_warns(tmp_path, tokenizer):  # noqa: F811
    root = str(tmp_path / "tokens")
    write_source(root, "big", "gen", [100, 100], tokenizer, seed=1)
    write_source(root, "small", "gen", [5], tokenizer, seed=2)
    write_source(root, "empty", "gen", [], tokenizer)
    m = MixtureManifest.model_validate({"name": "p", "data_root": root, "seq_len": 64, "tasks": {"gen": {"global_batch": 10, "sources": {
        "big": {"catalogs": ["big"], "weight": 1}, "small": {"catalogs": ["small"], "weight": 1},
        "empty": {"catalogs": ["empty"], "weight": 1}, "gone": {"catalogs": ["gone"], "weight": 1}}}}})
    plans, warnings = plan_mixture(m, steps=40, ids=LayoutIds.from_tokenizer(tokenizer))
    by = {p.source: p for p in plans}
    assert by["big"].samples == pytest.approx(200) and by["big"].epochs == pytest.approx(1.0)
    assert by["small"].samples == pytest.approx(200) and by["small"].epochs == pytest.approx(40.0)
    text = "\n".join(plan_warnings(plans, max_epochs=4))
    assert "small: will repeat 40.0 times" in text and "empty: empty" in text and "gone: catalog missing" in text
    assert "big" not in text

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(m.model_dump(mode="json", exclude_none=True)))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    result = CliRunner().invoke(app, ["mix", str(p), "--steps", "40", "--tokenizer", str(tmp_path / "tok")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "40.00" in result.output and "will repeat" in result.output
    result = CliRunner().invoke(app, ["mix", str(p), "--steps", "40"], terminal_width=200)
    assert result.exit_code == 2 and "--tokenizer" in result.output and "Traceback" not in result.output
