"""The HTTP ingress: the /v1/videos API, API keys, the bounded queue, dispatch and retries.

Jobs live in the object store (`cluster.jobs`), never only here: a restarted ingress reads them back
and takes over every unfinished job whose lease went stale (its holder is gone).

For each accepted job a background task (`_drive`) sends it to the group pool chosen by its size and
waits. If the group dies mid-video the job is retried on another group (up to `max_attempts`), then
failed with the reason. Serve's router queues the calls when every group is busy; that queue is
what Serve's autoscaler scales the pool on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import random
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cluster.api import ModelInfo, Video, VideoCreate, VideoList
from cluster.config import AppConfig, pool_name, route
from cluster.jobs import JobRecord, JobStore, new_job_id, valid_id
from cluster.storage import NotFound, storage_from_config

log = logging.getLogger("ray.serve")
_instance: dict[str, "VideoAPI"] = {}

api = FastAPI(
    title="pab-cluster video API",
    version="1.0",
    description="Text-to-video with Pyramid Attention Broadcast on GPU groups. Create a job, poll it, "
    "download the mp4. Send `Authorization: Bearer <key>`.",
)
_bearer = HTTPBearer(auto_error=False)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"code": code, "message": message}, headers=headers)


def _field_error(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, naming the field ("pab.spatial.blocks" names a nested one)."""
    loc = ("body", *field.split("."))
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])


def _guess_field(message: str, fields: list[str]) -> str:
    """The request field an engine error message is about (it starts with or names it)."""
    path = message.split(":", 1)[0]
    if path.split(".")[0] in fields and all(part.isidentifier() for part in path.split(".")):
        return path  # "pab.spatial.blocks: ..." names the nested field itself
    hits = [(message.find(f), f) for f in fields if f in message]
    return min(hits)[1] if hits else "body"


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
            log.warning("pab ingress: no API keys configured, the API is open (set PAB_API_KEYS)")
        self.owner = f"ingress:{uuid.uuid4().hex[:8]}"
        self._active: dict[str, asyncio.Task] = {}  # jobs this replica drives
        self._reserved = 0  # accepted requests whose job is being written, not yet in _active
        self._loop_task: asyncio.Task | None = None
        _instance["svc"] = self  # the routes below are module functions; one VideoAPI per replica process
        try:  # Serve runs the constructor on the replica's event loop: start adopting jobs right away
            self._ensure_background()
        except RuntimeError:  # no running loop (constructed outside Serve): started by the first request
            pass

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
            raise _error(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                         {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ requests

    async def create(self, body: VideoCreate) -> Video:
        self._ensure_background()
        model = body.model or self.cfg.default_model
        try:
            model_cfg = self.cfg.model(model)
        except KeyError:
            raise _field_error("model", f"unknown model {model!r}; served: {[m.name for m in self.cfg.models]}",
                               model) from None
        request = body.engine_request(model)
        request["seed"] = request["seed"] if request["seed"] is not None else random.randrange(2**31 - 1)
        try:
            request, size, notices = await asyncio.to_thread(self._resolve, request, body.seconds)
        except ValueError as e:
            raise _field_error(_guess_field(str(e), [*request, "seconds", "size"]), str(e)) from None
        # Check and reserve with no await in between: concurrent requests all passed the check before any
        # of them was registered, so 32 simultaneous POSTs got past a bound of 8.
        pending = len(self._active) + self._reserved
        if pending >= self.cfg.max_pending:
            raise _error(429, "queue_full", f"{pending} videos are queued or rendering; retry later",
                         {"Retry-After": str(self.cfg.retry_after_s)})
        self._reserved += 1
        try:
            pool = route(model_cfg, request["num_frames"] * request["height"] * request["width"])
            now = time.time()
            rec = JobRecord(
                id=new_job_id(), model=model, status="queued", created_at=now, prompt=request["prompt"],
                seconds=f"{request['num_frames'] / request['fps']:g}", size=size, notices=notices, request=request,
                seed=request["seed"], total_steps=request["steps"], pool=pool_name(model, pool.gpus),
                max_attempts=self.cfg.max_attempts,
            )
            await asyncio.to_thread(self.jobs.create, rec)
            self._start(rec.id)
        finally:
            self._reserved -= 1
        log.info("job %s queued on %s", rec.id, rec.pool)
        return rec.public()

    @staticmethod
    def _resolve(request: dict[str, Any], seconds: float | None) -> tuple[dict[str, Any], str, list[str]]:
        """Defaults filled in and the model's own checks run (ValueError -> 422 naming the field), with the
        size the video will have and the notices on it.

        If the engine's weight-free check itself breaks (an engine change), fall back to the model's
        defaults and let the group reject what the model cannot take: the API keeps working.
        """
        from actors.engine import frames_for_seconds, model_defaults, plan_request

        try:
            if seconds is not None:
                request["num_frames"], request["fps"] = frames_for_seconds(request["model"], seconds, request["fps"])
            return plan_request(request)
        except ValueError:
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
        try:
            return await asyncio.to_thread(self.jobs.get, job_id)
        except NotFound:
            raise _error(404, "not_found", f"no video {job_id!r}") from None

    async def view(self, job_id: str) -> Video:
        rec = await self.get(job_id)
        v = rec.public()
        if not rec.terminal:
            v.cancel_requested = await asyncio.to_thread(self.jobs.cancel_requested, job_id)
        return v

    async def cancel(self, job_id: str) -> Video:
        rec = await self.get(job_id)
        if rec.terminal:
            raise _error(409, "not_cancellable", f"video {job_id} is already {rec.status}")
        await asyncio.to_thread(self.jobs.request_cancel, job_id)
        if rec.status == "queued":
            # Not on a group yet: cancel now. A group that picks it up meanwhile sees the marker.
            rec.status, rec.completed_at = "cancelled", time.time()
            await asyncio.to_thread(self.jobs.save, rec)
            task = self._active.get(job_id)
            if task is not None:
                task.cancel()  # drops the call still waiting in Serve's router for a free group
        v = rec.public()
        v.cancel_requested = True
        return v

    async def content(self, job_id: str, redirect: bool = True, head: bool = False) -> Response:
        """The finished mp4: a 307 to a presigned URL (S3), else the bytes, with Range on a local folder.

        A local file goes out as Starlette's `FileResponse`, which streams it in chunks and answers
        `Range` the way players seek: one range is a 206 with `Content-Range`, a start at or past the
        end is a 416 with `Content-Range: bytes */SIZE`, several ranges are one multipart/byteranges
        206, and a header it cannot parse (or a unit other than bytes) is a 400 (RFC 9110 14.2 lets a
        server reject an invalid range). HEAD answers the same headers without the body.
        """
        rec = await self.get(job_id)
        if rec.status != "completed" or not rec.video_key:
            raise _error(409, "not_ready", f"video {job_id} is {rec.status}, not completed")
        url = self.store.presigned_url(rec.video_key) if redirect else None
        if url:
            return RedirectResponse(url, status_code=307)  # S3 serves Range and HEAD on the URL itself
        gone = _error(404, "not_found", f"the file of video {job_id} is gone")
        path = self.store.local_path(rec.video_key)
        if path is not None:
            try:  # stat here so a missing file is our 404, not FileResponse's RuntimeError (a 500)
                stat = await asyncio.to_thread(os.stat, path)
            except FileNotFoundError:
                raise gone from None
            return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4",
                                content_disposition_type="inline", stat_result=stat)
        try:
            size = await asyncio.to_thread(self.store.size, rec.video_key)
            headers = {"Content-Length": str(size), "Content-Disposition": f'inline; filename="{job_id}.mp4"'}
            if head:  # the headers only: opening the object would fetch all of it from S3 for nothing
                return Response(media_type="video/mp4", headers=headers)
            chunks = await asyncio.to_thread(self.store.iter_bytes, rec.video_key)
        except NotFound:
            raise gone from None
        return StreamingResponse(chunks, media_type="video/mp4", headers=headers)

    async def list(self, limit: int, after: str | None, order: str) -> VideoList:
        records, more = await asyncio.to_thread(self.jobs.list, limit, after, order)
        data = [r.public() for r in records]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=more)

    def models(self) -> dict[str, Any]:
        from actors.engine import model_defaults

        data = []
        for m in self.cfg.models:
            groups = [{"gpus": p.gpus, "min_groups": p.min_groups, "max_groups": p.max_groups,
                       "max_workload": p.max_workload, "deployment": pool_name(m.name, p.gpus)} for p in m.groups]
            data.append(ModelInfo(id=m.name, defaults=model_defaults(m.name), groups=groups).model_dump())
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ driving jobs

    def _start(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(job_id))
        self._active[job_id] = task
        task.add_done_callback(lambda _t, j=job_id: self._active.pop(j, None))

    async def _drive(self, job_id: str) -> None:
        """Dispatch until the job is finished; retry on another group when a group dies."""
        try:
            while True:
                rec = await asyncio.to_thread(self.jobs.get, job_id)
                if rec.terminal:
                    return
                if await asyncio.to_thread(self.jobs.cancel_requested, job_id):
                    rec.status, rec.completed_at = "cancelled", time.time()
                    await asyncio.to_thread(self.jobs.save, rec)
                    return
                rec.dispatch += 1
                rec.status, rec.progress, rec.step = "queued", 0, 0
                await asyncio.to_thread(self.jobs.save, rec)
                await asyncio.to_thread(self.jobs.touch, job_id, self.owner)
                handle = self.pools[rec.pool]
                try:
                    await handle.run.remote(job_id, rec.dispatch)
                    return  # the group wrote the outcome (or skipped a stale dispatch)
                except Exception as e:  # noqa: BLE001 - classified below
                    reason = _reason(e)
                    unavailable = "GroupUnavailable" in reason
                rec = await asyncio.to_thread(self.jobs.get, job_id)
                if rec.terminal:
                    return
                if unavailable:  # a broken group refused before starting: costs no attempt
                    await asyncio.sleep(self.cfg.retry_backoff_s)
                    continue
                rec.attempts += 1
                rec.last_error = reason
                log.warning("job %s attempt %d/%d failed: %s", job_id, rec.attempts, rec.max_attempts, reason)
                if rec.attempts >= rec.max_attempts:
                    from cluster.api import ErrorInfo

                    rec.status, rec.completed_at = "failed", time.time()
                    rec.error = ErrorInfo(code="group_failed",
                                          message=f"failed on {rec.attempts} GPU group(s); last error: {reason}")
                    await asyncio.to_thread(self.jobs.save, rec)
                    return
                await asyncio.to_thread(self.jobs.save, rec)
                await asyncio.sleep(self.cfg.retry_backoff_s)
        except Exception:  # noqa: BLE001 - storage down: leave the job to the reconciler
            log.exception("job %s: driver stopped; the reconciler will pick it up", job_id)

    async def _background(self) -> None:
        """Keep leases of our jobs fresh; adopt unfinished jobs whose holder is gone."""
        last_reconcile = 0.0
        while True:
            try:
                for job_id in list(self._active):
                    await asyncio.to_thread(self.jobs.touch, job_id, self.owner)
                if time.monotonic() - last_reconcile >= self.cfg.reconcile_interval_s:
                    last_reconcile = time.monotonic()
                    await self._reconcile()
            except Exception:  # noqa: BLE001
                log.exception("pab ingress background loop")
            await asyncio.sleep(min(self.cfg.heartbeat_s, self.cfg.reconcile_interval_s))

    async def _reconcile(self) -> None:
        for job_id in await asyncio.to_thread(self.jobs.active_ids):
            if job_id in self._active or not valid_id(job_id):
                continue
            lease = await asyncio.to_thread(self.jobs.lease, job_id)
            if lease is None:
                # Created but never leased (the creator died at once): judge by the record's age.
                try:
                    rec = await asyncio.to_thread(self.jobs.get, job_id)
                except NotFound:
                    continue
                age = time.time() - rec.updated_at
            else:
                age = time.time() - float(lease.get("at", 0))
            if age > self.cfg.stale_after_s:
                log.warning("adopting job %s (lease %.0fs old)", job_id, age)
                self._start(job_id)


def _reason(e: BaseException) -> str:
    """One line naming what went wrong (Ray wraps the remote error; its type is on the last lines)."""
    text = str(e)
    for name in ("GroupUnavailable", "GroupFailed", "ActorDiedError", "ActorUnavailableError", "RayActorError"):
        if name in text or name == type(e).__name__:
            line = next((ln.strip() for ln in text.splitlines() if name in ln), "")
            return (line or f"{name}: {text.strip().splitlines()[-1] if text.strip() else ''}")[:500]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


# ----------------------------------------------------------------------------------------------------
# Routes (bound to the replica's VideoAPI instance by serve.ingress)
# ----------------------------------------------------------------------------------------------------

def _svc(request: Request) -> VideoAPI:
    try:
        svc = _instance["svc"]
    except KeyError:
        raise _error(503, "starting", "the ingress is starting") from None
    svc._ensure_background()
    return svc


def _auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> VideoAPI:
    svc = _svc(request)
    svc.check_key(creds)
    return svc


@api.post("/v1/videos", response_model=Video, tags=["videos"])
async def create_video(body: VideoCreate, svc: VideoAPI = Depends(_auth)) -> Video:
    """Queue a video. Poll `GET /v1/videos/{id}` until `completed`, then download its content."""
    return await svc.create(body)


@api.get("/v1/videos", response_model=VideoList, tags=["videos"])
async def list_videos(
    limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, description="id of the last video of the previous page"),
    order: str = Query("desc", pattern="^(asc|desc)$"),
    svc: VideoAPI = Depends(_auth),
) -> VideoList:
    return await svc.list(limit, after, order)


@api.get("/v1/videos/{video_id}", response_model=Video, tags=["videos"])
async def get_video(video_id: str, svc: VideoAPI = Depends(_auth)) -> Video:
    return await svc.view(video_id)


# HEAD too (FastAPI adds it to no GET route): players ask it for the size before they seek.
@api.head("/v1/videos/{video_id}/content", include_in_schema=False)
@api.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=StreamingResponse,
         responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "the bytes a `Range` header asked for"},
                    307: {"description": "redirect to a presigned S3 URL"},
                    416: {"description": "the range starts past the end; `Content-Range: bytes */SIZE`"}})
async def video_content(
    request: Request, video_id: str,
    redirect: bool = Query(True, description="S3: redirect to a presigned URL (false: stream here)"),
    svc: VideoAPI = Depends(_auth),
) -> Response:
    """The mp4: a 307 to an expiring presigned URL on S3, a stream from a local folder that honours `Range`."""
    return await svc.content(video_id, redirect, head=request.method == "HEAD")


@api.delete("/v1/videos/{video_id}", response_model=Video, tags=["videos"])
async def cancel_video(video_id: str, svc: VideoAPI = Depends(_auth)) -> Video:
    """Cancel: a queued video never starts; a rendering one stops at its next denoising step."""
    return await svc.cancel(video_id)


@api.get("/v1/models", tags=["models"])
async def list_models(svc: VideoAPI = Depends(_auth)) -> dict[str, Any]:
    return await asyncio.to_thread(svc.models)


@api.get("/healthz", tags=["health"])
async def healthz(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    return {"status": "ok", "pending": len(svc._active) + svc._reserved, "max_pending": svc.cfg.max_pending}


def _json_safe(v: Any) -> Any:
    """What a 422 echoes of the input, made encodable: NaN/Infinity as text, unpaired surrogates escaped."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {_json_safe(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input as it came; NaN or a lone surrogate there made the 422 a 500.
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, dict) else {"code": "error", "message": exc.detail}
    body = {"error": detail}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
