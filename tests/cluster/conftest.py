"""Shared fixtures of the serving tests: a real SeaweedFS S3 server (session-wide)."""

from __future__ import annotations

import pytest

from weed import WeedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = WeedS3(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()
