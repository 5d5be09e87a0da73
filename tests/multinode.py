"""A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet, all on 127.0.0.1.

`ray.cluster_utils.Cluster` starts separate raylets (separate object stores, workers, node ids) in this machine;
with `synergen.local_ray.LOOPBACK_ONLY_ENV` set to "0" every node's address is 127.0.0.1, so nothing listens
on a routable address. The head gets no CPUs (like a production head): tasks run on the worker nodes. A job's
driver connects with `ray_address=cluster.address` (best from a subprocess, so a test session's own local Ray
is untouched). `node_of_process(cluster, pid)` says which node a worker process belongs to, so a test can kill
the whole node that runs a given task or actor with `kill_node(cluster, node)` (returns once the loss is visible).
"""

from __future__ import annotations

import contextlib
import os
import time

import psutil

from synergen.local_ray import LOOPBACK_ONLY_ENV

# The GCS declares a silent node dead after ~2 s instead of ~30 s (read by the head's processes at start).
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                   "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def multinode_cluster(workers: int = 3, cpus_per_worker: int = 1):
    """Yields (cluster, worker nodes); every process of every node is gone afterwards."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in (LOOPBACK_ONLY_ENV, *FAST_NODE_DEATH)}
    os.environ.update({LOOPBACK_ONLY_ENV: "0", **FAST_NODE_DEATH})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 80 * 1024**2})
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_worker, object_store_memory=80 * 1024**2) for _ in range(workers)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def node_of_process(cluster, pid: int):
    """The cluster node (head or worker) whose raylet spawned process `pid`, or None."""
    by_raylet = {raylet_pid(n): n for n in [cluster.head_node, *cluster.worker_nodes]}
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(pid).parents():
            if p.pid in by_raylet:
                return by_raylet[p.pid]
    return None


def kill_node(cluster, node, timeout: float = 60.0) -> None:
    """Kill a whole worker node without grace and return once the cluster knows: the GCS lists the node dead and
    every worker process it had spawned has exited. A worker outlives its raylet for a moment and still answers
    calls made straight to it, so a test that let the job go on at once could see the job finish before the loss
    is visible to it (then nothing was lost, and the test proves nothing)."""
    raylet = raylet_pid(node)
    workers = [p for p in psutil.process_iter() if _has_parent(p, raylet)]
    cluster.remove_node(node, allow_graceful=False)
    cluster.wait_for_nodes(timeout)  # the GCS's live nodes are the ones not removed
    deadline = time.time() + timeout
    while alive := [p for p in workers if _running(p)]:
        if time.time() > deadline:
            raise AssertionError(f"{len(alive)} worker processes of the killed node outlived it by {timeout:g} s")
        time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's exit may never be reaped where pid 1 does not reap)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _has_parent(p: psutil.Process, pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(q.pid == pid for q in p.parents())
    return False


def processes_named(part: str) -> list[int]:
    """Pids of processes whose command line contains `part` (Ray names workers `ray::<task or actor>`)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(part in c for c in (p.info["cmdline"] or [])):
                out.append(p.pid)
    return out
