"""Fixtures of the GPU-group tests: the session's Ray cluster and a SeaweedFS S3 server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))  # weed.py, raysession.py

from raysession import start_ray  # noqa: E402
from weed import WeedS3  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = start_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = WeedS3(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()
