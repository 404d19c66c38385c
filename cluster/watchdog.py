"""End a process's whole tree when it dies, even by SIGKILL, which runs no cleanup of its own.

`pab serve` starts its own Ray; killed with SIGKILL it leaves Ray's processes behind (the agents notice
their raylet died but linger for minutes, measured in #19). `start_watchdog()` starts a small separate process
that notes the server's descendants every second and, once the server is gone, kills those still running.

    python -m cluster.watchdog PID [INTERVAL_S]

Linux only (it reads /proc); elsewhere `start_watchdog` starts nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, or None when it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def running(pid: int, start: int | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie), and the same one if its start time is given."""
    s = _stat(pid)
    return s is not None and s[0] not in ("Z", "X") and (start is None or s[2] == start)


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of `pid`: pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (s := _stat(int(entry.name))) is not None and s[0] not in ("Z", "X"):
            children.setdefault(s[1], []).append((int(entry.name), s[2]))
    found, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            if child not in found:
                found[child] = start
                todo.append(child)
    return found


def watch(pid: int, interval: float = 1.0, grace: float = 2.0) -> int:
    """Note `pid`'s descendants until it is gone, then SIGTERM the survivors, SIGKILL them after `grace`.
    Returns how many were still running when `pid` went."""
    target = _stat(pid)
    if target is None:
        return 0
    known: dict[int, int] = {}
    ready = False
    while running(pid, target[2]):
        known.update(descendants(pid))  # reparented ones stay known: a dead raylet's agents go to PID 1
        known = {p: s for p, s in known.items() if p != os.getpid() and running(p, s)}
        if not ready:  # the first snapshot is taken: say so to a starter that waits for it (`start_watchdog`)
            ready = True
            try:
                print("ready", flush=True)
            except (BrokenPipeError, OSError, ValueError):
                pass
        time.sleep(interval)
    left = {p: s for p, s in known.items() if running(p, s)}
    terminate(left, grace)
    return len(left)


def terminate(
    processes: dict[int, int], grace: float, *, group: int | None = None,
    refresh: Callable[[], dict[int, int]] | None = None, settle: float = 0.0,
) -> dict[int, int]:  # fmt: skip
    """SIGTERM every process of `processes` (pid -> start time) still running, SIGKILL those left after `grace`.

    `group`: also signal this process group; `refresh`: processes found while waiting (say, orphans taken over
    by init), signalled too. Returns those still running `settle` seconds after the SIGKILL.
    """
    known = dict(processes)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, settle)):
        if group is not None:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        for p, s in known.items():
            if running(p, s):
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if refresh is not None:
                known.update(refresh())
            if not any(running(p, s) for p, s in known.items()):
                break
            time.sleep(0.1)
    return {p: s for p, s in known.items() if running(p, s)}


def start_watchdog(pid: int | None = None, interval: float = 1.0, ready_s: float = 0.0) -> subprocess.Popen | None:
    """Watch `pid` (default: this process) from a separate process in its own session; None off Linux.

    `ready_s`: wait up to that long for the watchdog's first note of `pid`'s descendants (its Python start takes
    ~0.3 s, seconds on a loaded host), so that what runs now is known to it before this returns; a watchdog not
    ready by then still starts."""
    if not PROC.is_dir() or not sys.platform.startswith("linux"):
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.watchdog", str(pid or os.getpid()), str(interval)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if ready_s > 0 else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the server's process group: a Ctrl-C there does not stop it
        cwd=str(Path(__file__).resolve().parents[1]),
    )  # fmt: skip
    if ready_s > 0 and proc.stdout is not None:
        if select.select([proc.stdout], [], [], ready_s)[0]:
            proc.stdout.readline()
        proc.stdout.close()  # it says "ready" once; a later write finds the pipe closed, which it ignores
    return proc


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(f"usage: python -m cluster.watchdog PID [INTERVAL_S]\n{__doc__}")
    watch(int(args[0]), float(args[1]) if len(args) > 1 else 1.0)
