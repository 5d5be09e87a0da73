"""Ingest: URL lists -> filtered raw WebDataset shards, on Ray, resumable and fault-tolerant.

The driver plans shards (shard N is a pure function of the rows assigned to it, recorded in the ledger
before any download), runs one Ray task per shard, and publishes the first attempt of each shard to
finish. A task runs img2dataset's per-shard `Downloader` into a local staging folder with every
download going through `pipeline.netguard`, then filters the shard (image size, aspect ratio, job-wide
exact/near dedup through one `DedupIndex` actor) and writes the final `NNNNN.tar/.parquet/_stats.json`
to `<out>/_staging/`. Publishing moves them into `<out>` with the parquet last: a shard is published
when its `NNNNN.parquet` exists, and a published shard is never rewritten.

`<out>/_ledger.parquet` holds one row per input row: pending (planned), ok, filtered (+reason, +dup_of),
opted_out, failed_retryable, failed_permanent. A re-run reads it: published shards are skipped, pending
shards are run again as planned, failed_retryable rows (up to `max_attempts`) go to NEW shards, rows
the ledger does not hold (an extended URL list) go to new shards, and nothing else is touched.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import shutil
import statistics
import tarfile
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import filters as F
from pipeline import image_decode, netguard
from pipeline.sources import SourceManifest, load_source_manifest, read_url_list
from synergen.errors import SynergenError
from synergen.local_ray import init_ray

log = logging.getLogger(__name__)

LEDGER = "_ledger.parquet"
SUMMARY = "_summary.json"
STAGING = "_staging"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: names are 00000.tar ...
FAILED_STATES = ("opted_out", "failed_retryable", "failed_permanent")
LEDGER_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("url", pa.string()), ("shard", pa.int64()), ("key", pa.string()),
    ("state", pa.string()), ("reason", pa.string()), ("dup_of", pa.string()), ("attempts", pa.int64()),
    ("sha256", pa.string()), ("phash", pa.uint64()),
])

# Columns after the input's in NNNNN.parquet: img2dataset's, then ours (ledger state, reason, duplicate-of).
SHARD_COLUMNS = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                 ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                 ("original_height", pa.int32()), ("sha256", pa.string()), ("row_id", pa.string()),
                 ("state", pa.string()), ("reason", pa.string()), ("dup_of", pa.string())]


class IngestError(SynergenError):
    """The ingest job cannot run (bad output location, inconsistent ledger) or a shard failed all its retries."""


@dataclass
class IngestOptions:
    """Knobs of one ingest job; defaults suit a single machine."""

    shard_size: int = 1000
    allow_private_network: bool = False
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed although private, e.g. ("127.0.0.0/8",); link-local never
    timeout: float = 10.0  # seconds per socket operation
    download_deadline_s: float = netguard.DEFAULT_TOTAL_TIMEOUT  # one download, all of it (trickling hosts: `timeout`)
    shard_download_deadline_s: float | None = None  # a shard's whole download phase; None: from the two above
    thread_count: int = 32
    max_attempts: int = 3  # downloads per URL across re-runs before a retryable failure is final
    task_retries: int = 3  # Ray retries of one shard task (worker died, or img2dataset returned ok=False)
    shard_deadline_s: float | None = None  # None: 3x the median shard time so far (at least 60 s)
    max_bytes: int = netguard.DEFAULT_MAX_BYTES
    max_pixels: int = netguard.DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = image_decode.DEFAULT_MAX_DECODED_BYTES  # width x height x bytes per pixel
    encode_quality: int = 95
    connect_audit: str | None = None  # file where workers record every connect address (tests prove the guard)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def _join(out: str, name: str) -> str:
    return out.rstrip("/") + "/" + name


# ---------------------------------------------------------------- filters built from the manifest


def row_filters(m: SourceManifest) -> list:
    """Filters that need only the URL-list row (run by the driver before anything is downloaded)."""
    f = m.filters
    out: list = [F.CaptionFilter(f.caption_min_chars, f.caption_max_chars)]
    out += [F.MetadataFilter(col, t.min, t.max) for col, t in f.metadata.items()]
    if f.languages:
        out.append(F.LanguageFilter(f.languages, f.language_column))
    return out


def image_filters(fc: dict) -> list:
    """Filters on the downloaded image's size (run in the shard task)."""
    out: list = [F.ImageSizeFilter(fc["min_side"], fc["max_side"], fc["min_pixels"])]
    if fc["max_aspect_ratio"]:
        out.append(F.AspectRatioFilter(fc["max_aspect_ratio"]))
    return out


# ---------------------------------------------------------------- the shard task (runs in a Ray worker)


def _state_of(status: str, error: str | None) -> tuple[str, str | None]:
    if status == "success":
        return "ok", None
    reason, retryable, _ = netguard.parse_error_text(error or "")
    if status == "failed_to_resize":
        return "failed_permanent", "undecodable" if reason in ("error", "undecodable") else reason
    if reason == "opted_out":
        return "opted_out", reason
    return ("failed_retryable" if retryable else "failed_permanent"), reason


def download_shard(spec: dict, dedup) -> dict:
    """Download, filter and stage one shard; returns the staged folder, per-row records and counts.

    Raises when img2dataset reports a failed shard, so Ray's retries act (img2dataset swallows errors);
    the attempt's local working folder is removed however it ends.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"synergen-{shard_name(spec['shard'])}-"))
    try:
        return _download_shard(spec, dedup, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_shard(spec: dict, dedup, tmp: Path) -> dict:
    import ray
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter
    import webdataset as wds

    opts = IngestOptions(**spec["options"])
    sid, rows = spec["shard"], spec["rows"]
    t0 = time.time()
    todo = [i for i, r in enumerate(rows) if not r["_prefilter"]]
    netguard.install(netguard.AddressPolicy(opts.allow_private_network, tuple(opts.allow_networks), opts.max_bytes,
                                           opts.max_pixels, total_timeout=opts.download_deadline_s),
                     opts.connect_audit, deadline_s=netguard.shard_download_deadline(
                         len(todo), opts.thread_count, opts.download_deadline_s, opts.shard_download_deadline_s))
    staged_meta: dict[int, dict] = {}
    staged_img: dict[int, bytes] = {}
    if todo:
        ipc = tmp / "input.arrow"
        table = pa.table({"url": [rows[i]["url"] for i in todo], "caption": [rows[i]["caption"] for i in todo]})
        with pa.OSFile(str(ipc), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        resizer = image_decode.Normaliser(opts.encode_quality, opts.max_decoded_bytes)
        dl_dir = tmp / "dl"
        dl_dir.mkdir()
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=opts.thread_count,
            save_caption=True, extract_exif=False, output_folder=str(dl_dir), column_list=["url", "caption"],
            timeout=opts.timeout, number_sample_per_shard=max(len(todo), 2), oom_shard_count=SHARD_DIGITS,
            compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=0,
            user_agent_token="synergen", disallowed_header_directives=list(netguard.OPT_OUT_DIRECTIVES))
        ok, _ = downloader((0, str(ipc)))
        if not ok:
            raise IngestError(f"shard {shard_name(sid)}: img2dataset's downloader failed (see the worker log); Ray retries it")
        oom = math.ceil(math.log10(max(len(todo), 2)))
        for rec in pq.read_table(dl_dir / f"{shard_name(0)}.parquet").to_pylist():
            staged_meta[todo[int(rec["key"]) % 10**oom]] = rec
        with tarfile.open(dl_dir / f"{shard_name(0)}.tar") as tf:
            for member in tf:
                k, _, ext = member.name.partition(".")
                if ext == "jpg":
                    staged_img[todo[int(k) % 10**oom]] = tf.extractfile(member).read()

    fc = spec["filters"]
    img_filters = image_filters(fc)
    oom_rows = math.ceil(math.log10(max(spec["shard_size"], 2)))
    records, claims = [], []
    for i, r in enumerate(rows):
        key = f"{sid * 10**oom_rows + i:0{oom_rows + SHARD_DIGITS}d}"
        meta = staged_meta.get(i, {})
        rec = {"row_id": r["row_id"], "url": netguard.redact_url(r["url"]), "shard": sid, "key": key, "sha256": meta.get("sha256"),
               "phash": None, "dup_of": r.get("_dup_of"), "width": meta.get("width"), "height": meta.get("height"),
               "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
               "error_message": meta.get("error_message"), "downloaded": not r["_prefilter"]}
        if r["_prefilter"]:
            rec.update(status="filtered", state="filtered", reason=r["_prefilter"])
        elif not meta:
            # img2dataset dropped the row without a record (it logs and continues): retry it later
            rec.update(status="failed_to_download", state="failed_retryable", reason="lost_by_downloader")
        else:
            state, reason = _state_of(meta["status"], meta.get("error_message"))
            rec.update(status=meta["status"], state=state, reason=reason)
            if state == "ok":
                size = {"width": meta["original_width"], "height": meta["original_height"]}
                drop = next((d for d in (flt(size) for flt in img_filters) if d), None)
                if drop:
                    rec.update(status="filtered", state="filtered", reason=drop)
                elif fc["dedup_exact"] or fc["dedup_near"]:
                    rec["phash"] = F.dhash_bytes(staged_img[i]) if fc["dedup_near"] else None
                    claims.append(i)
        records.append(rec)
    if claims and dedup is not None:
        decisions = ray.get(dedup.claim_many.remote([(records[i]["row_id"], records[i]["sha256"], records[i]["phash"]) for i in claims]))
        for i, d in zip(claims, decisions):
            if d is not None:
                records[i].update(status="filtered", state="filtered", reason=d[0], dup_of=d[1])

    # final shard: tar in row order (deterministic), parquet with every row, stats
    final = tmp / "final"
    final.mkdir()
    name = shard_name(sid)
    n_bytes = 0
    with wds.TarWriter(str(final / f"{name}.tar")) as tw:
        for i, (r, rec) in enumerate(zip(rows, records)):
            if rec["state"] != "ok":
                continue
            meta = {k: rec[k] for k in ("key", "status", "width", "height", "original_width", "original_height", "sha256")}
            meta |= {k: r[k] for k in ["caption", *spec["extra_columns"]]} | {"url": rec["url"]}  # input columns win
            meta["error_message"] = None
            tw.write({"__key__": rec["key"], "jpg": staged_img[i], "txt": r["caption"] or "", "json": json.dumps(meta)})
            n_bytes += len(staged_img[i])
    cols = {"url": pa.array([rec["url"] for rec in records], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string())}
    cols |= {c: pa.array([r.get(c) for r in rows]) for c in spec["extra_columns"]}
    for c, typ in SHARD_COLUMNS:
        if c not in ("width", "height") or c not in cols:  # an input's own width/height (COYO) is kept
            cols[c] = pa.array([rec[c] for rec in records], typ)
    pq.write_table(pa.table(cols), final / f"{name}.parquet")
    counts = shard_counts(records)
    stats = {"count": len(rows), "successes": counts["ok"],
             "failed_to_download": sum(1 for x in records if x["status"] == "failed_to_download"),
             "failed_to_resize": sum(1 for x in records if x["status"] == "failed_to_resize"),
             "filtered": counts["filtered"], "duration": time.time() - t0, "start_time": t0, "end_time": time.time(),
             "status_dict": dict(collections.Counter(x["status"] for x in records)),
             "failed_by_reason": counts["failed_by_reason"], "filtered_by_reason": counts["filtered_by_reason"],
             "attempt": spec["attempt"]}
    (final / f"{name}_stats.json").write_text(json.dumps(stats, indent=2))

    staged = _join(spec["out"], f"{STAGING}/{name}.{spec['attempt']}")
    fs, path = fsspec.core.url_to_fs(staged)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(final.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")
    return {"shard": sid, "attempt": spec["attempt"], "staged": staged, "records": records, "counts": counts,
            "image_bytes": n_bytes, "duration": stats["duration"], "downloaded": len(todo)}


def shard_counts(records: list[dict]) -> dict:
    """ok / failed / filtered with reasons; rows == ok + failed + filtered by construction."""
    ok = sum(1 for r in records if r["state"] == "ok")
    failed = collections.Counter(r["reason"] for r in records if r["state"] in FAILED_STATES)
    filtered = collections.Counter(r["reason"] for r in records if r["state"] == "filtered")
    return {"rows": len(records), "ok": ok, "failed": sum(failed.values()), "filtered": sum(filtered.values()),
            "failed_by_reason": dict(failed), "filtered_by_reason": dict(filtered)}


# ---------------------------------------------------------------- driver side: ledger, planning, publishing


class Ledger:
    """One record per input row, keyed by row_id; written whole to `_ledger.parquet` (temp name, then moved)."""

    def __init__(self, out: str):
        self.out = out
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.rows: dict[str, dict] = {}
        path = f"{self.root}/{LEDGER}"
        if self.fs.exists(path):
            with self.fs.open(path, "rb") as f:
                for r in pq.read_table(f).to_pylist():
                    self.rows[r["row_id"]] = r

    def apply(self, records: list[dict], count_attempt: bool) -> None:
        for rec in records:
            old = self.rows.get(rec["row_id"], {})
            attempts = (old.get("attempts") or 0) + (1 if count_attempt and rec.get("downloaded", True) else 0)
            self.rows[rec["row_id"]] = {k: rec.get(k) for k in LEDGER_SCHEMA.names} | {"attempts": attempts}

    def flush(self) -> None:
        table = pa.Table.from_pylist(list(self.rows.values()), schema=LEDGER_SCHEMA)
        tmp = f"{self.root}/{LEDGER}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, f"{self.root}/{LEDGER}")

    def reconcile(self) -> None:
        """Fold in shards published after the last ledger write (a driver that died between publish and flush)."""
        pending = {r["shard"] for r in self.rows.values() if r["state"] == "pending"}
        for sid in sorted(pending):
            path = f"{self.root}/{shard_name(sid)}.parquet"
            if self.fs.exists(path):
                with self.fs.open(path, "rb") as f:
                    recs = pq.read_table(f).to_pylist()
                for r in recs:
                    r.update(shard=sid, phash=None, downloaded=r["status"] != "filtered" or r["sha256"] is not None)
                self.apply([r for r in recs if self.rows.get(r["row_id"], {}).get("state") == "pending"], count_attempt=True)


def _publish(fs, root: str, staged: str, sid: int) -> bool:
    """Move a staged shard into place, parquet last (its existence marks the shard published). Idempotent."""
    name = shard_name(sid)
    if fs.exists(f"{root}/{name}.parquet"):
        return False
    _, spath = fsspec.core.url_to_fs(staged)
    for suffix in (".tar", "_stats.json", ".parquet"):
        fs.mv(f"{spath}/{name}{suffix}", f"{root}/{name}{suffix}")
    if fs.exists(spath):  # on S3 the folder vanished with its last file
        fs.rm(spath, recursive=True)
    return True


def _prefilter(rows: list[dict], m: SourceManifest, filters: list) -> None:
    """Sets `_prefilter` (a reason) and `_dup_of` on rows that need no download."""
    first_of: dict[str, str] = {}
    for r in rows:
        r["_prefilter"], r["_dup_of"] = None, None
        if r.get("bad_row"):  # a row of the URL list that could not be read (pipeline.sources.BAD_ROW)
            r["_prefilter"] = r["bad_row"]
            continue
        if not r["url"]:
            r["_prefilter"] = "url_missing"
            continue
        if r["url"] in first_of:
            r["_prefilter"], r["_dup_of"] = "duplicate_url", first_of[r["url"]]
            continue
        first_of[r["url"]] = r["row_id"]
        sample = dict(r)
        if not r["caption_utf8"]:
            sample["caption"] = b"\xff"  # the caption filter counts it as not UTF-8
        for flt in filters:
            reason = flt(sample)
            if reason:
                r["_prefilter"] = reason
                break


def run_ingest(manifest: SourceManifest | str, out: str, shard_size: int = 1000, allow_private_network: bool = False,
               ray_address: str | None = None, url_lists: list[str] | None = None,
               progress: Callable[[int, int], None] | None = None, **options) -> dict:
    """Ingest the manifest's URL lists into `out` (local path or s3://); returns the job summary (also `_summary.json`)."""
    import ray

    m = load_source_manifest(manifest) if isinstance(manifest, str) else manifest
    if url_lists is not None:
        m = m.model_copy(update={"url_lists": list(url_lists)})
    opts = IngestOptions(shard_size=shard_size, allow_private_network=allow_private_network, **options)
    t_start = time.time()
    table = read_url_list(m)  # checks columns: a bad list fails here, before any download
    rows = table.to_pylist()
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{STAGING}"):
        fs.rm(f"{root}/{STAGING}", recursive=True)  # attempts of a dead run; their shards were not published
    ledger = Ledger(out)
    ledger.reconcile()
    _prefilter(rows, m, row_filters(m))
    by_id = {r["row_id"]: r for r in rows}

    # plan: pending shards as recorded; retryable rows and new rows into new shards
    plan: dict[int, list[dict]] = collections.defaultdict(list)
    for rid, rec in ledger.rows.items():
        if rec["state"] == "pending" and rid in by_id:
            plan[rec["shard"]].append(by_id[rid])
    for sid in plan:  # keep the recorded order inside a pending shard
        plan[sid].sort(key=lambda r: ledger.rows[r["row_id"]]["key"])
    next_sid = max([r["shard"] for r in ledger.rows.values() if r["shard"] is not None] or [-1]) + 1
    fresh = [r for r in rows if r["row_id"] not in ledger.rows or (
        ledger.rows[r["row_id"]]["state"] == "failed_retryable" and (ledger.rows[r["row_id"]]["attempts"] or 0) < opts.max_attempts)]
    for start in range(0, len(fresh), opts.shard_size):
        plan[next_sid] = fresh[start:start + opts.shard_size]
        next_sid += 1
    oom_rows = math.ceil(math.log10(max(opts.shard_size, 2)))
    for sid, srows in plan.items():
        for i, r in enumerate(srows):
            old = ledger.rows.get(r["row_id"], {})
            ledger.rows[r["row_id"]] = {"row_id": r["row_id"], "url": netguard.redact_url(r["url"]), "shard": sid,
                                        "key": f"{sid * 10**oom_rows + i:0{oom_rows + SHARD_DIGITS}d}",
                                        "state": "pending", "reason": None, "dup_of": None,
                                        "attempts": old.get("attempts") or 0, "sha256": None, "phash": None}
    ledger.flush()  # the plan is durable before anything downloads
    total_rows = sum(len(v) for v in plan.values())
    log.info("ingest %s -> %s: %d input rows, %d to process in %d shards", m.name, netguard.redact_url(out),
             len(rows), total_rows, len(plan))

    if plan:
        init_ray(ray_address, log_to_driver=False)
    fc = m.filters.model_dump()
    dedup = None
    if plan and (fc["dedup_exact"] or fc["dedup_near"]):
        dedup = ray.remote(num_cpus=0)(F.DedupIndex).remote(fc["dedup_exact"], fc["dedup_near"], fc["near_max_distance"])
        kept = [(r["row_id"], r["sha256"], r["phash"]) for r in ledger.rows.values() if r["state"] == "ok"]
        if kept:
            ray.get(dedup.claim_many.remote(kept))
    task = ray.remote(num_cpus=1, max_retries=opts.task_retries, retry_exceptions=True)(download_shard)

    def submit(sid: int, n: int):
        spec = {"shard": sid, "rows": plan[sid], "out": out, "attempt": f"a{n}", "options": asdict(opts),
                "filters": fc, "extra_columns": m.extra_columns, "shard_size": opts.shard_size}
        return task.options(name=f"ingest-shard-{shard_name(sid)}").remote(spec, dedup)

    running: dict = {}
    attempts: collections.Counter[int] = collections.Counter()
    for sid in sorted(plan):
        running[submit(sid, 0)] = (sid, time.time())
        attempts[sid] = 1
    published: dict[int, dict] = {}
    failed_shards: dict[int, str] = {}
    durations: list[float] = []
    done_rows, last_flush, restarts = 0, time.time(), 0
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
        for ref in ready:
            sid, _ = running.pop(ref)
            if sid in published:
                continue
            try:
                res = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a shard that failed all retries; other attempts may still win
                if not any(s == sid for s, _ in running.values()):
                    failed_shards[sid] = str(err).splitlines()[0][:300]
                    log.error("shard %s failed after %d retries: %s", shard_name(sid), opts.task_retries, failed_shards[sid])
                continue
            _publish(fs, root, res["staged"], sid)
            published[sid] = res
            durations.append(res["duration"])
            ledger.apply(res["records"], count_attempt=True)
            for other, (osid, _) in list(running.items()):
                if osid == sid:  # the slower duplicate attempt of a straggler
                    ray.cancel(other, force=True)
                    running.pop(other)
            done_rows += len(plan[sid])
            if progress:
                progress(done_rows, total_rows)
        deadline = opts.shard_deadline_s or (max(60.0, 3 * statistics.median(durations)) if len(durations) >= 2 else None)
        if deadline:
            now = time.time()
            for ref, (sid, t0) in list(running.items()):
                if now - t0 > deadline and attempts[sid] < 2 and sid not in published:
                    log.warning("shard %s past its %.0f s deadline: starting a second attempt", shard_name(sid), deadline)
                    running[submit(sid, attempts[sid])] = (sid, now)
                    attempts[sid] += 1
                    restarts += 1
        if time.time() - last_flush > 10:
            ledger.flush()
            last_flush = time.time()
    for sid, err in failed_shards.items():
        ledger.apply([{"row_id": r["row_id"], "url": netguard.redact_url(r["url"]), "shard": sid, "key": ledger.rows[r["row_id"]]["key"],
                       "state": "failed_retryable", "reason": "shard_failed"} for r in plan[sid]], count_attempt=True)
    ledger.flush()
    if fs.exists(f"{root}/{STAGING}"):
        fs.rm(f"{root}/{STAGING}", recursive=True)

    summary = _summarize(fs, root, ledger, rows, published, failed_shards, restarts, time.time() - t_start)
    with fs.open(f"{root}/{SUMMARY}", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _summarize(fs, root, ledger: Ledger, rows, published, failed_shards, restarts, duration) -> dict:
    recs = [ledger.rows[r["row_id"]] for r in rows]
    total = shard_counts(recs)
    shards = {}
    for path in sorted(fs.glob(f"{root}/[0-9]*_stats.json")):
        with fs.open(path, "r") as f:
            s = json.load(f)
        name = path.rsplit("/", 1)[-1].removesuffix("_stats.json")
        shards[name] = {"rows": s["count"], "ok": s["successes"], "failed": s["count"] - s["successes"] - s["filtered"],
                        "filtered": s["filtered"], "failed_by_reason": s["failed_by_reason"],
                        "filtered_by_reason": s["filtered_by_reason"]}
    run_ok = sum(r["counts"]["ok"] for r in published.values())
    return {
        "rows_in": len(rows), "ok": total["ok"], "failed": total["failed"], "filtered": total["filtered"],
        "failed_by_reason": total["failed_by_reason"], "filtered_by_reason": total["filtered_by_reason"],
        "states": dict(collections.Counter(r["state"] for r in recs)),
        "shards": shards, "shards_total": len(shards), "shards_this_run": len(published),
        "shards_failed": {shard_name(k): v for k, v in failed_shards.items()},
        "straggler_restarts": restarts,
        "downloaded_this_run": sum(r["downloaded"] for r in published.values()),
        "ok_this_run": run_ok, "bytes_this_run": sum(r["image_bytes"] for r in published.values()),
        "duration_s": round(duration, 3), "samples_per_s": round(run_ok / duration, 2) if duration > 0 else 0.0,
    }
