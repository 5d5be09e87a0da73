"""A source's order in an epoch: a whole-source shuffle, a pure function of (seed, source, epoch), O(1) per position."""

from __future__ import annotations

import numpy as np
import pytest

from train.source_order import SourceOrder


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4099])
def test_every_sample_once_per_epoch(n):
    got = SourceOrder("src", n, seed=5).samples(3, np.arange(n))
    assert sorted(got.tolist()) == list(range(n))


def test_order_is_a_pure_function_of_seed_source_epoch():
    a = SourceOrder("src", 5000, seed=1)
    pos = np.arange(5000)
    first = a.samples(0, pos)
    assert (SourceOrder("src", 5000, seed=1).samples(0, pos) == first).all()  # another process, the same order
    for other in (a.samples(1, pos), SourceOrder("src", 5000, seed=2).samples(0, pos), SourceOrder("other", 5000, seed=1).samples(0, pos)):
        assert (other != first).mean() > 0.99
    # any position alone maps to the same sample (resume costs nothing), after other epochs were asked for
    assert [int(a.samples(0, np.array([p]))[0]) for p in (4999, 0, 2500)] == [first[4999], first[0], first[2500]]


def test_epoch_positions_do_not_follow_the_catalog_order():
    """Rank correlation of a sample's catalog position and its epoch position is ~0, and any 1,000 consecutive
    positions spread over the whole source (not slices of a few shards)."""
    n = 100_000
    got = SourceOrder("src", n, seed=0).samples(0, np.arange(n))
    assert abs(np.corrcoef(np.arange(n), got)[0, 1]) < 0.02  # both are ranks already: Pearson of them is Spearman's rho
    window = got[40_000:41_000]
    shards = np.unique(window // 1000)  # 100 shards of 1,000 samples
    assert len(shards) > 95


@pytest.mark.parametrize("pos", [[-1], [0, 27], [10**9]], ids=["negative", "the-size", "far-past"])
def test_positions_outside_the_source_are_refused_not_walked_forever(pos):
    with pytest.raises(ValueError, match=r"source src: positions .* not all in \[0, 27\)"):
        SourceOrder("src", 27, seed=5).samples(0, np.array(pos))
