"""The ingress service behind the /v1/videos API (`cluster.routes` is its HTTP surface): API keys, the bounded
queue, dispatch and retries.

Jobs live in the object store (`cluster.jobs`), never only here: a restarted ingress reads them back
and takes over every unfinished job whose lease went stale (its holder is gone).

For each accepted job a background task (`_drive`) sends it to the group pool chosen by its size and
waits. If the group dies mid-video the job is retried on another group (up to `max_attempts`), then
failed with the reason. Serve's router queues the calls when every group is busy; that queue is
what Serve's autoscaler scales the pool on.

Storage outages (the folder read-only, the S3 endpoint down): what cannot be read or saved answers
503 `storage_unavailable` with Retry-After, and /healthz says "degraded" until a write succeeds.
Nothing accepted is dropped. A job whose video (or record) could not be stored shows `queued` with
`error.code` "storage_unavailable" and why; it renders again once storage takes writes, and fails
after `max_storage_failures` such losses. A cancel that cannot be saved still cancels: the driver
and the group call are cancelled here (the render stops), GET shows `cancelled`, the answer is a 503
saying it is not saved yet, and the background loop saves it once storage is back (until then only
this replica knows it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse, RedirectResponse, Response, StreamingResponse,
)  # fmt: skip
from fastapi.security import HTTPAuthorizationCredentials
from starlette.datastructures import Headers

from cluster import failures
from cluster.api import ErrorInfo, ModelInfo, Video, VideoCreate, VideoList, error_body
from cluster.config import AppConfig, ModelConfig, pool_name, route, workload
from cluster.jobs import JobRecord, JobStore, RecordChanged, new_job_id, valid_id
from cluster.metrics import IngressMetrics
from pab.errors import RequestError
from pab.seeds import draw_seed
from pab.storage import (
    NotFound,
    StorageUnavailable,
    image_key,
    storage_errors,
    storage_from_config,
)

log = logging.getLogger("ray.serve")
_PROBE_EVERY_S = 1.0  # /healthz probes a failing storage at most this often (it needs no key)
_STORAGE_WAIT_MAX_S = 30.0  # longest pause between probes of a job waiting for storage
# An idempotency key bound this recently with no video yet is taken by a request still creating it (two writes);
# older, its creator died in between and the key is free again.
_KEY_CREATION_S = 15.0


class _FileResponse(FileResponse):
    """Starlette's FileResponse (Range, If-Range, HEAD), with its own range errors in OpenAI's error shape: it
    answers a malformed range (`bytes=abc`) with a plain-text 400 and one past the end with an empty 416."""

    async def __call__(self, scope, receive, send) -> None:
        shaped: list[bytes] = []

        async def send_shaped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                status = message["status"]
                size = next((v.decode() for k, v in message.get("headers", []) if k == b"content-range"), "")
                why = (f"the range starts past the end of the file ({size})" if status == 416
                       else f"the Range header {Headers(scope=scope).get('range')!r} is not a byte range")
                shaped.append(json.dumps(error_body(status, "range_not_satisfiable" if status == 416 else
                                                    "invalid_range", why)).encode())  # fmt: skip
                headers = [(k, v) for k, v in message.get("headers", []) if k not in (b"content-type",
                                                                                      b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(shaped[0])).encode())]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and shaped:
                message = {**message, "body": shaped[0], "more_body": False}
            await send(message)

        await super().__call__(scope, receive, send_shaped)


def api_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTP error answered in OpenAI's shape (`cluster.routes` writes the body): `code` names the case."""
    return HTTPException(status_code=status, detail={"code": code, "message": message}, headers=headers)


def field_error(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 400 with FastAPI's error list, naming the field ("pab.spatial.blocks" names a nested one)."""
    loc = ("body", *field.split("."))
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])


def too_big(model: ModelConfig, request: dict[str, Any], body: VideoCreate) -> None:
    """A 400 for a request above the model's `max_workload`, naming the field the body set (size or the frames)."""
    asked = workload(request)
    if model.max_workload is None or asked <= model.max_workload:
        return
    field = ("size" if body.size else "width" if body.width else "height" if body.height
             else "seconds" if body.seconds else "num_frames")  # fmt: skip
    raise field_error(field, f"{request['num_frames']} frames of {request['width']}x{request['height']} is "
                      f"{asked:,} frame-pixels; this server renders at most {model.max_workload:,} with {model.name} "
                      "(num_frames*height*width). Ask for fewer frames or a smaller size")


class VideoAPI:
    """Serve ingress deployment class (decorated in `cluster.app.build_app`)."""

    def __init__(self, config: dict[str, Any], pools: dict[str, Any]) -> None:
        self.cfg = AppConfig(**config)
        self.pools = pools  # deployment name -> DeploymentHandle
        self.store = storage_from_config(self.cfg.storage)
        self.jobs = JobStore(self.store)
        keys = [k.get_secret_value() for k in self.cfg.api_keys]
        keys += [k.strip() for k in os.environ.get("PAB_API_KEYS", "").split(",") if k.strip()]
        self._keys = [k.encode() for k in keys]
        self.auth_required = self.cfg.auth if self.cfg.auth is not None else bool(self._keys)
        if self.auth_required and not self._keys:
            raise ValueError("auth is on but no API key is configured (PAB_API_KEYS or api_keys)")
        if not self.auth_required:
            log.warning("pab ingress: no API keys configured, the API is open (set PAB_API_KEYS, or pab serve "
                        "--api-key)")
        self.owner = f"ingress:{uuid.uuid4().hex[:8]}"
        # Lease writes of this replica, in worker threads: once it stops (`_release_queued`) none may land after
        # the release, which would take a released lease back and leave the video to wait `stale_after_s`.
        self._lease_lock = threading.Lock()
        self._stopping = False
        self._active: dict[str, asyncio.Task] = {}  # jobs this replica drives
        self._reserved = 0  # accepted requests whose job is being written, not yet in _active
        self._loop_task: asyncio.Task | None = None
        # What this replica decided that storage does not have yet (a cancellation, a failure, a job
        # waiting for storage with the reason); GET shows it first. The finished ones are saved by the
        # background loop once storage takes writes, the others by the job's driver.
        self._held: dict[str, JobRecord] = {}
        self._seen: dict[str, JobRecord] = {}  # last record read of each job driven here: GET's fallback
        self._calls: dict[str, Any] = {}  # job id -> its group call in flight (a DeploymentResponse)
        self.metrics = IngressMetrics(lambda: len(self._active) + self._reserved, self._states)
        self._calibrations: dict[str, tuple[dict[str, Any] | None, bool]] = {}
        self._deleted: set[str] = set()  # deleted through this replica: 404 at once, whatever a late render writes
        self._idempotency: dict[str, asyncio.Lock] = {}  # one POST at a time per idempotency key
        self._probed_at = 0.0
        self._app = _app_name()  # Serve names a group replica's placement group after it, under the app's name
        self._unplaceable: dict[str, str] = {}  # pool -> why no node can hold its next group (Ray: INFEASIBLE)
        try:  # Serve runs the constructor on the replica's event loop: start adopting jobs right away
            self._ensure_background()
        except RuntimeError:  # no running loop (constructed outside Serve): started by the first request
            pass

    def __del__(self) -> None:
        """Serve calls this as it stops the replica (Python too, when the object goes): the background loop stops
        first. Left running, its next round asked a thread pool the stopping replica had shut down, and logged
        that as a failure of the loop. Then the videos still queued here are handed over (`_release_queued`)."""
        task = getattr(self, "_loop_task", None)  # None when the constructor failed before making it
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its event loop is closed already: nothing runs it any more
                pass
        if getattr(self, "_active", None):
            self._release_queued()

    def _touch(self, job_id: str) -> None:
        """Refresh the job's lease (blocking), unless this replica is stopping."""
        with self._lease_lock:
            if not self._stopping:
                self.jobs.touch(job_id, self.owner)

    def _release_queued(self) -> None:
        """Release the leases of the videos this replica queues, so another replica takes them over at its next
        reconcile (seconds) rather than once they go stale (`stale_after_s`, a minute by default): Serve stops
        replicas gracefully on a redeploy, a downscale and a RayService upgrade. A video a group renders is left
        alone (its group keeps the lease fresh); so is one a group claims as this runs (the release lands only on the
        lease as read, and a group's touch after it takes the lease back). Blocking: Serve runs this on the
        replica's loop as its last user code."""
        with self._lease_lock:  # a refresh in flight lands first; none starts after
            self._stopping = True
        if self.jobs.failure is not None:
            return  # storage is failing: the leases go stale as they would on a crash
        released = []
        for job_id in list(self._active):
            if job_id in self._held:
                continue  # this replica's own word on it is not saved: nobody else could go on from storage
            try:
                lease, version = self.jobs.lease_versioned(job_id)
                if lease is None or lease.get("owner") != self.owner or self.jobs.get(job_id).status != "queued":
                    continue
                if self.jobs.release(job_id, self.owner, version):  # not over a group's lease, touched meanwhile
                    released.append(job_id)
            except Exception as e:  # noqa: BLE001 - the rest go stale as on a crash; stopping must not fail
                log.warning("stopping: could not release the leases of the videos queued here: %s", e)
                break
        if released:
            log.info("stopping: %d queued video(s) released to the other ingress replicas: %s", len(released),
                     ", ".join(released))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook (`serve.ingress()` without an app): this replica's HTTP app, bound to this instance."""
        from cluster.routes import build_api  # the HTTP layer sits above the service it serves

        return build_api(self)

    def _states(self) -> dict[str, int]:
        """Unfinished videos this replica drives, by the state last read (the pab_jobs gauge)."""
        states = {"queued": 0, "in_progress": 0}
        for job_id in self._active:
            rec = self._held.get(job_id) or self._seen.get(job_id)
            state = rec.status if rec is not None and not rec.terminal else "queued"
            states[state] = states.get(state, 0) + 1
        return states

    def _ensure_background(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._background())
            loop.create_task(asyncio.to_thread(self._warm_up))

    def _warm_up(self) -> None:
        """Import the engine and build each model's meta-device VAE now, not on the first POST."""
        for m in self.cfg.models:
            try:
                self._resolve({"model": m.name, "prompt": "warm-up", "seed": 0}, None)
            except Exception as e:  # noqa: BLE001 - a broken model shows up on its first request
                log.warning("warm-up of %s failed: %s", m.name, e)

    # ------------------------------------------------------------------ auth

    def check_key(self, creds: HTTPAuthorizationCredentials | None) -> None:
        if not self.auth_required:
            return
        token = creds.credentials.encode() if creds and creds.scheme.lower() == "bearer" else b""
        # Compare against every key in constant time; the key itself is never logged.
        if not token or not any(hmac.compare_digest(token, k) for k in self._keys):
            raise api_error(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                            {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ requests

    async def create(self, body: VideoCreate, idempotency: tuple[str, str] | None = None,
                     remixed_from: str | None = None) -> Video:  # fmt: skip
        """Queue a video. `idempotency` = (digest of the key and its sender, hash of the request): a key seen
        before answers its job (409 if the request differs), in this replica or after a restart. `remixed_from`:
        the video whose settings `body` took (recorded on the new one)."""
        if idempotency is None:
            return await self._create(body, None, remixed_from)
        digest, request_hash = idempotency
        lock = self._idempotency.setdefault(digest, asyncio.Lock())  # one at a time here; across replicas, below
        try:
            async with lock:
                found, version = await asyncio.to_thread(self.jobs.idempotent_job, digest)
                if found is not None:
                    if found.get("request") != request_hash:
                        raise api_error(409, "idempotency_key_reused", "this Idempotency-Key was sent before with a "
                                        "different request; use a new key for a new video")  # fmt: skip
                    try:
                        return await self.view(found["job_id"])
                    except HTTPException as e:
                        if e.status_code != 404:
                            raise
                    # No video: deleted (the key is free again), or another replica is creating it right now.
                    if not await self._key_freed(found):
                        raise _key_in_use()
                try:
                    return await self._create(body, (digest, request_hash, version), remixed_from)
                except RecordChanged:  # another replica took the key between our read and our write
                    raise _key_in_use() from None
        finally:
            if not lock.locked():
                self._idempotency.pop(digest, None)

    async def _key_freed(self, found: dict[str, Any]) -> bool:
        """Whether an idempotency key whose video is missing may be used again: its video was deleted, or it is
        older than a creation takes (its creator died between binding the key and writing the video's record)."""
        if time.time() - float(found.get("at", 0)) > _KEY_CREATION_S:
            return True
        return await asyncio.to_thread(self.jobs.deleted, found["job_id"])

    def _check_room(self) -> None:
        pending = len(self._active) + self._reserved
        if pending >= self.cfg.max_pending:
            raise api_error(429, "queue_full", f"{pending} videos are queued or rendering; retry later",
                            {"Retry-After": str(self.cfg.retry_after_s)})

    async def _create(self, body: VideoCreate, idempotency: tuple[str, str, str | None] | None,
                      remixed_from: str | None = None) -> Video:  # fmt: skip
        self._ensure_background()
        # A full queue answers before the model's checks (a thread hop and the sampler's set-up): under a
        # burst most POSTs are refused, and each cost as much as an accepted one (bench.load, #17).
        self._check_room()
        model = body.model or self.cfg.default_model
        try:
            model_cfg = self.cfg.model(model)
        except KeyError:
            raise field_error("model", f"unknown model {model!r}; served: {[m.name for m in self.cfg.models]}",
                              model) from None
        request = body.engine_request(model)
        request["seed"] = request["seed"] if request["seed"] is not None else draw_seed()
        try:
            request, size, notices = await asyncio.to_thread(self._resolve, request, body.seconds)
        except ValueError as e:
            # The engine's checks say which field (RequestError); a ValueError that names none is the body's.
            field = (e.field if isinstance(e, RequestError) else "") or "body"
            top = field.split(".")[0]
            if top in ("cache", "pab"):  # one setting under two names: name the one the body used
                field = ("pab" if body.cache is None and body.pab is not None else "cache") + field[len(top):]
            raise field_error(field, str(e)) from None
        too_big(model_cfg, request, body)
        # Check again and reserve with no await in between: concurrent requests all passed the check before any
        # of them was registered, so 32 simultaneous POSTs got past a bound of 8.
        self._check_room()
        self._reserved += 1
        try:
            pool = route(model_cfg, workload(request))
            now, job_id = time.time(), new_job_id()
            if idempotency is not None:  # the key first: a crash before the record frees it again (no record)
                await asyncio.to_thread(self.jobs.remember_idempotent, idempotency[0], job_id, *idempotency[1:])
            rec = JobRecord(
                id=job_id, model=model, status="queued", created_at=now, prompt=request["prompt"],
                seconds=f"{request['num_frames'] / request['fps']:g}", size=size, notices=notices, request=request,
                seed=request["seed"], total_steps=request["steps"], pool=pool_name(model, pool.gpus),
                max_attempts=self.cfg.max_attempts, remixed_from_video_id=remixed_from,
            )
            try:
                await asyncio.to_thread(self.jobs.create, rec)
            except Exception:  # not on a cancel: the write may still land in its thread
                if idempotency is not None:  # free the key now, or its retry would wait `_KEY_CREATION_S`
                    await asyncio.to_thread(self.jobs.forget_idempotent, idempotency[0])
                raise
            self._start(rec.id)
        finally:
            self._reserved -= 1
        log.info("job %s queued on %s", rec.id, rec.pool)
        return rec.public()

    def _calibration(self, model: str) -> tuple[dict[str, Any] | None, bool]:
        """The model's step-reuse calibration (its presets) and whether preset names go unchecked here (weights
        on S3, read only by the groups); once per model."""
        if model not in self._calibrations:
            from actors.engine import model_calibration

            try:
                self._calibrations[model] = model_calibration(model, self.cfg.model(model).checkpoint)
            except ValueError as e:  # a damaged cache.json beside the weights: the server's to fix, not the request's
                why = f"{model}'s weights come with a calibration this server cannot read: {e}. Fix or remove it"
                raise api_error(500, "model_misconfigured", f"{why} (`pab calibrate` writes it).") from None
        return self._calibrations[model]

    def _resolve(self, request: dict[str, Any], seconds: float | None) -> tuple[dict[str, Any], str, list[str]]:
        """Defaults filled in and the model's own checks run (a RequestError -> 400 naming its field), with the
        size the video will have and the notices on it.

        If the engine's weight-free check itself breaks (an engine change), fall back to the model's
        defaults and let the group reject what the model cannot take: the API keeps working.
        """
        from actors.engine import frames_for_seconds, model_defaults, plan_request

        try:
            said: list[str] = []  # a duration the model cannot render exactly: what it renders instead, and why
            if seconds is not None:
                request["num_frames"], request["fps"], said = frames_for_seconds(request["model"], seconds,
                                                                                 request["fps"])  # fmt: skip
            calibration, unchecked = self._calibration(request["model"])
            request, size, notices = plan_request(request, calibration, names_unchecked=unchecked)
            return request, size, said + notices
        except (ValueError, HTTPException):
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("request check unavailable (%s: %s); using the model's defaults", type(e).__name__, e)
            d = model_defaults(request["model"])
            if seconds is not None and request.get("num_frames") is None:
                request["fps"] = request.get("fps") or d["fps"]
                request["num_frames"] = max(1, round(seconds * request["fps"]))
            request = {**request, **{k: v for k, v in d.items() if request.get(k) is None}}
            return request, f"{request['width']}x{request['height']}", []

    async def get(self, job_id: str) -> JobRecord:
        """The job: what this replica decided and storage lacks, else the stored record, else (storage
        unreadable) the state last read here, with the reason; StorageUnavailable if there is none."""
        if job_id in self._deleted:
            raise api_error(404, "not_found", f"no video {job_id!r} (deleted)")
        held = self._held.get(job_id)
        if held is not None:
            return held.model_copy(deep=True)
        try:
            rec = await asyncio.to_thread(self.jobs.get, job_id)
        except NotFound:
            raise api_error(404, "not_found", f"no video {job_id!r}") from None
        except StorageUnavailable as e:
            seen = self._seen.get(job_id)
            if seen is None:
                raise
            rec = seen.model_copy(deep=True)
            if not rec.terminal:
                rec.error = ErrorInfo(code="storage_unavailable", message=f"{e} Shown: the state last read.")
            return rec
        task = self._active.get(job_id)
        if task is not None and not task.done():
            self._seen[job_id] = rec.model_copy(deep=True)
        return rec

    async def view(self, job_id: str) -> Video:
        rec = await self.get(job_id)
        v = rec.public()
        why = self._unplaceable.get(rec.pool)
        if rec.status == "queued" and v.error is None and why is not None:
            # It waits for a group that no node can hold: say why (a larger node may still join, e.g. from the
            # autoscaler, so it is not failed).
            v.error = ErrorInfo(code="no_node_fits_group", message=f"waiting for a group of {rec.pool}: {why}")
        if not rec.terminal:
            try:
                v.cancel_requested = await asyncio.to_thread(self.jobs.cancel_requested, job_id)
            except StorageUnavailable:
                pass  # the record (or the state last read, with the reason) is still worth answering
        return v

    async def cancel(self, job_id: str) -> Video:
        rec = await self.get(job_id)
        if rec.terminal:
            held = self._held.get(job_id)
            if held is not None and held.status == "cancelled":  # cancelled here; storage did not take it yet
                if not await self._save_held(job_id):
                    raise StorageUnavailable(_unsaved_cancel(job_id, self.jobs.failure))
                v = held.public()
                v.cancel_requested = True
                return v
            raise api_error(409, "not_cancellable", f"video {job_id} is already {rec.status}")
        try:
            await asyncio.to_thread(self.jobs.request_cancel, job_id)
        except StorageUnavailable as e:
            # Not saved, but not lost: stop the render from here and keep the cancellation (GET shows it,
            # the background loop saves it once storage takes writes). The client is told: 503.
            rec.status, rec.completed_at, rec.error = "cancelled", time.time(), None
            self._held[job_id] = rec
            self._stop(job_id)
            raise StorageUnavailable(_unsaved_cancel(job_id, e)) from None
        if rec.status == "queued":
            # Not on a group yet: cancel now. A group that picks it up meanwhile sees the marker.
            rec.status, rec.completed_at, rec.error = "cancelled", time.time(), None
            self._stop(job_id)  # drops the call still waiting in Serve's router for a free group
            await self._save_final(rec)  # the marker is saved, so the cancellation holds even if this is late
            self.metrics.video_finished(rec)  # its driver, stopped, does not count it
        v = rec.public()
        v.cancel_requested = True
        return v

    async def delete(self, job_id: str) -> dict[str, Any]:
        """Remove the video, its sidecar, images and record; a queued or rendering one is aborted first.
        Storage failing: 503 and nothing changed (the render goes on)."""
        await self.get(job_id)  # 404 for an unknown (or already deleted) id
        await asyncio.to_thread(self.jobs.delete, job_id)  # the cancel marker stays: a group's render stops on it
        self._deleted.add(job_id)
        self._stop(job_id)
        self._held.pop(job_id, None)
        self._seen.pop(job_id, None)
        log.info("job %s deleted", job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    def _stop(self, job_id: str) -> None:
        """Cancel the job's group call (Serve cancels the group's `run`, which stops the render) and driver."""
        call = self._calls.pop(job_id, None)
        if call is not None:
            call.cancel()
        task = self._active.get(job_id)
        if task is not None:
            task.cancel()

    async def content(self, job_id: str, redirect: bool = True, head: bool = False,
                      variant: str = "video") -> Response:
        """The finished mp4 (or, by `variant`, its JPEG thumbnail or spritesheet): a 307 to a presigned URL
        (S3), else the bytes, with Range on a local folder.

        A local file goes out as Starlette's `FileResponse`, which streams it in chunks and answers
        `Range` the way players seek: one range is a 206 with `Content-Range`, a start at or past the
        end is a 416 with `Content-Range: bytes */SIZE`, several ranges are one multipart/byteranges
        206, and a header it cannot parse (or a unit other than bytes) is a 400 (RFC 9110 14.2 lets a
        server reject an invalid range). HEAD answers the same headers without the body.

        The images are stored beside the mp4 when it is rendered; a video made before they were (or whose
        images could not be made) gets them derived from its mp4 on the first request, and stored.
        """
        rec = await self.get(job_id)
        if rec.status != "completed" or not rec.video_key:
            raise api_error(409, "not_ready", f"video {job_id} is {rec.status}, not completed")
        if variant == "video":
            return await self._serve(rec.video_key, "video/mp4", f"{job_id}.mp4", redirect, head,
                                     f"the file of video {job_id}")
        key = image_key(job_id, variant)
        with storage_errors(self.cfg.storage, f"read the {variant} of video {job_id}"):
            stored = await asyncio.to_thread(self.store.exists, key)
        if stored:
            return await self._serve(key, "image/jpeg", f"{job_id}.{variant}.jpg", redirect, head,
                                     f"the {variant} of video {job_id}")
        data = await asyncio.to_thread(self._derive_image, rec, variant)
        return Response(data, media_type="image/jpeg",
                        headers={"Content-Disposition": f'inline; filename="{job_id}.{variant}.jpg"'})

    def _derive_image(self, rec: JobRecord, variant: str) -> bytes:
        """The JPEG `variant` of a video without one, from its stored mp4; stored for the next request."""
        from pab.video import still_images

        path = self.store.local_path(rec.video_key)
        try:
            with storage_errors(self.cfg.storage, f"read video {rec.id}"):
                src = path if path is not None and path.is_file() else self.store.get_bytes(rec.video_key)
        except NotFound:
            raise api_error(404, "not_found", f"the file of video {rec.id} is gone") from None
        try:
            data = still_images(src, (variant,))[variant]
        except Exception as e:  # noqa: BLE001  (a corrupt or truncated file: PyAV's errors vary)
            log.warning("video %s: no %s from its mp4 (%s: %s)", rec.id, variant, type(e).__name__, e)
            raise api_error(404, "not_found", f"video {rec.id} has no {variant} and its mp4 could not be "
                            f"decoded to make one ({type(e).__name__})") from None
        try:  # best effort: the next request (and S3's presigned URL) then finds it
            self.store.put_bytes(image_key(rec.id, variant), data, "image/jpeg")
        except Exception as e:  # noqa: BLE001
            log.warning("video %s: could not store its derived %s (%s: %s)", rec.id, variant, type(e).__name__, e)
        return data

    async def _serve(self, key: str, media_type: str, filename: str, redirect: bool, head: bool,
                     what: str) -> Response:
        """One stored object: a 307 to a presigned URL (S3 with `redirect`), a local file, or a stream."""
        url = self.store.presigned_url(key) if redirect else None
        if url:
            return RedirectResponse(url, status_code=307)  # S3 serves Range and HEAD on the URL itself
        gone = api_error(404, "not_found", f"{what} is gone")
        path = self.store.local_path(key)
        if path is not None:
            try:  # stat here so a missing file is our 404, not FileResponse's RuntimeError (a 500)
                stat = await asyncio.to_thread(os.stat, path)
            except FileNotFoundError:
                raise gone from None
            return _FileResponse(path, media_type=media_type, filename=filename,
                                 content_disposition_type="inline", stat_result=stat)
        try:
            with storage_errors(self.cfg.storage, f"read {what}"):
                size = await asyncio.to_thread(self.store.size, key)
                headers = {"Content-Length": str(size), "Content-Disposition": f'inline; filename="{filename}"'}
                if head:  # the headers only: opening the object would fetch all of it from S3 for nothing
                    return Response(media_type=media_type, headers=headers)
                chunks = await asyncio.to_thread(self.store.iter_bytes, key)
        except NotFound:
            raise gone from None
        return StreamingResponse(chunks, media_type=media_type, headers=headers)

    async def list(self, limit: int, after: str | None, order: str) -> VideoList:
        records, more = await asyncio.to_thread(self.jobs.list, limit, after, order)
        data = [self._held.get(r.id, r).public() for r in records if r.id not in self._deleted]
        # The cancel marker, as GET reports it: only unfinished videos have one to read (a page of them at most).
        unfinished = [v for v in data if v.status in ("queued", "in_progress") and not v.cancel_requested]
        asked = await asyncio.gather(*(asyncio.to_thread(self.jobs.cancel_requested, v.id) for v in unfinished),
                                     return_exceptions=True)  # fmt: skip
        for v, cancel in zip(unfinished, asked):
            v.cancel_requested = cancel is True  # unreadable now: as the record says
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=more)

    def models(self) -> dict[str, Any]:
        from actors.engine import model_defaults
        from pab.caching import cache_names

        data = []
        for m in self.cfg.models:
            groups = [{"gpus": p.gpus, "min_groups": p.min_groups, "max_groups": p.max_groups,
                       "max_workload": p.max_workload, "deployment": pool_name(m.name, p.gpus)} for p in m.groups]
            try:  # presets beside weights this machine cannot read are the groups' to judge: not listed here
                calibration = self._calibration(m.name)[0]
            except HTTPException:
                calibration = None
            data.append(ModelInfo(id=m.name, defaults=model_defaults(m.name), groups=groups,
                                  cache_presets=cache_names(m.name, calibration)).model_dump())  # fmt: skip
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ driving jobs

    def _start(self, job_id: str, judged: str | None = None) -> None:
        """Drive the job from here. `judged`: the version of its record a takeover was decided on (`_reconcile`);
        if the record has changed since, someone else acts on the job and it is left to them."""
        task = asyncio.get_running_loop().create_task(self._drive(job_id, judged))
        self._active[job_id] = task
        task.add_done_callback(lambda _t, j=job_id: self._active.pop(j, None))

    async def _drive(self, job_id: str, judged: str | None = None) -> None:
        """Dispatch until the job is finished; retry on another group when a group dies, and after storage
        failed once it takes writes again."""
        try:
            while not await self._attempt(job_id, judged):
                judged = None
            await self._count_finished(job_id)
        except RecordChanged as e:
            # Whoever changed it drives it now, and counts it; should it die, its lease goes stale and a replica
            # adopts the job.
            log.info("job %s: %s; left to whoever changed it", job_id, e)
        except NotFound:  # deleted through another replica: nothing left to drive
            log.info("job %s was deleted; its driver here ends", job_id)
        except Exception:  # noqa: BLE001 - a bug: leave the job to the reconciler
            log.exception("job %s: driver stopped; the reconciler will pick it up", job_id)
        finally:
            self._seen.pop(job_id, None)
            if job_id in self._held and not self._held[job_id].terminal:
                del self._held[job_id]  # a reason only this driver kept up to date

    async def _count_finished(self, job_id: str) -> None:
        """Metrics of a video its driver saw finish (the record the group wrote, or one held here)."""
        try:
            rec = await self.get(job_id)
        except (HTTPException, StorageUnavailable):
            return  # deleted meanwhile, or unreadable now: not counted rather than counted wrong
        if rec.terminal:
            self.metrics.video_finished(rec)

    async def _attempt(self, job_id: str, judged: str | None = None) -> bool:
        """One dispatch. True when nothing is left to do here (finished, or a group wrote the outcome); False to go
        round again: a group died, or storage failed (the job shows why while it waits).

        Every write of the record here is conditional on the version just read: a group that claimed the job, or
        another replica that took it over, in between wins, and this replica leaves the job to it (RecordChanged).
        Two replicas adopting one job (both saw its lease go stale) no longer both dispatch it, nor does a replica
        taking over a released job that a group claimed meanwhile."""
        rec = self._seen.get(job_id)
        try:
            rec = await asyncio.to_thread(self.jobs.get, job_id)
            if judged is not None and rec._version != judged:
                raise RecordChanged(f"the record of {job_id} changed since this replica decided to take it over")
            held = self._held.get(job_id)
            if held is not None and held.terminal:
                return True  # cancelled or failed here while storage was down; the background loop saves it
            if held is not None:  # counts made while storage could not take them
                rec.attempts = max(rec.attempts, held.attempts)
                rec.storage_failures = max(rec.storage_failures, held.storage_failures)
            if rec.terminal:
                return True
            if await asyncio.to_thread(self.jobs.cancel_requested, job_id):
                rec.status, rec.completed_at, rec.error = "cancelled", time.time(), None  # a retry's reason is over
                await self._save_final(rec)
                return True
            if rec.pool not in self.pools and not self._reroute(rec):  # a server restarted with other pools or models
                await self._save_final(rec)
                return True
            rec.dispatch += 1
            rec.status, rec.progress, rec.step = "queued", 0, 0
            if rec.error is None or rec.error.code != "retrying":  # why it waits again stays until a group starts it
                rec.error = None
            # The lease first: a replica that reads this dispatch's record as it judges the job (`_reconcile`)
            # then reads a fresh lease, and leaves it.
            await asyncio.to_thread(self._touch, job_id)
            await asyncio.to_thread(self.jobs.save, rec, if_unchanged=True)
            self._held.pop(job_id, None)  # storage has the job again: GET reads it there
            self._seen[job_id] = rec.model_copy(deep=True)
            failure = await self._call_group(rec)
            if failure is None:
                return True  # the group wrote the outcome
            lost = failures.storage_cause(failure)
            if lost is not None and failures.nothing_rendered(failure):
                return await self._storage_before_render(rec, lost)
            if lost is not None:
                return await self._store_failed(rec, lost)
            reason = failures.describe(failure)
            rec = await asyncio.to_thread(self.jobs.get, job_id)
            if rec.terminal:
                return True
            if failures.refused(failure):  # a broken group refused before starting: costs no attempt
                await asyncio.sleep(self.cfg.retry_backoff_s)
                return False
            rec.attempts += 1
            rec.last_error = reason
            log.warning("job %s attempt %d/%d failed: %s", job_id, rec.attempts, rec.max_attempts, reason)
            if rec.attempts >= rec.max_attempts:
                rec.status, rec.completed_at = "failed", time.time()
                rec.error = ErrorInfo(code="group_failed",
                                      message=f"failed on {rec.attempts} GPU group(s); last error: {reason}")
                await self._save_final(rec)
                return True
            # Queued again, for the seconds a new group may take: the video says why (the group clears it as it
            # starts the render).
            rec.error = ErrorInfo(code="retrying", message=f"attempt {rec.attempts} of {rec.max_attempts} failed "
                                  f"({reason}); it renders again once a group is free (a new group replaces a "
                                  "failed one)")  # fmt: skip
            await asyncio.to_thread(self.jobs.save, rec, if_unchanged=True)
            await asyncio.sleep(self.cfg.retry_backoff_s)
            return False
        except StorageUnavailable as e:
            # One of this replica's own reads or writes failed. Nothing ran that is lost: wait for storage.
            if rec is not None:
                self._hold(rec, f"{e} The video goes on once storage takes writes again.")
            await self._wait_for_storage()
            return False

    def _reroute(self, rec: JobRecord) -> bool:
        """Send a job whose pool this app no longer has (a restart changed the pools) to the pool its size routes
        to now; False, with the job failed and the reason, when its model is no longer served."""
        try:
            model = self.cfg.model(rec.model)
        except KeyError:
            rec.status, rec.completed_at = "failed", time.time()
            served = [m.name for m in self.cfg.models]
            rec.error = ErrorInfo(code="model_not_served", message=f"this server no longer serves {rec.model}, the "
                                  f"model the video was accepted for; served now: {served}. Create the video again "
                                  "with one of them.")  # fmt: skip
            log.warning("job %s: model %s is no longer served; failed", rec.id, rec.model)
            return False
        pool = pool_name(model.name, route(model, workload(rec.request)).gpus)
        log.info("job %s: pool %s is gone; routed to %s", rec.id, rec.pool, pool)
        rec.pool = pool
        return True

    async def _call_group(self, rec: JobRecord) -> Exception | None:
        """Run the job on its pool: None once a group wrote the outcome, else what the call raised. A group that
        skipped the dispatch (the record was cancelled, deleted, dispatched again or changed by someone else meanwhile)
        raises RecordChanged here: this driver's part is over, and whoever changed the record counts the video."""
        call = self.pools[rec.pool].run.remote(rec.id, rec.dispatch)
        self._calls[rec.id] = call
        try:
            answer = await call
        except Exception as e:  # noqa: BLE001 - the caller classifies it
            if self._calls.get(rec.id) is not call:  # `_stop` cancelled it (Serve raises RequestCancelledError)
                raise asyncio.CancelledError from e
            return e
        finally:
            if self._calls.get(rec.id) is call:
                del self._calls[rec.id]
        if isinstance(answer, dict) and "skipped" in answer:
            raise RecordChanged(f"the group skipped dispatch {rec.dispatch}: {answer['skipped']}")
        return None

    async def _storage_before_render(self, rec: JobRecord, err: StorageUnavailable) -> bool:
        """The group could not read or claim the job in storage: it rendered nothing, so no attempt is counted
        lost (a job queued behind an outage would otherwise fail for storage without ever rendering). Show why,
        and dispatch it again once storage takes writes."""
        self.jobs.failed(err)
        log.warning("job %s: storage failed before its render started: %s", rec.id, err)
        self._hold(rec, f"{err} Nothing of this video was rendered yet; it starts once storage takes writes again.")
        await self._wait_for_storage()
        return False

    async def _store_failed(self, rec: JobRecord, err: StorageUnavailable) -> bool:
        """The group could not store this attempt's video (or its record), so the render is lost. Show why,
        wait until storage takes writes, then render again; the `max_storage_failures`-th loss fails the job."""
        self.jobs.failed(err)
        rec.storage_failures += 1
        rec.last_error = str(err)
        n, limit = rec.storage_failures, self.cfg.max_storage_failures
        log.warning("job %s: attempt lost to storage (%d of at most %d): %s", rec.id, n, limit, err)
        if n >= limit:
            try:  # when and where the lost render started: the group wrote that in storage, not in this copy
                _carry_render_fields(rec, await asyncio.to_thread(self.jobs.get, rec.id))
            except (StorageUnavailable, NotFound):
                pass  # the held record takes it when it is saved (`_save_held`)
            rec.status, rec.completed_at = "failed", time.time()
            rec.error = ErrorInfo(code="storage_unavailable", message=f"storage did not take the video {n} times; the "
                                  f"last time: {err} Create the video again once storage works.")
            await self._save_final(rec)
            return True
        self._hold(rec, f"{err} This attempt's video is lost; it renders again once storage takes writes "
                        f"(loss {n}; the video fails at {limit}).")
        await self._wait_for_storage()
        return False

    def _hold(self, rec: JobRecord, message: str) -> None:
        """Show the job queued again with `message` (GET serves held records first) until its driver saves it."""
        current = self._held.get(rec.id)
        if current is not None and current.terminal:
            return
        held = rec.model_copy(deep=True)
        held.status, held.progress, held.step = "queued", 0, 0
        held.error = ErrorInfo(code="storage_unavailable", message=message)
        self._held[rec.id] = held

    async def _save_final(self, rec: JobRecord) -> None:
        """Save a finished job; if storage fails, hold it (GET shows it) for the background loop to save."""
        try:
            await asyncio.to_thread(self.jobs.save, rec)
        except StorageUnavailable:
            self._held[rec.id] = rec
        else:
            self._held.pop(rec.id, None)

    async def _save_held(self, job_id: str) -> bool:
        """Save a cancellation or failure decided here while storage was down; False while storage still fails."""
        rec = self._held.get(job_id)
        if rec is None or not rec.terminal:
            return True
        try:
            if rec.status == "cancelled":
                await asyncio.to_thread(self.jobs.request_cancel, job_id)  # a render still going stops on it
            stored = await asyncio.to_thread(self.jobs.get, job_id)
            if not stored.terminal or _cancel_wins(rec, stored):
                _carry_render_fields(rec, stored)
                await asyncio.to_thread(self.jobs.save, rec)
            elif stored.status != rec.status:
                log.warning("job %s ended %s before it could be saved %s; it stays %s",
                            job_id, stored.status, rec.status, stored.status)
        except NotFound:
            pass  # the record is gone: nothing to save it over
        except StorageUnavailable:
            return False
        if self._held.get(job_id) is rec:
            del self._held[job_id]
        return True

    async def _probe(self) -> bool:
        """Whether storage takes a write now (this also sets /healthz back to ok)."""
        self._probed_at = time.monotonic()
        try:
            await asyncio.to_thread(self.jobs.probe, self.owner)
        except StorageUnavailable:
            return False
        return True

    async def _wait_for_storage(self) -> None:
        """Return once storage takes a write: probes with backoff, at most `_STORAGE_WAIT_MAX_S` apart."""
        delay = max(self.cfg.retry_backoff_s, 0.05)
        while True:
            await asyncio.sleep(delay)
            if await self._probe():
                return
            delay = min(2 * delay, _STORAGE_WAIT_MAX_S)

    async def health(self) -> dict[str, Any]:
        """/healthz: "degraded" while the last storage operation failed, with why; a write success ends it."""
        if self.jobs.failure is not None and time.monotonic() - self._probed_at >= _PROBE_EVERY_S:
            await self._probe()  # so recovery shows without waiting for traffic or the background loop
        failure, since = self.jobs.failure, self.jobs.failing_since
        return {"status": "ok" if failure is None else "degraded",
                "storage": {"ok": failure is None, "error": None if failure is None else str(failure), "since": since},
                "unsaved": sum(r.terminal for r in self._held.values()),
                "pending": len(self._active) + self._reserved, "max_pending": self.cfg.max_pending,
                "unplaceable": dict(self._unplaceable)}  # pool -> why no node can hold its next group

    async def _background(self) -> None:
        """Keep leases of our jobs fresh; save what storage missed; adopt unfinished jobs whose holder is gone.
        While storage fails it only probes (the failure is logged once, when it starts)."""
        last_reconcile = 0.0
        while True:
            try:
                if self.jobs.failure is None or await self._probe():
                    for job_id in [j for j, r in self._held.items() if r.terminal]:
                        if not await self._save_held(job_id):
                            break
                    for job_id in list(self._active):
                        await asyncio.to_thread(self._touch, job_id)
                    if time.monotonic() - last_reconcile >= self.cfg.reconcile_interval_s:
                        last_reconcile = time.monotonic()
                        await self._reconcile()
                        self._unplaceable = await asyncio.to_thread(self._unplaceable_pools)
                        # What renders that were finishing as their video was deleted wrote since.
                        await asyncio.to_thread(self.jobs.sweep_deleted, 2 * self.cfg.stale_after_s)
            except StorageUnavailable:
                pass  # /healthz says degraded; the next round probes
            except Exception:  # noqa: BLE001
                log.exception("pab ingress background loop")
            await asyncio.sleep(min(self.cfg.heartbeat_s, self.cfg.reconcile_interval_s))

    def _unplaceable_pools(self) -> dict[str, str]:
        """Pools with a group replica whose placement group no node can hold now: pool -> why (it names the
        resources, the largest node and STRICT_PACK)."""
        if self._app is None:
            return {}
        from actors.group import infeasible_groups

        prefix = f"SERVE_REPLICA::{self._app}#"
        try:
            found = infeasible_groups(prefix)
        except Exception as e:  # noqa: BLE001 - a reason is a courtesy; the queue goes on without one
            log.debug("placement groups unreadable: %s", e)
            return {}
        return {name[len(prefix):].split("#", 1)[0]: why for name, why in sorted(found.items())}

    async def _reconcile(self) -> None:
        """Take over the unfinished jobs nobody holds: a stale lease (its holder died), a released one (its replica
        stopped), or none a while after creation (the creator died at once). Each is decided on the record as read
        here and taken only if it is still that version (`_attempt`): another replica deciding the same at the same
        time, or a group claiming the job, wins instead of dispatching it twice."""
        for job_id in await asyncio.to_thread(self.jobs.active_ids):
            if job_id in self._active or job_id in self._held or not valid_id(job_id):
                continue
            lease = await asyncio.to_thread(self.jobs.lease, job_id)
            released = False
            if lease is not None:
                age = time.time() - float(lease.get("at", 0))
                # Released by a stopping replica: a heartbeat on (time for it to be gone, and for a group that
                # claimed the video as it stopped to take the lease back), if still queued, it is ours.
                released = (bool(lease.get("released")) and age > self.cfg.heartbeat_s
                            and lease.get("owner") != self.owner)  # fmt: skip
                if not released and age <= self.cfg.stale_after_s:
                    continue
            try:
                rec = await asyncio.to_thread(self.jobs.get, job_id)
            except NotFound:
                continue
            if rec.terminal:  # the save that finished it stopped short of removing these
                await asyncio.to_thread(self.jobs.retire, job_id)
                continue
            if lease != await asyncio.to_thread(self.jobs.lease, job_id):
                continue  # taken (or claimed) as this was read: its new holder touched the lease first
            if lease is None:  # created but never leased (the creator died at once): judge by the record's age
                age = time.time() - rec.updated_at
                if age <= self.cfg.stale_after_s:
                    continue
            elif released and age <= self.cfg.stale_after_s:
                if rec.status != "queued":
                    continue  # a group claimed it as its replica stopped: the group's lease says whether it lives
                log.info("taking over job %s, released by %s", job_id, lease.get("owner"))
                self._start(job_id, rec._version)
                continue
            log.warning("adopting job %s (lease %.0fs old)", job_id, age)
            self._start(job_id, rec._version)


def _app_name() -> str | None:
    """The Serve application this replica belongs to; None outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
        return None


def _key_in_use() -> HTTPException:
    """409 with Retry-After, the one 409 a retry a moment later changes: the openai SDK is told to retry it (its own
    x-should-retry header; the routes send "false" with every other 409), and the retry answers the video the other
    request made."""
    return api_error(409, "idempotency_key_in_use", "another request with this Idempotency-Key is being handled right "
                     "now; retry in a moment to get the video it creates",
                     {"Retry-After": "1", "x-should-retry": "true"})  # fmt: skip


def _unsaved_cancel(job_id: str, e: BaseException | None) -> str:
    return (f"video {job_id} is cancelled on this server and its render told to stop, but the cancellation could "
            f"not be saved: {e or 'storage still fails.'} It is saved once storage takes writes again; GET shows "
            "the video as cancelled meanwhile.")


def _carry_render_fields(rec: JobRecord, stored: JobRecord) -> None:
    """Give `rec`, a copy this replica took before it dispatched the job, what the group wrote into the stored record
    as it started this dispatch's render: when, and on which group."""
    if stored.started_at is not None and stored.dispatch == rec.dispatch:
        rec.started_at, rec.group = stored.started_at, stored.group or rec.group


def _cancel_wins(held: JobRecord, stored: JobRecord) -> bool:
    """A render that completed after a cancellation this replica accepted (and could not save) does not count."""
    return held.status == "cancelled" and stored.status == "completed" and (
        (stored.completed_at or 0) > (held.completed_at or 0))
