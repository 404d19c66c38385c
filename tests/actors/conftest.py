"""Fixtures of the GPU-group tests: the session's Ray cluster and a SeaweedFS S3 server."""

from __future__ import annotations

from support.sessionfixtures import ray_session, s3_server  # noqa: F401 - fixtures
