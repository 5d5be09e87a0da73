"""Job actors that do not start in time (a node that never runs them, a driver never told they run): replaced, or
an error naming the cluster, never a job that waits forever on its first call."""

import os
import time

import pytest

from synergen.errors import SynergenError


def test_started_tells_running_actors_from_late_and_failed_ones(ray_cluster):
    import ray

    from synergen.local_ray import started

    @ray.remote(num_cpus=0)
    class Sleepy:
        def __init__(self, seconds: float, fail: bool = False):
            if fail:
                raise ValueError("a constructor that raises")
            time.sleep(seconds)

    actors = [Sleepy.remote(0), Sleepy.remote(60), Sleepy.remote(0, fail=True)]
    t0 = time.time()
    assert started(actors, timeout=10) == [True, False, False]
    assert time.time() - t0 < 40  # bounded by the timeout, not by the late actor's constructor
    for a in actors:
        ray.kill(a)


def test_a_dedup_actor_that_does_not_start_in_time_is_replaced_once_then_the_job_is_told(ray_cluster, tmp_path,
                                                                                         monkeypatch):
    import ray

    import pipeline.dedup as D

    marker = str(tmp_path / "slow-once")

    class SlowOnce(D.DedupShard):  # shard 1's first incarnation hangs in its constructor
        def __init__(self, index, *args, **kwargs):
            if index == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(120)
            super().__init__(index, *args, **kwargs)

    monkeypatch.setattr(D, "DedupShard", SlowOnce)
    monkeypatch.setattr(D, "START_S", 10.0)
    d = D.start_dedup(str(tmp_path / "out"), 2, True, True, 4)
    assert os.path.exists(marker) and len(d.shards) == 2
    # the replacement answers, and owns its hashes: an exact duplicate found whichever shard owns it
    assert d.claim_many([("r1-0", "a" * 64, 0x0123456789ABCDEF), ("r2-0", "b" * 64, 0xFEDCBA9876543210)]) == [None, None]
    assert d.claim_many([("r3-0", "a" * 64, 0x00FF00FF00FF00FF), ("r4-0", "b" * 64, 0x0F0F0F0F0F0F0F0F)]) == [("duplicate_exact", "r1-0"),
                                                                                     ("duplicate_exact", "r2-0")]
    for s in d.shards:
        ray.kill(s, no_restart=True)

    class NeverStarts(D.DedupShard):
        def __init__(self, *args, **kwargs):
            time.sleep(120)

    monkeypatch.setattr(D, "DedupShard", NeverStarts)
    monkeypatch.setattr(D, "START_S", 2.0)
    with pytest.raises(SynergenError, match=r"2 of 2 dedup actors did not start within 2 s, twice: check the cluster"):
        D.start_dedup(str(tmp_path / "out"), 2, True, True, 4)
