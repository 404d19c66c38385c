"""Jobs changing hands render once (in process, no Ray: the real service and the real group claim on a local
folder or a real SeaweedFS). Several ingress replicas adopting a crashed replica's videos, a replica taking over a
released video that a group claims at the same moment, a group claiming a video another replica dispatched again:
of two that act on one job at once exactly one goes on, because each writes the record only if it is still the
version it read. And a video deleted or cancelled through another replica ends the first replica's driver quietly,
counted once."""

import asyncio
import logging
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest
from test_ingress_shutdown import POOL, BusyPool, config, until

import cluster.ingress as ingress
from cluster.api import VideoCreate
from cluster.config import AppConfig
from cluster.groups import VideoGroup
from cluster.jobs import RecordChanged
from pab.storage import ObjectChanged, storage_from_config


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> dict:
    if request.param == "local":
        return {"backend": "local", "path": str(tmp_path / "store")}
    return request.getfixturevalue("s3_server").storage_config("takeover-" + uuid.uuid4().hex[:8])


def stop(*services) -> None:
    for svc in services:
        if svc._loop_task is not None:
            svc._loop_task.cancel()
        for task in list(svc._active.values()):
            task.cancel()


def claiming_group(cfg: dict) -> VideoGroup:
    """The group replica class itself, without placing rank actors: what its claim of a job does is real."""
    group = VideoGroup.__new__(VideoGroup)
    group.cfg, group.replica = AppConfig(**cfg), "test-replica"
    group.jobs = ingress.JobStore(storage_from_config(cfg["storage"]))
    group.group = SimpleNamespace(broken=None, name="g0", size=1, info={}, health=dict)
    return group


class WaitingPool:
    """A pool whose call waits a moment in Serve's router, then a group runs it (to its claim: a render would
    need ranks); `answers` keeps what the group answered."""

    def __init__(self, group: VideoGroup, answers: list) -> None:
        self.group, self.answers = group, answers

    @property
    def run(self) -> "WaitingPool":
        return self

    def remote(self, job_id: str, dispatch: int) -> asyncio.Future:
        async def call():
            await asyncio.sleep(0.3)
            self.answers.append(await asyncio.to_thread(self.group._run, job_id, dispatch))
            return self.answers[-1]

        return asyncio.ensure_future(call())


async def queued_on_a_then(cfg: dict, group: VideoGroup, answers: list, act) -> tuple:
    """Replica A queues a video (its call waits for `group`); `act(b, job_id)` runs through replica B meanwhile.
    Returns (a, b, job_id) once A's driver has ended."""
    a, b = (ingress.VideoAPI(cfg, pools={POOL: WaitingPool(group, answers)}) for _ in range(2))
    job_id = (await a.create(VideoCreate(prompt="a newt", size="32x32", num_frames=17))).id
    await asyncio.sleep(0.05)
    await act(b, job_id)
    await until(lambda: job_id not in a._active, 10, "A's driver to end")
    stop(a, b)
    return a, b, job_id


def test_replicas_adopting_a_crashed_replicas_videos_dispatch_each_once(storage, tmp_path):
    """Three replicas see the same stale leases at the same time. Before, each of them bumped the dispatch and
    called a group, often with the same number, so two groups rendered one video (most of 20 videos, in a probe)."""
    # Leases stale after 2 s: a loaded machine's loop must not let a survivor's own refreshes lapse (a second,
    # rightful adoption).
    cfg = {**config(tmp_path, stale_after_s=2.0), "storage": storage}

    async def crash_and_adopt() -> tuple[list, list[str]]:
        crashed_pool = BusyPool()
        crashed = ingress.VideoAPI(cfg, pools={POOL: crashed_pool})
        ids = [(await crashed.create(VideoCreate(prompt=f"a fox {i}", size="32x32", num_frames=17))).id
               for i in range(12)]  # fmt: skip
        await until(lambda: len(crashed_pool.calls) == 12, 20, "first dispatches")
        stop(crashed)  # no more lease refreshes: as a replica that died
        pools = [BusyPool() for _ in range(3)]
        survivors = [ingress.VideoAPI(cfg, pools={POOL: p}) for p in pools]
        calls = lambda: [c for p in pools for c in p.calls]  # noqa: E731
        await until(lambda: {c[0] for c in calls()} == set(ids), 30, "every video adopted")
        await asyncio.sleep(1.0)  # more reconcile rounds of all three: none may adopt again
        stop(*survivors)
        return calls(), ids

    calls, ids = asyncio.run(crash_and_adopt())
    per_video = Counter(job_id for job_id, _ in calls)
    assert per_video == Counter(ids), f"videos dispatched more than once: {per_video.most_common(3)}"
    jobs = ingress.JobStore(storage_from_config(storage))
    assert all(jobs.get(job_id).dispatch == 2 for job_id in ids)


def test_a_takeover_decided_as_a_group_claims_the_video_leaves_it_to_the_group(tmp_path):
    """A replica stopped with a video queued and released it; the new replica decides to take it over, and a group
    claims the old dispatch before the new replica writes. Before, the new replica dispatched it again anyway: two
    renders of one video."""
    cfg = config(tmp_path, stale_after_s=60.0)
    old_pool, new_pool = BusyPool(), BusyPool()

    async def takeover() -> str:
        old = ingress.VideoAPI(cfg, pools={POOL: old_pool})
        job_id = (await old.create(VideoCreate(prompt="a heron", size="32x32", num_frames=17))).id
        await until(lambda: old_pool.calls, 10, "first dispatch")
        old.__del__()  # Serve stops it: the queued video's lease is released
        stop(old)
        await asyncio.sleep(0.1)  # a heartbeat: the release is old enough to take
        new = ingress.VideoAPI(cfg, pools={POOL: new_pool})
        stop(new)  # its own loop off: this test runs the reconcile round itself
        await new._reconcile()
        assert job_id in new._active  # decided, not yet run
        # A group claims dispatch 1 now, the way VideoGroup._claim writes it.
        rec = new.jobs.get(job_id)
        rec.status = "in_progress"
        new.jobs.save(rec, if_unchanged=True)
        new.jobs.touch(job_id, "group:g0")
        await until(lambda: job_id not in new._active or new_pool.calls, 10, "the takeover's outcome")
        return job_id

    job_id = asyncio.run(takeover())
    jobs = ingress.JobStore(storage_from_config(cfg["storage"]))
    assert new_pool.calls == []
    rec = jobs.get(job_id)
    assert (rec.status, rec.dispatch) == ("in_progress", 1) and jobs.lease(job_id)["owner"] == "group:g0"


def test_a_group_claiming_a_video_dispatched_again_meanwhile_skips_it(tmp_path):
    """The real `VideoGroup._claim`: between its read of the record and its write, another replica dispatches the
    video again (dispatch 2). The claim of dispatch 1 must not overwrite that and render: it skips."""
    cfg = config(tmp_path)
    group = claiming_group(cfg)

    async def queue() -> str:
        svc = ingress.VideoAPI(cfg, pools={POOL: BusyPool()})
        job_id = (await svc.create(VideoCreate(prompt="a crab", size="32x32", num_frames=17))).id
        await until(lambda: svc.jobs.get(job_id).dispatch == 1, 10, "first dispatch")
        stop(svc)
        return job_id

    job_id = asyncio.run(queue())
    read_cancel = group.jobs.cancel_requested

    def dispatched_again_meanwhile(jid: str) -> bool:  # _claim reads this between its read and its write
        rec = group.jobs.get(jid)
        rec.dispatch += 1
        group.jobs.save(rec, if_unchanged=True)
        return read_cancel(jid)

    group.jobs.cancel_requested = dispatched_again_meanwhile
    answer = group._claim(job_id, 1)
    assert "changed" in answer["skipped"]
    rec = group.jobs.get(job_id)
    assert (rec.status, rec.dispatch, rec.group) == ("queued", 2, None)

    group.jobs.cancel_requested = read_cancel  # undisturbed, the claim of the current dispatch takes it
    claimed = group._claim(job_id, 2)
    assert claimed.status == "in_progress" and group.jobs.lease(job_id)["owner"] == "group:g0"


def test_of_two_writers_of_one_record_or_lease_only_the_first_lands(tmp_path):
    jobs = ingress.JobStore(storage_from_config({"backend": "local", "path": str(tmp_path)}))

    async def one() -> str:
        svc = ingress.VideoAPI(config(tmp_path), pools={POOL: BusyPool()})
        stop(svc)
        job_id = (await svc.create(VideoCreate(prompt="a owl", size="32x32", num_frames=17))).id
        stop(svc)
        return job_id

    job_id = asyncio.run(one())
    a, b = jobs.get(job_id), jobs.get(job_id)
    a.last_error, b.last_error = "a", "b"
    jobs.save(a, if_unchanged=True)
    with pytest.raises(RecordChanged):
        jobs.save(b, if_unchanged=True)
    assert jobs.get(job_id).last_error == "a"
    jobs.save(a, if_unchanged=True)  # the writer's copy follows its own write
    # A stopping replica's release lands only on the lease it read: not over a group's touch since.
    jobs.touch(job_id, "ingress:a")
    _, version = jobs.lease_versioned(job_id)
    jobs.touch(job_id, "group:g0")
    assert not jobs.release(job_id, "ingress:a", version) and jobs.lease(job_id)["owner"] == "group:g0"
    _, version = jobs.lease_versioned(job_id)
    assert jobs.release(job_id, "group:g0", version) and jobs.lease(job_id)["released"]
    with pytest.raises(ValueError, match="JobStore.get"):
        jobs.save(a.model_validate(a.model_dump()), if_unchanged=True)  # a copy not read from storage


def test_a_conditional_write_that_landed_and_whose_retry_was_refused_counts_as_written(storage, tmp_path):
    """botocore retries a PUT that timed out; if the first try landed, the store refuses the retry's If-Match (412).
    That write is this writer's own, not another's: the record, or an idempotency key, counts as written."""
    jobs = ingress.JobStore(storage_from_config(storage))

    async def one() -> str:
        svc = ingress.VideoAPI({**config(tmp_path), "storage": storage}, pools={POOL: BusyPool()})
        stop(svc)
        job_id = (await svc.create(VideoCreate(prompt="a mole", size="32x32", num_frames=17))).id
        stop(svc)
        return job_id

    job_id = asyncio.run(one())
    real = jobs.storage.put_if

    def landed_then_refused(key, data, version, content_type=None):
        real(key, data, version, content_type)
        raise ObjectChanged(f"{key}: the retry's If-Match")

    jobs.storage.put_if = landed_then_refused
    rec = jobs.get(job_id)
    rec.dispatch = 7
    jobs.save(rec, if_unchanged=True)
    assert jobs.get(job_id).dispatch == 7 and rec._version == jobs.get(job_id)._version
    jobs.remember_idempotent("digest", job_id, "hash", None)
    assert jobs.idempotent_job("digest")[0]["job_id"] == job_id
    stale = jobs.get(job_id)
    jobs.storage.put_if = real
    rec.dispatch = 8
    jobs.save(rec, if_unchanged=True)
    stale.dispatch = 9  # someone else's write came between: that is still a conflict
    with pytest.raises(RecordChanged):
        jobs.save(stale, if_unchanged=True)


def test_a_finished_video_left_active_is_retired_not_adopted(tmp_path):
    """The save that finished a video wrote its record but not the removal of its active marker and lease: the
    reconcile round retires them instead of adopting the video (before, each round adopted it again and counted it
    finished again)."""
    cfg = config(tmp_path, stale_after_s=0.1)
    pool = BusyPool()

    async def leftover() -> tuple[str, list]:
        svc = ingress.VideoAPI(cfg, pools={POOL: pool})
        job_id = (await svc.create(VideoCreate(prompt="a wren", size="32x32", num_frames=17))).id
        await until(lambda: pool.calls, 10, "first dispatch")
        stop(svc)
        rec = svc.jobs.get(job_id)
        rec.status, rec.progress = "completed", 100
        svc.store.put_json(f"jobs/records/{job_id}.json", rec.model_dump(mode="json"))  # as a save cut short
        await asyncio.sleep(0.2)  # its lease goes stale
        other = ingress.VideoAPI(cfg, pools={POOL: pool})
        stop(other)
        await other._reconcile()
        return job_id, list(other._active)

    job_id, adopted = asyncio.run(leftover())
    jobs = ingress.JobStore(storage_from_config(cfg["storage"]))
    assert adopted == [] and pool.calls == [(job_id, 1)]
    assert jobs.active_ids() == [] and jobs.lease(job_id) is None and jobs.get(job_id).status == "completed"


def test_one_idempotency_key_on_two_replicas_at_once_creates_one_video(tmp_path):
    """The same POST with one Idempotency-Key reaches two replicas at the same moment (a client retrying through a
    load balancer). Before, each read the key unbound and each created a video. Now one binds it; the other answers
    409 idempotency_key_in_use with Retry-After (the openai SDK retries that) or, if the video exists by then, it."""
    cfg = config(tmp_path)
    body = VideoCreate(prompt="a lynx", size="32x32", num_frames=17)
    key = ("digest-of-key-and-sender", "hash-of-request")

    async def both() -> list:
        a, b = (ingress.VideoAPI(cfg, pools={POOL: BusyPool()}) for _ in range(2))
        stop(a, b)
        out = await asyncio.gather(a.create(body, key), b.create(body, key), return_exceptions=True)
        again = await b.create(body, key)  # the client's retry
        stop(a, b)
        return [*out, again]

    first, second, retry = asyncio.run(both())
    jobs = ingress.JobStore(storage_from_config(cfg["storage"]))
    created = jobs.active_ids()
    assert len(created) == 1, f"{len(created)} videos for one key"
    for answer in (first, second):
        if isinstance(answer, Exception):
            assert answer.status_code == 409 and answer.headers["Retry-After"] == "1"
            assert "idempotency_key_in_use" in str(answer.detail)
        else:
            assert answer.id == created[0]
    assert retry.id == created[0]


def test_a_video_deleted_through_another_replica_ends_its_driver_quietly(tmp_path, caplog):
    """Replica A queues a video; it is deleted through replica B while A's call waits for a group. The group that
    then takes the call skips it, and A's driver ends. Before, the group's claim raised NotFound back to A, whose
    driver died logging an error and a traceback ("driver stopped; the reconciler will pick it up")."""
    cfg = config(tmp_path)
    group, answers = claiming_group(cfg), []
    _, _, job_id = asyncio.run(queued_on_a_then(cfg, group, answers, lambda b, job_id: b.delete(job_id)))
    assert answers == [{"skipped": f"job {job_id} was deleted"}]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_a_video_cancelled_through_another_replica_is_counted_once(tmp_path):
    """Cancelled through replica B while queued on A: B counts it cancelled (pab_videos_finished); A's call then
    reaches a group that skips the cancelled job, and A leaves it uncounted. Before, A counted it too, so the sum
    over replicas said two videos were cancelled."""
    cfg = config(tmp_path)
    group, answers = claiming_group(cfg), []

    def cancelled(svc) -> float:
        return svc.metrics.finished.labels(status="cancelled")._value.get()

    a, b, _ = asyncio.run(queued_on_a_then(cfg, group, answers, lambda b, job_id: b.cancel(job_id)))
    assert (cancelled(a), cancelled(b)) == (0, 1)
    assert answers == [{"skipped": "job is cancelled"}]
