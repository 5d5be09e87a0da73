"""The global plan: token-balanced rank split, resume checks of everything that decides the order, shuffle spread."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from loader_corpus import corpus, tokenizer  # noqa: F401 - module-scoped fixtures shared by the loader tests
from loader_corpus import as_bytes, manifest, stream, write_source
from synergen.errors import ConfigMismatchError, SynergenError


def test_rank_split_balances_tokens_and_counts():
    from train.plan import assign_ranks

    rng = np.random.default_rng(0)
    for world in (2, 3, 8):
        for _ in range(50):
            length = rng.integers(10, 400, int(rng.integers(world, 40)))
            rank = assign_ranks(length, world)
            assert (assign_ranks(length, world) == rank).all()  # every rank computes the same split
            counts = np.bincount(rank, minlength=world)
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1
            load = np.bincount(rank, weights=length, minlength=world)
            assert load.max() - load.min() <= length.max()


def test_ranks_get_equal_token_loads(corpus, tokenizer):
    """Global batches of 16 generation samples (lengths ~20 to ~40 tokens) over 2 ranks x 2 workers: each step the ranks' token loads
    differ by less than the spread of the batch's lengths (a split by position differs by up to 27 tokens here)."""
    mf = manifest(corpus, tasks={"gen": {"global_batch": 16, "unit": "tokens", "sources": {
        "gen_a": {"catalogs": ["gen_a"], "weight": 1}, "gen_b": {"catalogs": ["gen_b"], "weight": 1}}}})
    per_rank = []
    for rank in (0, 1):
        out, _ = stream(corpus, tokenizer, 10, workers=2, rank=rank, world=2, mf=mf)
        per_rank.append([sum(v["tokens"] for v in sb.report["tasks"]["gen"]["rank"].values()) for sb in out])
        assert all(sum(v["samples"] for v in sb.report["tasks"]["gen"]["rank"].values()) == 8 for sb in out)
    diffs = [abs(a - b) for a, b in zip(*per_rank)]
    assert max(diffs) <= 10 and sum(diffs) / len(diffs) <= 4


def test_global_batch_smaller_than_the_ranks_is_a_config_error(corpus, tokenizer):
    with pytest.raises(SynergenError, match=r"task 'gen' has global_batch 4 but the run has 5 ranks.*at least 5"):
        stream(corpus, tokenizer, 1, rank=0, world=5)


def _edited(state, path, value):
    state = copy.deepcopy(state)
    d = state
    for k in path[:-1]:
        d = d[k]
    if value is KeyError:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return state


@pytest.mark.parametrize("path, value, error, message", [
    (["sources", "cap_a", "pos"], -1, SynergenError, r"sources\.cap_a\.pos is -1 \(below 0\)"),
    (["sources", "cap_a", "pos"], 10**9, ConfigMismatchError, r"sources\.cap_a\.pos is 1000000000 but source cap_a has 27 samples"),
    (["sources", "cap_a", "pos"], "3", SynergenError, r"sources\.cap_a\.pos is '3' \(not an int\)"),
    (["sources", "cap_b", "epoch"], -2, SynergenError, r"sources\.cap_b\.epoch is -2 \(below 0\)"),
    (["sources", "cap_a", "fingerprint"], KeyError, SynergenError, r"sources\.cap_a\.fingerprint is missing"),
    (["sources"], KeyError, SynergenError, r"loader state: sources is missing"),
    (["seed"], KeyError, SynergenError, r"loader state: seed is missing"),
    (["step"], -1, SynergenError, r"loader state: step is -1 \(below 0\)"),
    (["step"], True, SynergenError, r"loader state: step is True \(not an int\)"),
], ids=["pos-negative", "pos-past-the-end", "pos-a-string", "epoch-negative", "no-fingerprint", "no-sources", "no-seed",
        "step-negative", "step-a-bool"])
def test_a_malformed_or_out_of_range_state_is_refused_naming_the_field(corpus, tokenizer, path, value, error, message):
    """A corrupted or hand-edited state: an error naming the field, its value and the fix, before any step; never a
    hang (pos=-1 walked the shuffle forever), a silently skipped epoch (pos=10**9) or a raw TypeError/KeyError."""
    _, loader = stream(corpus, tokenizer, 2)
    state = _edited(loader.state_dict(), path, value)
    with pytest.raises(error, match=message + r".*resume with the loader state saved with the checkpoint"):
        stream(corpus, tokenizer, 4, state=state)
    with pytest.raises(SynergenError, match=r"loader state: the state is 'list' \(not a dict\)"):
        stream(corpus, tokenizer, 4, state=[state])


def test_resume_refuses_another_order_or_migrates_to_the_next_epoch(corpus, tokenizer):
    _, loader = stream(corpus, tokenizer, 3)
    state = loader.state_dict()
    old = copy.deepcopy(state)
    old["order"] = "shards shuffled in groups of 4"
    with pytest.raises(ConfigMismatchError, match=r"orders samples by 'shards shuffled in groups of 4'.*migrate_order: true"):
        stream(corpus, tokenizer, 4, state=old)
    out, _ = stream(corpus, tokenizer, 4, state=old, migrate_order=True)
    assert {n: s["epoch"] for n, s in out[0].report["sources"].items()} == {n: s["epoch"] + 1 for n, s in state["sources"].items()}
    assert out[0].state["order"] == state["order"]


def test_resume_follows_content_not_location(corpus, tokenizer, s3, tmp_path):
    """The same shards moved to S3 resume; a shard whose content changed under the same name does not."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3)
    moved = f"{s3}/moved-{tmp_path.name}"
    fs.put(corpus, moved, recursive=True)
    full, _ = stream(corpus, tokenizer, 5)
    head, loader = stream(corpus, tokenizer, 2)
    tail, _ = stream(moved, tokenizer, 5, state=loader.state_dict(), cache_dir=str(tmp_path / "c"))
    assert [as_bytes(x) for x in head + tail] == [as_bytes(x) for x in full]
    changed = str(tmp_path / "changed")
    fsspec.filesystem("file").copy(corpus, changed, recursive=True)
    write_source(changed, "cap_b", "und", [4, 6, 3], tokenizer, seed=99, tiles=True)  # same names, other samples
    with pytest.raises(ConfigMismatchError, match="source cap_b: its shards changed since the checkpoint"):
        stream(changed, tokenizer, 5, state=loader.state_dict(), cache_dir=str(tmp_path / "c2"))


def test_a_global_batch_is_a_random_sample_of_the_whole_source(tmp_path, tokenizer):
    """16 shards of 8: one batch of 32 draws from most shards (uniformly ~14), not from 4 consecutive ones."""
    root = str(tmp_path)
    write_source(root, "big", "und", [8] * 16, tokenizer, seed=3)
    mf = manifest(root, tasks={"und": {"global_batch": 32, "sources": {"big": {"catalogs": ["big"], "weight": 1}}}})
    out, _ = stream(root, tokenizer, 4, mf=mf)
    for sb in out:
        shards = {k.split("-")[1] for _, _, k in sb.samples["und"]}
        assert len(shards) >= 10
    keys = [k for sb in out for _, _, k in sb.samples["und"]]
    assert sorted(keys) == sorted(f"big-{s:03d}-{i:04d}" for s in range(16) for i in range(8))  # the epoch, once each
