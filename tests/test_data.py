"""The streaming dataset end to end over real token shards (written with TokenShardWriter, synthetic codes):
layouts, packing, resume, ranks and workers, mixtures, bad shards, S3."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from loader_corpus import corpus, tokenizer  # noqa: F401 - module-scoped fixtures shared by the loader tests
from loader_corpus import CODEBOOK, FOLD, as_bytes, manifest, model_spec, stream, write_source
from model.folding import Fold
from pipeline.token_shards import TokenSample, TokenShardWriter, read_shard_index
from pipeline.catalog import vocab_hash
from synergen.errors import ConfigMismatchError, ShardError
from train.data import LoaderConfig, ModelDataSpec, StreamingLoader, StreamingMixture
from train.mixture import MixtureManifest
from train.sequence import IGNORE, LayoutIds, SequenceSpec, build_sequence, plan_layout


def test_sequence_layout_and_loss_masks(tokenizer):
    ids = LayoutIds.from_tokenizer(tokenizer)
    spec = SequenceSpec(seq_len=64, max_tiles=4, thumbnail=True, fold=FOLD)
    codes = np.arange(5 * 4 * 4).reshape(5, 4, 4).astype(np.uint16)  # 2x2 tiles + thumbnail, 4 groups each
    s = TokenSample("k", codes, np.array([11, 12, 13], np.int32), {"tiles": [2, 2], "thumbnail": True})
    lay = plan_layout(s, "und", False, spec, ids)
    seq = build_sequence(s, "und", False, lay, ids)
    assert len(seq) == lay.length == 1 + 5 * (1 + 2 + 4) + len(ids.prompt_und) + 3 + 1
    assert seq.input_ids[0] == ids.bos and seq.input_ids[1] == ids.tile and seq.input_ids[2] == ids.boi
    assert list(seq.input_ids).count(ids.tile) == 4 and list(seq.input_ids).count(ids.thumbnail) == 1
    assert seq.image_mask.sum() == 20 and not seq.image_targets.any()
    assert (seq.codes == codes.reshape(20, 4)).all()  # tiles then thumbnail, groups in order
    assert seq.labels[seq.labels != IGNORE].tolist() == [11, 12, 13, ids.eos]  # und: caption + </s>
    # too many tiles for the stage -> the thumbnail alone, no markers
    lay1 = plan_layout(s, "und", False, SequenceSpec(64, 1, False, FOLD), ids)
    assert lay1.images == (4,) and lay1.kind == "single"
    # longer than the sequence even as a thumbnail -> dropped, never cut
    assert plan_layout(s, "und", False, SequenceSpec(10, 4, True, FOLD), ids) is None
    # generation: prompt + caption, image is the code target, <eoi> and </s> are text targets
    g = TokenSample("g", codes[:1], np.array([11, 12], np.int32), {})
    gseq = build_sequence(g, "gen", False, plan_layout(g, "gen", False, spec, ids), ids)
    assert (gseq.image_targets == gseq.image_mask).all() and gseq.image_mask.sum() == 4
    assert gseq.labels[gseq.labels != IGNORE].tolist() == [ids.eoi, ids.eos]
    useq = build_sequence(g, "gen", True, plan_layout(g, "gen", True, spec, ids), ids)
    assert ids.prompt_uncond[-2] in useq.input_ids.tolist() and 11 not in useq.input_ids.tolist()


def test_batches_are_packed_per_task_with_document_boundaries(corpus, tokenizer):
    out, _ = stream(corpus, tokenizer, 2)
    sb = out[0]
    assert set(sb.batches) == {"und", "gen"}
    for task, b in sb.batches.items():
        assert b.task == task and b.input_ids.shape[1] == 64
        assert len(sb.samples[task]) == (6 if task == "und" else 4)
        assert sum(len(r) for r in b.doc_sources) == len(sb.samples[task])
        assert b.image_codes.shape[0] == int(b.image_mask.sum()) and b.image_codes.shape[1] == 4
        starts = (b.position_ids == 0) & (b.document_ids >= 0)
        assert int(starts.sum()) == len(sb.samples[task])  # positions restart at every document
        assert (b.image_targets <= b.image_mask).all()
        assert 0 < sb.report["tasks"][task]["packing_efficiency"] <= 1
    assert not sb.batches["und"].image_targets.any() and sb.batches["gen"].image_targets.any()


def test_exact_resume_at_several_points(corpus, tokenizer):
    full, _ = stream(corpus, tokenizer, 12)
    for k in (1, 4, 7):  # 7 is mid-shard and past cap_b's first epoch
        head, loader = stream(corpus, tokenizer, k)
        state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
        tail, _ = stream(corpus, tokenizer, 12, state=state)
        assert [as_bytes(x) for x in head + tail] == [as_bytes(x) for x in full]
    assert full[-1].report["sources"]["cap_b"]["epoch"] >= 1  # epochs do roll over, counted


def test_exact_resume_right_after_a_mixture_change(corpus, tokenizer):
    mf = manifest(corpus, schedule=[{"at_step": 3, "weights": {"und": {"cap_a": 0, "cap_b": 1}}}])
    full, _ = stream(corpus, tokenizer, 8, mf=mf)
    assert all(s == "cap_b" for s, _, _ in full[3].samples["und"]) and full[3].report["mixture"].endswith("#1")
    head, loader = stream(corpus, tokenizer, 4, mf=mf)
    tail, _ = stream(corpus, tokenizer, 8, state=loader.state_dict(), mf=mf)
    assert [as_bytes(x) for x in head + tail] == [as_bytes(x) for x in full]


def test_new_manifest_keeps_source_positions(corpus, tokenizer):
    """Switching manifests mid-epoch: no sample of a source is drawn twice within its epoch."""
    head, loader = stream(corpus, tokenizer, 2)
    mf2 = manifest(corpus, tasks={"und": {"global_batch": 5, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 1}}},
                                  "gen": {"global_batch": 4, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}}})
    tail, loader2 = stream(corpus, tokenizer, 5, state=loader.state_dict(), mf=mf2)
    seen = [x for sb in head + tail for x in sb.samples["und"] if x[0] == "cap_a" and x[1] == 0]
    assert len(seen) == len(set(seen)) and len(seen) > 10
    assert "cap_b" in loader2.state_dict()["sources"]  # the dropped source's cursor is carried for a switch back


def test_two_ranks_two_workers_then_one_rank_no_duplicate_no_loss(corpus, tokenizer):
    mf = manifest(corpus, tasks={"und": {"global_batch": 5, "sources": {"cap_a": {"catalogs": ["cap_a"], "weight": 1}}}})
    epoch_size = 27
    keys = Counter()
    states = []
    for rank in (0, 1):
        out, loader = stream(corpus, tokenizer, 3, workers=2, rank=rank, world=2, mf=mf)
        assert [sb.step for sb in out] == [0, 1, 2]  # DataLoader order = step order
        keys.update(k for sb in out for k in sb.samples["und"])
        states.append(loader.state_dict())
    assert states[0] == states[1]  # the state is global: any rank's checkpoint resumes all
    out, _ = stream(corpus, tokenizer, 6, state=states[0], mf=mf)  # 1 rank; 15 + 15 samples cover the epoch
    keys.update(k for sb in out for k in sb.samples["und"])
    epoch0 = {k: n for k, n in keys.items() if k[1] == 0}
    assert len(epoch0) == epoch_size and set(epoch0.values()) == {1}


def test_realised_proportions_in_samples_and_tokens(corpus, tokenizer):
    out, _ = stream(corpus, tokenizer, 6)
    for sb in out:
        und = sb.report["tasks"]["und"]["global"]
        assert und["cap_a"]["samples"] == 4 and und["cap_b"]["samples"] == 2  # 2:1 of 6, exactly
        gen = sb.report["tasks"]["gen"]["global"]
        b = sb.batches["gen"]
        longest = max(int((row == d).sum()) for row in b.document_ids for d in row.unique() if d >= 0)
        total = sum(d["tokens"] for d in gen.values())
        for src in ("gen_a", "gen_b"):  # equal token shares, each within one sample of half the batch
            assert abs(gen.get(src, {}).get("tokens", 0) - total / 2) <= longest
    n = Counter(s for sb in out for s, _, _ in sb.samples["gen"])
    assert n["gen_a"] > n["gen_b"]  # equal tokens means more of the short samples


def test_mismatched_catalog_is_refused_naming_both(corpus, tokenizer):
    with pytest.raises(ConfigMismatchError, match=r"fold 2x2 but the model config folds 2x8"):
        StreamingMixture(manifest(corpus), ModelDataSpec(Fold(2, 8), CODEBOOK, vocab_hash(tokenizer)), tokenizer)
    with pytest.raises(ConfigMismatchError, match=r"vocab hash .* run's tokenizer hashes to deadbeef"):
        StreamingMixture(manifest(corpus), ModelDataSpec(FOLD, CODEBOOK, "deadbeef"), tokenizer)
    with pytest.raises(ConfigMismatchError, match="codebook 64"):
        StreamingMixture(manifest(corpus), ModelDataSpec(FOLD, 32768, vocab_hash(tokenizer)), tokenizer)


def _bad_corpus(root, tokenizer):
    mf = manifest(root, tasks={"gen": {"global_batch": 6, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}}})
    write_source(root, "gen_a", "gen", [6, 6, 6], tokenizer, seed=9)
    return mf


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bad_shards_error_or_recorded_skip(tmp_path, tokenizer, request, where):
    import fsspec

    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('s3')}/bad-{tmp_path.name}"
    mf = _bad_corpus(root, tokenizer)
    fs, _ = fsspec.core.url_to_fs(root)
    good, _ = stream(root, tokenizer, 3, mf=mf, cache_dir=str(tmp_path / "cache"))
    assert sorted(k for sb in good for _, _, k in sb.samples["gen"]) == sorted(f"gen_a-{s:03d}-{i:04d}" for s in range(3) for i in range(6))
    data = fs.cat(f"{root}/gen_a/gen_a-00001.tar")
    fs.pipe(f"{root}/gen_a/gen_a-00001.tar", data[: len(data) // 2])  # truncated
    fs.rm(f"{root}/gen_a/gen_a-00002.tar")  # missing
    with pytest.raises(ShardError, match=r"gen_a-0000[12]\.tar"):
        stream(root, tokenizer, 4, mf=mf, cache_dir=str(tmp_path / "cache2"))
    out, _ = stream(root, tokenizer, 2, mf=mf, on_bad_shard="skip", cache_dir=str(tmp_path / "cache3"))
    keys = [k for sb in out for _, _, k in sb.samples["gen"]]
    assert len(keys) == 12 and all(k.startswith("gen_a-000-") for k in keys)  # only shard 0 is served, epoch after epoch
    assert out[-1].report["sources"]["gen_a"]["epoch"] == 1
    rep = out[-1].report
    assert {u.rsplit("/", 1)[-1] for u in rep["skipped_shards"]} == {"gen_a-00001.tar", "gen_a-00002.tar"}
    assert rep["sources"]["gen_a"]["skipped"] >= 12


def _flip_every_sample(path):
    """One byte of every member of the tar changed, the size kept (as bytes a reader can no longer trust)."""
    with open(path, "r+b") as f:
        for off, size in zip(*(read_shard_index(path)[k] for k in ("offset", "size"))):
            f.seek(int(off + size - 3))
            b = f.read(1)
            f.seek(int(off + size - 3))
            f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_stops_when_most_samples_become_unreadable_naming_the_shards(tmp_path, tokenizer, workers):
    """Every sample unreadable (e.g. credentials expired mid-run): skip mode stops within the window with a ShardError
    naming the worst shards and the fix, in-process and from DataLoader workers alike, instead of empty steps forever."""
    root = str(tmp_path / "data")
    mf = _bad_corpus(root, tokenizer)
    for i in range(3):
        _flip_every_sample(f"{root}/gen_a/gen_a-0000{i}.tar")
    ds = StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, max_steps=100, on_bad_shard="skip",
                                                                            cache_dir=str(tmp_path / "cache")))
    got = []
    with pytest.raises(ShardError, match=r"could not read \d+ of the \d+ samples .*max_unread_fraction=0\.05.*"
                                         r"gen_a-0000\d\.tar \(\d+\).*restore access.*raise data_options\.max_unread_fraction"):
        for sb in StreamingLoader(ds, num_workers=workers):
            got.append(sb)
    assert len(got) < 20 and not any(sb.samples["gen"] for sb in got)  # no more than the window's worth of empty steps


def test_the_unread_bound_judges_a_window_of_enough_samples_not_a_chance_few():
    from train.dataset import UnreadWindow

    w = UnreadWindow(0.05, rank=3)
    w.add(32, ["s3://b/x.tar"] * 2)  # 6% of 32, but two samples: chance where a few shards are bad
    for _ in range(19):
        w.add(32, [])
    w.add(32, ["s3://b/x.tar"] * 20 + ["s3://b/y.tar"] * 4)  # the window's oldest step left it: 24 of 640 (3.75%)
    with pytest.raises(ShardError, match=r"rank 3 could not read 34 of the 640 samples of its last 20 steps.*"
                                         r"most unread: s3://b/x\.tar \(30\), s3://b/y\.tar \(4\)"):
        w.add(32, ["s3://b/x.tar"] * 10)
    empty = UnreadWindow(0.05, rank=0)  # one sample a step, none read: 20 samples, under the minimum, still stops
    for _ in range(19):
        empty.add(1, ["z.tar"])
    with pytest.raises(ShardError, match=r"could not read 20 of the 20 samples"):
        empty.add(1, ["z.tar"])


def test_skip_mode_keeps_skipping_a_bad_shard_among_good_ones_within_the_bound(tmp_path, tokenizer):
    root = str(tmp_path / "data")
    mf = _bad_corpus(root, tokenizer)
    _flip_every_sample(f"{root}/gen_a/gen_a-00001.tar")  # a third of the samples
    out, _ = stream(root, tokenizer, 12, mf=mf, on_bad_shard="skip", max_unread_fraction=0.5, cache_dir=str(tmp_path / "c"))
    assert len(out) == 12 and sum(len(sb.report["unread_samples"]) for sb in out) == 24
    with pytest.raises(ShardError, match=r"gen_a-00001\.tar \(\d+\)"):  # over the default bound (5%) it stops
        stream(root, tokenizer, 12, mf=mf, on_bad_shard="skip", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_catalog_row_claiming_more_samples_than_its_bytes_hold_is_refused_naming_it(tmp_path, tokenizer, mode):
    """A hand-edited or corrupt catalog row (samples > bytes // 1024): refused before any table is sized by it."""
    from pipeline.catalog import read_catalog, write_catalog

    root = str(tmp_path / "data")
    mf = _bad_corpus(root, tokenizer)
    rows = read_catalog(f"{root}/gen_a")
    rows[1]["samples"] = 100_000
    write_catalog(f"{root}/gen_a", rows)
    with pytest.raises(ConfigMismatchError, match=rf"{root}/gen_a shard gen_a-00001\.tar: 100000 samples in \d+ bytes, "
                                                  r"but a sample takes at least 1024 bytes.*catalog row is wrong"):
        stream(root, tokenizer, 1, mf=mf, on_bad_shard=mode, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c" / "tables").exists()


def test_s3_reads_like_local_by_byte_ranges(corpus, tokenizer, s3, tmp_path):
    """The same shards on S3 give the same batches as on local disk, read by range (no whole shard fetched)."""
    import fsspec

    s3_fs, _ = fsspec.core.url_to_fs(s3)
    remote = f"{s3}/corpus-{tmp_path.name}"
    s3_fs.put(corpus, remote, recursive=True)
    local, _ = stream(corpus, tokenizer, 5, cache_dir=str(tmp_path / "c0"))
    remote_out, _ = stream(remote, tokenizer, 5, cache_dir=str(tmp_path / "c1"))
    assert [as_bytes(x) for x in local] == [as_bytes(x) for x in remote_out]
    io = remote_out[-1].report["io"]
    tars = sum(s3_fs.size(p) for p in s3_fs.glob(f"{remote}/*/*.tar"))
    sidecars = sum(s3_fs.size(p) for p in s3_fs.glob(f"{remote}/*/*.idx.npy"))
    assert io["index_bytes"] == sidecars and io["indices_rebuilt"] == 0
    assert 0 < io["read_bytes"] < tars / 2  # 5 steps of 10 samples, each read alone with its 512-byte tar header


def test_manifest_errors_name_the_key(tmp_path):
    from synergen.errors import ManifestError

    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "tasks": {"und": {"global_batch": 4, "sources": {"a": {"catalogs": ["a"]}}}}}))
    with pytest.raises(ManifestError, match=r"m\.yaml[\s\S]*tasks\.und[\s\S]*no `weight`"):
        MixtureManifest.load(str(p))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_a_loader_again_continues_where_its_state_says(corpus, tokenizer, workers):
    """A loop stopped after 3 steps (e.g. for an eval), then a second loop: it starts at step 3, as state_dict() says,
    and the two loops together are the uninterrupted stream."""
    full, _ = stream(corpus, tokenizer, 6)
    ds = StreamingMixture(manifest(corpus), model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, max_steps=6))
    loader = StreamingLoader(ds, num_workers=workers)
    head = []
    for sb in loader:
        head.append(sb)
        if sb.step == 2:
            break
    assert loader.state_dict()["step"] == 3
    tail = list(loader)
    assert [sb.step for sb in head + tail] == list(range(6))
    assert [as_bytes(x) for x in head + tail] == [as_bytes(x) for x in full]


def test_torch_dataloader_workers_yield_the_same_stream(corpus, tokenizer):
    single, _ = stream(corpus, tokenizer, 5)
    multi, _ = stream(corpus, tokenizer, 5, workers=2)
    assert [as_bytes(x) for x in single] == [as_bytes(x) for x in multi]
    assert isinstance(multi[0].batches["und"].input_ids, torch.Tensor)


def test_header_walk_matches_tarfile_and_catches_truncation(corpus):
    import fsspec

    from pipeline.token_shards import build_shard_index, iter_token_shard

    url = f"{corpus}/cap_a/cap_a-00000.tar"
    data = fsspec.open(url, "rb").open().read()
    slow, index = list(iter_token_shard(url, data=data)), build_shard_index(data, url)
    assert [k.decode() if isinstance(k, bytes) else str(k) for k in index["key"]] == [s.key for s in slow] and len(slow) == 7
    with pytest.raises(ShardError, match="cap_a-00000.tar: truncated"):
        build_shard_index(data[:3000], url)


def test_index_sidecar_is_written_on_publish_and_equals_a_header_scan(tmp_path, tokenizer):
    import fsspec

    from pipeline.token_shards import INDEX_SUFFIX, build_shard_index, read_shard_index

    write_source(str(tmp_path), "cap", "und", [5], tokenizer, seed=5, tiles=True)
    url = f"{tmp_path}/cap/cap-00000.tar"
    assert (tmp_path / "cap" / f"cap-00000.tar{INDEX_SUFFIX}").exists()
    side = read_shard_index(url)
    scan = build_shard_index(fsspec.open(url, "rb").open().read(), url)
    assert side.tolist() == scan.tolist() and len(side) == 5
    assert [k.decode() for k in side["key"]] == [f"cap-000-{i:04d}" for i in range(5)]
    assert (side["text"] > 0).all() and set(side["tiles"].tolist()) <= {1, 2, 4}
    with TokenShardWriter(str(tmp_path / "z.tar"), compress=True) as w:  # zstd members: headers read without the codes
        w.write(TokenSample("z0", np.zeros((2, 3, 4), np.uint16), np.arange(7, dtype=np.int32), {"tiles": [1, 1], "thumbnail": True}))
        w.publish()
    z = read_shard_index(str(tmp_path / "z.tar"))
    assert z[["n_images", "groups", "fold_size", "text", "tiles", "thumbnail"]].tolist() == [(2, 3, 4, 7, 1, True)]
    assert read_shard_index(str(tmp_path / "nowhere.tar")) is None


def test_missing_or_wrong_index_is_rebuilt_and_named(corpus, tokenizer, tmp_path, caplog):
    import shutil

    from pipeline.token_shards import INDEX_SUFFIX, read_shard_index

    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    (root / "cap_a" / f"cap_a-00000.tar{INDEX_SUFFIX}").unlink()  # missing: older or foreign shard
    (root / "cap_a" / f"cap_a-00001.tar{INDEX_SUFFIX}").write_bytes(b"not an index")  # garbage
    short = read_shard_index(f"{root}/cap_b/cap_b-00000.tar")[:-1]  # one row short of the catalog
    np.save(root / "cap_b" / f"cap_b-00000.tar{INDEX_SUFFIX}", short)
    want, _ = stream(corpus, tokenizer, 4, cache_dir=str(tmp_path / "c0"))
    with caplog.at_level("INFO", logger="train.shard_store"):
        got, _ = stream(str(root), tokenizer, 4, cache_dir=str(tmp_path / "c1"))
    assert [as_bytes(x) for x in got] == [as_bytes(x) for x in want]
    text = caplog.text
    assert f"cap_a-00000.tar has no index {root}/cap_a/cap_a-00000.tar{INDEX_SUFFIX}" in text
    for name in ("cap_a/cap_a-00001", "cap_b/cap_b-00000"):  # the catalog has each sidecar's sha256
        assert f"{root}/{name}.tar{INDEX_SUFFIX} does not match its shard (sha256 " in text
    assert got[-1].report["io"]["indices_rebuilt"] == 3
    # built once per machine: a second run finds the tables in the cache and reads no index
    again, _ = stream(str(root), tokenizer, 4, cache_dir=str(tmp_path / "c1"))
    assert again[-1].report["io"]["indices_rebuilt"] == 0 and again[-1].report["io"]["index_bytes"] == 0
    # a wrong index that looks right (every row's caption length) disagrees with its catalog row: rebuilt, named
    idx = read_shard_index(f"{root}/gen_a/gen_a-00000.tar")
    idx["text"] += 1
    with open(root / "gen_a" / f"gen_a-00000.tar{INDEX_SUFFIX}", "wb") as f:
        np.save(f, idx)
    caplog.clear()
    with caplog.at_level("INFO", logger="train.shard_store"):
        fixed, _ = stream(str(root), tokenizer, 4, cache_dir=str(tmp_path / "c2"))
    assert [as_bytes(x) for x in fixed] == [as_bytes(x) for x in want]
    assert f"gen_a-00000.tar{INDEX_SUFFIX} does not match its shard" in caplog.text


def test_each_worker_decodes_only_its_own_samples(corpus, tokenizer, tmp_path):
    """2 ranks x 2 workers sharing one machine cache: every process decodes exactly the samples it yields, the
    indices are read once for the machine, and what is read of the shards is the samples' own bytes."""
    import fsspec

    cache = str(tmp_path / "cache")
    decoded, yielded, read, used = Counter(), Counter(), 0, set()
    index_reads = []
    for rank in (0, 1):
        out, _ = stream(corpus, tokenizer, 6, workers=2, rank=rank, world=2, cache_dir=cache)
        last = {}
        for sb in out:
            io = sb.report["io"]
            assert io["rank"] == rank
            yielded[(rank, io["worker"])] += sum(len(v) for v in sb.samples.values())
            last[io["worker"]] = io
        for w, io in last.items():
            decoded[(rank, w)] = io["decoded"]
            read += io["read_bytes"]
        index_reads.append(last[0]["index_bytes"])
        used |= {(s, k.rsplit("-", 1)[0]) for sb in out for v in sb.samples.values() for s, _, k in v}
    assert set(yielded) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert decoded == yielded and sum(yielded.values()) == 6 * (6 + 4)  # every sample of every global batch, once
    fs = fsspec.filesystem("file")
    assert index_reads[0] == sum(fs.size(p) for p in fs.glob(f"{corpus}/*/*.idx.npy")) and index_reads[1] == 0
    assert read < sum(fs.size(p) for p in fs.glob(f"{corpus}/*/*.tar")) / 2
    assert len(used) > 4


def test_worker_batches_travel_narrowed_and_arrive_exact(corpus, tokenizer):
    """A batch pickled with its arrays (from a spawned worker, or by a user): codes and positions as uint16, ids as
    int32 (a quarter to a half of int64), widened back to the same int64 tensors on arrival."""
    import pickle

    sb = stream(corpus, tokenizer, 1)[0][0]
    blob = pickle.dumps(sb, protocol=pickle.HIGHEST_PROTOCOL)
    arrays = sb.__reduce__()[1][1]  # the batches' part of the pickle (the rest is the report and the state)
    wide = sum(t.numel() * t.element_size() for b in sb.batches.values() for t in vars(b).values() if isinstance(t, torch.Tensor))
    assert sum(v.nbytes for a in arrays.values() for v in a.values() if isinstance(v, np.ndarray)) < 0.4 * wide
    back = pickle.loads(blob)
    assert as_bytes(back) == as_bytes(sb)
    assert all(t.dtype == getattr(sb.batches[k], n).dtype for k, b in back.batches.items() for n, t in vars(b).items()
               if isinstance(t, torch.Tensor))


def test_worker_batches_travel_in_shared_slots_and_a_slot_reused_unread_is_an_error(corpus, tokenizer, monkeypatch):
    """A DataLoader worker packs each batch into a shared-memory slot, narrowed (int32 ids, uint16 codes: under
    half the int64 bytes even for these small batches, with each array's 64-byte alignment): what crosses its
    pipe is a header of a few KiB (not the arrays), the main process copies out exactly the in-process batch,
    widened, and a slot written again before its batch was read is an error naming the worker, never a silently
    mixed batch."""
    import pickle
    from types import SimpleNamespace

    from synergen.errors import SynergenError
    from train.dataset import BatchSlots

    single, loader = stream(corpus, tokenizer, 4)
    ds = loader.dataset
    ds._slots = slots = BatchSlots(workers=1, per_worker=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    try:
        written = list(ds)
        blobs = [pickle.dumps(sb, protocol=pickle.HIGHEST_PROTOCOL) for sb in written]  # as the worker's pipe does
        wide = sum(t.numel() * t.element_size() for b in single[0].batches.values() for t in vars(b).values()
                   if isinstance(t, torch.Tensor))
        assert max(map(len, blobs)) < min(8192, wide / 4)
        for sb, want in zip(written, single):  # the slot's bytes (past its header) against the int64 batch's
            slot_bytes = sb.slot[4] - BatchSlots.HEADER
            assert slot_bytes < 0.5 * sum(t.numel() * t.element_size() for b in want.batches.values()
                                          for t in vars(b).values() if isinstance(t, torch.Tensor))
        assert [as_bytes(pickle.loads(b)) for b in blobs[2:]] == [as_bytes(x) for x in single[2:]]
        with pytest.raises(SynergenError, match="worker 0 reused a batch slot before its batch 1 was read") as err:
            pickle.loads(blobs[0])  # batch 3 went into batch 1's slot (2 slots) before batch 1 was read
        fds = [fd for fd_list in slots.fds for fd in fd_list]
        slots.close()  # while the error's traceback is alive (as in the loader's `finally`): no BufferError, no leak
        assert err.value is not None and fds
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        slots.close()


def test_unknown_data_option_fails_synergen_train_before_it_starts_naming_the_key(tmp_path):
    """A misspelt key under a train config's `data_options:` stops `synergen train` at config load (exit 2, nothing
    written), naming the file, `data_options.<key>` and the valid keys, not a TypeError from inside the trainer."""
    from typer.testing import CliRunner

    from synergen.cli import app
    from train.config import TrainConfig
    from train.data import LoaderConfig

    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({"model": "tiny", "mixture": str(tmp_path / "m.yaml"), "steps": 1, "output_dir": str(out),
                                   "data_options": {"cache_dir": str(tmp_path / "c"), "cahce_bytes": 1 << 20}}))
    res = CliRunner().invoke(app, ["train", str(cfg)], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert "run.yaml" in res.output and "'data_options.cahce_bytes'" in res.output
    assert "valid keys here: on_bad_shard, cache_dir, cache_bytes" in res.output and "Traceback" not in res.output
    assert not out.exists()
    good = TrainConfig.load(str(cfg), {"data_options": {"cache_bytes": 1 << 20, "on_bad_shard": "skip"}})
    loader = LoaderConfig(rank=1, world_size=2, **good.data_options.model_dump())
    assert (loader.cache_bytes, loader.on_bad_shard, loader.rank) == (1 << 20, "skip", 1)
