"""One local Ray cluster per test session, shared by tests/actors and tests/cluster.

2 real cores, but logical resources sized for the tests: 4 fake GPUs (two groups of two) and 8
logical CPUs so fractional-CPU actors never wait on scheduling. The first fixture that asks starts
it; it stops at the end of the session.
"""

from __future__ import annotations

import os
import time

from support.ports import free_ports

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
                               f"{NUM_GPUS} fake GPUs (start_ray() in tests/support/raysession.py)")
        return False
    # address="local": always a fresh cluster, even if RAY_ADDRESS points at another one.
    ray.init(address="local", num_cpus=NUM_CPUS, num_gpus=NUM_GPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    return True


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.25):
    """`pred()`'s first truthy value, polled; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def start_serve(**options) -> int:
    """Start Serve with its HTTP proxy on a free loopback port (`options` go to `serve.start`); returns the port."""
    from ray import serve
    from ray.exceptions import RayActorError

    (port,) = free_ports(1)
    for attempt in range(3):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, **options)
            return port
        except RayActorError:
            # On a starved CPU Serve's controller may kill the HTTP proxy before it starts (seen with both
            # cores busy: "killed by ray.kill ... cancelled before it started running"); start Serve again.
            if attempt == 2:
                raise
            serve.shutdown()
            time.sleep(2)
    raise AssertionError("unreachable")
