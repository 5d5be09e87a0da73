"""Guards around an ingest job's output folder and its records: one job per folder, a file the job did not write
is never silently taken for its shard, input columns JSON has no type for, throttled rows keep their attempts."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import rawshard as R
from pipeline.ingest import IngestError, OutputLease, _pid_namespace, _records, run_ingest
from pipeline.sources import SourceManifest

LOOPBACK = ("127.0.0.0/8",)


def _lease_file(out, **fields):
    os.makedirs(out, exist_ok=True)
    lease = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
             "started": time.time(), "renewed": time.time(), **fields}
    with open(os.path.join(out, R.LEASE), "w") as f:
        json.dump(lease, f)


def test_a_second_job_on_a_folder_stops_naming_the_first_before_touching_anything(tmp_path):
    out = str(tmp_path / "out")
    _lease_file(out)  # a live job of this host (this very process)
    m = SourceManifest(name="g", task="gen", url_lists=[str(tmp_path / "missing.parquet")])
    with pytest.raises(IngestError, match=rf"another ingest \(host {socket.gethostname()}, pid {os.getpid()}, renewed 0 s "
                                          r"ago\) is writing to .*out: run one ingest per output folder"):
        run_ingest(m, out)
    assert sorted(os.listdir(out)) == [R.LEASE]  # nothing planned, nothing cleaned up, the lease left alone
    assert json.load(open(os.path.join(out, R.LEASE)))["token"] == "other"


def test_a_lease_is_taken_over_when_stale_or_its_process_is_gone_and_a_holder_stops_when_taken_over(tmp_path):
    out = str(tmp_path / "out")
    fs, root = fsspec.core.url_to_fs(out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # a live job in another pid namespace of a host of the same name (a container) is not taken for a dead pid
    _lease_file(out, pid=gone.pid, pidns=-1)
    with pytest.raises(IngestError, match="another ingest"):
        OutputLease(fs, root, out).acquire()
    for stale in ({"pid": gone.pid}, {"host": "elsewhere", "renewed": time.time() - 61}):
        _lease_file(out, **stale)
        lease = OutputLease(fs, root, out)
        lease.acquire()
        assert json.load(open(os.path.join(out, R.LEASE)))["token"] == lease.me["token"]
        lease.release()
        assert not os.path.exists(os.path.join(out, R.LEASE))
    # the holder renews from a thread, through long phases too, and stops when another job took the lease over
    lease = OutputLease(fs, root, out)
    lease.RENEW_S = 0.05
    lease.acquire()
    first = json.load(open(os.path.join(out, R.LEASE)))["renewed"]
    time.sleep(0.5)
    assert json.load(open(os.path.join(out, R.LEASE)))["renewed"] > first
    lease.check()
    _lease_file(out, host="elsewhere")
    time.sleep(0.5)
    with pytest.raises(IngestError, match="host elsewhere"):
        lease.check()
    lease.release()  # not ours any more: left in place
    assert json.load(open(os.path.join(out, R.LEASE)))["host"] == "elsewhere"


def test_an_output_that_is_a_file_is_named(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    m = SourceManifest(name="g", task="gen", url_lists=[str(tmp_path / "missing.parquet")])
    with pytest.raises(IngestError, match="out.txt is a file; give --out a folder"):
        run_ingest(m, str(out))


def test_throttled_rows_keep_their_attempts_and_refused_ones_use_one():
    rows = [{"row_id": f"r{i}-0", "rid64": i, "url": f"http://127.0.0.1:9/{i}.jpg", "key": f"0000{i}", "prefilter": None,
             "dup_of": None, "attempts": 1, "caption": ""} for i in range(2)]
    from pipeline.netguard import FetchError, error_text

    # what politeness returns for a row it kept from being requested, and what a server's 503 gives
    meta = {0: {"status": "failed_to_download", "error_message": error_text(FetchError("throttled", "over budget", True))},
            1: {"status": "failed_to_download", "error_message": error_text(FetchError("http_503", "unavailable", True))}}
    from pipeline.sources import FilterConfig

    fc = FilterConfig(dedup_exact=False, dedup_near=False).model_dump()
    recs = _records(rows, 0, meta, {}, fc, None)
    assert [(r["state"], r["reason"], r["attempts"]) for r in recs] == [("failed_retryable", "throttled", 1),
                                                                         ("failed_retryable", "http_503", 2)]


def test_a_shard_parquet_the_job_did_not_write_stops_it_naming_the_file(ray_cluster, web, tmp_path):
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 20, 90)).save(web.root / f"g{i}.jpg")
    pq.write_table(pa.table({"url": [web.url(f"files/g{i}.jpg") for i in range(4)], "caption": ["c"] * 4}),
                   tmp_path / "l.parquet")
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "00001.parquet")  # a stray copy where shard 1 will go
    m = SourceManifest(name="g", task="gen", url_lists=[str(tmp_path / "l.parquet")],
                       filters={"dedup_exact": False, "dedup_near": False})
    with pytest.raises(IngestError, match=r"00001.parquet appeared while this run made shard 00001 .*move it away"):
        run_ingest(m, str(out), shard_size=2, allow_networks=LOOPBACK)
    assert not (out / R.LEASE).exists()  # released however the job ended


def test_an_input_column_json_has_no_type_for_goes_in_as_text(ray_cluster, web, tmp_path):
    import datetime

    Image.new("RGB", (64, 64), (200, 20, 90)).save(web.root / "t.jpg")
    when = datetime.datetime(2024, 5, 1, 12, 30)
    pq.write_table(pa.table({"url": [web.url("files/t.jpg")], "caption": ["c"], "crawled": pa.array([when])}),
                   tmp_path / "l.parquet")
    m = SourceManifest(name="t", task="gen", url_lists=[str(tmp_path / "l.parquet")], extra_columns=["crawled"],
                       filters={"dedup_exact": False, "dedup_near": False})
    s = run_ingest(m, str(tmp_path / "out"), shard_size=2, allow_networks=LOOPBACK)
    assert s["ok"] == 1 and s["shards_failed"] == {}
    (sample,) = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert json.loads(sample["json"])["crawled"] == str(when)
    shutil.rmtree(tmp_path / "out")


def test_retry_after_reads_delay_seconds_and_http_dates():
    """RFC 9110 allows both forms; an HTTP-date used to read as a 1 s pause."""
    import email.utils

    from pipeline.politeness import MAX_RETRY_AFTER_S, retry_after_s

    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_after_s("HTTP 429; Retry-After 5") == 5.0
    assert 25 < retry_after_s(f"HTTP 503; Retry-After {in_30s}") <= 30
    assert retry_after_s("HTTP 503") == retry_after_s("HTTP 503; Retry-After soon") == 1.0
    assert retry_after_s("HTTP 429; Retry-After 99999999") == MAX_RETRY_AFTER_S
    assert retry_after_s(f"HTTP 429; Retry-After {email.utils.formatdate(time.time() - 60, usegmt=True)}") == 0.0
