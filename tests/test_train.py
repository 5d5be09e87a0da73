"""The trainer on real parts: the tiny SynerGen-VL model, the streaming loader over real token shards,
DeepSpeed's engine on CPU (one process in-process, one and two processes through the CLI and launcher)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from synergen.errors import SynergenError
from tests.conftest import free_port
from tests.train_corpus import make_corpus, write_train_config
from train.checkpoint import MARKER, list_tags
from train.config import STAGE_DEFAULTS, TrainConfig, TrainConfigError
from train.metrics import read_metrics
from train.trainer import lr_factor

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("train_corpus"))


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


# ---- config -------------------------------------------------------------------------------------------


def test_config_errors_name_the_file_the_key_and_the_fix(tmp_path, corpus):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "tiny", "mixture": corpus["mixture"], "steps": 2, "output_dir": "x", "lerning_rate": 1}))
    with pytest.raises(TrainConfigError, match=r"bad\.yaml[\s\S]*lerning_rate[\s\S]*valid keys here: .*\blr\b"):
        TrainConfig.load(str(bad))
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": "tiny", "steps": 2, "output_dir": "x"}))
    with pytest.raises(TrainConfigError, match=r"missing\.yaml[\s\S]*key 'mixture': Field required; fix: add it"):
        TrainConfig.load(str(missing))
    with pytest.raises(TrainConfigError, match="no such file"):
        TrainConfig.load(str(tmp_path / "nope.yaml"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    cfg = TrainConfig(model="tiny", mixture="m.yaml", steps=1, output_dir="x", deepspeed=str(ds))
    with pytest.raises(TrainConfigError, match=r"ds\.json has an 'optimizer'"):
        cfg.deepspeed_config(2, bf16=False)
    assert issubclass(TrainConfigError, SynergenError)


def test_the_run_folder_config_keeps_no_storage_credentials(tmp_path):
    from train.config import save_config

    opts = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9",
                                                                            "aws_session_token": "tok-123"},
            "token": {"refresh_token": "rt-456", "client_id": "cid-789"}, "api_keys": ["sk-abc"],
            "proxy": "http://user:pw-012@127.0.0.1:3128"}
    cfg = TrainConfig(model="tiny", mixture="m.yaml", steps=1, output_dir="x", data_options={"storage_options": opts})
    save_config(cfg, str(tmp_path / "train_config.yaml"))
    text = (tmp_path / "train_config.yaml").read_text()
    assert not [secret for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-123", "rt-456", "cid-789", "sk-abc", "pw-012")
                if secret in text]
    saved = yaml.safe_load(text)["data_options"]["storage_options"]
    assert saved["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9" and saved["secret"] == "REDACTED"
    assert cfg.data_options.storage_options["secret"] == "s3cr3t-value"  # the run itself keeps using them
    from pipeline.netguard import drop_redacted  # what `synergen mix --run` reads with: its own credentials

    assert drop_redacted(saved) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "proxy": saved["proxy"]}


def test_stage_defaults_follow_table_8():
    base = dict(model="tiny", mixture="m.yaml", steps=1000, output_dir="x")
    s1 = TrainConfig(stage=1, **base).resolved()
    s2 = TrainConfig(stage=2, **base).resolved()
    assert (s1.lr, s1.schedule, s1.warmup_steps, s1.weight_decay) == (1e-4, "constant", 200, 0.05)
    assert (s2.lr, s2.schedule, s2.weight_decay) == (5e-5, "cosine", 0.05)
    assert s1.betas == (0.9, 0.95) and s1.eps == 1e-8
    f1, f2 = lr_factor(s1), lr_factor(s2)
    assert f1(0) < f1(100) < f1(199) < 1.0 and f1(200) == f1(999) == 1.0  # constant after 200 warm-up steps
    assert f2(200) == pytest.approx(1.0) and f2(600) == pytest.approx(0.5, abs=0.01) and f2(1000) == pytest.approx(0.0, abs=1e-6)
    assert TrainConfig(stage=1, lr=3e-4, **base).resolved().lr == 3e-4  # an explicit value wins
    ds = TrainConfig(stage=1, grad_accum=3, grad_clip=0.5, **base).deepspeed_config(2, bf16=False)
    assert ds["gradient_accumulation_steps"] == 6 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert set(STAGE_DEFAULTS) == {1, 2, "sft"}


@pytest.mark.parametrize("name", ["demo", "stage1", "stage2"])
def test_shipped_train_configs_load(name):
    cfg = TrainConfig.load(str(REPO / "infra/train" / f"{name}.yaml")).resolved()
    assert (REPO / cfg.mixture).exists() and (REPO / cfg.deepspeed).exists()
    if name != "demo":
        assert cfg.stage == int(name[-1]) and cfg.lr == STAGE_DEFAULTS[cfg.stage]["lr"]


# ---- stages: frozen parameters stay bit-identical -------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parameters_untouched_under_each_stage(tmp_path, corpus, stage):
    from train.trainer import build_model, train

    cfg = TrainConfig.load(str(write_train_config(tmp_path / "cfg.yaml", corpus, tmp_path / "out", steps=2, stage=stage,
                                                  save_every=100, export=False)))
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(cfg, model=model)
    assert result.last_step == 2
    assert model.config._attn_implementation == "sdpa"  # attention "auto" on CPU: flex_attention cannot train here
    moved, frozen_moved = [], []
    for name, p in model.named_parameters():
        same = torch.equal(before[name], p.detach())
        if p.requires_grad and not same:
            moved.append(name)
        if not p.requires_grad and not same:
            frozen_moved.append(name)
    assert frozen_moved == []
    assert any(".image_mlp." in n for n in moved) and any("unfold_head." in n for n in moved)
    assert not any(n.startswith("model.layers.") and ".mlp." in n for n in moved)  # text FFNs frozen in stages 1 and 2
    assert not any("embed_tokens" in n or n.startswith("lm_head") for n in moved)
    attn_moved = any(n.startswith("model.layers.") and ".self_attn." in n for n in moved)
    assert attn_moved == (stage == 2)
    # Metrics of the run: per task, per source, throughput, data wait, lr, grad norm, realised mixture.
    rec = read_metrics(tmp_path / "out/metrics.jsonl")[-1]
    for key in ("loss/und", "loss/gen", "image_loss/gen", "source_loss/cap_a", "source_loss/gen_a", "tokens_per_s",
                "samples_per_s", "data_wait_fraction", "lr", "grad_norm"):
        assert key in rec and math.isfinite(rec[key]), key
    assert rec["mixture"]["tasks"]["und"]["global"]["cap_a"]["samples"] >= 1
    assert list((tmp_path / "out/tb").glob("events.out.tfevents.*"))


# ---- exact resume: one process, killed, newest checkpoint corrupt ---------------------------------------


def test_killed_run_resumes_with_identical_losses_past_a_corrupt_checkpoint(tmp_path, corpus):
    steps = 16
    synergen = str(BIN / "synergen")
    full = write_train_config(tmp_path / "full.yaml", corpus, tmp_path / "full", steps=steps, save_every=4, export=True)
    killed_out = tmp_path / "killed"
    killed = write_train_config(tmp_path / "killed.yaml", corpus, killed_out, steps=steps, save_every=4)

    proc = subprocess.Popen([synergen, "train", str(killed)], env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed_out / "checkpoints/step_00000008" / MARKER
    deadline = time.time() + 600  # a wait, not a timing check: generous for a loaded machine
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "training stopped before its step-8 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_tags(killed_out / "checkpoints")
    assert done and done[-1][0] < steps, f"the run finished before it was killed: {done}"

    subprocess.run([synergen, "train", str(full)], env=clean_env(), check=True, capture_output=True)
    # The newest complete checkpoint is corrupt (truncated), and a newer one is partial (no marker).
    last_step, last_tag = done[-1]
    states = killed_out / "checkpoints" / last_tag / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    partial = killed_out / "checkpoints" / f"step_{last_step + 4:08d}"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")

    res = subprocess.run([synergen, "train", str(killed), "--resume"], env=clean_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"step_{last_step + 4:08d} is unusable (partial" in res.stderr
    assert f"{last_tag} is unusable (file mp_rank_00_model_states.pt has" in res.stderr
    assert f"resuming from step_{last_step - 4:08d}" in res.stderr

    expected, got = step_losses(tmp_path / "full"), step_losses(killed_out)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bit-identical per-step losses, single process fp32 on CPU

    # The export loads with transformers' from_pretrained and computes the same loss as the trainer's last step.
    from model.modeling import SynerGenVLForCausalLM

    model = SynerGenVLForCausalLM.from_pretrained(str(tmp_path / "full/model"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (tmp_path / "full/model/tokenizer_config.json").exists()


# ---- two processes under the deepspeed launcher ---------------------------------------------------------


def test_two_process_deepspeed_run_resumes_within_tolerance(tmp_path, corpus):
    cfg = write_train_config(tmp_path / "two.yaml", corpus, tmp_path / "two", steps=6, save_every=3,
                             deepspeed=str(REPO / "infra/deepspeed/zero2_cpu.json"))

    def launch(*args) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()), str(BIN / "synergen"), "train", *args]
        res = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        return res

    launch(str(cfg))
    full = read_metrics(tmp_path / "two/metrics.jsonl")
    assert [r["step"] for r in full] == list(range(1, 7))
    # Both ranks trained: the global batch (4 + 4 samples) is split, and rank 0 saw only its half.
    mix = full[0]["mixture"]["tasks"]["und"]
    assert sum(v["samples"] for v in mix["global"].values()) == 4
    assert sum(v["samples"] for v in mix["rank"].values()) == 2
    assert full[-1]["loss"] < full[0]["loss"]

    shutil.copytree(tmp_path / "two", tmp_path / "resumed", ignore=shutil.ignore_patterns("step_00000006", "cache"))
    cfg2 = write_train_config(tmp_path / "resumed.yaml", corpus, tmp_path / "resumed", steps=6, save_every=3,
                              deepspeed=str(REPO / "infra/deepspeed/zero2_cpu.json"))
    launch(str(cfg2), "--resume")
    a, b = step_losses(tmp_path / "two"), step_losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 7))
    for s in range(4, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5), (s, a[s], b[s])
