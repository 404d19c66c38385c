"""A job outlives the server that accepted it (in process, no Ray: the real service on a local folder). Restarted
with other pools, the adopted job goes to the pool its size routes to now; restarted without its model, it fails
saying so (it waited `queued` forever, each adoption a KeyError in the log). A cancel after a failed attempt
leaves no `retrying` reason behind, and the list reports a cancel as GET does."""

import asyncio

from test_ingress_shutdown import POOL, BusyPool, config, until
from test_takeover import stop

import cluster.ingress as ingress
from cluster.api import VideoCreate
from cluster.config import pool_name
from pab.storage import storage_from_config

MODEL = "opensora-v1.2-tiny"


async def _queued_then_crashed(tmp_path) -> str:
    """A replica accepts a video and dispatches it, then dies: the job stays queued on `POOL`, its lease going stale."""
    busy = BusyPool()
    a = ingress.VideoAPI(config(tmp_path), pools={POOL: busy})
    job_id = (await a.create(VideoCreate(prompt="a newt", size="32x32", num_frames=17))).id
    await until(lambda: busy.calls, 10, "the dispatch")
    stop(a)
    return job_id


def test_a_job_whose_pool_is_gone_goes_to_the_pool_its_size_routes_to_now(tmp_path):
    async def scenario():
        job_id = await _queued_then_crashed(tmp_path)
        two = pool_name(MODEL, 2)
        pool = BusyPool()
        b = ingress.VideoAPI(config(tmp_path, stale_after_s=0.3, models=[{"name": MODEL, "groups": [{"gpus": 2}]}]),
                             pools={two: pool})  # fmt: skip
        await until(lambda: pool.calls, 15, "the adopted job's dispatch to the new pool")
        rec = b.jobs.get(job_id)
        stop(b)
        return job_id, pool.calls, rec

    job_id, calls, rec = asyncio.run(scenario())
    assert calls[0][0] == job_id and rec.pool == pool_name(MODEL, 2) and rec.status == "queued" and rec.error is None


def test_a_job_whose_model_is_no_longer_served_fails_saying_so(tmp_path):
    async def scenario():
        job_id = await _queued_then_crashed(tmp_path)
        b = ingress.VideoAPI(config(tmp_path, stale_after_s=0.3, models=[{"name": "latte-1-tiny"}]),
                             pools={pool_name("latte-1-tiny", 1): BusyPool()})  # fmt: skip
        store = ingress.JobStore(storage_from_config(b.cfg.storage))
        await until(lambda: store.get(job_id).terminal, 15, "the job's end")
        stop(b)
        return store.get(job_id)

    rec = asyncio.run(scenario())
    assert rec.status == "failed" and rec.error.code == "model_not_served", rec
    assert "no longer serves opensora-v1.2-tiny" in rec.error.message and "latte-1-tiny" in rec.error.message


class FailingOncePool:
    """A pool whose first call fails as a dead rank does; later calls wait in Serve's router."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def run(self) -> "FailingOncePool":
        return self

    def remote(self, job_id: str, dispatch: int) -> asyncio.Future:
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        if self.calls == 1:
            from actors.group import GroupFailed

            future.set_exception(GroupFailed("rank 0 died during a generation: ActorDiedError: killed"))
        return future


def test_a_cancel_after_a_failed_attempt_leaves_no_retrying_reason(tmp_path):
    async def scenario():
        pool = FailingOncePool()
        svc = ingress.VideoAPI(config(tmp_path, retry_backoff_s=1.0), pools={POOL: pool})
        job_id = (await svc.create(VideoCreate(prompt="a newt", size="32x32", num_frames=17))).id
        await until(lambda: (svc.jobs.get(job_id).error or ingress.ErrorInfo(code="", message="")).code == "retrying",
                    10, "the retrying reason")  # fmt: skip
        listed = (await svc.list(20, None, "desc")).data
        await asyncio.to_thread(svc.jobs.request_cancel, job_id)  # as another replica's POST /cancel saves it
        listed_after = (await svc.list(20, None, "desc")).data
        await until(lambda: svc.jobs.get(job_id).terminal, 10, "the cancellation")
        stop(svc)
        return svc.jobs.get(job_id), listed, listed_after

    rec, listed, listed_after = asyncio.run(scenario())
    assert not listed[0].cancel_requested and listed_after[0].cancel_requested  # the list reads the marker as GET
    assert rec.status == "cancelled" and rec.error is None and rec.attempts == 1, rec
