"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS is set), else a local one on loopback.

The local ("laptop mode") cluster binds every Ray service to 127.0.0.1: Ray would otherwise resolve
localhost to the machine's routable address, so a single-machine job would open ports on the network.
"""

from __future__ import annotations

import os

LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray uses 127.0.0.1 as the node address


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """`ray.init` once per process; a local cluster (no address, no RAY_ADDRESS) listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, ignore_reinit_error=True, **kwargs)
        return
    os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    kwargs.setdefault("include_dashboard", False)
    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, **kwargs)
