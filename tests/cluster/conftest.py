"""Shared fixtures of the serving tests: a real SeaweedFS S3 server, the session's Ray and Serve."""

from __future__ import annotations

import time

import httpx
import pytest
from support.raysession import start_serve, wait_for  # noqa: F401 - wait_for: the tests import it from here
from support.sessionfixtures import ray_session, s3_server  # noqa: F401 - fixtures


@pytest.fixture(scope="session")
def serve_port(ray_session):  # noqa: F811 - the imported fixture, asked for by name
    """Serve's HTTP proxy on a free loopback port."""
    from ray import serve

    yield start_serve()
    serve.shutdown()


def deploy(config: dict, name: str, port: int, key: str, timeout_s: float = 240) -> httpx.Client:
    """Run the app at route "/" and return an authenticated client once /healthz answers."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(config), name=name, route_prefix="/", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    wait_for(lambda: serve.status().applications[name].status == "RUNNING", timeout_s, "app RUNNING")
    wait_for(lambda: _ok(client, "/healthz"), 60, "healthz")
    return client


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def poll(client: httpx.Client, job_id: str, timeout_s: float = 180, until=("completed", "failed", "cancelled")):
    """Poll a job until its status is in `until`; returns (final record, every record seen)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get(f"/v1/videos/{job_id}")
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1]["status"] in until:
            return seen[-1], seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {seen[-1]['status'] if seen else '?'} after {timeout_s}s")


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    d = serve.status().applications[app].deployments[deployment]
    return d.replica_states.get(ReplicaState.RUNNING, 0)
