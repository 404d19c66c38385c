"""The session fixtures tests/actors and tests/cluster share: the session's Ray and a SeaweedFS S3 server.

Each folder's conftest imports them (the folders sit side by side, so neither conftest sees the other's).
"""

from __future__ import annotations

import pytest
from support.raysession import start_ray
from support.weed import WeedS3


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
