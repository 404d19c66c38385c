"""Fixtures of the GPU-group tests: the session's Ray cluster and a SeaweedFS S3 server."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))  # sessionfixtures.py, weed.py, raysession.py

from sessionfixtures import ray_session, s3_server  # noqa: E402, F401 - fixtures
