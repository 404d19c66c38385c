"""One bulk run at a time per output (`jobs.lock.RunLock`), on a local folder and a real SeaweedFS, and through the
real `BulkRender` driver (its groups faked, as in test_bulk_local.py): a second run is refused naming the first,
a dead run's lease is taken over, and a run whose lease another run took stops."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest
from test_bulk_local import _Group, _manifest

from jobs import render
from jobs.lock import LOCK_KEY, OutputBusy, RunLock
from jobs.results import RESULTS_KEY
from pab.storage import ObjectChanged, storage_from_config


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return storage_from_config({"backend": "local", "path": str(tmp_path / "out")})
    server = request.getfixturevalue("s3_server")
    return storage_from_config(server.storage_config("lock-" + uuid.uuid4().hex[:8]))


def test_a_second_run_is_refused_naming_the_first_and_a_take_over_wins(store):
    first = RunLock(store, "raysubmit_first", "s3://videos/batch1", heartbeat_s=0.05)
    first.acquire()
    lost: list[str] = []
    first.start_refreshing(lost.append)
    with pytest.raises(OutputBusy) as e:
        RunLock(store, "raysubmit_second", "s3://videos/batch1").acquire()
    said = str(e.value)
    assert "raysubmit_first" in said and f"pid {os.getpid()}" in said and "--take-over" in said
    assert "s3://videos/batch1" in said and "last seen 0 s ago" in said
    assert store.get_json(LOCK_KEY)["run_id"] == "raysubmit_first"  # the refusal wrote nothing

    second = RunLock(store, "raysubmit_second", "s3://videos/batch1")
    second.acquire(force=True)  # the user knows the first is dead (here it is not: it finds out)
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lost and "raysubmit_second took s3://videos/batch1 over" in lost[0]
    first.release()  # not its lease any more: left alone
    assert store.get_json(LOCK_KEY)["run_id"] == "raysubmit_second"
    second.release()
    assert not store.exists(LOCK_KEY)
    RunLock(store, "raysubmit_third", "s3://videos/batch1").acquire()  # free again


def test_a_refresh_that_landed_and_whose_retry_was_refused_keeps_the_lease(store):
    """botocore retries a PUT that timed out; the store refuses the retry's If-Match when the first try landed. The
    lease is still this run's: it must not stop as if another run had taken the output."""
    lock = RunLock(store, "run-mine", "out", heartbeat_s=0.05)
    lock.acquire()
    real, refused = store.put_if, []

    def landed_then_refused(key, data, version, content_type=None):
        landed = real(key, data, version, content_type)
        if not refused:  # the first refresh: landed, its retry refused
            refused.append(key)
            raise ObjectChanged(f"{key}: the retry's If-Match")
        return landed

    store.put_if = landed_then_refused
    lost: list[str] = []
    lock.start_refreshing(lost.append)
    time.sleep(0.5)
    lock.release()
    assert refused and lost == [] and not store.exists(LOCK_KEY)


def test_a_dead_runs_lease_is_taken_over(store):
    """Its driver ran here and is gone: at once. Another host's: once the lease is `stale_after_s` old."""
    done = subprocess.Popen(["true"])
    done.wait()
    me = {"run_id": "run-dead", "host": socket.gethostname(), "pid": done.pid, "started": "1", "at": time.time()}
    store.put_json(LOCK_KEY, me)
    RunLock(store, "run-next", "out").acquire()
    assert store.get_json(LOCK_KEY)["run_id"] == "run-next"

    store.put_json(LOCK_KEY, {**me, "host": "another-node", "pid": os.getpid()})
    with pytest.raises(OutputBusy, match="run-dead"):
        RunLock(store, "run-next", "out", stale_after_s=60).acquire()
    store.put_json(LOCK_KEY, {**me, "host": "another-node", "at": time.time() - 61})
    RunLock(store, "run-next", "out", stale_after_s=60).acquire()
    assert store.get_json(LOCK_KEY)["run_id"] == "run-next"


def test_of_runs_starting_together_one_gets_the_output(store):
    winners, busy, gate = [], [], threading.Barrier(6)

    def start(i: int) -> None:
        gate.wait()
        try:
            RunLock(store, f"run-{i}", "out").acquire()
            winners.append(i)
        except OutputBusy:
            busy.append(i)

    runs = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for r in runs:
        r.start()
    for r in runs:
        r.join(60)
    assert len(winners) == 1 and len(busy) == 5
    assert store.get_json(LOCK_KEY)["run_id"] == f"run-{winners[0]}"


def _run(tmp_path, *extra: str, rows: int = 4) -> render.BulkRender:
    args = render.parse_args(["--manifest", _manifest(tmp_path / "m.parquet", rows), "--output",
                              str(tmp_path / "out"), "--model", "opensora-v1.2-tiny", *extra])  # fmt: skip
    job = render.BulkRender(args)
    job._connect = lambda: None
    job._new_group = lambda index: _Group()
    return job


def test_the_driver_refuses_an_output_another_run_writes_and_takes_it_over_when_told(tmp_path, capsys):
    store = storage_from_config({"backend": "local", "path": str(tmp_path / "out")})
    other = RunLock(store, "raysubmit_other", str(tmp_path / "out"))
    other.acquire()
    argv = ["--manifest", _manifest(tmp_path / "m.parquet", 2), "--output", str(tmp_path / "out"),
            "--model", "opensora-v1.2-tiny"]  # fmt: skip
    assert render.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: another run is writing to") and "raysubmit_other" in err and "Traceback" not in err
    assert "`pab bulk stop raysubmit_other`" in err  # a Ray job: stopped through the job API
    assert not store.exists(RESULTS_KEY) and store.get_json(LOCK_KEY)["run_id"] == "raysubmit_other"
    assert render.main([*argv, "--dry-run"]) == 0  # reading needs no lease

    job = _run(tmp_path, "--take-over", rows=2)
    assert job.run() == 0
    assert store.exists(RESULTS_KEY) and not store.exists(LOCK_KEY)  # released at the end


def test_a_run_whose_output_another_run_took_starts_no_more_rows_and_writes_no_results(tmp_path):
    job = _run(tmp_path, rows=12)
    job.lock.heartbeat_s = 0.05
    store = job.store
    taken = threading.Event()

    def take_over() -> None:  # another run, told the first was dead, takes the output as the first renders
        _Group.started.wait(30)
        RunLock(store, "raysubmit_new", str(tmp_path / "out")).acquire(force=True)
        taken.set()

    _Group.started.clear()
    theirs = {"state": "rendering", "run_id": "raysubmit_new"}  # the new run's intent on a row this one has queued
    store.put_json("videos/r11.json", theirs)
    thief = threading.Thread(target=take_over)
    thief.start()
    rc = job.run()
    thief.join(30)
    assert taken.is_set() and rc == 1
    assert "raysubmit_new took" in job.lost_output
    assert sum(r.status == "completed" for r in job.results.values()) < 12  # stopped starting rows
    assert not store.exists(RESULTS_KEY)  # the table is the new run's to write
    assert store.get_json("videos/r11.json") == theirs  # the rows left here are not cleaned up under it
    assert store.get_json(LOCK_KEY)["run_id"] == "raysubmit_new"  # and its lease stays


def test_a_run_started_here_is_not_named_as_a_job_to_stop(tmp_path):
    """A run started without Ray's job API (`python -m jobs.render`) has no job `pab bulk stop` could find: the
    message says how to stop that process instead."""
    store = storage_from_config({"backend": "local", "path": str(tmp_path)})
    RunLock(store, "run-1a2b3c4d", "out").acquire()
    with pytest.raises(OutputBusy) as e:
        RunLock(store, "run-5e6f7a8b", "out").acquire()
    assert f"Ctrl-C it, or `kill {os.getpid()}` on" in str(e.value) and "pab bulk stop" not in str(e.value)
