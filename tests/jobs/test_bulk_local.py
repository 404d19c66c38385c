"""`python -m jobs.render` on a machine whose local Ray cannot hold a GPU group: it renders on the CPU, or
fails at once saying what is missing, instead of waiting on Ray's resource request for ever (#19 item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.render import BulkRender, ResourceError, parse_args


def _fit(argv: list[str], resources: dict[str, float]):
    args = parse_args(["--manifest", "m.parquet", "--output", "out", *argv])
    BulkRender._fit_local(SimpleNamespace(args=args), resources)
    return args


def test_no_gpu_renders_on_the_cpu():
    assert _fit([], {"CPU": 2.0}).gpus_per_rank == 0.0
    assert _fit([], {"CPU": 2.0, "GPU": 1.0}).gpus_per_rank == 1.0  # a GPU is used when there is one


@pytest.mark.parametrize("argv,resources,says", [
    (["--group-size", "4"], {"CPU": 2.0}, "needs 0 GPU and 4 CPU"),
    (["--group-size", "2"], {"CPU": 8.0, "GPU": 1.0}, "needs 2 GPU"),
    (["--device", "cuda"], {"CPU": 8.0}, "needs 1 GPU"),
])  # fmt: skip
def test_a_group_that_can_never_start_is_an_error_at_once(argv, resources, says):
    with pytest.raises(ResourceError, match=says):
        _fit(argv, resources)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.slow
def test_render_without_gpus_completes_on_the_cpu(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "a red circle staying still on a black background"}]),
                   manifest)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR="/tmp/raypabbulk", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, "-m", "jobs.render", "--manifest", str(manifest), "--output",
                          str(tmp_path / "out"), "--model", "opensora-v1.2-tiny", "--steps", "2", "--num-frames", "17"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "rendering on the CPU" in run.stdout + run.stderr
    assert (tmp_path / "out" / "results.parquet").is_file()
    assert pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()[0]["status"] == "completed"
