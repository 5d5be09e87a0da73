"""`ray job submit` of the ingest and tokenize jobs, through infra/launch/submit_*.sh, to a real Ray head
(`ray start --head` with the dashboard) with the repository as working directory, on the local web
server and moto's S3.

The head is a separate cluster from the session's in-process `ray_cluster` fixture: its own free ports,
its own temp dir and token (token auth on, as on a real cluster), stopped by signalling its own
`ray start --block` process, never `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from synergen.local_ray import ray_service_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_VQ = REPO / "model" / "assets" / "demo_vq"
DEMO_TOKENIZER = REPO / "model" / "assets" / "demo_tokenizer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head --block` process group; `env` is what a client needs to reach its job API."""

    def __init__(self, num_cpus: int = 2):
        self.tmp = tempfile.mkdtemp(prefix="synergen-rayhead-")  # short: Ray's socket paths must fit 107 bytes
        token = Path(self.tmp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.token = token.read_text()
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        # Our own address and token only (an in-process ray.init() of this session sets RAY_AUTH_MODE and may
        # have a RAY_AUTH_TOKEN of its own).
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env = {
            **env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints run `synergen` from this venv
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_ADDRESS": self.address,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain; stop at once
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine head: every Ray service on 127.0.0.1
        }
        ports = ["--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"]
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--include-dashboard=true",
               "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--dashboard-port", str(self.dashboard), "--temp-dir", self.tmp,
               "--disable-usage-stats"]
        for flag in ports:
            cmd += [flag, str(free_port())]
        self.log = open(Path(self.tmp) / "head.log", "w")
        # Ray's services without their cloud-metadata probe (synergen.local_ray); clients keep self.env.
        self.proc = subprocess.Popen(cmd, env=ray_service_env(self.env), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout=90)

    def _wait_ready(self, timeout: float) -> None:
        req = urllib.request.Request(f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.time() + timeout
        while True:
            try:
                json.loads(urllib.request.urlopen(req, timeout=2).read())
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray head did not come up: {Path(self.tmp, 'head.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def alive_in_group(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> bool:
        """SIGTERM to `ray start` (it stops its own processes); SIGKILL the group only for stragglers.

        Returns whether the graceful stop left nothing behind.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 10
        while self.alive_in_group() and time.time() < deadline:
            time.sleep(0.2)
        clean = not self.alive_in_group()
        if not clean:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return clean


@pytest.fixture(scope="module")
def ray_head(s3):
    head = RayHead(num_cpus=2)
    yield head
    assert head.stop(), "the Ray head did not stop cleanly on SIGTERM"


def submit(head: RayHead, script: str, *args: str, timeout: float = 240, diagnose=lambda: "") -> subprocess.CompletedProcess:
    r = subprocess.run([str(REPO / "infra" / "launch" / script), *args], cwd="/", env=head.env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}\n{diagnose()}"
    assert "succeeded" in r.stdout + r.stderr
    return r


def test_ingest_and_tokenize_jobs_submitted_to_a_ray_head_run_to_completion(ray_head, s3, web, tmp_path):
    from synergen.demo.corpus import write_demo_corpus, write_url_list

    rows = write_demo_corpus(web.root, n=8, seed=3, size=256)  # served as /files/NAME
    urls = write_url_list(rows, web.base, str(tmp_path / "urls.parquet"))
    manifest = tmp_path / "infra_demo.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "infra_demo", "task": "gen", "stages": ["S.1"], "url_lists": [urls],
        "url_column": "url", "caption_column": "caption",
        "filters": {"min_side": 64, "dedup_exact": False, "dedup_near": False},
    }))
    raw = f"{s3}/infra-job/raw/infra_demo"
    tokens = f"{s3}/infra-job/tokens/infra_demo"

    # The working dir is the repository (the scripts cd there), whatever the caller's cwd.
    submit(ray_head, "submit_ingest.sh", str(manifest), "--out", raw, "--shard-size", "4", "--allow-private-network")
    fs = fsspec.filesystem("s3")
    tars = sorted(fs.glob(f"{raw.removeprefix('s3://')}/*.tar"))
    assert len(tars) == 2, tars
    summary = json.loads(fs.cat(f"{raw.removeprefix('s3://')}/_summary.json"))
    assert summary["rows_in"] == 8 and summary["ok"] == 8, json.dumps(summary)[:3000]
    assert sum(n for path, n in web.hits.items() if "/files/" in path) >= 8, web.hits

    def flag_reasons() -> list:
        return [json.loads(fs.cat(p)).get("flag_reasons") for p in fs.glob(f"{tokens.removeprefix('s3://')}/*_stats.json")]

    submit(ray_head, "submit_tokenize.sh", "--raw", raw, "--out", tokens, "--task", "gen", "--vq", str(DEMO_VQ),
           "--tokenizer", str(DEMO_TOKENIZER), "--fold", "2x8", "--image-size", "64", diagnose=flag_reasons)
    with fs.open(f"{tokens.removeprefix('s3://')}/_catalog.parquet", "rb") as f:
        catalog = pq.read_table(f).to_pylist()
    assert catalog and sum(r["samples"] for r in catalog) == 8, catalog
    for r in catalog:  # paths are relative to the catalog's folder
        assert fs.exists(f"{tokens.removeprefix('s3://')}/{r['path']}"), r["path"]

    # Both jobs ran on this head, not on a Ray the driver started by itself.
    jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head.address], env=ray_head.env,
                          capture_output=True, text=True, timeout=60)
    assert jobs.stdout.count("SUCCEEDED") >= 2 and "synergen ingest" in jobs.stdout and "synergen tokenize" in jobs.stdout


def test_a_failing_job_fails_the_submit_script(ray_head, tmp_path):
    r = subprocess.run([str(REPO / "infra" / "launch" / "submit_ingest.sh"), str(tmp_path / "missing.yaml"),
                        "--out", str(tmp_path / "raw")], env=ray_head.env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "missing.yaml" in r.stdout + r.stderr
