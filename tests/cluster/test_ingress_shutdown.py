"""The ingress replica stopping (in process, no Ray, the real service on a local folder): its background loop ends
at once, before the replica's thread pool goes (a round after that logged "cannot schedule new futures after
shutdown" as a loop failure), and the videos it still queues go to another replica within seconds, not once their
leases go stale. Rendering videos stay with their groups."""

import asyncio

import cluster.ingress as ingress
from cluster.api import VideoCreate
from cluster.config import pool_name
from cluster.jobs import JobStore
from pab.storage import storage_from_config

POOL = pool_name("opensora-v1.2-tiny", 1)


def config(tmp_path, **kw) -> dict:
    return {"models": [{"name": "opensora-v1.2-tiny"}], "storage": {"backend": "local", "path": str(tmp_path)},
            "heartbeat_s": 0.02, "reconcile_interval_s": 0.02, **kw}  # fmt: skip


class BusyPool:
    """A pool whose groups are all busy: each call waits in Serve's router (here: a future nobody completes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    @property
    def run(self) -> "BusyPool":
        return self

    def remote(self, job_id: str, dispatch: int) -> asyncio.Future:
        self.calls.append((job_id, dispatch))
        return asyncio.get_running_loop().create_future()


async def until(check, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} after {timeout_s} s"
        await asyncio.sleep(0.02)


def test_stopping_the_replica_ends_its_background_loop_at_once(tmp_path):
    async def replica_lifetime() -> tuple[bool, bool]:
        svc = ingress.VideoAPI(config(tmp_path), pools={})  # on a running loop, as under Serve: the loop starts
        task = svc._loop_task
        await asyncio.sleep(0.2)  # rounds of leases, reconciling, sweeping
        running = task is not None and not task.done()
        svc.__del__()  # what Serve calls as it stops the replica
        for _ in range(3):
            await asyncio.sleep(0)
        return running, task.cancelled()

    assert asyncio.run(replica_lifetime()) == (True, True)


def test_a_stopping_replica_hands_its_queued_videos_over_and_leaves_rendering_ones(tmp_path):
    """A minute's `stale_after_s` (the default): without the hand-over the next replica would wait that long."""
    cfg = config(tmp_path, stale_after_s=60.0)
    jobs = JobStore(storage_from_config({"backend": "local", "path": str(tmp_path)}))

    async def redeploy() -> None:
        old_pool, new_pool = BusyPool(), BusyPool()
        old = ingress.VideoAPI(cfg, pools={POOL: old_pool})
        queued = (await old.create(VideoCreate(prompt="a fox", size="32x32", num_frames=17))).id
        rendering = (await old.create(VideoCreate(prompt="a heron", size="32x32", num_frames=17))).id
        await until(lambda: len(old_pool.calls) == 2, 10, "dispatch")
        # A group took the second video, as VideoGroup._claim does: in progress, leased to the group.
        rec = jobs.get(rendering)
        rec.status = "in_progress"
        jobs.save(rec)
        jobs.touch(rendering, "group:g0")

        old.__del__()  # Serve stops the replica
        await asyncio.sleep(0.2)  # rounds its loop would have run: nothing of it takes the lease back
        old._touch(queued)  # nor a refresh that was in a worker thread as the replica stopped
        lease = jobs.lease(queued)
        assert lease["released"] and lease["owner"] == old.owner
        assert not jobs.lease(rendering).get("released")  # (its owner may read either: both touch it)

        new = ingress.VideoAPI(cfg, pools={POOL: new_pool})
        await until(lambda: new_pool.calls, 5, "takeover")
        await asyncio.sleep(0.3)  # many reconciles more: the rendering video must stay where it is
        assert new_pool.calls == [(queued, 2)]  # dispatched again, the stale first dispatch skipped by any group
        assert jobs.get(queued).dispatch == 2 and jobs.lease(queued)["owner"] == new.owner
        assert jobs.get(rendering).status == "in_progress" and jobs.get(rendering).dispatch == 1
        for svc in (old, new):
            svc.__del__()
            for task in list(svc._active.values()):
                task.cancel()
        await asyncio.sleep(0)

    asyncio.run(redeploy())
