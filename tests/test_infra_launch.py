"""infra/launch/train_multinode.sh on this one machine: a hostfile naming `localhost slots=2` makes
DeepSpeed's launcher start two CPU ranks of `synergen train`, which train the tiny model a few steps.
On several nodes the same script reads /job/hostfile (see infra/launch/hostfile.example)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.train_corpus import make_corpus, write_train_config
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "infra" / "launch" / "train_multinode.sh"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("launch_corpus"))


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DEEPSPEED=str(BIN / "deepspeed"), MASTER_PORT=str(free_port()), **extra)
    return env


def test_multinode_script_trains_the_tiny_model_with_two_processes_from_a_hostfile(tmp_path, corpus):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine, two ranks\nlocalhost slots=2\n")
    cfg = write_train_config(tmp_path / "stage1.yaml", corpus, tmp_path / "run", steps=3, save_every=100,
                             deepspeed="infra/deepspeed/zero2_cpu.json")  # relative: resolved in the repo root
    r = subprocess.run([str(SCRIPT), str(cfg)], cwd=REPO, env=launch_env(HOSTFILE=str(hostfile)),
                       capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    # The script handed DeepSpeed the hostfile and a local rendezvous, and skipped the ssh probe for localhost.
    assert f"--hostfile {hostfile}" in out and "--master_addr 127.0.0.1" in out and "--no_ssh_check" in out
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics)  # finite, real losses
    # Two ranks: rank 0 saw half of each global batch.
    und = metrics[0]["mixture"]["tasks"]["und"]
    assert sum(v["samples"] for v in und["global"].values()) == 2 * sum(v["samples"] for v in und["rank"].values())


def test_multinode_script_refuses_more_nodes_than_the_hostfile_names(tmp_path, corpus):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = write_train_config(tmp_path / "c.yaml", corpus, tmp_path / "run")
    r = subprocess.run([str(SCRIPT), str(cfg)], cwd=REPO, env=launch_env(HOSTFILE=str(hostfile), NUM_NODES="2"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NUM_NODES=2" in r.stderr and str(hostfile) in r.stderr
