"""Fixtures of the multi-node tests: one `LocalCluster` (head + 3 workers of 2 fake GPUs, SeaweedFS S3) for the
whole folder, this process as its driver, and Serve's HTTP proxy on the head.

This process can be the driver of one Ray cluster at a time. tests/actors and tests/cluster keep a single-node
Ray for the whole session; it is stopped here (their fixtures start or find one again when they need it) and
the multi-node cluster is stopped once the last test of this folder has run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localcluster import LocalCluster  # noqa: E402
from support.raysession import start_serve  # noqa: E402

STEP_S = 0.05  # one step of the fake engine (tests/actors/fake_engine.py) in every rank actor


def _leave_other_ray() -> None:
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def mn():
    _leave_other_ray()
    lc = LocalCluster(workers=3, gpus=2, cpus=4).start()
    try:
        lc.connect(env={"FAKE_ENGINE_STEP_S": str(STEP_S)})
        yield lc
    finally:
        lc.shutdown()


@pytest.fixture(scope="package")
def serve_port(mn):
    """Serve with its HTTP proxy on the head only (the ingress is pinned there too), on a free loopback port."""
    from ray import serve

    yield start_serve(proxy_location="HeadOnly")
    serve.shutdown()
