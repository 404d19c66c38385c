"""Fixtures shared across the test tree, and how pytest-xdist shares the tests out."""

import shutil

import pytest
import torch

# How pytest-xdist shares the tests between CI's two workers. The tests that start Ray are a third of the
# suite but most of its wall time, so they come in two blocks, scheduled first, one per worker: those with
# their own clusters (multinode, `pab serve` and `bench.load` subprocesses) and those on the session's Ray.
# Within a block they run one after another. The CPU-bound rest follows, by file (a file's module fixtures
# are built once). xdist's own `loadgroup` cannot do it: it renames node ids, which pytest 9.2 ignores, and
# the groups are silently dropped. Its scheduler sees node ids only, hence the paths; collection checks that
# every test starting Ray is under one of them.
RAY_FIXTURES = {"ray_session", "serve_port", "mn", "ray_jobs"}
RAY_BLOCKS = {
    "ray-own": ("tests/multinode/", "tests/bench/test_load.py", "tests/cluster/test_local.py"),
    "ray-session": ("tests/actors/", "tests/cluster/test_serve_", "tests/cluster/test_failures.py",
                    "tests/jobs/test_bulk_job.py", "tests/jobs/test_bulk_local.py"),
}


def _starts_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or bool(RAY_FIXTURES & set(item.fixturenames))


def _scope(nodeid: str) -> str:
    return next((block for block, paths in RAY_BLOCKS.items() if nodeid.startswith(paths)), nodeid.split("::")[0])


def pytest_collection_modifyitems(config, items):
    stray = [item.nodeid for item in items if _starts_ray(item) and _scope(item.nodeid) not in RAY_BLOCKS]
    if stray:
        raise pytest.UsageError(f"these tests start Ray but are in none of tests/conftest.py's RAY_BLOCKS, so two "
                                f"workers could run clusters at once; add their files there: {stray[:5]}")
    # The Ray blocks first (a stable sort: each file's tests stay together and in order).
    rank = {block: i for i, block in enumerate(RAY_BLOCKS)}
    items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)  # where pytest-xdist is not installed (the GPU machine), pytest skips it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayBlocks(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order: the Ray blocks go out first
    return RayBlocks(config, log)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): CI runs two
    workers on 2 cores, where tiny models with two OpenMP threads each spin against each other (~50x slower),
    and one thread keeps float32 results reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def inductor():
    """Skip (with the reason) where torch.compile cannot build CPU kernels: no C++ compiler. Where there is
    one, a failure to compile is a failure, not a skip (CI runs every non-GPU test; issue #18)."""
    torch._dynamo.reset()
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile (inductor) needs a C++ compiler for CPU kernels; none on PATH")
    torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(4))
