"""The CLI is thin: its options are the config models' fields (no default restated), a bad value is reported by
the flag that gave it (config files by file and key), and every option reaches the job it configures."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from model.init_config import InitConfig
from pipeline.ingest_config import IngestOptions
from pipeline.sources import load_source_manifest
from pipeline.tokenization_config import TokenizeConfig
from synergen.cli import app
from synergen.demo.config import DemoConfig, VQTrainConfig
from synergen.errors import ManifestError
from pipeline.inspection_config import InspectConfig
from train.generate_config import GenerateConfig
from train.mix_config import MixConfig


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command,model,excluded", [
    ("ingest", IngestOptions, ()), ("tokenize", TokenizeConfig, ()), ("generate", GenerateConfig, ()),
    ("vq-train", VQTrainConfig, ()), ("init", InitConfig, ()), ("inspect", InspectConfig, ()), ("mix", MixConfig, ()),
    ("demo", DemoConfig, ("model_overrides",)),  # a dict: no flag spells it
])
def test_command_options_are_the_config_fields_with_their_defaults(command, model, excluded):
    params = _params(command)
    fields = {}
    for name, f in model.model_fields.items():
        sub = getattr(f.annotation, "model_fields", None)
        fields |= sub if sub else {name: f}
    assert not set(excluded) & set(params)
    for name, f in ((n, f) for n, f in fields.items() if n not in excluded):
        assert name in params, f"`synergen {command}` has no option for {model.__name__}.{name}"
        if not f.is_required():
            want = f.get_default(call_default_factory=True)
            got = params[name].default
            assert (list(want) if isinstance(want, tuple) else want) == (list(got) if isinstance(got, tuple) else got), name
            assert params[name].help == f.description


def test_ingest_politeness_flags_exist_and_are_checked():
    params = _params("ingest")
    assert "--per-host-connections" in params["per_host_connections"].opts
    assert "--per-host-rps" in params["per_host_rps"].opts
    assert params["connect_audit"].hidden  # a test knob: settable, not advertised


@pytest.mark.parametrize("args,flag,fix", [
    (["--shard-size", "0"], "--shard-size", "greater than or equal to 1"),
    (["--per-host-connections", "0"], "--per-host-connections", "greater than or equal to 1"),
    (["--per-host-rps", "-1"], "--per-host-rps", "greater than 0"),
    (["--allow-networks", "127.0.0.1/8"], "--allow-networks", "127.0.0.0/8"),
    (["--timeout", "0"], "--timeout", "greater than 0"),
    (["--encode-quality", "101"], "--encode-quality", "less than or equal to 100"),
])
def test_a_bad_ingest_option_is_named_by_its_flag_before_anything_runs(tmp_path, args, flag, fix):
    res = CliRunner().invoke(app, ["ingest", "no-such-manifest.yaml", "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert f"{flag}:" in res.output and fix in res.output and "key '" not in res.output, res.output
    assert isinstance(res.exception, (SystemExit, type(None)))  # no traceback
    assert not (tmp_path / "out").exists()  # nothing ran


def test_tokenize_errors_name_flags_of_nested_fields_and_validators():
    res = CliRunner().invoke(app, ["tokenize", "--raw", "a", "--out", "b", "--task", "gen", "--vq", "v", "--tokenizer", "t",
                                   "--fold", "2by8", "--max-flagged-share", "2"])
    assert res.exit_code == 2
    assert "--fold: fold '2by8' is not ROWSxCOLS" in res.output and "--max-flagged-share:" in res.output, res.output


@pytest.mark.parametrize("command,args,flag", [
    ("demo", ["--n-images", "10", "--n-eval", "10"], "--n-eval"),
    ("demo", ["--fold", "2"], "--fold"),
    ("demo", ["--loss-reduction", "mean"], "--loss-reduction"),
    ("vq-train", ["--holdout", "3000"], "--holdout"),
    ("vq-train", ["--lr", "0"], "--lr"),
    ("init", ["llm-folder", "--template", "jinja"], "--template"),
    ("init", ["llm-folder", "--fold", "2x0"], "--fold"),
])
def test_demo_and_vq_train_refuse_bad_values_by_flag_before_any_work(tmp_path, command, args, flag):
    res = CliRunner().invoke(app, [command, "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and f"{flag}:" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_a_config_file_error_still_names_the_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "task": "both", "url_lists": ["a.parquet"]}))
    with pytest.raises(ManifestError) as e:
        load_source_manifest(str(p))
    assert str(p) in str(e.value) and "key 'task'" in str(e.value) and "--task" not in str(e.value)


def test_run_ingest_rejects_a_misspelt_option_naming_it():
    from pipeline.ingest import run_ingest
    from synergen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"key 'shard_sise'.*valid keys here: shard_size"):
        run_ingest("unused.yaml", "unused", shard_sise=4)


def test_generate_refuses_both_directions_and_an_unreadable_image_by_name(tmp_path):
    res = CliRunner().invoke(app, ["generate", "m", "--vq", "v", "--caption", "a", "--image", "x.png"])
    assert res.exit_code == 2 and "--image:" in res.output and "not both" in res.output, res.output

    common = [str(tmp_path / "no-model"), "--vq", str(tmp_path / "no-vq")]  # images are read before any model loads
    (tmp_path / "not.png").write_text("text, not an image")
    res = CliRunner().invoke(app, ["generate", *common, "--image", str(tmp_path / "not.png")])
    assert res.exit_code == 2 and f"{tmp_path / 'not.png'}: not a readable image" in res.output
    res = CliRunner().invoke(app, ["generate", *common, "--image", str(tmp_path / "missing.png")])
    assert res.exit_code == 2 and "no such file" in res.output and isinstance(res.exception, (SystemExit, type(None)))


def test_ingest_flags_reach_the_shard_tasks(ray_cluster, web, tmp_path):
    """--shard-size sets the shards, --per-host-rps paces each task's downloads (split over 2 attempts at once)."""
    for i in range(8):
        Image.new("RGB", (96, 96), (30 * i, 90, 120)).save(web.root / f"i{i}.jpg")
    pq.write_table(pa.table({"url": [web.url(f"files/i{i}.jpg") for i in range(8)], "caption": [f"c{i}" for i in range(8)]}),
                   tmp_path / "l.parquet")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "t", "task": "gen", "url_lists": [str(tmp_path / "l.parquet")],
                                        "filters": {"min_side": 32, "dedup_near": False}}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["ingest", str(manifest), "--out", str(out), "--allow-networks", "127.0.0.0/8",
                                   "--shard-size", "4", "--max-in-flight", "1", "--per-host-rps", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] == 8 and summary["shards_total"] == 2
    for stats in out.glob("*_stats.json"):  # 4 starts at 1/s per attempt: at least 3 s (unpaced: well under 1 s)
        assert json.loads(stats.read_text())["duration"] >= 2.9


@pytest.mark.parametrize("args,want", [
    ([], "--run: give a mixture manifest"),
    (["m.yaml"], "--steps: planning a mixture needs"),
    (["m.yaml", "--run", "r"], "--run: give a mixture manifest"),
])
def test_mix_names_the_missing_or_conflicting_flag_once(args, want):
    res = CliRunner().invoke(app, ["mix", *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and want in res.output and res.output.count("  --") == 1, res.output


def test_configs_check_their_mode_when_built_from_python_too():
    from pydantic import ValidationError

    for build in (lambda: MixConfig(), lambda: MixConfig(mixture="m.yaml"),
                  lambda: GenerateConfig(model="m", vq="v")):
        with pytest.raises(ValidationError):
            build()


def test_an_image_too_big_to_decode_is_named_not_a_traceback(tmp_path, monkeypatch):
    from PIL import Image

    from synergen.errors import SynergenError
    from train.generate import open_image

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice this PIL raises a DecompressionBombError
    with pytest.raises(SynergenError, match="big.png: too many pixels"):
        open_image(str(tmp_path / "big.png"))
