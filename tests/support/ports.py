"""Free TCP ports for the servers tests start (Ray heads, SeaweedFS, `pab serve`), picked so nothing else takes them.

A port is picked free and then closed, and the server binds it a moment later (`ray start` binds some of its
ports seconds later). A port from the kernel's ephemeral range (`bind(0)`) can be taken in that window by any
outgoing connection on the machine, and CI's other xdist worker runs Ray clusters that open many. So these
ports come from below the ephemeral range, where the kernel never hands a port out by itself, and from a band
of their own per xdist worker, so two workers never pick the same one. Ray's workers take 10002-19999 by default:
the bands start above that.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOW = 20000  # above Ray's default worker ports (10002-19999)
BANDS = 8  # xdist workers gw0..gw7 get bands of their own; more share them by number
_handed: set[int] = set()  # never hand a port out twice in one process: its server may not have bound it yet


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def band(worker: str | None = None) -> range:
    """The ports this xdist worker (`PYTEST_XDIST_WORKER`, e.g. gw1) picks from; the first band outside xdist."""
    worker = worker if worker is not None else os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % BANDS if worker.startswith("gw") and worker[2:].isdigit() else 0
    high = _ephemeral_low()
    if high - LOW < BANDS * 64:  # an unusual ephemeral range leaves no room below it: use the kernel's picks
        return range(0)
    size = (high - LOW) // BANDS
    return range(LOW + index * size, LOW + (index + 1) * size)


def _bindable(port: int) -> bool:
    # On all interfaces: Ray binds some ports on 0.0.0.0, and that conflicts with a loopback bind too.
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _kernel_pick() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now, from this worker's band (a random start, so runs on one machine spread out)."""
    ports = band()
    if not ports:
        picked: list[int] = []
        while len(picked) < n:
            if (p := _kernel_pick()) not in picked:
                picked.append(p)
        return picked
    start = random.randrange(len(ports))
    picked = []
    for i in range(len(ports)):
        port = ports[(start + i) % len(ports)]
        if port not in _handed and _bindable(port):
            picked.append(port)
            _handed.add(port)
            if len(picked) == n:
                return picked
    raise RuntimeError(f"fewer than {n} free ports in {ports.start}-{ports.stop - 1}: stop leftover test servers")
