"""End-to-end tokenize runs on local services: local Ray, moto S3, the trained demo VQ and BPE."""

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import psutil
import pytest
import torch
import webdataset as wds

from model.folding import Fold, fold_codes, unfold_codes
from model.vq import VQTokenizer, tiny_emu3_config
from pipeline.text_tokenizer import load_text_tokenizer
from pipeline.tokenization import QualityThresholds, TokenizeConfig, run_tokenize
from pipeline.token_shards import decode_token_sample
from pipeline.catalog import read_catalog
from tokenize_helpers import REPO_TOKENIZER, REPO_VQ, write_raw_shards

# Thresholds for the demo VQ on 64-px images (its shards measure ~150 distinct codes, ~6 bits, >20 dB).
DEMO_GATE = QualityThresholds(min_distinct_codes=24, min_entropy_bits=3.5, min_psnr_db=14.0, max_flagged_share=0.0)


def cfg(raw, out, task="und", **kw):
    base = dict(raw=raw, out=out, task=task, vq=REPO_VQ, tokenizer=REPO_TOKENIZER, fold="2x4", image_size=64,
                max_tiles=4, thumbnail=True, batch_size=8, quality=DEMO_GATE, psnr_images=2)
    return TokenizeConfig(**{**base, **kw})


def read_all(out):
    """Every sample of every shard of the catalog, read with plain webdataset and the documented one-liner."""
    fs, root = fsspec.core.url_to_fs(out)
    samples = []
    for row in read_catalog(out):
        url = f"{out}/{row['path']}"
        with fsspec.open(url, "rb") as f:
            data = f.read()
        local = io.BytesIO(data)
        with tarfile.open(fileobj=local) as tar:  # readable by plain tar, every member one sample
            assert len(tar.getnames()) == row["samples"]
        path = f"/tmp/_i6_{os.getpid()}_{row['path']}"
        with open(path, "wb") as f:
            f.write(data)
        ds = wds.WebDataset(path, shardshuffle=False).map(lambda s: decode_token_sample(s.get("sgt") or s["sgt.zst"], s["__key__"]))
        got = list(ds)
        os.remove(path)
        assert len(got) == row["samples"]
        samples += got
    return samples


@pytest.fixture(scope="module")
def vq():
    return VQTokenizer.from_pretrained(REPO_VQ)


def test_understanding_end_to_end_local(ray_cluster, tmp_path, vq):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "tok")
    info = write_raw_shards(raw, 2, 6, seed=1, broken={0: ["too_small", "decode_error"], 1: ["decode_error"]})
    s = run_tokenize(cfg(raw, out))
    # Counts reconcile: ingest successes = tokenized + filtered, by reason.
    assert s["raw_successes"] == info["successes"] == s["samples_in"] == 15
    assert s["filtered"] == {"too_small": 1, "decode_error": 2} == info["bad"]
    assert s["tokenized"] == 12 and s["shards"] == 2 and not s["flagged_shards"]
    assert 0 < s["encoder_busy_fraction"] <= 1
    rows = read_catalog(out)
    assert [r["path"] for r in rows] == ["00000.tar", "00001.tar"]
    r0 = rows[0]
    assert r0["vq_model"] == vq.model_id and r0["codebook_size"] == 512 and r0["fold"] == "2x4"
    assert r0["text_tokenizer"] == "demo_tokenizer" and len(r0["vocab_hash"]) == 16
    assert r0["distinct_codes"] >= 24 and r0["psnr"] > 14 and r0["flagged"] is False
    assert len(r0["sha256"]) == 64 and r0["bytes"] > 0
    samples = read_all(out)
    tok = load_text_tokenizer(REPO_TOKENIZER)
    fold = Fold(2, 4)
    for smp in samples:
        m = smp.meta
        assert m["caption"] == info["captions"][smp.key]
        assert tok.decode(smp.text_ids.tolist()) == m["caption"]
        rows_, cols_ = m["tiles"]
        assert smp.codes.shape == (rows_ * cols_ + int(m["thumbnail"]), 8, 8) and smp.codes.dtype == np.uint16
        assert m["grid"] == [8, 8] and m["fold"] == [2, 4] and m["size"] == [256, 256] and len(m["sha256"]) == 64
        grid = unfold_codes(smp.codes, fold, 8, 8)
        assert np.array_equal(fold_codes(grid, fold), smp.codes)
    # The codes of a shard decode to images of the tile size.
    pix = vq.decode(torch.from_numpy(unfold_codes(samples[0].codes.astype(np.int64), fold, 8, 8)))
    assert pix.shape == (samples[0].codes.shape[0], 3, 64, 64)


def test_generation_end_to_end_s3_compressed_and_rerun_does_nothing(ray_cluster, s3):
    raw, out = f"{s3}/raw_gen", f"{s3}/tok_gen"
    info = write_raw_shards(raw, 2, 5, seed=2)
    s = run_tokenize(cfg(raw, out, task="gen", compress=True))
    assert s["tokenized"] == info["successes"] == 10 and s["filtered"] == {}
    samples = read_all(out)
    assert all(x.codes.shape == (1, 8, 8) and x.meta["tiles"] == [1, 1] for x in samples)
    fs, root = fsspec.core.url_to_fs(out)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root) if not p.endswith(".idx.npy"))  # loader index sidecars
    assert names == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "_catalog.parquet", "_summary.json"]
    before = {r["path"]: r["sha256"] for r in read_catalog(out)}
    again = run_tokenize(cfg(raw, out, task="gen", compress=True))
    assert again["shards_written_now"] == 0 and again["shards_skipped"] == 2 and again["tokenized"] == 10
    assert {r["path"]: r["sha256"] for r in read_catalog(out)} == before
    # A shard lost after publishing (its stats gone) is re-made with the same bytes.
    fs.rm(f"{root}/00001_stats.json")
    third = run_tokenize(cfg(raw, out, task="gen", compress=True))
    assert third["shards_written_now"] == 1
    assert {r["path"]: r["sha256"] for r in read_catalog(out)} == before


def _encoder_pid() -> int | None:
    """Pid of this test's Ray worker hosting the EncodeImages actor (its process title names the class)."""
    for p in psutil.Process().children(recursive=True):  # the local Ray instance runs under this process
        try:
            if any("EncodeImages" in part for part in p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    return None


def _kill_encoder_after_first_shard(out: Path, stop: threading.Event) -> dict:
    """From outside the job: once the first token shard's stats file appears (so the encoder has encoded at
    least one batch), SIGKILL the encoder actor's worker, then watch for the worker Ray restarts in its place."""
    seen: dict = {"killed": None, "stats_at_kill": None, "restarted": None}
    while not stop.is_set():
        if seen["killed"] is None and list(out.glob("*_stats.json")):
            pid = _encoder_pid()
            if pid is not None:
                seen["stats_at_kill"] = len(list(out.glob("*_stats.json")))
                os.kill(pid, signal.SIGKILL)
                seen["killed"] = pid
        elif seen["killed"] is not None:
            pid = _encoder_pid()
            if pid is not None and pid != seen["killed"]:
                seen["restarted"] = pid
                return seen
        time.sleep(0.02)
    return seen


def test_killed_actor_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    raw, out = str(tmp_path / "raw"), tmp_path / "tok"
    n_shards = 6
    info = write_raw_shards(raw, n_shards, 10, seed=3, broken={1: ["decode_error"]})
    stop = threading.Event()
    seen: dict = {}
    killer = threading.Thread(target=lambda: seen.update(_kill_encoder_after_first_shard(out, stop)), daemon=True)
    killer.start()
    # batch_size=1: many encoder calls, so the kill lands while most shards still have batches to encode.
    s = run_tokenize(cfg(raw, str(out), task="gen", batch_size=1))
    stop.set()
    killer.join(timeout=10)
    assert seen["killed"] is not None and not psutil.pid_exists(seen["killed"]), seen  # the encoder really died
    assert seen["stats_at_kill"] < n_shards and seen["restarted"] is not None, seen  # mid-run; Ray restarted it
    assert s["shards"] == n_shards and s["tokenized"] == info["successes"] - 1 and s["filtered"] == {"decode_error": 1}
    keys = [x.key for x in read_all(str(out))]
    expected = {k for k, c in info["captions"].items() if c != "a broken image"}
    assert len(keys) == len(set(keys)) == s["tokenized"] and set(keys) == expected


def test_mismatched_vq_trips_the_quality_gate(ray_cluster, tmp_path):
    from transformers import Emu3VQVAE

    torch.manual_seed(0)
    wrong = tmp_path / "untrained_vq"
    VQTokenizer(Emu3VQVAE(tiny_emu3_config())).save_pretrained(str(wrong))
    raw, out = str(tmp_path / "raw"), str(tmp_path / "tok")
    write_raw_shards(raw, 1, 6, seed=4)
    # Through the CLI: `synergen tokenize` exits non-zero (3) when too many shards are flagged.
    from typer.testing import CliRunner

    from synergen.cli import app

    res = CliRunner().invoke(app, ["tokenize", "--raw", raw, "--out", out, "--task", "gen", "--vq", str(wrong),
                                   "--tokenizer", REPO_TOKENIZER, "--fold", "2x4", "--image-size", "64",
                                   "--min-psnr-db", "14", "--max-flagged-share", "0"], env={"COLUMNS": "200"})
    assert res.exit_code == 3, res.output
    assert "quality gate" in res.output
    row = read_catalog(out)[0]
    assert row["flagged"] and row["psnr"] < 14
    summary = json.loads((tmp_path / "tok" / "_summary.json").read_text())
    assert summary["flagged_shards"] == ["00000.tar"]


def test_bad_inputs_fail_clearly(tmp_path):
    from synergen.errors import SynergenError

    with pytest.raises(SynergenError, match="ingest"):
        run_tokenize(cfg(str(tmp_path / "nothing"), str(tmp_path / "tok")))
    write_raw_shards(str(tmp_path / "raw"), 1, 1)
    with pytest.raises(SynergenError, match="config.json"):
        run_tokenize(cfg(str(tmp_path / "raw"), str(tmp_path / "tok"), vq=str(tmp_path / "novq")))
    with pytest.raises(SynergenError, match="fold"):
        run_tokenize(cfg(str(tmp_path / "raw"), str(tmp_path / "tok"), fold="3x4"))
    from typer.testing import CliRunner

    from synergen.cli import app

    res = CliRunner().invoke(app, ["tokenize", "--raw", "a", "--out", "b", "--task", "both", "--vq", "v", "--tokenizer", "t"])
    assert res.exit_code == 2 and "--task" in res.output and "'und' or 'gen'" in res.output, res.output


def test_raw_shard_emptied_by_ingest_filters_is_published_empty_once(ray_cluster, tmp_path, vq):
    import tarfile

    raw, out = str(tmp_path / "raw"), str(tmp_path / "tok")
    write_raw_shards(raw, 1, 4, seed=3, failed_rows=0)
    tarfile.open(tmp_path / "raw" / "00001.tar", "w").close()  # ingest kept no row of this shard
    s = run_tokenize(cfg(raw, out))
    rows = {r["path"]: r for r in read_catalog(out)}
    assert set(rows) == {"00000.tar", "00001.tar"} and rows["00001.tar"]["samples"] == 0
    assert rows["00001.tar"]["codebook_size"] == 512 and rows["00001.tar"]["flagged"] is False
    assert s["tokenized"] == 4 and s["shards_written_now"] == 2
    again = run_tokenize(cfg(raw, out))
    assert again["shards_written_now"] == 0 and again["shards_skipped"] == 2


def test_unfinished_shard_exits_nonzero_naming_it_and_rerun_finishes(ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from synergen.cli import app

    raw, out = tmp_path / "raw", tmp_path / "tok"
    info = write_raw_shards(str(raw), 3, 3, seed=7)
    good = (raw / "00001.tar").read_bytes()
    (raw / "00001.tar").write_bytes(b"this is not a tar archive" * 40)  # truncated upload, disk error...
    args = ["tokenize", "--raw", str(raw), "--out", str(out), "--task", "gen", "--vq", REPO_VQ, "--tokenizer",
            REPO_TOKENIZER, "--fold", "2x4", "--image-size", "64", "--min-distinct-codes", "24",
            "--min-entropy-bits", "3.5", "--max-flagged-share", "0"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    text = " ".join(res.output.split())
    assert res.exit_code == 4, res.output
    assert "00001.tar" in text and "re-run" in text and "Traceback" not in res.output
    assert [r["path"] for r in read_catalog(str(out))] == ["00000.tar", "00002.tar"]  # the others are published
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["unfinished_shards"] == ["00001.tar"] and summary["tokenized"] == 6
    (raw / "00001.tar").write_bytes(good)
    res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_written_now"] == 1 and summary["shards_skipped"] == 2 and summary["unfinished_shards"] == []
    keys = [x.key for x in read_all(str(out))]
    assert sorted(keys) == sorted(info["captions"])
