"""`python -m jobs.render` on a machine whose local Ray cannot hold a GPU group: it renders on the CPU, or
fails at once saying what is missing, instead of waiting on Ray's resource request for ever (#19 item 7)."""

from __future__ import annotations

import os
import signal
import threading
import time
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


def _manifest(path, n: int) -> str:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"a fox {i}" for i in range(n)]}), path)
    return str(path)


def test_an_output_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path, capsys):
    """A path under a file (or a bucket that does not exist): no traceback, exit 2 naming the output and what to
    check, a dry run included."""
    from jobs.render import main

    (tmp_path / "file").write_text("")
    for dry in ([], ["--dry-run"]):
        argv = ["--manifest", _manifest(tmp_path / "m.parquet", 2), "--output", str(tmp_path / "file" / "out"), *dry]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: storage unavailable: could not open the output") and "Traceback" not in err
        assert f"{tmp_path / 'file' / 'out'}" in err and len(err.strip().splitlines()) == 1


class _Group:
    """A group that renders each row in 0.2 s, and says when its first row started."""

    started = threading.Event()

    def __init__(self) -> None:
        self.name, self.info = "fake", {}

    def start(self) -> None:
        pass

    def generate(self, request, output, timeout_s):
        type(self).started.set()
        time.sleep(0.2)
        return {"video": {"uri": f"file:///{output['video_id']}.mp4"}, "timings": {}}

    def shutdown(self) -> None:
        pass


class _CtrlC(threading.Event):
    """The driver's wait for the rows: Ctrl-C lands there (KeyboardInterrupt in the main thread) once a row renders.
    Raised here rather than by a signal: a test process's own SIGINT handling (pytest-xdist's) is not ours."""

    pressed = False

    def wait(self, timeout=None):
        if _Group.started.is_set() and not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt
        return super().wait(timeout)


def test_ctrl_c_starts_no_more_rows_and_writes_the_results(tmp_path):
    """Ctrl-C: the driver stops handing out rows, writes the results table for what it has (the rest
    `not rendered`, to be rendered by the next run) and exits 130, without a traceback."""
    import jobs.render as render
    from jobs.results import RESULTS_KEY

    args = parse_args(["--manifest", _manifest(tmp_path / "m.parquet", 6), "--output", str(tmp_path / "out"),
                       "--model", "opensora-v1.2-tiny", "--groups", "1"])  # fmt: skip
    job = render.BulkRender(args)
    job._connect = lambda: None
    job._new_group = lambda index: _Group()
    job._all_done = _CtrlC()
    try:
        assert job.run() == 130
    except KeyboardInterrupt:  # escaping, it would end the whole test session
        pytest.fail("Ctrl-C escaped BulkRender.run")
    table = pq.read_table(tmp_path / "out" / RESULTS_KEY).to_pylist()
    assert len(table) == 6
    errors = [r["error"] or "" for r in table]
    assert sum(e.startswith("not rendered: interrupted") for e in errors) >= 4, errors  # at most 2 were started
    assert all(r["status"] == "completed" or e.startswith("not rendered: interrupted") for r, e in zip(table, errors))


def test_sigterm_is_handled_as_ctrl_c_and_the_results_are_written(tmp_path):
    """`pab bulk stop`, `ray job stop` and a pod's deletion send SIGTERM: a real one, to this process, once a row
    renders. The driver stops handing out rows, writes the results table and exits 143 (Ray's own handler, which
    ray.init sets, only exited: no table). The handler it replaced is back afterwards."""
    import jobs.render as render
    from jobs.results import RESULTS_KEY

    args = parse_args(["--manifest", _manifest(tmp_path / "m.parquet", 6), "--output", str(tmp_path / "out"),
                       "--model", "opensora-v1.2-tiny", "--groups", "1"])  # fmt: skip
    job = render.BulkRender(args)
    job._connect = lambda: None
    job._new_group = lambda index: _Group()
    _Group.started.clear()

    def term_once_a_row_renders() -> None:
        if _Group.started.wait(30):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=term_once_a_row_renders, daemon=True).start()
    try:
        assert job.run() == 143
    except KeyboardInterrupt:  # escaping, it would end the whole test session
        pytest.fail("SIGTERM escaped BulkRender.run")
    assert signal.getsignal(signal.SIGTERM) is before
    table = pq.read_table(tmp_path / "out" / RESULTS_KEY).to_pylist()
    assert len(table) == 6
    errors = [r["error"] or "" for r in table]
    assert sum(e.startswith("not rendered: stopped (SIGTERM)") for e in errors) >= 4, errors
    assert all(r["status"] == "completed" or e.startswith("not rendered: stopped (SIGTERM)")
               for r, e in zip(table, errors))  # fmt: skip
