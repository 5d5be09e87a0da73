"""The ingest row index partitioned by URL hash: the same answers as one dict over every row, whatever the number
of partitions, and no partition holding a URL it does not own."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import rawshard as R
from pipeline.netguard import url_hash
from pipeline.row_index import RowIndex, RowIndexPart, UrlOccurrences, h64_of_row_ids


def _plan_shard(out, sid, row_ids):
    (out / R.INPUTS).mkdir(parents=True, exist_ok=True)
    h64 = h64_of_row_ids(row_ids)
    n = np.array([int(r.split("-")[1]) for r in row_ids], np.int64)
    pq.write_table(pa.table({"row_id": row_ids, "rid64": R.row_key64(h64, n)}), R.input_path(str(out), sid))


def _rid64(row_ids):
    return R.row_key64(h64_of_row_ids(row_ids), np.array([int(r.split("-")[1]) for r in row_ids], np.int64))


def test_row_ids_hash_prefix_is_the_urls_first_64_bits():
    urls = [f"http://example.com/{i}.jpg" for i in range(50)] + [""]
    ids = [f"{url_hash(u)}-3" for u in urls]
    assert h64_of_row_ids(ids).tolist() == [int(url_hash(u)[:16], 16) for u in urls]
    assert h64_of_row_ids(pa.array(ids)).tolist() == h64_of_row_ids(ids).tolist()
    assert h64_of_row_ids([]).dtype == np.uint64


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_partitioned_index_numbers_rows_and_knows_planned_ones_like_one_dict(tmp_path, parts):
    """Occurrence numbers across batches, "a shard holds this row", and which record of a retried row is current,
    against a plain dict over every row; each partition holds only the URLs its hash picks."""
    rng = np.random.default_rng(parts)
    urls = [f"http://h{i % 7}.example/{i}.jpg" for i in range(400)]
    stream = [urls[i] for i in rng.integers(0, len(urls), 3_000)]  # repeats within and across batches
    counts: dict[str, int] = {}
    want_ids = []
    for u in stream:
        want_ids.append(f"{url_hash(u)}-{counts.get(u, 0)}")
        counts[u] = counts.get(u, 0) + 1
    # an earlier run planned the first 1,000 rows in shards 0-1, and retried 50 of shard 0's rows in shard 2
    _plan_shard(tmp_path, 0, want_ids[:500])
    _plan_shard(tmp_path, 1, want_ids[500:1000])
    _plan_shard(tmp_path, 2, want_ids[:50])
    made = []
    index = RowIndex(str(tmp_path), lambda: made.extend([RowIndexPart() for _ in range(parts)]) or made[-parts:])
    got_ids, got_seen = [], []
    for a, b in [(0, 7), (7, 700), (700, 701), (701, 3_000)]:
        h64 = np.array([int(url_hash(u)[:16], 16) for u in stream[a:b]], np.uint64)
        n, seen = index.fresh(h64)
        got_ids += [f"{url_hash(u)}-{k}" for u, k in zip(stream[a:b], n.tolist())]
        got_seen += seen.tolist()
    assert got_ids == want_ids
    assert got_seen == [i < 1000 for i in range(len(stream))]
    # each partition owns exactly the URLs whose hash picks it
    for k, part in enumerate(index.parts):
        owned = np.concatenate([h for h, _ in part.occ.runs]) if part.occ.runs else np.zeros(0, np.uint64)
        assert (owned % np.uint64(parts) == k).all()
    assert sum(len(np.unique(np.concatenate([h for h, _ in p.occ.runs]))) for p in index.parts) == len(set(stream))
    # shard 0's record of a retried row is not current; shard 2's is; shard 1's rows are current
    assert not index.current(want_ids[:50], _rid64(want_ids[:50]), 0).any()
    assert index.current(want_ids[50:500], _rid64(want_ids[50:500]), 0).all()
    assert index.current(want_ids[:50], _rid64(want_ids[:50]), 2).all()
    assert index.current(want_ids[500:1000], _rid64(want_ids[500:1000]), 1).all()
    # a shard planned after loading: its new rows are current at once; retried rows once the index is told and sealed
    assert index.current(want_ids[1000:1100], _rid64(want_ids[1000:1100]), 3).all()
    index.add_planned(want_ids[500:520], _rid64(want_ids[500:520]), 3)
    index.seal()
    assert not index.current(want_ids[500:520], _rid64(want_ids[500:520]), 1).any()
    assert index.current(want_ids[520:1000], _rid64(want_ids[520:1000]), 1).all()
    # a rebuild reads the same state back from the input files (shard 3 was never written: not in it)
    index.rebuild()
    assert index.rebuilds == 1 and len(made) == 2 * parts
    assert index.current(want_ids[500:520], _rid64(want_ids[500:520]), 1).all()
    assert sum(len(p.keys) for p in index.parts) == 1000


def test_url_occurrences_number_every_row_like_a_dict_counter_across_many_batches():
    """The planner's occurrence numbers (row ids `<hash>-<n>`, duplicate URLs) equal a plain dict's, whatever the
    batch sizes and however its sorted runs merged."""
    rng = np.random.default_rng(0)
    occ, seen = UrlOccurrences(), {}
    for size in [*rng.integers(0, 700, 60), 5_000]:
        h = rng.integers(0, 3_000, size).astype(np.uint64)  # many repeats within and across batches
        want = []
        for x in h.tolist():
            want.append(seen.get(x, 0))
            seen[x] = want[-1] + 1
        assert occ.add(h).tolist() == want
    assert len(occ) <= 2 * len(seen) and len(occ.runs) <= 8  # merged: few runs, each hash in few of them


def _lists(tmp_path, n_files=3, rows=40):
    paths = []
    for f in range(n_files):
        urls = [f"http://127.0.0.1:9/{(f * rows + i) % 90}.jpg" for i in range(rows)]  # repeats across files
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(rows)]}), tmp_path / f"l{f}.parquet")
        paths.append(str(tmp_path / f"l{f}.parquet"))
    return paths


def _planned(out):
    import glob

    return [pq.read_table(p, columns=["row_id", "prefilter"]).to_pylist() for p in sorted(glob.glob(f"{out}/{R.INPUTS}/*.parquet"))]


def test_planner_rebuilds_a_lost_index_partition_mid_list_and_plans_every_row_once(ray_cluster, tmp_path):
    """A partition actor killed between two URL lists: the planner rebuilds the index from the input files,
    re-reads the lists, and writes exactly the shards a run without the loss writes."""
    import ray

    from pipeline import ledger as L
    from pipeline.ingest import IngestOptions, Planner, _compact
    from pipeline.row_index import start_row_index
    from pipeline.sources import SourceManifest

    m = SourceManifest(name="p", task="gen", url_lists=_lists(tmp_path))
    outs = {}
    for name in ("lost", "reference"):
        out = tmp_path / name
        (out / R.INPUTS).mkdir(parents=True)
        planner = Planner(m, str(out), IngestOptions(shard_size=10), L.scan(str(out)))
        if name == "lost":
            planner.index = start_row_index(str(out), 3)
            it = iter(planner)
            first = [next(it) for _ in range(4)]  # the first list, whole; the second is not read yet
            ray.kill(planner.index.parts[1])
            sids = first + list(it)
            assert planner.index.rebuilds == 1 and len(planner.index.parts) == 3
            # compaction after another loss: rebuilt again, one record per row, no half-written ledger left
            ray.kill(planner.index.parts[0])
            totals = _compact(str(out), planner.index)
            assert planner.index.rebuilds == 2 and totals["rows"] == totals["pending"] == 120
            assert pq.read_table(out / R.LEDGER).num_rows == 120 and not list(out.glob("*.tmp-*"))
        else:
            sids = list(planner)
        assert sids == list(range(12)) and planner.planned_rows == 120 and planner.rows_in == 120
        outs[name] = _planned(out)
    assert outs["lost"] == outs["reference"]
    rows = [r for shard in outs["lost"] for r in shard]
    assert len({r["row_id"] for r in rows}) == 120
    assert sum(r["prefilter"] == "duplicate_url" for r in rows) == 120 - 90


def test_planner_gives_up_naming_the_fix_when_the_index_keeps_dying(ray_cluster, tmp_path):
    """Partitions that die as soon as they start (a cluster losing node after node): a bounded number of
    rebuilds, then an error that says what happened and what to do, not a loop."""
    import ray

    from pipeline import ledger as L
    from pipeline.ingest import IngestError, IngestOptions, Planner
    from pipeline.row_index import RowIndex
    from pipeline.sources import SourceManifest

    actor = ray.remote(num_cpus=0, max_restarts=0)(RowIndexPart)
    made = []

    def dying_parts():
        parts = [actor.remote() for _ in range(2)]
        ray.get([p.__ray_ready__.remote() for p in parts])  # started, then lost (as with their node)
        for p in parts:
            ray.kill(p)
        made.append(parts)
        return parts

    out = tmp_path / "out"
    (out / R.INPUTS).mkdir(parents=True)
    planner = Planner(SourceManifest(name="p", task="gen", url_lists=_lists(tmp_path, 1)), str(out),
                      IngestOptions(shard_size=10), L.scan(str(out)))
    planner.index = RowIndex(str(out), dying_parts, load=False)
    with pytest.raises(IngestError, match=r"lost 6 times .* while planning: check the cluster's nodes and re-run"):
        list(planner)
    assert len(made) == 6 and not list((out / R.INPUTS).iterdir())
