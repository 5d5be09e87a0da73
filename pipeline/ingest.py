"""Ingest: URL lists -> filtered raw WebDataset shards, on Ray, resumable, fault-tolerant, driver state O(shards).

The driver streams the URL lists in batches and writes each shard's input rows once, durably, to
`<out>/_inputs/NNNNN.parquet` (shard N is a pure function of that file; names in `pipeline.rawshard`); it holds
shard ids and counts, never rows: URL occurrence numbers (row ids, duplicate URLs) and which rows are planned
live in the row index (`pipeline.row_index`), partitioned by URL hash over actors. A
bounded window of shard tasks runs; each reads its own input file, runs img2dataset's per-shard `Downloader`
with every download going through `pipeline.netguard`, filters (row filters, image size, job-wide exact/near
dedup through the sharded `pipeline.dedup` actors), and stages `NNNNN.tar/.parquet/_stats.json` plus its
ledger fragment under `<out>/_staging/`. Publishing moves them into place with the parquet last: a shard is
published when its `NNNNN.parquet` exists, and a published shard is never rewritten.

The ledger (`pipeline.ledger`) is the per-shard fragments, compacted into `_ledger.parquet` at the end. A
re-run: published shards are skipped, planned-but-unpublished shards run again from their input files,
failed_retryable rows (up to `max_attempts`) go to NEW shards, URL-list rows no shard holds (an extended list)
go to new shards, and nothing else is touched. A shard that fails all its retries leaves its rows
failed_retryable (reason `shard_failed`) and the summary's `shards_failed` non-empty (the CLI exits 1).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import filters as F
from pipeline import ledger as L
from pipeline import image_decode, netguard, politeness
from pipeline import rawshard as R
from pipeline.dedup import start_dedup
from pipeline.ingest_config import IngestOptions
from pipeline.row_index import RowIndex, RowIndexLost, h64_of_row_ids, start_row_index
from pipeline.rawshard import shard_name  # noqa: F401 - re-exported (tokenize imports it from here until it moves)
from pipeline.sources import SourceManifest, check_url_lists, iter_url_list_parts, load_source_manifest
from synergen.errors import SynergenError, validated
from synergen.imports import submodule_alone
from synergen.local_ray import init_ray

log = logging.getLogger(__name__)

# Columns after the input's in NNNNN.parquet: img2dataset's, then ours (ledger state, reason, duplicate-of).
SHARD_COLUMNS = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                 ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                 ("original_height", pa.int32()), ("sha256", pa.string()), ("row_id", pa.string()),
                 ("state", pa.string()), ("reason", pa.string()), ("dup_of", pa.string())]
PLAN_COLUMNS = ["row_id", "rid64", "url", "caption", "caption_utf8"]  # then extras, then key/prefilter/dup_of/attempts


class IngestError(SynergenError):
    """The ingest job cannot run (bad output location, inconsistent ledger) or a shard failed all its retries."""


# ---------------------------------------------------------------- filters built from the manifest


def row_filters(m: SourceManifest) -> list:
    """Filters that need only the URL-list row (run in the shard task before anything is downloaded)."""
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


def _row_prefilter(r: dict, filters: list) -> str | None:
    sample = dict(r)
    if not r["caption_utf8"]:
        sample["caption"] = b"\xff"  # the caption filter counts it as not UTF-8
    return next((reason for reason in (flt(sample) for flt in filters) if reason), None)


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
    """Download, filter and stage one shard (its rows read from its input file); returns counts, never rows.

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

    opts = IngestOptions.model_validate(spec["options"])
    m = SourceManifest.model_validate(spec["manifest"])
    sid = spec["shard"]
    with fsspec.open(R.input_path(spec["out"], sid), "rb") as f:
        rows = pq.read_table(f).to_pylist()
    t0 = time.time()
    flts = row_filters(m)
    for r in rows:
        if not r["prefilter"]:
            r["prefilter"] = _row_prefilter(r, flts)
    todo = politeness.interleave_by_host([i for i, r in enumerate(rows) if not r["prefilter"]], [r["url"] for r in rows])
    netguard.install(netguard.AddressPolicy(opts.allow_private_network, tuple(opts.allow_networks), opts.max_bytes,
                                           opts.max_pixels, total_timeout=opts.download_deadline_s),
                     opts.connect_audit, deadline_s=netguard.shard_download_deadline(
                         len(todo), opts.thread_count, opts.download_deadline_s, opts.shard_download_deadline_s))
    if opts.per_host_connections or opts.per_host_rps:  # wraps netguard's download (so after it); an equal share per attempt
        share = spec["share"]
        politeness.install(politeness.HostLimiter(
            max(1, opts.per_host_connections // share) if opts.per_host_connections else None,
            opts.per_host_rps / share if opts.per_host_rps else None,
            # long enough for this attempt's share of the rate to start at least two requests
            max_wait=max(opts.timeout, 2.0 * share / opts.per_host_rps if opts.per_host_rps else 0.0)))
    staged_meta, staged_img = _download(rows, todo, opts, tmp, sid) if todo else ({}, {})
    records = _records(rows, sid, staged_meta, staged_img, spec["filters"], dedup)
    staged, stats, n_bytes, frag_ms = _stage_shard(spec, m, rows, records, staged_img, tmp / "final", t0)
    return {"shard": sid, "attempt": spec["attempt"], "staged": staged, "counts": stats["counts"], "image_bytes": n_bytes,
            "duration": stats["duration"], "downloaded": len(todo), "fragment_ms": frag_ms, "node": ray.get_runtime_context().get_node_id()}


def _download(rows: list[dict], todo: list[int], opts: IngestOptions, tmp: Path, sid: int) -> tuple[dict, dict]:
    """img2dataset's per-shard Downloader over rows `todo` (in that order): ({row: its img2dataset record},
    {row: its normalised JPEG bytes}). Raises when img2dataset reports the shard failed, so Ray retries it."""
    writer, samples = _memory_writer()
    ipc = tmp / "input.arrow"
    table = pa.table({"url": [rows[i]["url"] for i in todo], "caption": [rows[i]["caption"] for i in todo]})
    with pa.OSFile(str(ipc), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    resizer = image_decode.Normaliser(opts.encode_quality, opts.max_decoded_bytes)
    dl_dir = tmp / "dl"
    dl_dir.mkdir()
    downloader = submodule_alone("img2dataset.downloader").Downloader(
        sample_writer_class=writer, resizer=resizer, thread_count=opts.thread_count,
        save_caption=True, extract_exif=False, output_folder=str(dl_dir), column_list=["url", "caption"],
        timeout=opts.timeout, number_sample_per_shard=max(len(todo), 2), oom_shard_count=R.SHARD_DIGITS,
        compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=0,
        user_agent_token="synergen", disallowed_header_directives=list(netguard.OPT_OUT_DIRECTIVES))
    ok, _ = downloader((0, str(ipc)))
    if not ok:
        raise IngestError(f"shard {shard_name(sid)}: img2dataset's downloader failed (see the worker log); Ray retries it")
    oom = math.ceil(math.log10(max(len(todo), 2)))
    staged_meta: dict[int, dict] = {}
    staged_img: dict[int, bytes] = {}
    for key, (img, meta) in samples.items():
        row = todo[int(key) % 10**oom]
        staged_meta[row] = meta
        if img is not None:
            staged_img[row] = img
    return staged_meta, staged_img


def _memory_writer() -> tuple[type, dict[str, tuple[bytes | None, dict]]]:
    """img2dataset's sample-writer protocol over a dict (key -> (image bytes or None, its record)), so the shard's
    images are not written to a tar and read back before the shard is staged: (the writer class, the dict)."""
    samples: dict[str, tuple[bytes | None, dict]] = {}

    class MemoryWriter:
        def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
            pass

        def write(self, img_str, key, caption, meta):
            samples[key] = (img_str, dict(meta))

        def close(self):
            pass

    return MemoryWriter, samples


def _records(rows: list[dict], sid: int, staged_meta: dict, staged_img: dict, fc: dict, dedup) -> list[dict]:
    """Each input row's ledger record: its state and reason after download, the image filters and the job-wide
    dedup (one `claim_many` call for the shard's ok rows)."""
    img_filters = image_filters(fc)
    records, claims = [], []
    for i, r in enumerate(rows):
        meta = staged_meta.get(i, {})
        downloaded = not r["prefilter"]
        # a row the politeness budget kept from being requested: no request, so no attempt used up
        throttled = bool(meta) and netguard.parse_error_text(meta.get("error_message") or "")[0] == "throttled"
        rec = {"row_id": r["row_id"], "rid64": r["rid64"], "url": netguard.redact_url(r["url"]) if r["url"] else r["url"],
               "url_hash": netguard.url_hash(r["url"]), "shard": sid, "key": r["key"], "sha256": meta.get("sha256"),
               "phash": None, "dup_of": r["dup_of"], "attempts": (r["attempts"] or 0) + int(downloaded and not throttled),
               "width": meta.get("width"), "height": meta.get("height"),
               "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
               "error_message": meta.get("error_message")}
        if not downloaded:
            rec.update(status="filtered", state="filtered", reason=r["prefilter"])
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
        decisions = dedup.claim_many([(records[i]["row_id"], records[i]["sha256"], records[i]["phash"]) for i in claims])
        for i, d in zip(claims, decisions):
            if d is not None:
                records[i].update(status="filtered", state="filtered", reason=d[0], dup_of=d[1])
    return records


def _stage_shard(spec: dict, m: SourceManifest, rows: list[dict], records: list[dict], staged_img: dict, final: Path,
                 t0: float) -> tuple[str, dict, int, float]:
    """Write the shard (tar in row order, so deterministic; parquet with every row; stats; ledger fragment) into
    `final`, then copy it under `<out>/_staging/`: (staged URL, stats, image bytes, fragment write ms)."""
    sid = spec["shard"]
    final.mkdir()
    name = shard_name(sid)
    n_bytes = 0
    # webdataset's TarWriter, imported alone (synergen.imports), over a file we open: alone, its module's `gopen`
    # is not the function webdataset's __init__ would have put there
    with open(final / f"{name}.tar", "wb") as f, submodule_alone("webdataset.writer").TarWriter(f) as tw:
        for i, (r, rec) in enumerate(zip(rows, records)):
            if rec["state"] != "ok":
                continue
            meta = {k: rec[k] for k in ("key", "status", "width", "height", "original_width", "original_height", "sha256")}
            meta |= {k: r[k] for k in ["caption", *m.extra_columns]} | {"url": rec["url"]}  # input columns win (COYO's width)
            meta["error_message"] = None
            # an input column JSON has no type for (a timestamp, a decimal) goes in as its text
            tw.write({"__key__": rec["key"], "jpg": staged_img[i], "txt": r["caption"] or "",
                      "json": json.dumps(meta, default=str)})
            n_bytes += len(staged_img[i])
    cols = {"url": pa.array([rec["url"] for rec in records], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string())}
    cols |= {c: pa.array([r.get(c) for r in rows]) for c in m.extra_columns}
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
    t_frag = time.time()
    pq.write_table(L.fragment_table(records, "published"), final / f"{name}.fragment.parquet")
    frag_ms = 1000 * (time.time() - t_frag)

    staged = R.join(spec["out"], R.STAGING, f"{name}.{spec['attempt']}")
    fs, path = fsspec.core.url_to_fs(staged)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(final.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")
    return staged, {**stats, "counts": counts}, n_bytes, frag_ms


def shard_counts(records: list[dict]) -> dict:
    """ok / failed / filtered with reasons; rows == ok + failed + filtered by construction."""
    ok = sum(1 for r in records if r["state"] == "ok")
    failed = collections.Counter(r["reason"] for r in records if r["state"] in L.FAILED_STATES)
    filtered = collections.Counter(r["reason"] for r in records if r["state"] == "filtered")
    return {"rows": len(records), "ok": ok, "failed": sum(failed.values()), "filtered": sum(filtered.values()),
            "failed_by_reason": dict(failed), "filtered_by_reason": dict(filtered)}


# ---------------------------------------------------------------- driver side: streaming planner


class Planner:
    """Writes new shards' input files: retryable rows of closed shards first, then URL-list rows no shard holds.

    Iterating yields each new shard's id once its input file is durable (written under a temporary name, then
    moved), so shards start while later ones are still being planned. Occurrence numbers and "a shard holds this
    row already" come from the row index (`pipeline.row_index`, partitioned over actors in a job); when a
    partition is lost the index is rebuilt from the input files and the pass starts again from the first row
    (rows planned before the loss are in the index then, and are not planned twice).
    """

    def __init__(self, m: SourceManifest, out: str, opts: IngestOptions, st: L.ShardStates):
        self.m, self.out, self.opts, self.st = m, out, opts, st
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.files = check_url_lists(m)
        self.index: RowIndex | None = None  # set before iterating (start_row_index in a job, RowIndex.local else)
        self.next_id = st.next_id
        self.rows_in = 0
        self.planned_rows = 0
        self.done = False
        self._buf: list[pa.Table] = []
        self._n = 0

    def __iter__(self) -> Iterator[int]:
        self.index = self.index or RowIndex.local(self.out)
        while True:
            try:
                yield from self._pass()
                break
            except RowIndexLost as err:
                self._buf, self._n, self.rows_in = [], 0, 0  # rows not written to a shard yet are read again
                try:
                    self.index.recover(err)
                except RowIndexLost as final:
                    raise IngestError(f"{final} while planning: check the cluster's nodes and re-run (planned shards "
                                      "are kept)") from None
        yield from self._cut(final=True)
        self.done = True

    def _pass(self) -> Iterator[int]:
        for t in L.retryable_inputs(self.out, self.st, self.index, self.opts.max_attempts):
            yield from self._push(t.select([*PLAN_COLUMNS, *self.m.extra_columns, "attempts"]))
        for batch in iter_url_list_parts(self.m, self.files):
            self.rows_in += batch.num_rows
            yield from self._push(self._fresh(batch))

    def _fresh(self, batch: pa.Table) -> pa.Table:
        urls = batch["url"].to_pylist()
        digests = [netguard.url_hash(u) for u in urls]
        h64 = h64_of_row_ids(digests)
        n, seen = self.index.fresh(h64)
        row_ids = [f"{d}-{k}" for d, k in zip(digests, n.tolist())]
        rid64 = R.row_key64(h64, n)
        # a row the URL list could not give (pipeline.sources.BAD_ROW) is counted, never downloaded
        prefilter = [bad or (None if u else "url_missing") for u, bad in zip(urls, batch["bad_row"].to_pylist())]
        dup_of = [None] * len(urls)
        for i in np.flatnonzero(n > 0):
            if urls[i] and not prefilter[i]:
                prefilter[i], dup_of[i] = "duplicate_url", f"{digests[i]}-0"
        t = batch.add_column(0, "row_id", pa.array(row_ids, pa.string())).add_column(1, "rid64", pa.array(rid64))
        if any(u and "@" in u for u in urls):  # identity above is the full URL; no password is written to `_inputs/`
            t = t.set_column(t.column_names.index("url"), "url", pa.array([u and netguard.mask_userinfo(u) for u in urls], pa.string()))
        t = t.append_column("prefilter", pa.array(prefilter, pa.string())).append_column("dup_of", pa.array(dup_of, pa.string()))
        t = t.append_column("attempts", pa.array(np.zeros(len(urls), np.int64)))
        return t.filter(pa.array(~seen)) if seen.any() else t

    def _push(self, t: pa.Table) -> Iterator[int]:
        if t.num_rows:
            if "prefilter" not in t.column_names:  # retried rows: downloaded before, so no pre-download verdict
                t = t.append_column("prefilter", pa.nulls(t.num_rows, pa.string())).append_column("dup_of", pa.nulls(t.num_rows, pa.string()))
            self._buf.append(t.select([*PLAN_COLUMNS, *self.m.extra_columns, "prefilter", "dup_of", "attempts"]))
            self._n += t.num_rows
        yield from self._cut(final=False)

    def _cut(self, final: bool) -> Iterator[int]:
        size = self.opts.shard_size
        while self._n >= size or (final and self._n):
            buf = pa.concat_tables(self._buf, promote_options="permissive").combine_chunks()
            take = min(size, buf.num_rows)
            rows, rest = buf.slice(0, take), buf.slice(take)
            self._buf, self._n = ([rest] if rest.num_rows else []), rest.num_rows
            sid = self.next_id
            self.next_id += 1
            keys = [R.sample_key(sid, i, size) for i in range(take)]
            path = R.input_path(self.root, sid)
            if self.fs.exists(path):  # planned by another job since this one scanned the folder
                raise IngestError(f"{path} appeared while this run planned shard {shard_name(sid)}: another ingest is "
                                  "writing to the same folder; run one ingest per output folder")
            L.write_parquet_atomic(self.fs, path, rows.append_column("key", pa.array(keys, pa.string())))
            retried = rows.filter(pc.greater(rows["attempts"], 0))
            if retried.num_rows:  # their records in closed shards stop being current (the index learns at `seal`)
                self.index.add_planned(retried["row_id"], retried["rid64"].to_numpy(), sid)
            self.planned_rows += take
            yield sid


# ---------------------------------------------------------------- driver side: running and publishing


def _failure(err: Exception) -> str:
    """Why a shard failed all its retries, for the summary and the log: the task's own exception (type and first
    line), not Ray's wrapper ("ray::ingest-shard-00000() (pid=...)")."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def _publish(fs, root: str, staged: str, sid: int) -> bool:
    """Move a staged shard into place: tar, stats, ledger fragment, then the parquet (which marks it published).
    Idempotent."""
    name = shard_name(sid)
    if fs.exists(f"{root}/{name}.parquet"):
        return False
    _, spath = fsspec.core.url_to_fs(staged)
    for suffix in R.RAW_SUFFIXES[:-1]:
        fs.mv(f"{spath}/{name}{suffix}", f"{root}/{name}{suffix}")
    fs.mv(f"{spath}/{name}.fragment.parquet", R.fragment_path(root, sid))
    fs.mv(f"{spath}/{name}.parquet", f"{root}/{name}.parquet")
    if fs.exists(spath):  # on S3 the folder vanished with its last file
        fs.rm(spath, recursive=True)
    return True


def _close_failed_shard(fs, root: str, sid: int) -> list[str]:
    """The fragment of a shard that failed all its retries: every row failed_retryable (`shard_failed`). Returns
    the rows' ids."""
    with fs.open(R.input_path(root, sid), "rb") as f:
        recs = L.pending_records(pq.read_table(f), sid).to_pylist()
    for r in recs:
        r.update(state="failed_retryable", reason="shard_failed", attempts=(r["attempts"] or 0) + 1)
    L.write_parquet_atomic(fs, R.fragment_path(root, sid), L.fragment_table(recs, "shard_failed"))
    return [r["row_id"] for r in recs]


class OutputLease:
    """The one ingest job writing to an output folder: `<out>/_lease.json` (its host, pid, a token, when it last
    renewed). Another job finding a live lease stops with IngestError naming it, before it touches anything, so
    two runs never plan into the same shard numbers or delete each other's staged shards. A lease is stale, and
    taken over, when not renewed for STALE_S, or at once when it names a process of this host that is gone (a
    killed driver's re-run need not wait). The holder renews it every RENEW_S from a thread and stops if another job
    took it over (two jobs that started at the same instant: one of them stops after its next renewal)."""

    STALE_S, RENEW_S = 60.0, 10.0

    def __init__(self, fs, root: str, out: str):
        self.fs, self.path, self.out = fs, f"{root}/{R.LEASE}", out
        self.me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                   "started": time.time()}
        self.renewed = 0.0

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def _live(self, other: dict) -> bool:
        if time.time() - float(other.get("renewed", 0)) > self.STALE_S:
            return False
        # a pid means this process only on this host and in this pid namespace (containers share host names)
        if other.get("host") == socket.gethostname() and other.get("pidns") == _pid_namespace():
            try:
                os.kill(int(other["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, KeyError, ValueError, TypeError):
                pass
        return True

    def _busy(self, other: dict) -> IngestError:
        return IngestError(f"another ingest (host {other.get('host')}, pid {other.get('pid')}, renewed "
                           f"{time.time() - float(other.get('renewed', 0)):.0f} s ago) is writing to "
                           f"{netguard.redact_url(self.out)}: run one ingest per output folder; wait for it to end (its "
                           f"lease, {R.LEASE}, is taken over {self.STALE_S:g} s after it stops being renewed)")

    def acquire(self) -> None:
        """Take the lease (IngestError naming the holder of a live one), then keep it renewed from a thread while
        the job runs, through long phases too (planning a big list, compaction)."""
        other = self._read()
        if other and other.get("token") != self.me["token"] and self._live(other):
            raise self._busy(other)
        self._write()
        self._stop, self._lost = threading.Event(), None
        self._thread = threading.Thread(target=self._keep, name="ingest-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.RENEW_S):
            try:
                self.renew()
            except IngestError as err:  # taken over: the job stops at its next check
                self._lost = err
                return
            except Exception as err:  # noqa: BLE001 - storage hiccup: try again next time, the lease lasts STALE_S
                log.warning("could not renew the lease %s: %s", self.path, err)

    def check(self) -> None:
        """IngestError if another job took the lease over (called by the job's scheduling loop)."""
        if self._lost is not None:
            raise self._lost

    def renew(self) -> None:
        if time.time() - self.renewed < self.RENEW_S:
            return
        other = self._read()
        if other and other.get("token") != self.me["token"]:
            raise self._busy(other)
        self._write()

    def _write(self) -> None:
        """Atomically (a temporary name, then moved into place): a reader never sees half a lease."""
        self.renewed = time.time()
        tmp = f"{self.path}.tmp-{self.me['token'][:8]}"
        with self.fs.open(tmp, "w") as f:
            json.dump({**self.me, "renewed": self.renewed}, f)
        self.fs.mv(tmp, self.path)

    def release(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        other = self._read()
        if other and other.get("token") == self.me["token"]:
            self.fs.rm(self.path)


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def run_ingest(manifest: SourceManifest | str, out: str, ray_address: str | None = None, url_lists: list[str] | None = None,
               progress: Callable[[int, int | None], None] | None = None, **options) -> dict:
    """Ingest the manifest's URL lists into `out` (local path or s3://); returns the job summary (also `_summary.json`).

    `options` are `IngestOptions`' fields; values that do not validate raise ConfigError naming each and the fix.
    One job at a time per folder: the job holds the folder's lease (`OutputLease`) from start to end."""
    opts = validated(IngestOptions, "run_ingest", "ingest options", **options)
    m = load_source_manifest(manifest) if isinstance(manifest, str) else manifest
    if url_lists is not None:
        m = m.model_copy(update={"url_lists": list(url_lists)})
    t_start = time.time()
    fs, root = fsspec.core.url_to_fs(out)
    if fs.isfile(root):
        raise IngestError(f"the output {netguard.redact_url(out)} is a file; give --out a folder (new or an earlier "
                          "run's)")
    fs.makedirs(root, exist_ok=True)
    lease = OutputLease(fs, root, out)
    lease.acquire()  # before anything in the folder is touched
    try:
        return _run(m, out, opts, fs, root, lease, t_start, ray_address, progress)
    finally:
        lease.release()


def _run(m: SourceManifest, out: str, opts: IngestOptions, fs, root: str, lease: OutputLease, t_start: float,
         ray_address: str | None, progress) -> dict:
    """run_ingest's job, holding the output folder's lease. Long because it is the driver's one scheduling loop:
    the attempts running, each shard's attempt count, the straggler deadline and wall time, the published and
    failed shards are state that setup, the loop and the summary share (split, they would travel as a dozen
    arguments or a class holding nothing else)."""
    import ray

    for folder in (f"{root}/{R.INPUTS}", f"{root}/{R.FRAGMENTS}"):
        fs.makedirs(folder, exist_ok=True)
    if fs.exists(f"{root}/{R.STAGING}"):
        fs.rm(f"{root}/{R.STAGING}", recursive=True)  # attempts of a dead run; their shards were not published
    st = L.scan(out)
    planner = Planner(m, out, opts, st)  # checks every URL list's columns: a bad list fails here
    todo = itertools.chain(st.pending, planner)
    pending_rows = 0
    for sid in st.pending:
        with fs.open(R.input_path(root, sid), "rb") as f:
            pending_rows += pq.read_metadata(f).num_rows
    log.info("ingest %s -> %s: %d shards published, %d pending; planning new rows", m.name, netguard.redact_url(out),
             len(st.published), len(st.pending))

    setup_s = time.time() - t_start  # listing, repairs, URL-list checks: planning work before Ray starts
    init_ray(ray_address, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    window = opts.max_in_flight or max(2, 2 * cpus)
    fc = m.filters.model_dump()
    dedup = None
    if fc["dedup_exact"] or fc["dedup_near"]:
        dedup = start_dedup(out, opts.dedup_actors or max(1, cpus // 16), fc["dedup_exact"], fc["dedup_near"],
                            fc["near_max_distance"])
    # a cluster under 16 CPUs ingests ~10^8 rows a day at most: 12 B per URL in the driver is ~1 GB then
    n_index = cpus // 16 if opts.row_index_actors is None else opts.row_index_actors
    planner.index = start_row_index(out, n_index) if n_index else RowIndex.local(out)
    task = ray.remote(num_cpus=1, max_retries=opts.task_retries, retry_exceptions=True)(download_shard)
    manifest_dump = m.model_dump()

    def submit(sid: int, n: int):
        spec = {"shard": sid, "out": out, "attempt": f"a{n}", "options": opts.model_dump(), "filters": fc,
                "manifest": manifest_dump, "share": window + 1}  # +1: a straggler's second attempt
        return task.options(name=f"ingest-shard-{shard_name(sid)}").remote(spec, dedup)

    running: dict = {}  # ref -> (shard, started)
    attempts: collections.Counter[int] = collections.Counter()
    published: dict[int, dict] = {}
    failed_shards: dict[int, str] = {}
    durations: list[float] = []
    done_rows, restarts, abandoned = 0, 0, 0
    exhausted = False
    planning_s, first_shard_s = setup_s, None  # planning_s: time spent planning (not starting Ray)

    def start(sid: int) -> None:
        running[submit(sid, attempts[sid])] = (sid, time.time())
        attempts[sid] += 1

    def give_up(sid: int, err: str) -> None:
        failed_shards[sid] = err
        log.error("shard %s failed after %d attempts: %s", shard_name(sid), attempts[sid], err)
        row_ids = _close_failed_shard(fs, root, sid)
        if dedup is not None:  # its images are stored nowhere: copies claimed from now on are kept
            dedup.release(row_ids)

    while True:
        while not exhausted and len(running) < window:
            t_next = time.time()
            sid = next(todo, None)
            planning_s += time.time() - t_next
            first_shard_s = first_shard_s or time.time() - t_start
            if sid is None:
                exhausted = True
            else:
                start(sid)
        if not running:
            break
        lease.check()
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
        for ref in ready:
            sid, _ = running.pop(ref)
            if sid in published:
                continue
            try:
                res = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a shard that failed all retries; other attempts may still win
                if not any(s == sid for s, _ in running.values()):
                    give_up(sid, _failure(err))
                continue
            if not _publish(fs, root, res["staged"], sid):
                raise IngestError(f"{netguard.redact_url(out)}: {shard_name(sid)}.parquet appeared while this run made shard "
                                  f"{shard_name(sid)} (a file this run did not write: another job, or a copy): move it "
                                  "away and re-run; run one ingest per output folder")
            published[sid] = res
            durations.append(res["duration"])
            for other, (osid, _) in list(running.items()):
                if osid == sid:  # the slower duplicate attempt of a straggler
                    ray.cancel(other, force=True)
                    running.pop(other)
            done_rows += res["counts"]["rows"]
            if progress:
                progress(done_rows, pending_rows + planner.planned_rows if planner.done else None)
        deadline = opts.shard_deadline_s or (max(60.0, 3 * statistics.median(durations)) if len(durations) >= 2 else None)
        wall = opts.shard_wall_s or (4 * deadline if deadline else None)
        now = time.time()
        for ref, (sid, t0) in list(running.items()):
            if sid in published or ref not in running:
                continue
            if wall and now - t0 > wall:  # hung: abandon this attempt (its worker is killed) and count it
                ray.cancel(ref, force=True)
                running.pop(ref)
                abandoned += 1
                if not any(s == sid for s, _ in running.values()):
                    if attempts[sid] <= opts.task_retries:
                        log.warning("shard %s attempt ran past %.0f s: abandoned, starting another", shard_name(sid), wall)
                        start(sid)
                    else:
                        give_up(sid, f"every attempt ran past the shard wall time of {wall:g} s")
            elif deadline and now - t0 > deadline and attempts[sid] < 2:
                log.warning("shard %s past its %.0f s deadline: starting a second attempt", shard_name(sid), deadline)
                start(sid)
                restarts += 1
    if fs.exists(f"{root}/{R.STAGING}"):
        fs.rm(f"{root}/{R.STAGING}", recursive=True)

    lease.check()  # a job whose folder was taken over writes no ledger or summary over the new holder's
    t_compact = time.time()
    totals = _compact(out, planner.index)
    summary = _summarize(fs, root, totals, published, failed_shards, restarts, abandoned, time.time() - t_start)
    summary |= {"rows_listed": planner.rows_in, "row_index_parts": len(planner.index.parts),
                "row_index_rebuilds": planner.index.rebuilds, "planning_s": round(planning_s, 3), "first_shard_s": first_shard_s,
                "compact_s": round(time.time() - t_compact, 3),
                "fragment_write_ms": statistics.fmean([r["fragment_ms"] for r in published.values()] or [0.0])}
    with fs.open(f"{root}/{R.SUMMARY}", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _compact(out: str, index: RowIndex) -> dict:
    """The ledger, with the job's row index told of every retried row planned (rebuilt when a partition is lost)."""
    while True:
        try:
            index.seal()
            return L.compact(out, index)  # also callable on demand: pipeline.ledger.compact(out)
        except RowIndexLost as err:
            try:
                index.recover(err)
            except RowIndexLost as final:
                raise IngestError(f"{final} while compacting the ledger: every shard is published; run "
                                  "pipeline.ledger.compact(out) on demand") from None


def _summarize(fs, root, totals: dict, published, failed_shards, restarts, abandoned, duration) -> dict:
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
        "rows_in": totals["rows"], "ok": totals["ok"], "failed": totals["failed"], "filtered": totals["filtered"],
        "pending": totals["pending"],
        "failed_by_reason": totals["failed_by_reason"], "filtered_by_reason": totals["filtered_by_reason"],
        "states": totals["states"],
        "shards": shards, "shards_total": len(shards), "shards_this_run": len(published),
        "shards_failed": {shard_name(k): v for k, v in failed_shards.items()},
        "shards_by_node": dict(collections.Counter(r["node"] for r in published.values())),
        "straggler_restarts": restarts, "attempts_abandoned": abandoned,
        "downloaded_this_run": sum(r["downloaded"] for r in published.values()),
        "ok_this_run": run_ok, "bytes_this_run": sum(r["image_bytes"] for r in published.values()),
        "duration_s": round(duration, 3), "samples_per_s": round(run_ok / duration, 2) if duration > 0 else 0.0,
    }
