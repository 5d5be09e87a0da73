"""No packet towards a cloud metadata service or any other address: a whole small run, counted by listeners.

The run (the demo's steps at a tiny size: local web -> Ray ingest -> tokenize -> DeepSpeed training) goes in
a fresh network namespace where 169.254.169.254 (AWS/Azure/GCP metadata) and 198.51.100.7 (what
metadata.google.internal resolves to there) are real local addresses with listeners that count every
connection. Ray probes both names on every start unless stopped (synergen.local_ray).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUN = r"""
import json, socket, sys, threading, time
hits = []
def listen(ip, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        hits.append(f"{ip}:{port}")
        c.close()
for ip in ("169.254.169.254", "198.51.100.7"):
    for port in (80, 443):
        threading.Thread(target=listen, args=(ip, port), daemon=True).start()
time.sleep(0.2)
for ip in ("169.254.169.254", "198.51.100.7"):  # canaries: prove a connection would be counted
    socket.create_connection((ip, 80), timeout=2).close()
from pathlib import Path
from synergen.demo.run import DemoConfig, prepare_data, train_demo_model
t0 = time.time()
cfg = DemoConfig(out=sys.argv[1], n_images=16, n_eval=2, steps=2, stage1_share=0.5, warmup_steps=1)
Path(cfg.out).mkdir(parents=True)
prepare_data(cfg, Path(cfg.out), {"timings_s": {}},
             echo=lambda line: print(f"{time.time() - t0:6.1f}s {line}", file=sys.stderr, flush=True))
train_demo_model(cfg, Path(cfg.out))
print(f"{time.time() - t0:6.1f}s trained", file=sys.stderr)
time.sleep(0.5)
print("HITS " + json.dumps(sorted(hits)))
"""


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip") and shutil.which("mount")):
        return False
    return subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, unshare, ip and mount (network namespaces)")
def test_full_run_sends_nothing_to_metadata_or_other_addresses(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + "\n198.51.100.7 metadata.google.internal metadata\n")
    setup = (f"ip link set lo up && ip addr add 169.254.169.254/32 dev lo && ip addr add 198.51.100.7/32 dev lo && "
             f"mount --bind {hosts} /etc/hosts && exec {sys.executable} -c \"$RUN\" {tmp_path / 'demo'}")
    env = {**os.environ, "RUN": RUN, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["unshare", "-n", "-m", "sh", "-c", setup], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = json.loads(proc.stdout.rsplit("HITS ", 1)[1])
    assert hits == ["169.254.169.254:80", "198.51.100.7:80"]  # the two canaries, nothing else
    assert (tmp_path / "demo" / "train" / "all" / "model" / "config.json").exists()  # the run went all the way


def test_local_ray_services_find_the_bootstrap_config_and_workers_keep_the_real_home(ray_cluster):
    """How the probe is stopped, checked on the session's Ray (no namespace needed): Ray's dashboard runs with
    the HOME that holds ray_bootstrap_config.yaml, job workers with the user's HOME."""
    import psutil

    from synergen.local_ray import BOOTSTRAP_CONFIG, ray_home

    session = ray_cluster._private.worker._global_node.get_session_dir_path()
    dashboards = [p for p in psutil.process_iter(["cmdline"])
                  if any("dashboard/dashboard.py" in c for c in p.info["cmdline"] or [])
                  and f"--session-dir={session}" in (p.info["cmdline"] or [])]
    assert len(dashboards) == 1
    home = Path(dashboards[0].environ()["HOME"])
    assert home == ray_home() and (home / BOOTSTRAP_CONFIG).is_file()
    assert ray_cluster.get(ray_cluster.remote(lambda: os.environ["HOME"]).remote()) == str(Path.home())
