"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS is set), else a local one on loopback.

The local ("laptop mode") cluster binds every Ray service to 127.0.0.1: Ray would otherwise resolve
localhost to the machine's routable address, so a single-machine job would open ports on the network.

It also sends no packet to a cloud metadata service. Ray's dashboard process (started even with
`include_dashboard=False`, to run `UsageStatsHead`) calls
`usage_lib.get_cluster_config_to_report("~/ray_bootstrap_config.yaml")`, which, when that file is absent,
sends HTTP GETs to 169.254.169.254 and metadata.google.internal to guess the cloud, whether usage stats
are enabled or not (no environment variable turns it off; Ray 2.60). The file is Ray's own
cluster-launcher config, which `ray up` places on every head it launches. So Ray's services (GCS,
raylet, dashboard) start with HOME set to `ray_home()`, a folder of ours holding that file (and a link
to the real `~/.ray`, where Ray keeps its auth token); the driver's HOME is restored as soon as
`ray.init` returns and job workers get the real HOME back through the runtime env (so `init_ray` starts them
itself: Ray prestarts only workers without a runtime env). A cluster operator
does the same on a head node: see infra/README.md, "Safety: cloud metadata, egress, secrets".
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray uses 127.0.0.1 as the node address
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"  # the name Ray's UsageStatsHead looks for in HOME


def ray_home() -> Path:
    """A HOME for Ray's own processes: holds `ray_bootstrap_config.yaml` (so Ray skips its cloud probe) and
    `.ray` -> the real `~/.ray` (Ray's auth token and config stay where Ray and the user expect them)."""
    home = Path(tempfile.gettempdir()) / f"synergen-ray-home-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    if home.is_symlink() or home.stat().st_uid != os.getuid():  # not ours (a shared /tmp): a private one instead
        home = Path(tempfile.mkdtemp(prefix="synergen-ray-home-"))
    cfg = home / BOOTSTRAP_CONFIG
    if not cfg.exists():
        cfg.write_text("# Written by synergen.local_ray: its presence stops Ray probing cloud metadata services.\n{}\n")
    real_ray = Path.home() / ".ray"
    real_ray.mkdir(exist_ok=True)
    link = home / ".ray"
    if not link.is_symlink():
        try:
            link.symlink_to(real_ray)
        except FileExistsError:
            pass  # another process of ours made it at the same moment
    return home


def ray_service_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a `ray start` subprocess: Ray's services never probe metadata."""
    env = dict(os.environ if env is None else env)
    env["HOME"] = str(ray_home())
    return env


@contextlib.contextmanager
def ray_services_home():
    """While inside, HOME is `ray_home()`: Ray processes started here (`ray.init`, `ray.cluster_utils.Cluster`
    nodes) inherit it and skip the metadata probe. Give job workers the real HOME through their runtime env."""
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(ray_home())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """`ray.init` once per process; a local cluster (no address, no RAY_ADDRESS) listens on loopback only and
    never probes cloud metadata addresses."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, ignore_reinit_error=True, **kwargs)
        return
    os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    kwargs.setdefault("include_dashboard", False)
    real_home = str(Path.home())
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {"HOME": real_home, **(runtime_env.get("env_vars") or {})}
    with ray_services_home():
        # "local": a new cluster of our own, never one that some `ray start` on this machine left running
        ray.init(address="local", num_cpus=num_cpus, ignore_reinit_error=True, runtime_env=runtime_env, **kwargs)
    _start_workers(ray)


def _start_workers(ray) -> None:
    """Start the job's worker processes now, one per CPU, as Ray's prestart does for workers without a runtime env
    (ours carries the real HOME, so Ray's prestarted workers cannot run its tasks and each first task would wait
    ~1.5 s for a worker to start). A job's first tasks then start at once."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus:
        noop = ray.remote(num_cpus=1)(_noop)
        ray.get([noop.remote() for _ in range(cpus)])


def _noop() -> None:
    return None


def started(actors: list, timeout: float) -> list[bool]:
    """Which of these new actors run within `timeout` seconds (their constructor returned and the driver heard of it).

    A bound on what is otherwise an unbounded wait: in one test session a driver was never told that a new actor
    had become alive (the GCS had it ALIVE), and its first call waited forever. Callers replace the ones that did
    not start, or stop with an error naming the cluster."""
    import ray

    refs = [a.__ray_ready__.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    ready_set = set(ready)
    ok = []
    for ref in refs:
        if ref not in ready_set:
            ok.append(False)
            continue
        try:
            ray.get(ref)
            ok.append(True)
        except ray.exceptions.RayActorError:  # died while starting (its node lost, its constructor raised)
            ok.append(False)
    return ok
