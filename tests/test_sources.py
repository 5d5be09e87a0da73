"""Source manifests and URL lists: every shipped manifest loads, bad ones name file/key/fix, lists are checked first."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import UrlListError, load_source_manifest, manifest_dir, read_url_list
from synergen.errors import ManifestError

TABLE1 = {"laion_aesthetics", "megalith", "sam", "objects365", "imagenet1k", "laion_en", "coyo"}


def test_every_shipped_manifest_loads_and_table1_is_covered():
    names = {load_source_manifest(str(p)).name for p in manifest_dir().glob("*.yaml")}
    assert TABLE1 | {"demo"} <= names


def test_laion_manifest_uses_the_released_column_names():
    m = load_source_manifest(str(manifest_dir() / "laion_aesthetics.yaml"))
    assert (m.url_column, m.caption_column) == ("URL", "TEXT") and "punsafe" in m.filters.metadata


@pytest.mark.parametrize("body, key, fix", [
    ("name: x\ntask: gen\nurl_lists: [a.parquet]\nfilters: {min_sid: 3}\n", "filters.min_sid", "remove it"),
    ("name: x\ntask: both\nurl_lists: [a.parquet]\n", "task", "allowed values"),
    ("name: x\ntask: gen\n", "url_lists", "add it"),
    ("name: x\ntask: gen\nurl_lists: a.parquet\nfilters: {min_side: -1}\n", "filters.min_side", "greater than or equal to 0"),
])
def test_bad_manifest_names_file_key_and_fix(tmp_path, body, key, fix):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ManifestError) as e:
        load_source_manifest(str(p))
    assert str(p) in str(e.value) and repr(key) in str(e.value) and fix in str(e.value)


def test_metadata_threshold_needs_its_column_carried(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\ntask: gen\nurl_lists: [a.parquet]\nfilters: {metadata: {punsafe: {max: 0.5}}}\n")
    with pytest.raises(ManifestError, match="extra_columns"):
        load_source_manifest(str(p))


def _manifest(tmp_path, lists, **kw):
    from pipeline.sources import SourceManifest
    return SourceManifest(name="t", task="gen", url_lists=lists, **kw)


def test_reads_parquet_csv_jsonl_with_glob_and_stable_row_ids(tmp_path):
    pq.write_table(pa.table({"URL": ["http://a/1", "http://a/2"], "TEXT": ["one", "two"], "aesthetic": [5.0, 6.0]}),
                   tmp_path / "p1.parquet")
    pq.write_table(pa.table({"URL": ["http://a/1"], "TEXT": ["dup"], "aesthetic": [1.0]}), tmp_path / "p2.parquet")
    t = read_url_list(_manifest(tmp_path, [str(tmp_path / "p*.parquet")], url_column="URL", caption_column="TEXT",
                                extra_columns=["aesthetic"]))
    assert t.column("url").to_pylist() == ["http://a/1", "http://a/2", "http://a/1"]
    ids = t.column("row_id").to_pylist()
    assert ids[0] != ids[2] and ids[0].endswith("-0") and ids[2].endswith("-1")
    (tmp_path / "l.csv").write_bytes(b"url,caption\nhttp://b/1,ok\nhttp://b/2,\xff\xfe bad\n")
    t = read_url_list(_manifest(tmp_path, [str(tmp_path / "l.csv")]))
    assert t.column("caption_utf8").to_pylist() == [True, False]
    (tmp_path / "l.jsonl").write_text('{"url": "http://c/1", "caption": "x"}\n')
    assert read_url_list(_manifest(tmp_path, [str(tmp_path / "l.jsonl")])).num_rows == 1


def test_missing_url_column_fails_naming_the_column(tmp_path):
    pq.write_table(pa.table({"link": ["http://a/1"], "caption": ["x"]}), tmp_path / "l.parquet")
    with pytest.raises(UrlListError, match="'url'.*url_column"):
        read_url_list(_manifest(tmp_path, [str(tmp_path / "l.parquet")]))


def test_no_matching_file_is_a_clear_error(tmp_path):
    with pytest.raises(UrlListError, match="matches no file"):
        read_url_list(_manifest(tmp_path, [str(tmp_path / "nothing*.parquet")]))


def test_url_list_on_s3(s3):
    import s3fs
    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3}/lists/l.parquet", "wb") as f:
        pq.write_table(pa.table({"url": ["http://a/1"], "caption": ["x"]}), f)
    t = read_url_list(_manifest(Path("."), [f"{s3}/lists/*.parquet"]))
    assert t.column("url").to_pylist() == ["http://a/1"]


def test_csv_over_1mb_with_newlines_in_quoted_captions_reads_every_row(tmp_path):
    lines = ["url,caption"] + [f'http://a/{i},"line one\nline two, with a comma ""quoted"" {"x" * 200}"' for i in range(6000)]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "l.csv").stat().st_size > 1024 * 1024
    t = read_url_list(_manifest(tmp_path, [str(tmp_path / "l.csv")]))
    assert t.num_rows == 6000 and t.column("caption")[5999].as_py().startswith("line one\nline two")
    assert t.column("bad_row").null_count == 6000


def test_bad_lines_and_values_become_counted_bad_rows_and_the_rest_is_read(tmp_path, caplog):
    (tmp_path / "l.jsonl").write_text('{"url": "http://c/1", "caption": "x"}\n{"url": "http://c/2", "capt\n'
                                      '{"url": "http://c/\\ud800", "caption": "y"}\n{"url": "http://c/4", "caption": "z"}\n')
    (tmp_path / "l.csv").write_bytes(b"url,caption\nhttp://b/1,ok\nhttp://b/2,too,many\nhttp://b/\xff,x\n")
    pq.write_table(pa.table({"url": pa.array([b"http://p/1", b"http://p/\xc3\x28", b"http://p/3"], pa.binary()).view(pa.string()),
                             "caption": pa.array([b"a", b"b", b"\xff"], pa.binary()).view(pa.string())}), tmp_path / "l.parquet")
    for name, good, bad in (("l.jsonl", ["http://c/1", "http://c/4"], 2), ("l.csv", ["http://b/1"], 2),
                            ("l.parquet", ["http://p/1", "http://p/3"], 1)):
        t = read_url_list(_manifest(tmp_path, [str(tmp_path / name)]))
        rows = t.to_pylist()
        assert [r["url"] for r in rows if not r["bad_row"]] == good, name
        assert sum(r["bad_row"] == "url_list_bad_row" for r in rows) == bad, name
        assert name in caplog.text
    assert [r["caption_utf8"] for r in rows] == [True, True, False]  # a bad caption is the caption filter's to count


@pytest.mark.parametrize("name, data, where", [
    ("l.parquet", b"PAR1 this is not parquet", "re-export"),
    ("l.jsonl", b"<html>not json</html>\nneither\n", "line 1"),
    ("l.csv.gz", b"\x1f\x8b\x08\x00broken gzip", "cannot read"),
])
def test_unreadable_url_list_is_a_clean_error_naming_file_place_and_fix(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UrlListError) as e:
        read_url_list(_manifest(tmp_path, [str(tmp_path / name)]))
    assert str(tmp_path / name) in str(e.value) and where in str(e.value) and "url_lists" in str(e.value)


def test_laion_aesthetics_manifest_reads_both_released_schemas(tmp_path):
    m = load_source_manifest(str(manifest_dir() / "laion_aesthetics.yaml"))
    base = {"URL": ["http://a/1"], "TEXT": ["an image"], "WIDTH": [512], "HEIGHT": [512], "similarity": [0.3],
            "punsafe": [0.1], "pwatermark": [0.2]}
    for i, score in enumerate(("aesthetic", "AESTHETIC_SCORE")):
        pq.write_table(pa.table({**base, score: [6.5]}), tmp_path / f"r{i}.parquet")
        t = read_url_list(m.model_copy(update={"url_lists": [str(tmp_path / f"r{i}.parquet")]}))
        assert t.column("aesthetic").to_pylist() == [6.5]


def test_missing_filtered_column_error_suggests_a_fix_that_works(tmp_path):
    pq.write_table(pa.table({"url": ["http://a/1"], "caption": ["x"], "AESTHETIC_SCORE": [6.0]}), tmp_path / "l.parquet")
    kw = {"extra_columns": ["aesthetic"], "filters": {"metadata": {"aesthetic": {"min": 5}}}}
    with pytest.raises(UrlListError) as e:
        read_url_list(_manifest(tmp_path, [str(tmp_path / "l.parquet")], **kw))
    assert "column_aliases: {aesthetic: [AESTHETIC_SCORE]}" in str(e.value)
    t = read_url_list(_manifest(tmp_path, [str(tmp_path / "l.parquet")], column_aliases={"aesthetic": ["AESTHETIC_SCORE"]}, **kw))
    assert t.column("aesthetic").to_pylist() == [6.0]


def test_every_format_streams_in_bounded_parts_in_order_with_bad_lines_counted_where_they_are(tmp_path):
    """A planner reads a list a bounded part at a time whatever the file: one 10k-row row group, a 10k-line CSV or
    JSONL file; every row arrives once, in order, and a bad line deep in the file is named by its own line."""
    from pipeline.sources import check_url_lists, iter_url_list_parts

    n = 10_000
    urls = [f"http://h/{i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(n)]}), tmp_path / "l.parquet",
                   row_group_size=n)
    (tmp_path / "l.csv").write_text("url,caption\n" + "".join(f"{u},c{i}\n" for i, u in enumerate(urls)))
    lines = [f'{{"url": "{u}", "caption": "c{i}"}}\n' for i, u in enumerate(urls)]
    lines[7_000] = '{"url": "http://h/7000", "capt\n'  # malformed, in the fourth part of 2,048 lines
    (tmp_path / "l.jsonl").write_text("".join(lines))
    for name, bad in (("l.parquet", 0), ("l.csv", 0), ("l.jsonl", 1)):
        m = _manifest(tmp_path, [str(tmp_path / name)])
        parts = list(iter_url_list_parts(m, check_url_lists(m), batch_rows=2_048))
        assert len(parts) == 5 and max(p.num_rows for p in parts) <= 2_048 + bad, name
        got = [u for p in parts for u in p.column("url").to_pylist() if u is not None]
        assert got == [u for i, u in enumerate(urls) if not (bad and i == 7_000)], name
        assert sum(p.column("bad_row").null_count for p in parts) == n - bad, name


def test_a_sparse_jsonl_extra_column_first_seen_deep_in_the_file_reads_and_one_no_line_has_fails_first(tmp_path):
    from pipeline.sources import check_url_lists, iter_url_list_parts

    lines = [f'{{"url": "http://h/{i}", "caption": "c"}}\n' for i in range(10)] + ['{"url": "http://h/x", "caption": "c", "lic": "cc"}\n']
    (tmp_path / "l.jsonl").write_text("".join(lines))
    m = _manifest(tmp_path, [str(tmp_path / "l.jsonl")], extra_columns=["lic"])
    parts = list(iter_url_list_parts(m, check_url_lists(m), batch_rows=4))
    assert [v for p in parts for v in p.column("lic").to_pylist()] == [None] * 10 + ["cc"]
    with pytest.raises(UrlListError, match="lacks extra_columns"):
        check_url_lists(_manifest(tmp_path, [str(tmp_path / "l.jsonl")], extra_columns=["nowhere"]))


def test_a_csv_line_with_too_many_fields_near_the_top_is_counted_like_one_deep_in_the_file(tmp_path):
    """The list check reads only the header's block: a bad line there is the reader's to count (as one deeper in
    the file is), not a reason to refuse the whole file."""
    from pipeline.sources import check_url_lists, iter_url_list_parts

    rows = [f"http://h/{i},c{i}\n" for i in range(50)]
    rows[3] = "http://h/3,c3,extra,fields\n"
    (tmp_path / "l.csv").write_text("url,caption\n" + "".join(rows))
    m = _manifest(tmp_path, [str(tmp_path / "l.csv")])
    parts = list(iter_url_list_parts(m, check_url_lists(m)))
    got = [u for p in parts for u in p.column("url").to_pylist() if u is not None]
    assert got == [f"http://h/{i}" for i in range(50) if i != 3]
    assert [b for p in parts for b in p.column("bad_row").to_pylist() if b] and sum(p.num_rows for p in parts) == 50
