"""Filters: each drops by its own counted reason; dedup is job-wide, idempotent and catches near copies."""

import io

import numpy as np
import pytest
import pyarrow.parquet as pq

from PIL import Image, ImageDraw

from pipeline import filters as F
from pipeline.dedup import Dedup, DedupShard, start_dedup


def test_size_and_aspect_filters_name_their_reason():
    size, aspect = F.ImageSizeFilter(min_side=64, max_side=1000, min_pixels=10_000), F.AspectRatioFilter(3.0)
    assert size({"width": 32, "height": 500}) == "image_too_small"
    assert size({"width": 2000, "height": 500}) == "image_too_large"
    assert size({"width": 64, "height": 100}) == "too_few_pixels"
    assert size({"width": 200, "height": 200}) is None
    assert aspect({"width": 400, "height": 100}) == "aspect_ratio" and aspect({"width": 300, "height": 100}) is None


def test_caption_filter_handles_empty_short_long_and_non_utf8():
    f = F.CaptionFilter(min_chars=3, max_chars=10)
    assert [f({"caption": c}) for c in (None, "  ", "ab", "x" * 11, b"\xff\xfe", "a cat", "ü cat".encode())] == [
        "caption_empty", "caption_empty", "caption_too_short", "caption_too_long", "caption_not_utf8", None, None]


def test_metadata_filter_thresholds_and_missing():
    f = F.MetadataFilter("punsafe", max=0.5)
    assert f({"punsafe": 0.9}) == "punsafe_above_max" and f({"punsafe": None}) == "punsafe_missing"
    assert f({"punsafe": 0.1}) is None
    assert F.MetadataFilter("aesthetic", min=5)({"aesthetic": 4.9}) == "aesthetic_below_min"


def test_language_filter_by_column_and_by_script():
    assert F.LanguageFilter(["en"])({"caption": "a red circle"}) is None
    assert F.LanguageFilter(["en"])({"caption": "红色的圆形"}) == "language"
    assert F.LanguageFilter(["zh"], column="LANGUAGE")({"LANGUAGE": "zh", "caption": "x"}) is None


def _jpeg(img):
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def _scene(shift=0, colour="red"):
    img = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(img).ellipse([20 + shift, 30, 90 + shift, 100], fill=colour)
    return img


def test_dhash_is_close_for_a_reencoded_copy_and_far_for_another_image():
    a = F.dhash_bytes(_jpeg(_scene()))
    b = F.dhash(_scene().resize((100, 100)))
    c = F.dhash_bytes(_jpeg(_scene(shift=30)))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ c).count("1")


def test_sharded_dedup_actors_exact_near_and_idempotent_claims(ray_cluster, tmp_path):
    d = start_dedup(str(tmp_path), 3, exact=True, near=True, max_distance=4)
    h = F.dhash(_scene())
    sha = lambda c: c * 64  # noqa: E731 - a sha256 hex digest stand-in
    assert d.claim_many([("r1", sha("a"), h)]) == [None]
    assert d.claim_many([("r2", sha("a"), F.dhash(_scene(shift=30)))]) == [("duplicate_exact", "r1")]
    assert d.claim_many([("r3", sha("b"), h ^ 0b101)]) == [("duplicate_near", "r1")]
    # a retried attempt gets the same answers; 6 bits away is distinct
    assert d.claim_many([("r1", sha("a"), h), ("r3", sha("b"), h ^ 0b101), ("r4", sha("c"), h ^ 0b111111)]) == [
        None, ("duplicate_near", "r1"), None]


def _oracle(claims, max_distance):
    """Brute force, one claim at a time: exact by sha (the first claimer of the bytes), then near against every
    kept hash."""
    by_sha, kept, out = {}, [], []
    for rid, sha, h in claims:
        if by_sha.setdefault(sha, rid) != rid:
            out.append(("duplicate_exact", by_sha[sha]))
            continue
        near = [k for k, kh in kept if bin(kh ^ h).count("1") <= max_distance]
        if near:
            out.append(("duplicate_near", near))
            continue
        kept.append((rid, h))
        out.append(None)
    return out


def test_sharded_vectorised_dedup_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 2**63, 150, dtype=np.uint64)
    claims = []
    for i in range(600):
        h = int(bases[rng.integers(len(bases))])
        for bit in rng.choice(64, rng.integers(0, 7), replace=False):
            h ^= 1 << int(bit)
        sha = f"{rng.integers(0, 500):064x}"
        claims.append((f"r{i}", sha, h))
    d = Dedup([DedupShard(k, 4, max_distance=4) for k in range(4)], exact=True, near=True, max_distance=4)
    got = [x for start in range(0, len(claims), 25) for x in d.claim_many(claims[start:start + 25])]
    want = _oracle(claims, 4)
    assert sum(w is None for w in want) > 50 and sum(w is not None for w in want) > 100
    for g, w in zip(got, want):
        if w is None or w[0] == "duplicate_exact":
            assert g == w
        else:
            assert g[0] == "duplicate_near" and g[1] in w[1]


def test_restarted_dedup_actor_rebuilds_its_index_from_ledger_fragments(ray_cluster, tmp_path):
    from pipeline import ledger, rawshard

    h = F.dhash(_scene())
    rec = {"row_id": "kept-0", "rid64": 1, "url": "u", "url_hash": "x", "shard": 0, "key": "0", "state": "ok",
           "reason": None, "dup_of": None, "attempts": 1, "sha256": "a" * 64, "phash": h}
    (tmp_path / rawshard.FRAGMENTS).mkdir()
    pq.write_table(ledger.fragment_table([rec], "published"), rawshard.fragment_path(str(tmp_path), 0))
    d = start_dedup(str(tmp_path), 2, exact=True, near=True, max_distance=4)
    assert d.claim_many([("new-0", "a" * 64, None), ("new-1", "b" * 64, h ^ 1)]) == [
        ("duplicate_exact", "kept-0"), ("duplicate_near", "kept-0")]
    for shard in d.shards:  # as if their node died: Ray restarts them, they rebuild from the fragments
        ray_cluster.kill(shard, no_restart=False)
    assert d.claim_many([("new-2", "a" * 64, h ^ 2)]) == [("duplicate_exact", "kept-0")]
    assert d.claim_many([("new-3", "c" * 64, h ^ 3)]) == [("duplicate_near", "kept-0")]


def test_near_duplicates_claimed_at_once_by_two_tasks_keep_exactly_one_of_each_pair(ray_cluster, tmp_path):
    """Two claimers (as two shard tasks) claim the two halves of 300 near-duplicate pairs at the same time, in
    small batches, over 4 dedup actors: of every pair exactly one is kept and the other names it."""
    import threading

    d = start_dedup(str(tmp_path), 4, exact=False, near=True, max_distance=4)
    bases = np.random.default_rng(1).integers(0, 2**63, 300, dtype=np.uint64)  # random: far apart
    halves = {"a": [(f"a{i}", None, int(h)) for i, h in enumerate(bases)],
              "b": [(f"b{i}", None, int(h) ^ 0b1011) for i, h in enumerate(bases)]}  # 3 bits from its twin
    got: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def claim(name):
        barrier.wait()
        got[name] = [x for s in range(0, 300, 3) for x in d.claim_many(halves[name][s:s + 3])]

    threads = [threading.Thread(target=claim, args=(n,)) for n in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(300):
        a, b = got["a"][i], got["b"][i]
        assert (a is None) != (b is None), (i, a, b)
        assert (a or b) in (("duplicate_near", f"a{i}"), ("duplicate_near", f"b{i}"))
        assert (a or b)[1] != f"{'a' if a else 'b'}{i}"  # the dropped one names its twin, not itself


@pytest.mark.parametrize("recent", [1 << 16, 3])
def test_probe_insert_sees_a_near_row_inserted_after_the_claimers_probe_from_its_log_or_the_whole_index(recent):
    """Between a claimer's probe and its insert another task inserts a near row (then far ones): the insert step
    finds it, from the log of recent inserts or, when the log no longer reaches back, from the whole index."""
    from pipeline.dedup import BandKeys

    n_keys = len(BandKeys(4).pairs)
    shard = DedupShard(0, 1, exact=False, near=True, max_distance=4)
    shard.RECENT = recent
    h = 0x0123456789ABCDEF
    late = [("late", h ^ 0b11, b) for b in range(n_keys)]
    answers, since = shard.probe_at(late)
    assert answers == [None] * n_keys
    shard.commit([("first", h, b) for b in range(n_keys)])
    for i, far in enumerate(np.random.default_rng(0).integers(0, 2**63, 4).tolist()):
        shard.commit([(f"far{i}", far, b) for b in range(n_keys)])
    assert (since[1] < shard._recent_base) == (recent == 3)
    assert shard.probe_insert(([late], since, [False])) == ["first"]
    # a restarted shard (its node lost) counts from its rebuild: a claimer's count from before is not trusted
    _, before_loss = shard.probe_at(late)  # counts this copy's 75 inserts
    restarted = DedupShard(0, 1, exact=False, near=True, max_distance=4)
    restarted.commit([("first", h, b) for b in range(n_keys)])
    assert before_loss[1] > restarted._inserted and restarted.probe_insert(([late], before_loss, [False])) == ["first"]
    assert "late" not in set(shard.probe([("third", h ^ 0b1100, b) for b in range(n_keys)]))


@pytest.mark.parametrize("recent", [1 << 16, 3])
def test_a_retry_kept_by_its_first_attempt_stays_kept_whichever_check_the_insert_step_runs(recent):
    """A retried claim found itself at one shard (its first attempt kept it) and, at another, a near row that
    shard could only have told it of from the whole index: it stays kept and its missing entries go in, from
    the log of recent inserts and from the whole index alike (before, the whole-index check made it a duplicate
    while its older entries elsewhere still counted as a kept row)."""
    from pipeline.dedup import BandKeys

    n_keys = len(BandKeys(4).pairs)
    shard = DedupShard(0, 1, exact=False, near=True, max_distance=4)
    shard.RECENT = recent
    h = 0x0123456789ABCDEF
    shard.commit([("other", h ^ 0b1, b) for b in range(n_keys)])  # a near row kept by another task, long ago
    retry = [("retry", h, b) for b in range(n_keys)]
    _, since = shard.probe_at(retry)
    for i, far in enumerate(np.random.default_rng(1).integers(0, 2**63, 4).tolist()):
        shard.commit([(f"far{i}", far, b) for b in range(n_keys)])
    assert (since[1] < shard._recent_base) == (recent == 3)  # the whole-index check runs when the log is short
    assert shard.probe_insert(([retry], since, [True])) == [None]
    assert shard.probe(retry) == [""] * n_keys  # its entries went in, under every key
    if recent == 3:  # the same check tells a claim not kept before of that row
        fresh = [("fresh", h ^ 0b10, b) for b in range(n_keys)]
        assert shard.probe_insert(([fresh], since, [False]))[0] in ("other", "retry")


def test_rows_of_a_shard_that_failed_for_good_are_released_so_a_copy_claimed_later_is_kept():
    """The driver releases the rows of a shard that failed every attempt (they claimed, then nothing was stored):
    an exact or near copy claimed afterwards is kept instead of naming a row no tar holds."""
    from pipeline.dedup import Dedup

    shards = [DedupShard(i, 2, exact=True, near=True, max_distance=4) for i in range(2)]
    d = Dedup(shards, True, True, 4)
    h = 0x0123456789ABCDEF
    assert d.claim_many([("lost-0", "a" * 64, h)]) == [None]
    assert d.claim_many([("before-0", "a" * 64, 0x0F0F0F0F0F0F0F0F)]) == [("duplicate_exact", "lost-0")]
    d.release(["lost-0"])
    assert d.claim_many([("exact-0", "a" * 64, 0x00FF00FF00FF00FF)]) == [None]  # the same bytes, now kept
    assert d.claim_many([("near-0", "b" * 64, h ^ 0b101)]) == [None]  # near the released row only: kept
    assert d.claim_many([("later-0", "c" * 64, h ^ 0b11)]) == [("duplicate_near", "near-0")]
