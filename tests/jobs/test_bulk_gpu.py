"""Bulk render on real GPUs (never in CI): one group of two GPUs (DSP over NCCL), then a re-run that renders nothing.

    python -m pytest -m gpu tests/jobs/test_bulk_gpu.py        # or: python tests/jobs/test_bulk_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]


def run_render(manifest: Path, out: Path, *extra: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run(
        [sys.executable, "-m", "jobs.render", "--manifest", str(manifest), "--output", str(out),
         "--model", "opensora-v1.2-tiny", "--num-frames", "17", "--height", "64", "--width", "96", "--steps", "10",
         "--pab", "paper", "--progress-every", "5", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540,
    )
    print(p.stdout[-6000:], p.stderr[-3000:])
    assert p.returncode == 0
    return p.stdout


@pytest.mark.gpu
def test_bulk_render_on_a_two_gpu_group(tmp_path=None):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    tmp_path = Path(tmp_path or tempfile.mkdtemp())
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"gpu-{i}" for i in range(5)] + ["bad"],
                             "prompt": [f"a lighthouse in a storm, take {i}" for i in range(5)] + [""]}), manifest)
    out = tmp_path / "out"
    log = run_render(manifest, out, "--groups", "1", "--group-size", "2")
    assert "6 rows, 1 bad, 0 already rendered, 5 to render" in log
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["completed"] * 5 + ["failed"]
    sidecar = json.loads((out / "videos" / "gpu-0.json").read_text())
    assert sidecar["group"]["world_size"] == 2 and sidecar["group"]["device"].startswith("cuda")
    assert sidecar["parallel"]["sp"] == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")}
    assert len(mtimes) == 5
    log = run_render(manifest, out, "--groups", "2", "--group-size", "1")
    assert "6 rows, 1 bad, 5 already rendered, 0 to render" in log
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")} == mtimes


if __name__ == "__main__":
    test_bulk_render_on_a_two_gpu_group()
    print("GPU bulk smoke: OK")
