"""Ingest end to end over the real local web, local Ray and moto S3: every bad input lands in its own reason."""

import glob
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.ingest import run_ingest
from pipeline.sources import SourceManifest, UrlListError

LOOPBACK = ("127.0.0.0/8",)


def _images(web, n, size=(160, 120)):
    names = []
    for i in range(n):
        name = f"img{i}.jpg"
        Image.new("RGB", size, (i * 20 % 255, 90, 200 - i * 10 % 200)).save(web.root / name, quality=90)
        names.append(name)
    return names


def _manifest(path, **filters):
    return SourceManifest(name="t", task="gen", url_lists=[path], extra_columns=["punsafe"],
                          filters={"min_side": 64, "dedup_near": False, **filters})


def _write_list(path, urls, captions, punsafe=None):
    pq.write_table(pa.table({"url": urls, "caption": captions, "punsafe": punsafe or [0.1] * len(urls)}), path)
    return str(path)


def _check_summary(s):
    assert s["rows_in"] == s["ok"] + s["failed"] + s["filtered"]
    for shard in s["shards"].values():
        assert shard["rows"] == shard["ok"] + shard["failed"] + shard["filtered"]


def test_ingest_local_every_bad_input_counted(ray_cluster, web, tmp_path):
    names = _images(web, 6)
    Image.new("RGB", (40, 40)).save(web.root / "tiny.jpg")
    (web.root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (web.root / "page.html").write_text("<html>hi</html>")
    Image.new("1", (20000, 20000)).save(web.root / "bomb.png")
    u = web.url
    rows = [
        (u(f"files/{names[0]}"), "a good image"), (u(f"files/{names[1]}"), "another good image"),
        (u(f"files/{names[0]}"), "the same url again"),                       # duplicate_url
        (u(f"files/{names[2]}"), ""),                                         # caption_empty
        (u(f"files/{names[3]}"), b"\xff\xfe not utf8"),                        # caption_not_utf8
        (u("status/404"), "missing"), (u("status/500"), "server error"), (u("reset"), "reset"),
        (u(f"slow/5/{names[4]}"), "too slow"), (u(f"truncated/{names[5]}"), "cut short"),
        (u("files/corrupt.jpg"), "corrupt"), (u("files/page.html"), "html page"),
        (u("files/bomb.png"), "a decompression bomb"), (u("files/tiny.jpg"), "too small"),
        ("http://169.254.169.254/latest/meta-data/", "metadata service"),
        (u("redirect?to=http://169.254.169.254/latest/meta-data/"), "redirect to metadata"),
        (u("redirect?to=http://10.0.0.1/x.jpg"), "redirect to private"), ("http://10.0.0.1/x.jpg", "private"),
        (u(f"robots/noai/{names[1]}"), "opted out"),
    ]
    (tmp_path / "l.csv").write_bytes(b"url,caption,punsafe\n" + b"".join(
        url.encode() + b"," + (c if isinstance(c, bytes) else c.encode()) + b",0.1\n" for url, c in rows))
    audit = tmp_path / "connects.txt"
    s = run_ingest(_manifest(str(tmp_path / "l.csv")), str(tmp_path / "out"), shard_size=8, allow_networks=LOOPBACK,
                   timeout=1.0, connect_audit=str(audit), thread_count=8)
    _check_summary(s)
    assert s["rows_in"] == len(rows) and s["ok"] == 2
    assert s["filtered_by_reason"] == {"duplicate_url": 1, "caption_empty": 1, "caption_not_utf8": 1, "image_too_small": 1}
    fr = s["failed_by_reason"]
    assert fr["blocked_address"] == 4 and fr["http_404"] == 1 and fr["http_500"] == 1 and fr["timeout"] == 1
    assert fr["connection_reset"] == 1 and fr["truncated"] == 1 and fr["undecodable"] == 1 and fr["not_image"] == 1
    assert fr["pixel_cap"] == 1 and fr["opted_out"] == 1
    # the workers never connected anywhere but loopback (they resolve and refuse first)
    assert audit.exists() and {line.split()[0] for line in audit.read_text().split()} <= {"127.0.0.1"}
    # one row per input row across shard parquets; the ledger agrees
    shard_rows = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(str(tmp_path / "out" / "[0-9]*.parquet")))])
    assert shard_rows.num_rows == len(rows) and len(set(shard_rows.column("row_id").to_pylist())) == len(rows)
    assert set(shard_rows.column("status").to_pylist()) <= {"success", "failed_to_download", "failed_to_resize", "filtered"}
    ledger = pq.read_table(tmp_path / "out" / "_ledger.parquet").to_pylist()
    dup = next(r for r in ledger if r["reason"] == "duplicate_url")
    assert dup["dup_of"] == next(r["row_id"] for r in ledger if r["url"] == rows[0][0] and r["state"] == "ok")
    states = {r["state"] for r in ledger}
    assert states == {"ok", "filtered", "opted_out", "failed_retryable", "failed_permanent"}
    assert all(r["row_id"].startswith(r["url_hash"] + "-") for r in ledger)  # one URL identity everywhere
    samples = list(wds.WebDataset(sorted(glob.glob(str(tmp_path / "out" / "*.tar"))), shardshuffle=False).decode("pil"))
    assert len(samples) == 2 and {x["txt"] for x in samples} == {"a good image", "another good image"}
    assert samples[0]["jpg"].size == (160, 120)  # original size kept (resize_mode "no")


def test_ingest_to_s3_reads_back_with_webdataset(ray_cluster, web, s3, tmp_path):
    names = _images(web, 5)
    _images_dup = web.root / "copy.jpg"
    _images_dup.write_bytes((web.root / names[0]).read_bytes())
    urls = [web.url(f"files/{n}") for n in names] + [web.url("files/copy.jpg")]
    lst = _write_list(tmp_path / "l.parquet", urls, [f"caption {i}" for i in range(6)], [0.1, 0.1, 0.1, 0.9, 0.1, 0.1])
    m = _manifest(lst, metadata={"punsafe": {"max": 0.5}})
    s = run_ingest(m, f"{s3}/ingest", shard_size=4, allow_networks=LOOPBACK)
    _check_summary(s)
    assert s["ok"] == 4 and s["filtered_by_reason"] == {"punsafe_above_max": 1, "duplicate_exact": 1}
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("synergen-test/ingest")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json",
        "_fragments", "_inputs", "_ledger.parquet", "_summary.json"]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("synergen-test/ingest/_fragments")) == ["00000.parquet", "00001.parquet"]
    local = tmp_path / "dl"
    fs.get("synergen-test/ingest/", str(local), recursive=True)
    samples = list(wds.WebDataset(sorted(str(p) for p in local.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 4 and all(json.loads(x["json"])["status"] == "success" for x in samples)
    ledger = pq.read_table(local / "_ledger.parquet").to_pylist()
    # shards run in parallel: whichever copy claims first is kept, the other records the key it duplicates
    dup = next(r for r in ledger if r["reason"] == "duplicate_exact")
    kept = next(r for r in ledger if r["row_id"] == dup["dup_of"])
    assert {dup["url"], kept["url"]} == {urls[0], urls[-1]} and kept["state"] == "ok"


def test_missing_url_column_fails_before_any_download(ray_cluster, web, tmp_path):
    pq.write_table(pa.table({"link": [web.url("files/x.jpg")], "caption": ["x"], "punsafe": [0.1]}), tmp_path / "l.parquet")
    with pytest.raises(UrlListError, match="'url'"):
        run_ingest(_manifest(str(tmp_path / "l.parquet")), str(tmp_path / "out"), allow_networks=LOOPBACK)
    assert sum(web.hits.values()) == 0
