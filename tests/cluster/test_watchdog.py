"""The watchdog ends a process tree whose root is SIGKILLed (what `pab serve` leaves of Ray otherwise, #19)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import watchdog

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="the watchdog reads /proc (Linux)")

# A root that starts a child and a shell with a child of its own (as Ray's raylet has its agents), then its
# watchdog, as `pab serve` starts it after Ray, waiting until the watchdog has noted them; it prints their pids and
# waits.
ROOT = """
import subprocess, sys, time
from cluster.watchdog import start_watchdog
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
shell = subprocess.Popen(["bash", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
sleep_pid = shell.stdout.readline().strip()
start_watchdog(interval=0.2, ready_s=60)  # its first note holds all three, however loaded the host
print(child.pid, shell.pid, sleep_pid, flush=True)
time.sleep(300)
"""


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(watchdog.running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.faults
def test_a_sigkilled_roots_descendants_are_ended():
    repo = Path(__file__).resolve().parents[2]
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True, cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    pids = [int(p) for p in root.stdout.readline().split()]  # child, shell, the shell's sleep
    try:
        assert all(watchdog.running(p) for p in pids)  # and the watchdog has noted them (ready_s)
        # The shell dies first, as a raylet does: its sleep goes to PID 1 and is no descendant of the root.
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(1.0)
        assert watchdog.running(pids[2]) and pids[2] not in watchdog.descendants(root.pid)
        root.send_signal(signal.SIGKILL)
        root.wait()
        assert _gone_within(pids, 10.0), [p for p in pids if watchdog.running(p)]
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def test_descendants_are_found_and_a_live_root_is_left_alone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in watchdog.descendants(os.getpid())
        assert watchdog.running(child.pid) and not watchdog.running(child.pid, start=-1)  # start time tells
    finally:
        child.kill()
        child.wait()
    assert not watchdog.running(child.pid)
    assert watchdog.watch(2**22 + 12345) == 0  # no such process: nothing to watch
