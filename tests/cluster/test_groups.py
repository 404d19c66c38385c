"""A group replica's render writes the job's record only while the job is still its own (in process, no Ray: the
real `VideoGroup._run` on a local folder or a real SeaweedFS, with a render that steps through `generate`'s
callbacks). A group the ingress took for dead, whose job was dispatched again, deleted or cancelled by a late save
meanwhile, stops at its next step and never writes over what replaced it; a job that stays its own renders as
before."""

import time
import uuid
from types import SimpleNamespace

import pytest

from actors.group import GenerationCancelled
from cluster.config import AppConfig
from cluster.groups import VideoGroup
from cluster.jobs import JobRecord, JobStore, new_job_id
from pab.storage import NotFound, storage_from_config, video_keys

STEPS = 6


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> dict:
    if request.param == "local":
        return {"backend": "local", "path": str(tmp_path / "store")}
    return request.getfixturevalue("s3_server").storage_config("groups-" + uuid.uuid4().hex[:8])


class Render:
    """`GpuGroup.generate` for a render of STEPS steps: progress each step, `meanwhile()` once after step 2 (what
    someone else does to the job as it renders), the cancel polled each step, and the mp4 stored at the end."""

    def __init__(self, store, meanwhile=lambda: None) -> None:
        self.store, self.meanwhile, self.steps_run = store, meanwhile, 0

    def __call__(self, request, on_progress, should_cancel, output) -> dict:
        for step in range(1, STEPS + 1):
            if should_cancel():
                raise GenerationCancelled(f"cancelled at step {step}")
            self.steps_run = step
            on_progress(step, STEPS)
            if step == 2:
                self.meanwhile()
        ref = self.store.put_video(output.video_id, b"mp4 of " + output.video_id.encode(), sidecar=output.sidecar)
        return {"video": {"key": ref.key, "size_bytes": ref.size_bytes}, "timesteps": list(range(STEPS))}


def rendering_group(storage: dict, render: Render | None = None) -> VideoGroup:
    """The group replica class itself with `render` in place of its ranks: its claim and record writes are real."""
    group = VideoGroup.__new__(VideoGroup)
    group.cfg = AppConfig(models=[{"name": "opensora-v1.2-tiny"}], storage=storage, progress_interval_s=0,
                          cancel_poll_s=0.01)  # fmt: skip
    group.replica, group.jobs = "test-replica", JobStore(storage_from_config(storage))
    group.group = SimpleNamespace(broken=None, name="g0", size=1, info={}, generate=render, health=dict)
    return group


def queued_job(jobs: JobStore) -> str:
    """A job an ingress dispatched once (dispatch 1), as the group's `run` finds it."""
    job_id = new_job_id()
    jobs.create(JobRecord(id=job_id, created_at=time.time(), model="opensora-v1.2-tiny", prompt="a newt",
                          seconds="1", size="32x32", request={}, seed=0, status="queued", pool="p", dispatch=1))
    return job_id


def dispatch_again(jobs: JobStore, job_id: str) -> None:
    """What an ingress replica that took the group for dead does: the record at the next dispatch, queued."""
    rec = jobs.get(job_id)
    rec.dispatch, rec.status, rec.progress, rec.step = rec.dispatch + 1, "queued", 0, 0
    jobs.save(rec, if_unchanged=True)


def test_a_job_that_stays_the_groups_own_completes(storage):
    jobs = JobStore(storage_from_config(storage))
    render = Render(jobs.storage)
    group = rendering_group(storage, render)
    job_id = queued_job(jobs)
    assert group._run(job_id, 1)["status"] == "completed"
    rec = jobs.get(job_id)
    assert (rec.status, rec.progress, rec.step, rec.dispatch, render.steps_run) == ("completed", 100, STEPS, 1, STEPS)
    assert rec.video_key == video_keys(job_id)[0] and jobs.storage.exists(rec.video_key)


def test_a_group_whose_job_was_dispatched_again_stops_and_writes_nothing_more(storage):
    jobs = JobStore(storage_from_config(storage))
    job_id = queued_job(jobs)
    render = Render(jobs.storage, meanwhile=lambda: dispatch_again(jobs, job_id))
    answer = rendering_group(storage, render)._run(job_id, 1)
    assert "skipped" in answer, answer
    assert render.steps_run == 3  # the write after the re-dispatch was refused; the next step did not start
    rec = jobs.get(job_id)  # as the re-dispatching replica left it, for the group that runs dispatch 2
    assert (rec.status, rec.dispatch, rec.progress, rec.video_key) == ("queued", 2, 0, None)
    assert not jobs.storage.exists(video_keys(job_id)[0])


def test_a_group_whose_job_was_deleted_does_not_bring_its_record_back(storage):
    jobs = JobStore(storage_from_config(storage))
    job_id = queued_job(jobs)
    render = Render(jobs.storage, meanwhile=lambda: jobs.delete(job_id))
    answer = rendering_group(storage, render)._run(job_id, 1)
    assert "skipped" in answer or answer == {"status": "deleted"}, answer
    assert render.steps_run < STEPS
    with pytest.raises(NotFound):
        jobs.get(job_id)


def test_the_outcome_of_a_render_that_lost_its_job_after_the_last_step_is_not_written(storage):
    jobs = JobStore(storage_from_config(storage))
    job_id = queued_job(jobs)
    render = Render(jobs.storage)
    group = rendering_group(storage, render)
    real_generate = render.__call__

    def generate_then_lose_the_job(*args, **kw):  # the re-dispatch lands between the last step and the outcome
        out = real_generate(*args, **kw)
        dispatch_again(jobs, job_id)
        return out

    group.group.generate = generate_then_lose_the_job
    assert "skipped" in group._run(job_id, 1)
    rec = jobs.get(job_id)
    assert (rec.status, rec.dispatch, rec.video_key) == ("queued", 2, None)


def test_a_cancel_saved_late_over_the_running_record_wins_and_its_video_goes(storage):
    """A replica that accepted a cancel while storage failed saves the cancelled record later (`_save_held`): the
    marker first, then the record. A render that finished in between does not overwrite it, and its video goes."""
    jobs = JobStore(storage_from_config(storage))
    job_id = queued_job(jobs)
    render = Render(jobs.storage)
    group = rendering_group(storage, render)
    real_generate = render.__call__

    def generate_then_cancel_is_saved(*args, **kw):
        out = real_generate(*args, **kw)
        rec = jobs.get(job_id)
        rec.status, rec.completed_at = "cancelled", time.time()
        jobs.save(rec)  # its marker is written later here: the group's check of it after the render finds none
        return out

    group.group.generate = generate_then_cancel_is_saved
    assert "skipped" in group._run(job_id, 1)
    assert jobs.get(job_id).status == "cancelled"
    assert not jobs.storage.exists(video_keys(job_id)[0])


def test_a_write_of_its_own_that_landed_though_storage_failed_does_not_stop_the_render(storage):
    """A progress write that lands but whose answer is lost (a reset connection after the PUT) leaves a version the
    group never learnt. The record is still its own (this dispatch, in progress): the render goes on to the end."""
    jobs = JobStore(storage_from_config(storage))
    job_id = queued_job(jobs)
    render = Render(jobs.storage)
    group = rendering_group(storage, render)
    put_if, failed = group.jobs.storage.put_if, []

    def lands_then_fails_once(key, data, version, content_type=None):
        new = put_if(key, data, version, content_type)
        if key.startswith("jobs/records/") and b'"in_progress"' in data and b'"step": 2' in data and not failed:
            failed.append(key)
            raise OSError("connection reset by peer")  # after the object was written
        return new

    group.jobs.storage.put_if = lands_then_fails_once
    assert group._run(job_id, 1)["status"] == "completed"
    assert failed and render.steps_run == STEPS
    rec = jobs.get(job_id)
    assert (rec.status, rec.step, rec.dispatch) == ("completed", STEPS, 1)


def test_a_group_that_lost_a_rank_while_idle_refuses_the_job_before_claiming_it(storage):
    """A rank killed while the group sat idle was found only by the render, which cost the next video an attempt
    (three such deaths failed a video that never rendered). The claim pings every rank first: a dead one is a
    refusal (GroupUnavailable: no attempt), and the job stays queued for another group."""
    from actors.group import GroupFailed, GroupUnavailable

    jobs = JobStore(storage_from_config(storage))
    render = Render(jobs.storage)
    group = rendering_group(storage, render)

    def dead_rank() -> dict:
        raise GroupFailed("a rank died: ActorDiedError: killed")

    group.group.health = dead_rank
    job_id = queued_job(jobs)
    with pytest.raises(GroupUnavailable, match="lost a rank before this video: a rank died"):
        group._run(job_id, 1)
    rec = jobs.get(job_id)
    assert (rec.status, rec.dispatch, render.steps_run) == ("queued", 1, 0)
