"""Ingest under faults: a killed Ray worker, timeouts recovered by a re-run, an extended list, a straggler shard."""

import glob
import http.server
import json
import os
import signal
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.ingest import run_ingest
from pipeline.sources import SourceManifest

LOOPBACK = ("127.0.0.0/8",)


def _setup(web, tmp_path, paths, n_images):
    for i in range(n_images):
        Image.new("RGB", (96, 96), (i * 37 % 255, i * 11 % 255, 120)).save(web.root / f"i{i}.jpg")
    urls = [web.url(p) for p in paths]
    lst = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(len(urls))]}), lst)
    m = SourceManifest(name="f", task="und", url_lists=[str(lst)], filters={"dedup_near": False})
    return m, lst, urls


def _shard_rows(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{out}/[0-9]*.parquet"))])


def _kill_one_shard_worker(stop):
    """Kill the first Ray worker seen running a shard task (process title `ray::ingest-shard-...`)."""
    while not stop.is_set():
        for p in psutil.process_iter(["cmdline"]):
            if any("ingest-shard" in part for part in (p.info["cmdline"] or [])):
                os.kill(p.pid, signal.SIGKILL)
                return p.pid
        time.sleep(0.05)


def test_killed_worker_loses_no_row_and_rerun_downloads_nothing(ray_cluster, web, tmp_path):
    # every shard holds one URL the server answers only after a worker was killed: the kill lands mid-shard
    paths = [f"held/i{i}.jpg" if i % 4 == 0 else f"files/i{i}.jpg" for i in range(12)]
    m, _, urls = _setup(web, tmp_path, paths, 12)
    out = str(tmp_path / "out")
    stop = threading.Event()
    killed = []

    def kill_then_release():
        killed.append(_kill_one_shard_worker(stop))
        web.release()

    killer = threading.Thread(target=kill_then_release, daemon=True)
    killer.start()
    s = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=60)
    stop.set()
    assert killed and killed[0] is not None
    assert s["rows_in"] == 12 and s["ok"] == 12 and s["rows_in"] == s["ok"] + s["failed"] + s["filtered"]
    rows = _shard_rows(out)
    assert sorted(rows.column("url").to_pylist()) == sorted(urls)  # every row exactly once
    hits = sum(web.hits.values())
    s2 = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=5)
    assert sum(web.hits.values()) == hits and s2["shards_this_run"] == 0 and s2["ok"] == 12


def test_rerun_recovers_timeouts_into_new_shards_and_skips_404_and_extends(ray_cluster, web, tmp_path):
    """Over a row index partitioned on 3 actors (retried rows move to new shards, the ledger keeps their latest record)."""
    paths = ["files/i0.jpg", "slow/3/i1.jpg", "status/404", "files/i2.jpg"]
    m, lst, urls = _setup(web, tmp_path, paths, 5)
    out = str(tmp_path / "out")
    s = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=1, row_index_actors=3)
    assert s["row_index_parts"] == 3
    assert s["ok"] == 2 and s["failed_by_reason"] == {"timeout": 1, "http_404": 1}
    first = open(f"{out}/00000.tar", "rb").read()
    web.unslow()
    s = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=1, row_index_actors=3)
    assert s["ok"] == 3 and s["failed_by_reason"] == {"http_404": 1} and s["shards_total"] == 2
    assert web.hits["/status/404"] == 1 and web.hits["/files/i0.jpg"] == 1
    assert open(f"{out}/00000.tar", "rb").read() == first  # published shards are never rewritten
    recovered = pq.read_table(f"{out}/00001.parquet").to_pylist()
    assert [(r["url"], r["status"]) for r in recovered] == [(urls[1], "success")]
    # an extended list: only the new URL is downloaded, into a new shard
    pq.write_table(pa.table({"url": urls + [web.url("files/i4.jpg")], "caption": [f"image {i}" for i in range(5)]}), lst)
    before = sum(web.hits.values())
    s = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=1, row_index_actors=3)
    assert sum(web.hits.values()) == before + 1 and s["rows_in"] == 5 and s["ok"] == 4 and s["shards_total"] == 3
    ledger = {r["url"]: r for r in pq.read_table(f"{out}/_ledger.parquet").to_pylist()}
    assert ledger[urls[2]]["state"] == "failed_permanent" and ledger[urls[1]]["attempts"] == 2


def test_straggler_shard_gets_a_second_attempt_and_publishes_once(ray_cluster, web, tmp_path):
    paths = ["slow/4/i0.jpg", "files/i1.jpg"]
    m, _, urls = _setup(web, tmp_path, paths, 2)
    out = str(tmp_path / "out")
    def unslow_after_first_request():  # the first attempt is stuck in its sleep; a second one is fast
        deadline = time.time() + 60
        while not web.hits.get("/slow/4/i0.jpg") and time.time() < deadline:
            time.sleep(0.02)
        web.unslow()

    threading.Thread(target=unslow_after_first_request, daemon=True).start()
    s = run_ingest(m, out, shard_size=4, allow_networks=LOOPBACK, timeout=10, shard_deadline_s=1.0,
                   shard_wall_s=120)
    assert s["straggler_restarts"] == 1 and s["ok"] == 2 and s["shards_total"] == 1
    # one attempt published (the second, unless the first reached the web after the unslow), the other was cancelled
    assert json.loads(open(f"{out}/00000_stats.json").read())["attempt"] in ("a0", "a1")
    assert not glob.glob(f"{out}/_staging/*")
    assert sorted(_shard_rows(out).column("url").to_pylist()) == sorted(urls)
    assert web.hits["/slow/4/i0.jpg"] <= 2  # (on a loaded machine the first attempt may be cancelled before its request)


def test_cli_exits_1_when_a_shard_hangs_past_its_wall_time_and_a_rerun_finishes_it(ray_cluster, web, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from synergen.cli import app

    m, _, urls = _setup(web, tmp_path, ["slow/6/i0.jpg", "files/i1.jpg"], 2)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m.model_dump()))
    out = str(tmp_path / "out")
    args = ["ingest", str(tmp_path / "m.yaml"), "--out", out, "--shard-size", "4", "--allow-private-network"]
    res = CliRunner().invoke(app, [*args, "--shard-wall-s", "1.5", "--task-retries", "0"], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "failed all retries" in res.output
    ledger = pq.read_table(f"{out}/_ledger.parquet").to_pylist()
    assert {(r["state"], r["reason"], r["attempts"]) for r in ledger} == {("failed_retryable", "shard_failed", 1)}
    web.unslow()
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    ledger = pq.read_table(f"{out}/_ledger.parquet").to_pylist()
    assert sorted((r["url"], r["state"], r["shard"]) for r in ledger) == sorted([(urls[0], "ok", 1), (urls[1], "ok", 1)])


class _Throttling(http.server.BaseHTTPRequestHandler):
    """A host that answers every request slowly with 429 + Retry-After: an hour, and records its peak concurrency."""

    lock, active, peak, hits = threading.Lock(), 0, 0, 0

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.hits += 1
            cls.peak = max(cls.peak, cls.active)
        time.sleep(0.5)
        with cls.lock:
            cls.active -= 1
        self.send_response(429)
        self.send_header("Retry-After", "3600")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_throttling_host_gets_its_connection_share_and_retry_after_without_stalling_other_hosts(ray_cluster, web, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        busy = [f"http://127.0.0.1:{server.server_port}/img{i}.jpg" for i in range(6)]
        m, lst, urls = _setup(web, tmp_path, [f"files/i{i}.jpg" for i in range(6)], 6)
        pq.write_table(pa.table({"url": busy + urls, "caption": [f"c{i}" for i in range(12)]}), lst)
        t0 = time.time()
        s = run_ingest(m, str(tmp_path / "out"), shard_size=12, allow_networks=LOOPBACK, timeout=3, thread_count=8,
                       per_host_connections=4, max_in_flight=1)  # 2 attempts may run at once: 2 connections each
        assert time.time() - t0 < 600  # nobody waited for the hour of Retry-After
    finally:
        server.shutdown()
    assert s["ok"] == 6 and _Throttling.peak <= 2 and _Throttling.hits <= 2
    ledger = {r["url"]: r for r in pq.read_table(tmp_path / "out" / "_ledger.parquet").to_pylist()}
    assert {ledger[u]["state"] for u in busy} == {"failed_retryable"}
    assert {ledger[u]["reason"] for u in busy} == {"http_429", "throttled"}
