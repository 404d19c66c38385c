"""One local Ray cluster per test session, shared by tests/actors and tests/cluster.

2 real cores, but logical resources sized for the tests: 4 fake GPUs (two groups of two) and 8
logical CPUs so fractional-CPU actors never wait on scheduling. The first fixture that asks starts
it; it stops at the end of the session.
"""

from __future__ import annotations

import os

NUM_GPUS = 4
NUM_CPUS = 8


def start_ray():
    """Start (or reuse) the session's Ray; returns True if this call started it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/raypabsv")
    # Serve's default 5 s for its HTTP proxy to come up is missed on a loaded 2-core CI host; `pab serve`
    # (cluster/local.py) allows the same 60 s on a local Ray.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < NUM_GPUS:
            raise RuntimeError(f"this test process already runs a Ray with {gpus} GPU(s); the serving tests need "
                               f"{NUM_GPUS} fake GPUs (start_ray() in tests/cluster/raysession.py)")
        return False
    # address="local": always a fresh cluster, even if RAY_ADDRESS points at another one.
    ray.init(address="local", num_cpus=NUM_CPUS, num_gpus=NUM_GPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    return True
