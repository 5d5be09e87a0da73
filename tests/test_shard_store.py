"""Source tables and verified byte-range reads: every sample's bytes checked, each node reading its share only,
sidecars checked against their shard, the cache bounded without walking it."""

from __future__ import annotations

import glob
import json
import os
import struct
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from loader_corpus import corpus, tokenizer  # noqa: F401 - module-scoped fixtures shared by the loader tests
from loader_corpus import as_bytes, manifest, stream, write_source
from pipeline.token_shards import (INDEX_SUFFIX, TokenSample, build_shard_index, decode_token_sample, encode_token_sample,
                                   read_shard_index)
from pipeline.catalog import CATALOG_NAME
from synergen.errors import ShardError


def _one_source(root, tokenizer, n=3):
    mf = manifest(root, tasks={"gen": {"global_batch": 6, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}}})
    write_source(root, "gen_a", "gen", [6] * n, tokenizer, seed=9)
    return mf


def test_a_flipped_byte_of_the_same_size_is_caught_on_read_after_the_first_check(tmp_path, tokenizer):
    """A sample's bytes changed after its shard was read once (same size, same mtime): the next read names it."""
    root = str(tmp_path / "data")
    mf = _one_source(root, tokenizer)
    cache = str(tmp_path / "cache")
    before, _ = stream(root, tokenizer, 3, mf=mf, cache_dir=cache)  # one epoch: every shard read and checked
    path = f"{root}/gen_a/gen_a-00001.tar"
    st = os.stat(path)
    index = read_shard_index(path)
    with open(path, "r+b") as f:  # one byte in the codes of every sample of the shard
        for off, size in zip(index["offset"], index["size"]):
            f.seek(int(off + size - 8))
            b = f.read(1)
            f.seek(int(off + size - 8))
            f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ShardError, match=r"gen_a-00001\.tar: sample gen_a-001-\d+: xxh3 .* but its index says"):
        stream(root, tokenizer, 3, mf=mf, cache_dir=cache)
    out, _ = stream(root, tokenizer, 3, mf=mf, cache_dir=cache, on_bad_shard="skip")  # skip mode: left out and reported
    keys = [k for sb in out for _, _, k in sb.samples["gen"]]
    assert len(keys) == 12 and not any(k.startswith("gen_a-001-") for k in keys)
    assert sum(len(sb.report["unread_samples"]) for sb in out) == 6


def test_zstd_members_carry_a_frame_checksum():
    s = TokenSample("k", np.arange(64, dtype=np.uint16).reshape(1, 4, 16), np.arange(5, dtype=np.int32), {"tiles": [1, 1]})
    ext, data = encode_token_sample(s, compress=True)
    assert ext == "sgt.zst" and zstandard.get_frame_parameters(data).has_checksum
    bad = bytearray(data)
    bad[-5] ^= 0xFF  # inside the frame's last block or its checksum
    with pytest.raises(ShardError, match="sample 'k'"):
        decode_token_sample(bytes(bad), "k")


def _header(h: dict) -> bytes:
    b = json.dumps(h).encode()
    return b"SGT1" + struct.pack("<I", len(b)) + b


def _zstd_declaring_16_tib() -> bytes:
    """A real sample's zstd frame whose header claims 16 TiB of content (frame content size field widened to 8 bytes)."""
    s = TokenSample("k", np.zeros((1, 4, 4), np.uint16), np.arange(3, dtype=np.int32), {"tiles": [1, 1]})
    z = encode_token_sample(s, compress=True)[1]
    assert zstandard.get_frame_parameters(z).content_size < 256  # a 1-byte size field, replaced below
    forged = z[:4] + bytes([0xE4]) + struct.pack("<Q", 1 << 44) + z[6:]  # single segment, checksum, 8-byte size
    assert zstandard.frame_content_size(forged) == 1 << 44
    return forged


@pytest.mark.parametrize("member, why", [
    (b"SGT1", r"corrupt token sample \(error: unpack_from requires a buffer of at least 8 bytes"),
    (_header({"meta": {"tiles": [1, 1]}, "codes": {"dtype": "bogus", "shape": [1, 4, 4]}, "text": {"n": 3}}) + bytes(44),
     r"codes of dtype 'bogus'"),
    (_header({"meta": {}, "codes": {"dtype": "<f4", "shape": [1, 4, 4]}, "text": {"n": 0}}) + bytes(64), r"codes of dtype '<f4'"),
    (b"SGT1" + struct.pack("<I", 200_000) + b"[" * 100_000 + b"]" * 100_000, r"RecursionError"),
    (_zstd_declaring_16_tib(), r"a zstd frame declaring 17592186044416 bytes, more than a sample holds"),
], ids=["truncated-header", "bogus-dtype", "float32-dtype", "deeply-nested-header", "zstd-16-TiB"])
def test_a_malformed_member_is_a_shard_error_naming_its_sample(member, why):
    """Garbage in a member (a crafted or truncated shard) is a ShardError naming the sample and the fix, never a raw
    exception, a recursion crash or a 16 TiB allocation."""
    with pytest.raises(ShardError, match=rf"sample 'k': .*{why}.*re-tokenize its shard"):
        decode_token_sample(member, "k")


@pytest.mark.parametrize("member, why", [
    (b"SGT1", r"corrupt token sample header \(error: unpack_from requires"),
    (b"SGT1" + struct.pack("<I", 200_000) + b"[" * 100_000 + b"]" * 100_000, r"RecursionError"),
    (_header([1, 2, 3]), r"a header that is not \{codes"),
    (_header({"meta": {"tiles": 7}, "codes": {"shape": [1, 4, 4]}, "text": {"n": 3}}), r"TypeError"),
], ids=["truncated-header", "deeply-nested-header", "a-list", "tiles-not-a-list"])
def test_indexing_a_shard_with_a_malformed_member_names_the_shard_and_sample(member, why):
    """A shard from elsewhere has no sidecar, so the loader indexes it from its tar headers: a member without a
    readable header is a ShardError naming shard and sample there too (the shard is then skipped or an error)."""
    import io
    import tarfile

    good = encode_token_sample(TokenSample("s-0000", np.zeros((1, 4, 4), np.uint16), np.arange(3, dtype=np.int32),
                                           {"tiles": [1, 1]}))[1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, data in (("s-0000", good), ("s-0001", member)):
            info = tarfile.TarInfo(f"{key}.sgt")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=rf"token shard x/a\.tar: sample 's-0001': .*{why}.*re-tokenize its shard"):
        build_shard_index(buf.getvalue(), "x/a.tar")


@pytest.mark.parametrize("case", ["codes >= codebook", "uint32 codes", "float32 codes", "int8 codes"])
def test_codes_outside_the_codebook_or_of_another_dtype_are_refused_on_read(tmp_path, tokenizer, monkeypatch, case):
    """A shard whose catalog says a codebook of 64 but whose sample holds codes the model's embedding cannot take
    (>= 64, or another dtype): reading it is a ShardError naming the shard and the sample, not a batch."""
    import pipeline.token_shards as ts

    encode = ts.encode_token_sample

    def forged(s, compress=False, level=3):
        if s.key == "gen_a-000-0001":
            c = s.codes.astype(np.int64)
            c = {"codes >= codebook": lambda: (c + 60000).astype(np.uint16), "uint32 codes": lambda: c.astype(np.uint32),
                 "float32 codes": lambda: c.astype(np.float32) + 0.5, "int8 codes": lambda: (-c - 1).astype(np.int8)}[case]()
            s = TokenSample(s.key, c, s.text_ids, s.meta)
        return encode(s, compress, level)

    root = str(tmp_path / "data")
    monkeypatch.setattr(ts, "encode_token_sample", forged)
    mf = manifest(root, tasks={"gen": {"global_batch": 4, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}}})
    write_source(root, "gen_a", "gen", [4], tokenizer, seed=3)
    monkeypatch.setattr(ts, "encode_token_sample", encode)
    why = r"codes of dtype uint16 up to 6\d{4}, but the codebook has 64 codes" if case == "codes >= codebook" else "codes of dtype"
    with pytest.raises(ShardError, match=rf"gen_a-00000\.tar: sample '?gen_a-000-0001'?: .*{why}"):
        stream(root, tokenizer, 1, mf=mf, cache_dir=str(tmp_path / "c"))


def test_each_node_reads_its_share_of_the_samples_from_s3(corpus, tokenizer, s3, tmp_path):
    """2 simulated nodes (own caches), 2 ranks x 2 workers: a node reads the indices once and its ranks' samples, not the
    shards; the two nodes together read each sample of the epoch once."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3)
    remote = f"{s3}/share-{tmp_path.name}"
    fs.put(corpus, remote, recursive=True)
    mf = manifest(remote, tasks={"und": {"global_batch": 6, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 1}}}})
    tars = sum(fs.size(p) for p in fs.glob(f"{remote}/cap_a/*.tar"))
    sidecars = sum(fs.size(p) for p in fs.glob(f"{remote}/cap_a/*{INDEX_SUFFIX}"))
    members = sum(int(read_shard_index(p)["size"].sum()) for p in glob.glob(f"{corpus}/cap_a/*.tar"))
    per_node, keys = [], Counter()
    for rank in (0, 1):
        out, _ = stream(remote, tokenizer, 27 // 6, workers=2, rank=rank, world=2, mf=mf, cache_dir=str(tmp_path / f"node{rank}"))
        last = {sb.report["io"]["worker"]: sb.report["io"] for sb in out}
        per_node.append(last[0]["index_bytes"] + sum(io["read_bytes"] for io in last.values()))
        keys.update(k for sb in out for k in sb.samples["und"])
    assert set(keys.values()) == {1}
    for b in per_node:
        assert b < sidecars + 0.7 * members < 0.8 * tars  # its half of the samples (+/- the token balance), not the shards
    assert sum(per_node) - 2 * sidecars <= members  # nothing read twice


def _old_catalog(folder):
    """The catalog as written before sidecar checksums were recorded."""
    import pyarrow as pa

    t = pq.read_table(f"{folder}/{CATALOG_NAME}")
    pq.write_table(t.set_column(t.schema.get_field_index("index_sha256"), "index_sha256", pa.nulls(len(t), pa.string())),
                   f"{folder}/{CATALOG_NAME}")


@pytest.mark.parametrize("catalog", ["with sidecar sha256", "without"])
def test_sidecar_rows_that_would_misplan_a_sample_are_named_and_rebuilt(corpus, tokenizer, tmp_path, caplog, catalog):
    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    if catalog == "without":
        for src in ("gen_a", "gen_b", "cap_a", "cap_b"):
            _old_catalog(root / src)
    edits = {"gen_a/gen_a-00000": ("groups", 0, 1000), "gen_a/gen_a-00001": ("n_images", 3, 0),
             "cap_a/cap_a-00000": ("contradiction", 0, None)}
    for name, (field, row, value) in edits.items():
        idx = read_shard_index(f"{root}/{name}.tar")
        if field == "contradiction":  # 2x the images at half the groups: every total still adds up
            row = int(np.flatnonzero((idx["n_images"] == 1) & (idx["groups"] % 2 == 0))[0])
            idx["n_images"][row], idx["groups"][row] = 2, idx["groups"][row] // 2
        else:
            idx[field][row] = value
        np.save(root / f"{name}.tar{INDEX_SUFFIX}", idx)
    want, _ = stream(corpus, tokenizer, 6, cache_dir=str(tmp_path / "c0"))
    with caplog.at_level("WARNING", logger="train.shard_store"):
        got, _ = stream(str(root), tokenizer, 6, cache_dir=str(tmp_path / "c1"))
    assert [as_bytes(x) for x in got] == [as_bytes(x) for x in want]  # no sample silently dropped or misplanned
    for name in edits:
        assert f"shard index {root}/{name}.tar{INDEX_SUFFIX} does not match its shard" in caplog.text
    if catalog == "without":
        assert "adds up to" in caplog.text or "add up to" in caplog.text
        assert "contradicts itself" in caplog.text
    assert got[-1].report["io"]["indices_rebuilt"] == 3


def test_a_row_that_agrees_with_every_total_but_not_its_sample_is_named_on_read(corpus, tokenizer, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    _old_catalog(root / "gen_a")
    idx = read_shard_index(f"{root}/gen_a/gen_a-00000.tar")
    i, j = (int(x) for x in np.flatnonzero(idx["text"] != idx["text"][0])[:1].tolist() + [0])
    idx["text"][i], idx["text"][j] = idx["text"][j], idx["text"][i]  # two captions' lengths swapped: totals unchanged
    np.save(root / "gen_a" / f"gen_a-00000.tar{INDEX_SUFFIX}", idx)
    with pytest.raises(ShardError, match=rf"shard index .*gen_a-00000\.tar{INDEX_SUFFIX}: sample gen_a-000-\d+ .* index row says"
                                         r".*source table .*gen_a-\w+-v\d+\.npy.*the table is removed.*delete the index"):
        stream(str(root), tokenizer, 12, cache_dir=str(tmp_path / "c"))
    assert not glob.glob(str(tmp_path / "c" / "tables" / "gen_a-*"))  # so following the fix is enough:
    os.remove(root / "gen_a" / f"gen_a-00000.tar{INDEX_SUFFIX}")
    got, _ = stream(str(root), tokenizer, 12, cache_dir=str(tmp_path / "c"))
    want, _ = stream(corpus, tokenizer, 12, cache_dir=str(tmp_path / "c0"))
    assert [as_bytes(x) for x in got] == [as_bytes(x) for x in want]


def test_an_edited_cached_table_is_named_and_rebuilt_not_served(corpus, tokenizer, tmp_path, caplog):
    """A row of the machine's cached table pointed at another sample's bytes (with that sample's xxh3): the digest
    beside the table catches it, the table is rebuilt from the sidecars, and every sample is served under its own key."""
    cache = tmp_path / "c"
    want, _ = stream(corpus, tokenizer, 6, cache_dir=str(cache))
    table = glob.glob(str(cache / "tables" / "gen_a-*.npy"))[0]
    rows = np.load(table)
    rows[0] = rows[1]
    rows[0]["key"] = np.load(table)[0]["key"]
    np.save(table, rows)
    with caplog.at_level("WARNING", logger="train.shard_store"):
        got, _ = stream(corpus, tokenizer, 6, cache_dir=str(cache))
    assert f"cached source table {table} does not match the digest" in caplog.text
    assert [as_bytes(x) for x in got] == [as_bytes(x) for x in want]
    assert (np.load(table) == np.load(table, mmap_mode="r")).all() and not (np.load(table)[0] == rows[0])


def test_the_default_cache_is_this_users_own_folder(tmp_path, monkeypatch):
    import tempfile

    from synergen.errors import SynergenError
    from train.shard_store import default_cache_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = default_cache_dir()
    assert path == str(tmp_path / f"synergen-shards-{os.getuid()}") and os.stat(path).st_mode & 0o777 == 0o700
    os.chmod(path, 0o777)  # as if another user made it first, for everyone to write
    with pytest.raises(SynergenError, match=rf"{path} is not a folder of this user.*data_options\.cache_dir"):
        default_cache_dir()


def test_cache_smaller_than_the_indices_warns_and_reads_never_walk_it(corpus, tokenizer, s3, tmp_path, caplog, monkeypatch):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3)
    remote = f"{s3}/walk-{tmp_path.name}"
    fs.put(corpus, remote, recursive=True)
    walks = Counter()
    for fn in ("walk", "scandir", "listdir"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda *a, _real=real, _fn=fn, **k: (walks.update([_fn]), _real(*a, **k))[1])
    with caplog.at_level("WARNING", logger="train.dataset"):
        from loader_corpus import model_spec
        from train.data import LoaderConfig, StreamingLoader, StreamingMixture

        ds = StreamingMixture(manifest(remote), model_spec(tokenizer), tokenizer,
                              LoaderConfig(seed=7, max_steps=6, cache_dir=str(tmp_path / "cache"), cache_bytes=1000))
    assert "cache_bytes=1000 is smaller than this mixture's source indices" in caplog.text
    built = sum(walks.values())
    assert built <= 4  # one listing of the tables' folder per table built, never of the whole cache
    out = list(StreamingLoader(ds))
    assert len(out) == 6 and sum(walks.values()) == built  # reading samples lists nothing
    tables = sorted(p.name for p in (tmp_path / "cache" / "tables").iterdir() if p.suffix == ".npy")
    assert len(tables) == 4  # in use: kept although over the bound
    # another run's tables (another shard list) come in: the least recently used ones go, the new ones stay
    write_source(str(tmp_path / "other"), "cap_a", "und", [3], tokenizer, seed=11, tiles=True)
    other = {"und": {"global_batch": 2, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 1}}}}
    StreamingMixture(manifest(str(tmp_path / "other"), tasks=other), model_spec(tokenizer), tokenizer,
                     LoaderConfig(cache_dir=str(tmp_path / "cache"), cache_bytes=1000))
    left = sorted(p.name for p in (tmp_path / "cache" / "tables").iterdir() if p.suffix == ".npy")
    assert len(left) == 1 and left[0] not in tables
