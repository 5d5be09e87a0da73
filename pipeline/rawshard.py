"""Names and formulas of the raw (ingest) output folder: the one place they are written down.

Layout of an ingest output folder `<out>`:
- `NNNNN.tar`, `NNNNN_stats.json`, `NNNNN.parquet`: a published raw shard (img2dataset's names; the parquet,
  moved last, marks it published).
- `_inputs/NNNNN.parquet`: the shard's planned input rows, written once by the planner before the shard runs
  (shard N is a pure function of this file).
- `_fragments/NNNNN.parquet`: the shard's ledger fragment (one record per input row), written by the shard's
  task and published with the shard, or written by the driver when the shard failed all its retries.
- `_ledger.parquet`: the fragments (and pending shards' inputs) compacted into one table, `_summary.json`.
- `_staging/NNNNN.<attempt>/`: an attempt's files before publishing (removed at the start of every run).
"""

from __future__ import annotations

import math

import numpy as np

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: names are 00000.tar ...
LEDGER = "_ledger.parquet"
SUMMARY = "_summary.json"
STAGING = "_staging"
INPUTS = "_inputs"
FRAGMENTS = "_fragments"
LEASE = "_lease.json"  # the one job writing to the folder (pipeline.ingest.OutputLease)
RAW_SUFFIXES = (".tar", "_stats.json", ".parquet")  # publish order: the parquet last


def shard_name(shard_id: int) -> str:
    """`00042` for shard 42."""
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shard_id_of(name: str) -> int:
    """42 for `00042.tar`, `.../00042.parquet`, `00042_stats.json`."""
    return int(name.rsplit("/", 1)[-1][:SHARD_DIGITS])


def sample_key(shard_id: int, index: int, shard_size: int) -> str:
    """The WebDataset key of row `index` of shard `shard_id` (img2dataset's formula: shard id, then row index)."""
    oom = math.ceil(math.log10(max(shard_size, 2)))
    return f"{shard_id * 10**oom + index:0{oom + SHARD_DIGITS}d}"


def join(out: str, *names: str) -> str:
    return "/".join([out.rstrip("/"), *names])


def input_path(out: str, shard_id: int) -> str:
    return join(out, INPUTS, f"{shard_name(shard_id)}.parquet")


def fragment_path(out: str, shard_id: int) -> str:
    return join(out, FRAGMENTS, f"{shard_name(shard_id)}.parquet")


def row_key64(url_h64: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """64-bit keys of row ids `<sha1(url)[:20]>-<occurrence>` from the URL hash's first 64 bits and the occurrence
    (uint64, vectorised): the compact form planners, compaction and the ledger index rows by."""
    return url_h64.astype(np.uint64) + occurrence.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
