"""Fixtures shared across the test tree, and how pytest-xdist shares the tests out."""

import pytest
import torch

# Tests that start a Ray cluster (through one of these fixtures, or marked `ray`: a subprocess's) run one after
# another on one pytest-xdist worker: two clusters at once on CI's 2 cores push each other past their health
# checks and timeouts. The other worker runs the rest beside them, by file (a file's module fixtures are then
# built once). xdist's own `loadgroup` cannot do it: it renames node ids, which pytest 9.2 no longer allows, and
# the groups are silently dropped. The scheduler below sees node ids only, hence the paths; collection checks
# that every test starting Ray is under one of them.
RAY_FIXTURES = {"ray_session", "serve_port", "mn", "ray_jobs"}
RAY_PATHS = (
    "tests/actors/", "tests/multinode/", "tests/jobs/test_bulk_job.py", "tests/jobs/test_bulk_local.py",
    "tests/cluster/test_serve_", "tests/cluster/test_failures.py", "tests/cluster/test_local.py",
    "tests/bench/test_load.py",
)  # fmt: skip


def _starts_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or bool(RAY_FIXTURES & set(item.fixturenames))


def _scope(nodeid: str) -> str:
    return "ray" if nodeid.startswith(RAY_PATHS) else nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    stray = [item.nodeid for item in items if _starts_ray(item) and _scope(item.nodeid) != "ray"]
    if stray:
        raise pytest.UsageError(f"these tests start Ray but are not under tests/conftest.py's RAY_PATHS, so two "
                                f"workers could run clusters at once; add their files there: {stray[:5]}")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RayApart(config, log)


@pytest.fixture(scope="module")
def inductor():
    """Skip (with the reason) where torch.compile cannot build CPU kernels, e.g. no C++ compiler."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(4))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        pytest.skip(f"torch.compile (inductor) unavailable on this machine: {type(e).__name__}: {e}")
