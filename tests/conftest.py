"""Fixtures shared across the test tree, and how pytest-xdist shares the tests out."""

import pytest
import torch

# Tests that start a Ray cluster (through one of these fixtures, or marked `ray`: a subprocess's) run one after
# another on one pytest-xdist worker: two clusters at once on CI's 2 cores push each other past their health
# checks and timeouts. They are mostly waiting, so the other worker runs the rest beside them, by file (a
# file's module fixtures are then built once).
RAY_FIXTURES = {"ray_session", "serve_port", "mn", "ray_jobs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        starts_ray = item.get_closest_marker("ray") is not None or bool(RAY_FIXTURES & set(item.fixturenames))
        item.add_marker(pytest.mark.xdist_group("ray" if starts_ray else item.nodeid.split("::")[0]))


@pytest.fixture(scope="module")
def inductor():
    """Skip (with the reason) where torch.compile cannot build CPU kernels, e.g. no C++ compiler."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(4))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        pytest.skip(f"torch.compile (inductor) unavailable on this machine: {type(e).__name__}: {e}")
