"""Test services, all real: a local web server, moto's S3 server on loopback, a local Ray cluster.

Environment is set before anything starts so Ray workers inherit it: dummy AWS credentials and
`AWS_ENDPOINT_URL` pointing at moto, so every s3fs/pyarrow client in any process talks to loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; yields the endpoint URL (env already points at it)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start; is moto[server] installed?")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_shm_buffers():
    """DeepSpeed's CPU all-reduce leaves its shared-memory buffers (`/dev/shm/deepspeed_allreduce_buffer_*`, ~66 MB
    each, two per multi-rank run) behind when a run ends; a day of test sessions filled this machine's /dev/shm
    (19 GB) until Ray's memory monitor killed tasks. The session removes the ones its runs made."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    for path in (set(shm.glob("deepspeed_allreduce_buffer_*")) - before) if shm.is_dir() else ():
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _aws_env(request):
    """Dummy credentials for every test; the endpoint is set by `s3`. Real credentials never leak in."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3(s3_server):
    """A fresh bucket on the moto server; yields `s3://bucket` with AWS_ENDPOINT_URL set for all clients."""
    import s3fs

    os.environ["AWS_ENDPOINT_URL"] = s3_server
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("synergen-test")
    yield "s3://synergen-test"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster started once per test session (after moto, so workers inherit its env)."""
    import ray

    from synergen.local_ray import init_ray

    os.environ["AWS_ENDPOINT_URL"] = s3_server
    init_ray(num_cpus=2, log_to_driver=False,
             runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_server, "NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def web(tmp_path):
    """A local web server over a fresh folder; tests write the files it serves into `web.root`."""
    from synergen.demo.localweb import LocalWeb

    root = tmp_path / "www"
    root.mkdir()
    server = LocalWeb(root).start()
    server.root = root
    yield server
    server.stop()
