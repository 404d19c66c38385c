"""The group deployment: one Serve replica = one GPU group, one video at a time.

The replica owns a placement group (`placement_group_bundles`, STRICT_PACK) and runs inside bundle 0;
its `GpuGroup` puts rank i in bundle i. The ingress calls `run(job_id, dispatch)`; the replica reads
the job record, renders the video on its group, and writes the record as the job moves (in progress,
progress per denoising step, completed / failed / cancelled). Rank 0 stores the mp4 and its sidecar
directly in the object store.

Errors the ingress sees from `run`:
  * `GroupFailed`: a rank died mid-video. The group is broken; `check_health` now fails so Serve
    replaces this replica. The ingress retries the job elsewhere (it counts as an attempt).
  * `GroupUnavailable`: this replica's group was already broken, or a rank of it died while it was idle (every
    rank is pinged before a job is claimed); nothing ran, retry costs nothing.
  * `StorageUnavailable`: the video or the record could not be stored. The group is fine; the ingress
    says so on the job and renders it again once storage takes writes.
Everything else (cancelled, rejected request) is written to the record and `run` returns normally.
A cancelled call (the ingress cancels it on a DELETE, and on a cancel it could not save) stops the render too.

Once it claims a job the group is the record's only writer, so every write of it is conditional on the version the
group itself wrote last. A write refused over a record that is gone, at another dispatch or finished means the job
left this group (an ingress replica took it for dead and dispatched it again, or it was deleted or cancelled through
a replica that could not save the cancel earlier): the render stops at its next step and writes nothing more, so a
group thought dead never writes over the render that replaced it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from actors.group import GenerationCancelled, GenerationError, GpuGroup, GroupFailed, GroupUnavailable
from actors.worker import VideoOutput
from cluster.api import ErrorInfo
from cluster.config import AppConfig, ModelConfig, PoolConfig
from cluster.failures import NothingRendered
from cluster.jobs import JobRecord, JobStore, RecordChanged
from pab.storage import NotFound, StorageUnavailable, storage_from_config

log = logging.getLogger("ray.serve")


class VideoGroup:
    """Serve deployment class (decorated by `cluster.app.build_app`, not here)."""

    def __init__(self, config: dict[str, Any], model: str, gpus: int) -> None:
        self.cfg = AppConfig(**config)
        self.model_cfg: ModelConfig = self.cfg.model(model)
        self.pool: PoolConfig = next(p for p in self.model_cfg.groups if p.gpus == gpus)
        self.store = storage_from_config(self.cfg.storage)
        self.jobs = JobStore(self.store)
        self.replica = self._replica_id()
        s3 = None
        if self.cfg.storage.backend == "s3":  # checkpoints on the same S3 as the videos by default
            s = self.cfg.storage.to_args()
            s3 = {k: s[k] for k in ("endpoint_url", "region", "access_key_id", "secret_access_key")}
        self.group = GpuGroup(
            model, size=gpus, checkpoint=self.model_cfg.checkpoint, vae=self.model_cfg.vae,
            text_encoder=self.model_cfg.text_encoder, device=self.model_cfg.device,
            dtype=self.model_cfg.dtype, cfg_parallel=self.pool.cfg_parallel,
            gpus_per_rank=self.cfg.gpus_per_rank, cpus_per_rank=self.cfg.cpus_per_rank,
            placement_group="current", s3=s3, cache_dir=self.cfg.cache_dir,
            engine_factory=self.cfg.engine_factory, start_timeout_s=self.cfg.group_start_timeout_s,
            engine_options=self.model_cfg.engine.changed(),
            name=f"pab-{self.replica}",  # + group id; the record names it, so operators find its ranks
        )
        self.group.start()
        log.info("group %s ready: %s x%d", self.group.name, model, gpus)

    @staticmethod
    def _replica_id() -> str:
        try:
            from ray import serve

            ctx = serve.get_replica_context()
            return f"{ctx.deployment}-{ctx.replica_id.unique_id}"
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            import uuid

            return f"local-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ Serve hooks

    async def check_health(self) -> None:
        """Serve calls this periodically: every rank must answer, else the replica is replaced."""
        await asyncio.to_thread(self.group.health, self.cfg.health_check_timeout_s / 2)

    def __del__(self) -> None:
        try:
            self.group.shutdown()
        except Exception:  # noqa: BLE001 - the rank actors die with this replica anyway
            pass

    async def info(self) -> dict[str, Any]:
        return {"replica": self.replica, "group": self.group.info, "broken": self.group.broken}

    # ------------------------------------------------------------------ running a job

    async def run(self, job_id: str, dispatch: int) -> dict[str, Any]:
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self._run, job_id, dispatch, stop)
        except asyncio.CancelledError:
            # The ingress cancelled the call (a delete, or a cancel it could not save: the marker the render
            # polls may never appear). Stop at the next step all the same.
            stop.set()
            raise

    def _run(self, job_id: str, dispatch: int, cancel: threading.Event | None = None) -> dict[str, Any]:
        try:
            claimed = self._claim(job_id, dispatch)
        except StorageUnavailable as e:  # before any rendering: nothing of the video is lost
            raise NothingRendered(str(e)) from e
        if not isinstance(claimed, JobRecord):
            return claimed
        return self._render(claimed, cancel)

    def _claim(self, job_id: str, dispatch: int) -> JobRecord | dict[str, Any]:
        """The job's record, marked in progress and leased to this group; or what the call answers instead (a
        skipped stale dispatch, a job cancelled before it started, or deleted through another ingress replica
        while it waited for this group)."""
        try:
            rec = self.jobs.get(job_id)
        except NotFound:
            return {"skipped": f"job {job_id} was deleted"}
        if rec.terminal:
            return {"skipped": f"job is {rec.status}"}
        if rec.dispatch != dispatch:
            return {"skipped": f"stale dispatch {dispatch} (job is at {rec.dispatch})"}
        if self.group.broken:
            raise GroupUnavailable(f"{self.group.name} is broken: {self.group.broken}")
        try:  # a rank that died while the group sat idle: refuse (no attempt spent); Serve replaces the group
            self.group.health()
        except GroupFailed as e:
            raise GroupUnavailable(f"{self.group.name} lost a rank before this video: {e}") from None
        if self.jobs.cancel_requested(job_id):
            return self._finish(rec, "cancelled")
        owner = f"group:{self.group.name}"
        rec.status, rec.started_at, rec.error = "in_progress", time.time(), None  # a retry's reason is history now
        rec.group = {"name": self.group.name, "replica": self.replica, "gpus": self.group.size,
                     "namespace": self.group.info.get("namespace")}
        try:  # only the record read above: a replica that took the job over (a new dispatch) meanwhile wins
            self.jobs.save(rec, if_unchanged=True)
        except RecordChanged:
            return {"skipped": f"the record of {job_id} changed as this group claimed dispatch {dispatch}"}
        self.jobs.touch(job_id, owner)
        return rec

    def _render(self, rec: JobRecord, cancel: threading.Event | None) -> dict[str, Any]:
        job_id, owner = rec.id, f"group:{self.group.name}"
        stop, lost = threading.Event(), threading.Event()  # lost: the job left this group (a write was refused)
        cancel = cancel if cancel is not None else threading.Event()

        def keep_alive() -> None:  # lease + cancel polling, off the generation thread
            last_touch = time.monotonic()
            while not stop.wait(self.cfg.cancel_poll_s) and not lost.is_set():
                try:
                    if not cancel.is_set() and self.jobs.cancel_requested(job_id):
                        cancel.set()
                    if not cancel.is_set() and time.monotonic() - last_touch >= self.cfg.heartbeat_s:
                        self.jobs.touch(job_id, owner)
                        last_touch = time.monotonic()
                except Exception as e:  # noqa: BLE001 - storage hiccup: try again next tick
                    log.warning("job %s keep-alive: %s", job_id, e)

        last_write = [0.0]

        def on_progress(step: int, total: int) -> None:
            rec.step, rec.total_steps = step, total
            rec.progress = min(99, int(100 * step / total))  # 100 only once the video is stored
            now = time.monotonic()
            if now - last_write[0] >= self.cfg.progress_interval_s or step == total:
                last_write[0] = now
                try:
                    if not self._save_own(rec):
                        log.warning("job %s left group %s (dispatched again, deleted or cancelled elsewhere); "
                                    "stopping this render", job_id, self.group.name)
                        lost.set()
                except Exception as e:  # noqa: BLE001 - progress is best effort
                    log.warning("job %s progress write: %s", job_id, e)

        sidecar = {"job_id": job_id, "created_at": rec.created_at, "attempt": rec.attempts + 1, "prompt": rec.prompt}
        if rec.remixed_from_video_id:
            sidecar["remixed_from_video_id"] = rec.remixed_from_video_id
        output = VideoOutput(storage=self.cfg.storage.to_args(), video_id=job_id, sidecar=sidecar)
        watcher = threading.Thread(target=keep_alive, daemon=True, name=f"lease-{job_id}")
        watcher.start()
        try:
            result = self.group.generate(rec.request, on_progress=on_progress,
                                         should_cancel=lambda: cancel.is_set() or lost.is_set(), output=output)
        except GenerationCancelled:
            return _left(job_id) if lost.is_set() else self._finish(rec, "cancelled")
        except GenerationError as e:
            return self._finish(rec, "failed", ErrorInfo(code="generation_error", message=str(e)))
        finally:
            stop.set()
            watcher.join(5)
        # GroupFailed and StorageUnavailable propagate: the ingress retries (elsewhere, or once storage is back).
        if lost.is_set():  # after the last step: what rank 0 stored is the same key the new dispatch writes
            return _left(job_id)
        if cancel.is_set() or self.jobs.cancel_requested(job_id):
            # Cancelled after the last step (e.g. a cancel saved late, once storage came back): it still wins,
            # and what rank 0 already stored goes, as it would had the render stopped a step earlier.
            self.jobs.discard_outputs(job_id)
            return self._finish(rec, "cancelled")
        rec.status, rec.progress, rec.completed_at = "completed", 100, time.time()
        rec.step = rec.total_steps = len(result.get("timesteps") or []) or rec.total_steps
        rec.video_key, rec.size_bytes = result["video"]["key"], result["video"]["size_bytes"]
        rec.pab = result.get("pab")
        rec.cache = result.get("cache")
        # what only the render could tell (a prompt longer than the text encoder reads), after the ingress's own
        rec.notices = [*rec.notices, *(n for n in result.get("notices") or [] if n not in rec.notices)]
        rec.cost = result.get("cost")
        rec.timings = {
            **{k: float(v) for k, v in result.get("timings", {}).items()},
            "queue_s": rec.started_at - rec.created_at, "run_s": rec.completed_at - rec.started_at,
            "total_s": rec.completed_at - rec.created_at,
        }
        if not self._save_own(rec):
            if self._cancelled_meanwhile(job_id):  # a cancel saved late, by a replica storage failed: it wins
                self.jobs.discard_outputs(job_id)
            return _left(job_id)
        return {"status": "completed", "video": result["video"]}

    def _finish(self, rec, status: str, error: ErrorInfo | None = None) -> dict[str, Any]:
        if status == "cancelled" and self.jobs.deleted(rec.id):
            return {"status": "deleted"}  # no record to bring back; a write racing the delete is swept
        rec.status, rec.completed_at, rec.error = status, time.time(), error
        if rec.started_at:
            rec.timings = {**rec.timings, "run_s": rec.completed_at - rec.started_at}
        return {"status": status} if self._save_own(rec) else _left(rec.id)

    def _save_own(self, rec: JobRecord) -> bool:
        """Write the record of a job this group claimed; False, and nothing written, once the job is not its own any
        more: gone, dispatched again, or finished by someone else. The job is judged by what the record says, not by
        its version alone: a write of this group's own that landed although storage reported it failed leaves a
        version the group never learnt, and the render must not stop for that."""
        try:
            self.jobs.save(rec, if_unchanged=True)
            return True
        except RecordChanged:
            pass
        try:
            stored = self.jobs.get(rec.id)
        except NotFound:
            return False
        if stored.dispatch != rec.dispatch or stored.terminal:
            return False
        rec._version = stored._version  # still this dispatch, in progress: only this group writes that
        try:
            self.jobs.save(rec, if_unchanged=True)
        except RecordChanged:
            return False
        return True

    def _cancelled_meanwhile(self, job_id: str) -> bool:
        try:
            return self.jobs.get(job_id).status == "cancelled"
        except NotFound:
            return False


def _left(job_id: str) -> dict[str, Any]:
    """What `run` answers for a job that left this group mid-render: the ingress that sent it leaves it too."""
    return {"skipped": f"the record of {job_id} changed while this group rendered it: dispatched again, deleted or "
                       "cancelled elsewhere"}
