"""Tokenize on a real multi-node Ray cluster: a head and three worker nodes (separate raylets, every one on
127.0.0.1, see synergen/local_ray.py), one of them killed whole mid-job."""

import os
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.tokenization import QualityThresholds, TokenizeConfig, run_tokenize
from pipeline.token_shards import iter_token_shard
from pipeline.catalog import read_catalog
from synergen.local_ray import LOOPBACK_ONLY_ENV
from tests.multinode import kill_node
from tokenize_helpers import REPO_TOKENIZER, REPO_VQ, write_raw_shards

WORKER_NODES = 3


@pytest.fixture()
def cluster():
    """Head (no CPUs: the driver only) + 3 worker nodes of 3 logical CPUs. The session's local Ray, if any,
    is stopped first (one Ray per process) and started again afterwards for the tests that follow."""
    was_local = ray.is_initialized()
    ray.shutdown()
    os.environ[LOOPBACK_ONLY_ENV] = "0"
    loopback = {"node_ip_address": "127.0.0.1"}
    # A dead node is declared after 3 missed 1-s health checks (Ray's default: 5 x 3 s), to keep the test short.
    fast_death = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast_death,
                                                      **loopback})
    workers = [c.add_node(num_cpus=3, **loopback) for _ in range(WORKER_NODES)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()
    if was_local:
        from synergen.local_ray import init_ray

        init_ray(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": {
            k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "NO_ALBUMENTATIONS_UPDATE") if k in os.environ}})


def _kill_a_node_after_first_shard(cluster, node, out: Path, n_shards: int, stop: threading.Event) -> dict:
    """From outside the job: once a token shard is published, kill a whole worker node (raylet and workers, no
    grace), which hosts one of the encoder actors (they are spread one per node)."""
    while not stop.is_set():
        published = len(list(out.glob("*_stats.json")))
        if published:
            kill_node(cluster, node)  # returns once the GCS lists it dead and its workers are gone
            return {"killed": node.node_id, "published_at_kill": published}
        time.sleep(0.05)
    return {}


def test_worker_node_killed_mid_job_every_sample_once_rerun_does_nothing(cluster, tmp_path):
    c, workers = cluster
    raw, out = tmp_path / "raw", tmp_path / "tok"
    n_shards = 9
    info = write_raw_shards(str(raw), n_shards, 4, seed=21, failed_rows=0)
    gate = QualityThresholds(min_distinct_codes=16, min_entropy_bits=3.0, min_psnr_db=12.0, max_flagged_share=0.0)
    cfg = dict(raw=str(raw), out=str(out), task="gen", vq=REPO_VQ, tokenizer=REPO_TOKENIZER, fold="2x4", image_size=64,
               quality=gate, psnr_images=1, concurrency=WORKER_NODES, batch_size=1, shards_in_flight=4,
               ray_address=c.address)
    stop, seen = threading.Event(), {}
    killer = threading.Thread(daemon=True, target=lambda: seen.update(
        _kill_a_node_after_first_shard(c, workers[0], out, n_shards, stop)))
    killer.start()
    s = run_tokenize(TokenizeConfig(**cfg))
    stop.set()
    killer.join(timeout=90)
    assert seen and seen["published_at_kill"] < n_shards, seen  # the node died mid-job
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert seen["killed"] not in alive
    # The job completed in one run: every shard, every sample once, no shard unfinished.
    assert s["unfinished_shards"] == [] and s["shards"] == n_shards and s["tokenized"] == info["successes"]
    cat = read_catalog(str(out))
    keys = [x.key for r in cat for x in iter_token_shard(str(out / r["path"]))]
    assert len(keys) == len(set(keys)) and set(keys) == set(info["captions"])
    # The work was spread: shard tasks on several worker nodes (never the CPU-less head), encoders on all three.
    worker_ids = {w.node_id for w in workers}
    stats = [__import__("json").loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    task_nodes = {st["node"] for st in stats}
    encoder_nodes = {n for st in stats for n in st["encoder_nodes"]}
    assert task_nodes <= worker_ids and len(task_nodes) >= 2, task_nodes
    assert encoder_nodes == worker_ids, (encoder_nodes, worker_ids)
    assert sum(s["shards_by_node"].values()) == n_shards
    # A re-run does nothing and leaves the published bytes as they were.
    before = {r["path"]: r["sha256"] for r in cat}
    again = run_tokenize(TokenizeConfig(**cfg))
    assert again["shards_written_now"] == 0 and again["shards_skipped"] == n_shards
    assert {r["path"]: r["sha256"] for r in read_catalog(str(out))} == before
