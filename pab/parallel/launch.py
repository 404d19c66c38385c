"""Run a function on N local processes that share one process group (tests, `pab generate --sp N`).

Ray actors build their process group themselves and call `init_parallel` directly; this launcher is
for a single host without Ray. Each process gets one GPU and NCCL when CUDA is available (else gloo on
CPU), joins the group through a free TCP port on 127.0.0.1, runs `fn(rank, world_size, *args)`, and
sends back its return value or its traceback. The first failure is raised in the parent with the rank
that failed, and the remaining processes are stopped (they would otherwise wait forever in a
collective for the failed rank).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LaunchError(RuntimeError):
    """A launched process failed; `rank` names it."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed:\n{message}")
        self.rank = rank


def rendezvous_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's TCP store, bound to a port the OS picks as it binds (`.port` says which).

    Picking a free port first and binding it later leaves a window in which another process can take it
    (EADDRINUSE at `init_process_group`); binding port 0 has none. Keep the store alive while the group is.
    """
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


def join_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store `rendezvous_store` opened, for every rank that did not open it."""
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    threads: int | None,
    timeout_s: float,
    results: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if backend == "nccl":
            os.environ["LOCAL_RANK"] = str(rank)
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            store=join_store("127.0.0.1", port, world_size, timeout_s),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
    except BaseException:  # noqa: B036 - everything, KeyboardInterrupt included, goes back to the parent
        # Report before tearing the group down: peers stuck in a collective with this rank fail with
        # "connection reset" once it closes its sockets, and that is only a consequence.
        results.put((rank, False, traceback.format_exc()))
        return
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Pickled here, into bytes: a tensor put on the queue as it is travels as a handle to this process's shared
    # memory, which is gone once the process exits ("connection reset" in the parent's get).
    results.put((rank, True, pickle.dumps(value)))


# Errors a rank sees when a *peer* died in the middle of a collective: symptoms, not causes.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "remote process exited", "Broken pipe")


def _first_failure(rank: int, message: str, results: Any, grace_s: float = 3.0) -> LaunchError:
    """The failure to report: a rank's own error in preference to peers' lost-connection errors.

    When one rank raises, the others fail shortly after in their collectives; errors arriving within
    `grace_s` are collected, and the first one that is not merely "peer lost" is named.
    """
    failures = [(rank, message)]
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=grace_s)
    while any(s in failures[0][1] for s in _PEER_LOST) and datetime.datetime.now() < deadline:
        try:
            r, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if not ok:
            failures.append((r, value))
            failures.sort(key=lambda f: any(s in f[1] for s in _PEER_LOST))
    rank, message = failures[0]
    others = sorted(r for r, _ in failures[1:])
    if others:
        message += f"\n(ranks {others} failed too, after it)"
    return LaunchError(rank, message)


def launch_local(
    nprocs: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str | None = None,
    threads: int | None = 1,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Spawn `nprocs` processes that each run `fn(rank, nprocs, *args)` inside one process group.

    Args:
        nprocs (`int`): number of processes (one per GPU under NCCL).
        fn (`Callable`): a picklable (module-level) function; its return value must be picklable (tensors are
            copied back; CUDA ones to the same device index).
        *args: extra picklable arguments for `fn`.
        backend (`str`, *optional*): `"nccl"` if CUDA is available and has `nprocs` devices, else `"gloo"`.
        threads (`int`, *optional*): `torch.set_num_threads` in each child (1 keeps N processes from
            fighting over a few CPU cores; `None` leaves torch's default).
        timeout_s (`float`): wall-clock limit for the whole run and for each collective.

    Returns:
        `list`: the return value of each rank, indexed by rank.

    Raises:
        `LaunchError`: naming the first rank that raised (with its traceback) or died.

    Example:
        ```python
        def work(rank, world, steps):
            ctx = init_parallel(ParallelConfig(sp=world))
            ...
            return out
        outs = launch_local(2, work, 10)
        ```
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"NCCL needs one GPU per process: {nprocs} processes, {torch.cuda.device_count()} GPUs")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = rendezvous_store("127.0.0.1", nprocs, timeout_s)  # held here, so every rank is a client
    port = store.port
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, nprocs, port, backend, threads, timeout_s, results, fn, args),
            daemon=False,
        )
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(values) < nprocs:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in values and not p.is_alive() and p.exitcode not in (0, None):
                        raise LaunchError(rank, f"process exited with code {p.exitcode} without a result") from None
                if datetime.datetime.now() > deadline:
                    missing = sorted(set(range(nprocs)) - set(values))
                    raise LaunchError(
                        missing[0], f"no result after {timeout_s:.0f} s (ranks {missing} still running)"
                    ) from None
                continue
            if not ok:
                raise _first_failure(rank, value, results)
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive() and len(values) < nprocs:
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(nprocs)]
