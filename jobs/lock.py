"""One bulk run at a time per output: a lease object in the output storage itself.

Two runs writing one output (a job submitted again while the first still runs: its client lost the connection,
or a second team member started it) would render the same rows twice and overwrite each other's results table.
The run holds ``runs/active.json`` ({"run_id", "host", "pid", "started", "at"}), written with a conditional PUT
so of two runs starting together exactly one gets it, and refreshed every `heartbeat_s`. A run that died leaves a
lease that stops being refreshed: `stale_after_s` after its last refresh the next run takes it over, or at once
when the holder's driver ran on the same host and its process is gone (a Ray job's driver runs on the head node,
so a job resubmitted after the first was killed starts straight away).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from pab.storage import NotFound, ObjectChanged, Storage

LOCK_KEY = "runs/active.json"
log = logging.getLogger(__name__)


class OutputBusy(RuntimeError):
    """Another run holds the output (its message names it and says when it counts as dead)."""


class RunLock:
    """The output's run lease. `acquire` or OutputBusy; `start_refreshing` keeps it fresh and calls `lost` if another
    run took it over (this run was taken for dead); `release` gives it back."""

    def __init__(self, store: Storage, run_id: str, where: str, heartbeat_s: float = 15.0,
                 stale_after_s: float = 120.0) -> None:  # fmt: skip
        self.store, self.run_id, self.where = store, run_id, where
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": _process_start(os.getpid()), "at": time.time()}  # fmt: skip

    def acquire(self, force: bool = False) -> None:
        """Take the lease: it is free, stale, or (`force`) held by a run the caller knows is dead."""
        while True:
            try:
                held, version = self.store.get_json_versioned(LOCK_KEY)
            except NotFound:
                held, version = None, None
            if held is not None and held.get("run_id") != self.run_id and not force:
                age = time.time() - float(held.get("at", 0))
                if age <= self.stale_after_s and _gone(held):
                    log.warning("run %s's driver (pid %s on this host) is gone", held.get("run_id"), held.get("pid"))
                elif age <= self.stale_after_s:
                    run, pid, host = held.get("run_id"), held.get("pid"), held.get("host")
                    # A run started here (not as a Ray job) is named run-<hex> and has no job to stop.
                    how = (f"Ctrl-C it, or `kill {pid}` on {host}" if str(run).startswith("run-")
                           else f"`pab bulk stop {run}`")
                    raise OutputBusy(
                        f"another run is writing to {self.where}: {run} (pid {pid} on {host}), last seen {age:.0f} s "
                        f"ago. Wait for it to finish or stop it ({how}). A run that died frees the output "
                        f"{self.stale_after_s:.0f} s after it was last seen (in {self.stale_after_s - age:.0f} s); "
                        "--take-over starts now, once you know it is dead.")
                log.warning("taking over %s from run %s, last seen %.0f s ago", self.where, held.get("run_id"), age)
            try:
                self._version = self.store.put_json_if(LOCK_KEY, self._mine(), version)
                return
            except ObjectChanged:
                continue  # another run moved first: judge again what it wrote

    def start_refreshing(self, lost: Callable[[str], None]) -> None:
        def refresh() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self._version = self.store.put_json_if(LOCK_KEY, self._mine(), self._version)
                except ObjectChanged:
                    try:
                        held, version = self.store.get_json_versioned(LOCK_KEY)
                    except Exception:  # noqa: BLE001 - gone, or unreadable: it is not ours either way
                        held, version = {}, None
                    if held.get("run_id") == self.run_id:  # our own refresh landed; its retry was refused
                        self._version = version
                        continue
                    lost(f"run {held.get('run_id') or 'another run'} took {self.where} over (this run was taken "
                         "for dead)")
                    return
                except Exception as e:  # noqa: BLE001 - a storage hiccup: the lease has stale_after_s of slack
                    log.warning("could not refresh the run lease of %s: %s", self.where, e)

        self._thread = threading.Thread(target=refresh, name="run-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            held = self.store.get_json(LOCK_KEY)
            if held.get("run_id") == self.run_id:
                self.store.delete(LOCK_KEY)
        except NotFound:
            pass
        except Exception as e:  # noqa: BLE001 - the next run takes it over once stale
            log.warning("could not release the run lease of %s: %s", self.where, e)


def _process_start(pid: int) -> str | None:
    """When the process started (Linux: its start time in clock ticks since boot), or None where unknown or when it
    is no longer running (gone, or a zombie not yet reaped): with the pid it names one process, whatever pid reuse
    does."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _gone(held: dict[str, Any]) -> bool:
    """Whether the lease's holder surely died: its driver ran on this host and that process no longer runs."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False  # another host's process: only the lease's age tells
    if not os.path.isdir("/proc"):
        return False  # no way to look here
    started = _process_start(held["pid"])
    return started is None or (held.get("started") is not None and started != held["started"])
