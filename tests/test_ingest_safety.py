"""Ingest stays safe and right over the real local web and Ray: trickling hosts, secrets in URLs, real-world images."""

import glob
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import netguard
from pipeline.ingest import run_ingest
from pipeline.sources import SourceManifest

LOOPBACK = ("127.0.0.0/8",)


def _manifest(lst, **kw):
    return SourceManifest(name="s", task="und", url_lists=[str(lst)], filters={"dedup_near": False, "dedup_exact": False},
                          **kw)


def _list(tmp_path, urls, **extra):
    lst = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(len(urls))], **extra}), lst)
    return lst


def _samples(out):
    """{caption: (json, decoded image)} of every sample in the output tars."""
    got = {}
    for tar in sorted(glob.glob(f"{out}/[0-9]*.tar")):
        with tarfile.open(tar) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(data)
                got[meta["caption"]] = (meta, Image.open(io.BytesIO(files[key + ".jpg"])))
    return got


def _ledger(out):
    return {r["url"]: r for r in pq.read_table(f"{out}/_ledger.parquet").to_pylist()}


def test_trickling_host_fails_as_timeout_within_the_deadline_and_rerun_finishes(ray_cluster, web, tmp_path):
    Image.new("RGB", (96, 96), "red").save(web.root / "a.jpg")
    urls = [web.url("trickle/body/a.jpg"), web.url("trickle/headers/a.jpg"), web.url("files/a.jpg")]
    m, out = _manifest(_list(tmp_path, urls)), str(tmp_path / "out")
    for run in (1, 2):
        t0 = time.monotonic()
        s = run_ingest(m, out, shard_size=10, allow_networks=LOOPBACK, timeout=5, download_deadline_s=2)
        assert time.monotonic() - t0 < 40  # without a total deadline this never returns
        assert s["ok"] == 1 and s["failed_by_reason"] == {"timeout": 2}
        ledger = _ledger(out)
        for url in urls[:2]:
            assert (ledger[url]["state"], ledger[url]["reason"], ledger[url]["attempts"]) == ("failed_retryable", "timeout", run)
    assert Path(out, "_summary.json").exists()


def test_shard_download_phase_is_bounded_as_a_whole(ray_cluster, web, tmp_path):
    Image.new("RGB", (96, 96), "red").save(web.root / "a.jpg")
    urls = [web.url(f"trickle/body/a.jpg?n={i}") for i in range(3)]
    t0 = time.monotonic()
    s = run_ingest(_manifest(_list(tmp_path, urls)), str(tmp_path / "out"), shard_size=10, allow_networks=LOOPBACK,
                   timeout=5, download_deadline_s=30, shard_download_deadline_s=2, thread_count=1)
    assert time.monotonic() - t0 < 25  # three 30 s downloads one after the other would take 90 s
    assert s["failed"] == 3 and set(s["failed_by_reason"]) <= {"timeout", "shard_deadline"}


def test_secrets_in_urls_never_reach_output_files_and_userinfo_is_refused(ray_cluster, web, tmp_path):
    Image.new("RGB", (96, 96), "blue").save(web.root / "b.jpg")
    host = web.base.removeprefix("http://")
    secrets = ["SIGSECRET123", "AKIASECRETKEY", "hunter2pass", "dnspassw0rd"]
    urls = [web.url("files/b.jpg?X-Amz-Signature=SIGSECRET123&X-Amz-Credential=AKIASECRETKEY&w=96"),
            f"http://alice:hunter2pass@{host}/files/b.jpg",
            "http://bob:dnspassw0rd@no-such-host.invalid/b.jpg"]
    out = str(tmp_path / "out")
    s = run_ingest(_manifest(_list(tmp_path, urls)), out, shard_size=10, allow_networks=LOOPBACK, timeout=5)
    assert s["ok"] == 1 and s["failed_by_reason"] == {"userinfo": 2}
    assert web.hits["/files/b.jpg"] == 1  # credentials were never sent
    ledger = _ledger(out)
    assert set(ledger) == {netguard.redact_url(u) for u in urls}
    assert ledger[netguard.redact_url(urls[0])]["state"] == "ok"
    texts = []
    for path in Path(out).rglob("*"):
        if path.parent.name == "_inputs":  # the job's partition of the URL list: URLs as given (documented), no password
            assert "hunter2pass" not in json.dumps(pq.read_table(path).to_pylist(), default=str)
            continue
        if path.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        elif path.suffix == ".tar":
            with tarfile.open(path) as tf:
                texts += [tf.extractfile(m).read().decode("latin-1") for m in tf if m.isfile()]
        elif path.is_file():
            texts.append(path.read_text(errors="replace"))
    blob = "\n".join(texts)
    assert "files/b.jpg?X-Amz-Signature=REDACTED" in blob
    for secret in secrets:
        assert secret not in blob


def test_images_are_stored_upright_8bit_with_input_sizes_kept_and_decoded_bytes_capped(ray_cluster, web, tmp_path):
    Image.fromarray(np.full((64, 80), 30000, np.uint16)).save(web.root / "g16.png")  # 16-bit gray
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8)).save(web.root / "rgba8.png")
    import cv2  # Pillow cannot write 16-bit RGBA; OpenCV can
    cv2.imwrite(str(web.root / "rgb16.png"), np.full((64, 64, 3), 30000, np.uint16))
    cv2.imwrite(str(web.root / "rgba16.png"), np.full((64, 64, 4), 30000, np.uint16))  # 8 bytes a pixel: over
    photo = Image.new("RGB", (80, 40), "red")
    photo.paste((0, 0, 255), (40, 0, 80, 40))  # left red, right blue; EXIF 6 = turn 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(web.root / "rot.jpg", exif=exif, quality=95)
    names = ["g16.png", "rgb16.png", "rot.jpg", "rgba8.png", "rgba16.png"]
    lst = _list(tmp_path, [web.url(f"files/{n}") for n in names], width=[[640], [641], [642], [643], [644]],
                height=[[480]] * 5)
    out = str(tmp_path / "out")
    s = run_ingest(_manifest(lst, extra_columns=["width", "height"]), out, shard_size=10, allow_networks=LOOPBACK,
                   max_decoded_bytes=64 * 64 * 6)  # 16-bit RGB: at the cap
    assert s["ok"] == 4 and s["failed_by_reason"] == {"decoded_cap": 1}
    got = _samples(out)
    assert abs(np.asarray(got["image 0"][1]).mean() - 30000 / 256) < 2  # not saturated white
    assert abs(np.asarray(got["image 1"][1].convert("RGB")).mean() - 30000 / 256) < 2
    meta, rot = got["image 2"]
    assert rot.size == (40, 80) and (meta["original_width"], meta["original_height"]) == (40, 80)
    top, bottom = np.asarray(rot)[5, 20], np.asarray(rot)[75, 20]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # upright: red above blue
    assert (meta["width"], meta["height"]) == ([642], [480])  # the input's columns, not the download's size
    table = pq.read_table(glob.glob(f"{out}/00000.parquet")[0]).to_pylist()
    assert [r["width"] for r in table] == [[640], [641], [642], [643], [644]]


def test_cli_reports_an_unreadable_url_list_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from synergen.cli import app

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not a parquet file at all")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\ntask: gen\nurl_lists: [{tmp_path / 'bad.parquet'}]\n")
    res = CliRunner().invoke(app, ["ingest", str(manifest), "--out", str(tmp_path / "out")])
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2 and "bad.parquet" in text and "re-export" in text
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # a clean exit, nothing raised


def test_bad_url_list_rows_are_counted_and_the_rest_ingests(ray_cluster, web, tmp_path):
    Image.new("RGB", (96, 96), "green").save(web.root / "c.jpg")
    lst = tmp_path / "l.jsonl"
    lst.write_text(f'{{"url": "{web.url("files/c.jpg")}", "caption": "fine"}}\n{{"url": "http://x/", "capt\n'
                   '{"url": "http://x/\\ud800", "caption": "lone surrogate"}\n')
    s = run_ingest(_manifest(lst), str(tmp_path / "out"), shard_size=10, allow_networks=LOOPBACK)
    assert (s["rows_in"], s["ok"], s["filtered_by_reason"]) == (3, 1, {"url_list_bad_row": 2})
    assert s["rows_in"] == s["ok"] + s["failed"] + s["filtered"]


def test_rerun_of_a_job_killed_while_hung_on_a_trickling_host_finishes(ray_cluster, web, tmp_path):
    import os
    import subprocess
    import sys

    Image.new("RGB", (96, 96), "red").save(web.root / "a.jpg")
    lst = _list(tmp_path, [web.url("trickle/body/a.jpg"), web.url("files/a.jpg")])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: k\ntask: und\nurl_lists: [{lst}]\nfilters: {{dedup_near: false}}\n")
    out = str(tmp_path / "out")
    # a driver whose download deadline is far away: it hangs on the trickling host until killed
    code = (f"from pipeline.ingest import run_ingest; run_ingest({str(manifest)!r}, {out!r}, shard_size=10, "
            f"allow_networks=('127.0.0.0/8',), download_deadline_s=3600, ray_address={ray_cluster.get_runtime_context().gcs_address!r})")
    driver = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 120
        while web.hits["/trickle/body/a.jpg"] == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert web.hits["/trickle/body/a.jpg"] == 1 and driver.poll() is None  # hung mid-download
    finally:
        driver.kill()
        driver.wait()
    # killed mid-download: the shard's input rows are durable, the shard is not published
    assert Path(out, "_inputs", "00000.parquet").exists() and not Path(out, "00000.parquet").exists()
    t0 = time.monotonic()
    s = run_ingest(str(manifest), out, shard_size=10, allow_networks=LOOPBACK, download_deadline_s=2)
    assert time.monotonic() - t0 < 40 and (s["ok"], s["failed_by_reason"]) == (1, {"timeout": 1})
    assert Path(out, "_summary.json").exists()


def test_normaliser_makes_every_mode_8bit_rgb_or_grey_with_transparency_on_white():
    from pipeline.image_decode import Normaliser

    def run(im, fmt="PNG", **save):
        b = io.BytesIO()
        im.save(b, fmt, **save)
        data, w, h, ow, oh, err = Normaliser()(io.BytesIO(b.getvalue()))
        assert err is None and (w, h) == (ow, oh) == im.size
        return Image.open(io.BytesIO(data))

    assert np.asarray(run(Image.new("RGB", (8, 8)), transparency=(0, 0, 0))).min() == 255  # colour key -> white
    assert np.asarray(run(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))).min() == 255
    assert run(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG").mode == "RGB"
    assert run(Image.new("P", (8, 8))).mode == "RGB" and run(Image.new("1", (8, 8))).mode == "L"
    assert netguard.parse_error_text(Normaliser()(io.BytesIO(b"<html>"))[-1])[0] == "undecodable"
