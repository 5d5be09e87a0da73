"""The ingest ledger: one record per input row, kept as per-shard fragments and compacted on demand.

A shard's fragment (`_fragments/NNNNN.parquet`, LEDGER_SCHEMA + `rid64`) is written once, by the shard's task,
and published with the shard before its parquet (so a published shard always has its fragment); a shard that
failed all its retries gets a fragment written by the driver (kind `shard_failed`, every row failed_retryable).
Fragments are never rewritten. A row retried in a later shard appears in both fragments: the record of the
highest shard is the row's current one. `compact()` folds fragments, plus the inputs of shards still pending,
into `_ledger.parquet` (one record per row), asking the row index (`pipeline.row_index`, partitioned by URL hash)
which record of a row is current.

States: pending (planned), ok, filtered (+reason, +dup_of), opted_out, failed_retryable, failed_permanent.
"""

from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import rawshard as R
from pipeline.netguard import url_hash
from pipeline.row_index import RowIndex

FAILED_STATES = ("opted_out", "failed_retryable", "failed_permanent")
LEDGER_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("url", pa.string()), ("url_hash", pa.string()), ("shard", pa.int64()),
    ("key", pa.string()), ("state", pa.string()), ("reason", pa.string()), ("dup_of", pa.string()),
    ("attempts", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()),
])
FRAGMENT_SCHEMA = LEDGER_SCHEMA.append(pa.field("rid64", pa.uint64()))
KIND = b"synergen.kind"  # fragment metadata: b"published" or b"shard_failed"
RETRYABLE = b"synergen.retryable"  # fragment metadata: number of failed_retryable rows (skip reading when 0)


def _fs(out: str):
    return fsspec.core.url_to_fs(out)


def write_parquet_atomic(fs, path: str, table: pa.Table) -> None:
    """Write under a temporary name, then move into place: readers never see a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def fragment_table(records: list[dict], kind: str) -> pa.Table:
    """A fragment from per-row records (dicts with LEDGER_SCHEMA's fields and rid64)."""
    table = pa.Table.from_pylist(records, schema=FRAGMENT_SCHEMA)
    n_retry = sum(1 for r in records if r["state"] == "failed_retryable")
    return table.replace_schema_metadata({KIND: kind.encode(), RETRYABLE: str(n_retry).encode()})


def _ids(fs, folder: str, pattern: str) -> set[int]:
    return {R.shard_id_of(p) for p in fs.glob(f"{folder}/{pattern}")}


@dataclass
class ShardStates:
    """Which shards exist in an output folder, by state: O(shards) ints, never rows."""

    planned: set[int] = field(default_factory=set)  # has an input file
    closed: set[int] = field(default_factory=set)  # has a fragment (published, or failed all retries)
    published: set[int] = field(default_factory=set)

    @property
    def pending(self) -> list[int]:
        return sorted(self.planned - self.closed)

    @property
    def next_id(self) -> int:
        return max(self.planned | self.closed, default=-1) + 1


def scan(out: str) -> ShardStates:
    """Read the folder's listing and repair what a killed driver left half done.

    A fragment without its published parquet is either a failed shard's (kept) or the leftover of a publish
    interrupted between the fragment and the parquet (removed: the shard runs again).
    """
    fs, root = _fs(out)
    st = ShardStates(planned=_ids(fs, f"{root}/{R.INPUTS}", "[0-9]*.parquet"),
                     closed=_ids(fs, f"{root}/{R.FRAGMENTS}", "[0-9]*.parquet"),
                     published=_ids(fs, root, "[0-9]*.parquet"))
    for sid in sorted(st.closed - st.published):
        path = R.fragment_path(root, sid)
        with fs.open(path, "rb") as f:
            kind = (pq.read_schema(f).metadata or {}).get(KIND)
        if kind != b"shard_failed":
            fs.rm(path)
            st.closed.discard(sid)
    return st


def _read(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def iter_fragments(out: str, columns: list[str]):
    """Yields every fragment's table (those columns), in shard order; reads the listing only, changes nothing."""
    fs, root = _fs(out)
    for sid in sorted(_ids(fs, f"{root}/{R.FRAGMENTS}", "[0-9]*.parquet")):
        yield _read(fs, R.fragment_path(root, sid), columns)


def retryable_inputs(out: str, st: ShardStates, index: RowIndex, max_attempts: int):
    """Yields input-row tables (one per closed shard) of rows whose current record (by `index`) is
    failed_retryable with fewer than `max_attempts` downloads; `attempts` is set to the fragment's count."""
    fs, root = _fs(out)
    for sid in sorted(st.closed):
        path = R.fragment_path(root, sid)
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if int(meta.get(RETRYABLE, b"1")) == 0:
            continue
        frag = _read(fs, path, ["row_id", "rid64", "state", "attempts"])
        mask = pc.and_(pc.equal(frag["state"], "failed_retryable"), pc.less(frag["attempts"], max_attempts)).to_numpy(zero_copy_only=False)
        if mask.any():
            mask &= index.current(frag["row_id"], frag["rid64"].to_numpy(), sid)
        if not mask.any():
            continue
        wanted = frag.filter(pa.array(mask))
        inp = _read(fs, R.input_path(root, sid))
        idx = pc.index_in(wanted["rid64"], inp["rid64"])
        rows = inp.take(idx)
        yield rows.set_column(rows.schema.get_field_index("attempts"), "attempts", wanted["attempts"])


def compact(out: str, index: RowIndex | None = None) -> dict:
    """Write `_ledger.parquet` (one current record per row; pending shards' rows as `pending`) and return
    the totals: rows, states, ok/failed/filtered with reasons.

    `index` (a job's partitioned row index, loaded after the last shard was planned) says which record of a
    retried row is current; without one, a local index is built here (12 bytes per row in this process)."""
    st = scan(out)
    fs, root = _fs(out)
    index = index or RowIndex.local(out)
    states: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    filtered: collections.Counter[str] = collections.Counter()
    tmp = f"{root}/{R.LEDGER}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, LEDGER_SCHEMA) as w:
            for sid in sorted(st.planned | st.closed):
                if sid in st.closed:
                    t = _read(fs, R.fragment_path(root, sid))
                else:
                    t = pending_records(_read(fs, R.input_path(root, sid)), sid)
                t = t.filter(pa.array(index.current(t["row_id"], t["rid64"].to_numpy(), sid)))
                w.write_table(t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA))
                for g in t.group_by(["state", "reason"]).aggregate([("state", "count")]).to_pylist():
                    s, reason, n = g["state"], g["reason"], g["state_count"]
                    states[s] += n
                    if s in FAILED_STATES:
                        failed[reason] += n
                    elif s == "filtered":
                        filtered[reason] += n
    except BaseException:
        if fs.exists(tmp):  # a lost row-index partition, a bad fragment: no half-written ledger left behind
            fs.rm(tmp)
        raise
    fs.mv(tmp, f"{root}/{R.LEDGER}")
    return {"rows": int(sum(states.values())), "ok": states["ok"], "failed": int(sum(failed.values())),
            "filtered": int(sum(filtered.values())), "pending": states["pending"], "states": dict(states),
            "failed_by_reason": dict(failed), "filtered_by_reason": dict(filtered)}


def pending_records(inputs: pa.Table, sid: int) -> pa.Table:
    """Ledger records of a planned shard's input rows that have not run yet."""
    from pipeline.netguard import redact_url

    n = inputs.num_rows
    urls = inputs["url"].to_pylist()
    return pa.table({
        "row_id": inputs["row_id"], "url": pa.array([redact_url(u) if u else u for u in urls], pa.string()),
        "url_hash": pa.array([url_hash(u) for u in urls], pa.string()), "shard": pa.array([sid] * n, pa.int64()),
        "key": inputs["key"], "state": pa.array(["pending"] * n, pa.string()), "reason": pa.nulls(n, pa.string()),
        "dup_of": pa.nulls(n, pa.string()), "attempts": inputs["attempts"], "sha256": pa.nulls(n, pa.string()),
        "phash": pa.nulls(n, pa.uint64()), "rid64": inputs["rid64"]})

