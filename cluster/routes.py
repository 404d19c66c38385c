"""The HTTP surface of the ingress: the /v1/videos routes, API keys, request bodies (JSON or the openai SDK's
forms) and every error in OpenAI's shape. The routes are stateless; `build_api` binds them to one
`cluster.ingress.VideoAPI`, the service that keeps the jobs (Serve builds one app per ingress replica)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api import Video, VideoCreate, VideoDeleted, VideoList, error_body, form_fields, remix_fields
from cluster.ingress import VideoAPI, api_error
from cluster.jobs import valid_id
from cluster.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pab.request import deepest_first, error_message, field_path
from pab.storage import StorageUnavailable

# The routes, stateless: each reads the VideoAPI of the app serving it (`build_api`).
router = APIRouter()
_bearer = HTTPBearer(auto_error=False)


def _svc(request: Request) -> VideoAPI:
    svc = getattr(request.app.state, "svc", None)
    if svc is None:
        raise api_error(503, "starting", "the ingress is starting")
    svc._ensure_background()
    return svc


# async, so it runs on the event loop: a sync dependency runs in a worker thread, where starting the
# background loop (no running loop there) failed every request of a VideoAPI made outside Serve.
async def _auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> VideoAPI:
    svc = _svc(request)
    svc.check_key(creds)
    return svc


_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
_VIDEO_CREATE = {"$ref": "#/components/schemas/VideoCreate"}
# A video request is a few KB (its longest fields, the prompts, take 4,000 characters each; a step-reuse policy's
# lists ~0.3 MB at their limits). A form may carry a file the SDK uploads (input_reference), refused by name after
# it is read, so it may be larger.
MAX_JSON_BYTES = 1 << 20
MAX_FORM_BYTES = 32 << 20
# Fields some clients send that no model here takes, and why (a plain "extra inputs are not permitted" hides it).
_NOT_TAKEN = {
    "input_reference": "image-to-video needs an image-conditioned model; the models served here take text only",
}


async def _video_create(request: Request) -> VideoCreate:
    """The body as a VideoCreate, from JSON or from a form (the openai SDK always sends multipart). One schema
    judges both, so a bad field is the same 400 either way."""
    return _validated(await _body_data(request))


async def _body_data(request: Request) -> Any:
    """The body's fields as JSON values, from JSON or from a form; a 400 for JSON that does not parse or a file
    in a form (no field takes one), a 413 for a body over its limit."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in _FORMS:
        _check_length(request, MAX_FORM_BYTES)
        form = await request.form()
        try:
            files = list(dict.fromkeys(k for k, v in form.multi_items() if not isinstance(v, str)))
            if files:  # refused by name; its bytes are never read as text (a file in `prompt` is not a prompt)
                raise RequestValidationError([_file_error(k) for k in files])
            data: Any = form_fields(form.multi_items())
        finally:
            await form.close()
    else:
        raw = await _read_body(request, MAX_JSON_BYTES)
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            error = {"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)), "msg": "JSON decode error",
                     "input": {}, "ctx": {"error": str(e)}}
            raise RequestValidationError([error]) from None
    return data


def _too_large(size: int | str, limit: int) -> Exception:
    return api_error(413, "body_too_large", f"the request body is {size} bytes, over this route's {limit >> 20} MiB: "
                     "a video request is a few KB (prompt and negative_prompt take 4,000 characters each)")


def _check_length(request: Request, limit: int) -> None:
    """A 413 before reading a body whose Content-Length is over `limit`."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise _too_large(size, limit)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read until it passes `limit` (a chunked upload has no Content-Length to check first)."""
    _check_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {size}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _file_error(field: str) -> dict[str, Any]:
    why = _NOT_TAKEN.get(field, "this field takes text, and no field here takes a file")
    return {"type": "file_not_accepted", "loc": ("body", field), "msg": f"a file was sent: {why}", "input": None}


def _validated(data: Any) -> VideoCreate:
    try:
        return VideoCreate.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        for err in errors:  # a field some clients send that no model here takes: say why
            if err["type"] == "extra_forbidden" and len(err["loc"]) == 2 and err["loc"][1] in _NOT_TAKEN:
                err["msg"] = f"not taken: {_NOT_TAKEN[err['loc'][1]]}"
        raise RequestValidationError(errors, body=data) from None


@router.post("/v1/videos", response_model=Video, tags=["videos"], openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/json": {"schema": _VIDEO_CREATE}, "multipart/form-data": {"schema": _VIDEO_CREATE}},
    "description": "`VideoCreate` as JSON or as form fields (what the openai SDK sends): numbers as text, `pab` a "
                   "preset name, a JSON object or bracketed fields (`pab[spatial][range]`)."}})
async def create_video(request: Request, svc: VideoAPI = Depends(_auth)) -> Video:
    """Queue a video. Poll `GET /v1/videos/{id}` until `completed`, then download its content. With an
    `Idempotency-Key` header, a repeated request answers the video the first one created (no second render)."""
    body = await _video_create(request)
    return await svc.create(body, _idempotency(request, body, default_model=svc.cfg.default_model))


@router.post("/v1/videos/{video_id}/remix", response_model=Video, tags=["videos"], openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/json": {"schema": _VIDEO_CREATE}, "multipart/form-data": {"schema": _VIDEO_CREATE}},
    "description": "`prompt` and any other `VideoCreate` field to change; the rest is the completed video's."}})
async def remix_video(video_id: str, request: Request, svc: VideoAPI = Depends(_auth)) -> Video:
    """Queue a remix of a completed video (what the SDK's `videos.remix(id, prompt=...)` sends): its model and
    every setting, its seed included (so the same starting noise), with the new prompt and any other field given
    changed. The video is text-conditioned only: a remix renders afresh, it does not edit the frames."""
    given = await _body_data(request)
    if isinstance(given, dict) and "prompt" not in given:  # without a new prompt a remix renders the video again
        why = "Field required: a remix renders the video's settings with a new prompt"
        raise RequestValidationError([{"type": "missing", "loc": ("body", "prompt"), "msg": why, "input": given}])
    source = await svc.get(video_id)
    if source.status != "completed":
        raise api_error(409, "video_not_completed", f"video {video_id} is {source.status}: only a completed video can "
                        "be remixed (its settings are in its `request`; POST /v1/videos with them to render it anew)")
    body = _validated(remix_fields(source.request, given))
    return await svc.create(body, _idempotency(request, body, video_id), remixed_from=video_id)


_UNSUPPORTED = {
    "edits": "editing a video needs a video-conditioned model",
    "extensions": "extending a video needs a video-conditioned model",
    "characters": "characters (a subject taken from an uploaded video) need a video-conditioned model",
}


@router.post("/v1/videos/edits", tags=["videos"], include_in_schema=False)
@router.post("/v1/videos/extensions", tags=["videos"], include_in_schema=False)
@router.post("/v1/videos/characters", tags=["videos"], include_in_schema=False)
@router.get("/v1/videos/characters/{character_id}", tags=["videos"], include_in_schema=False)
async def unsupported(request: Request, svc: VideoAPI = Depends(_auth)) -> None:
    """The SDK's `videos.edit`, `videos.extend`, `videos.create_character` and `videos.get_character`: refused saying
    why (without these routes they were a bare 405 or 404)."""
    what = _UNSUPPORTED[request.url.path.split("/")[3]]  # /v1/videos/<what>[/<id>]
    raise api_error(400, "unsupported_operation", f"{what}; the models served here take text only. POST /v1/videos/"
                    "{id}/remix renders a completed video's settings and seed with a new prompt")


def _idempotency(request: Request, body: VideoCreate, remixed_from: str | None = None,
                 default_model: str | None = None) -> tuple[str, str] | None:  # fmt: skip
    """(digest of the key and the API key that sent it, hash of the request), or None without the header. A body
    without a model asks for `default_model`: the same request as one naming it."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise api_error(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable characters")
    sender = request.headers.get("authorization", "")  # keys of different API keys never collide; never stored
    digest = hashlib.sha256(f"{sender}\0{key}".encode()).hexdigest()
    asked = {**body.model_dump(mode="json"), **({"remixed_from": remixed_from} if remixed_from else {})}
    asked["model"] = asked["model"] or default_model
    request_hash = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()
    return digest, request_hash


@router.get("/v1/videos", response_model=VideoList, tags=["videos"])
async def list_videos(
    limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, description="id of the last video of the previous page"),
    order: str = Query("desc", pattern="^(asc|desc)$"),
    svc: VideoAPI = Depends(_auth),
) -> VideoList:
    if after is not None and not valid_id(after):  # a deleted video's id still pages on (ids sort by creation)
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "after"), "input": after,
                                       "msg": "must be a video id (video_ and 25 hex digits), e.g. a page's last_id"}])
    return await svc.list(limit, after, order)


@router.get("/v1/videos/{video_id}", response_model=Video, tags=["videos"])
async def get_video(video_id: str, response: Response, svc: VideoAPI = Depends(_auth)) -> Video:
    video = await svc.view(video_id)
    if video.status in ("queued", "in_progress"):
        response.headers["openai-poll-after-ms"] = "1000"  # the openai SDK's create_and_poll waits this long
    return video


# HEAD too (FastAPI adds it to no GET route): players ask it for the size before they seek.
@router.head("/v1/videos/{video_id}/content", include_in_schema=False)
@router.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=StreamingResponse,
         responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}},
                    206: {"description": "the bytes a `Range` header asked for"},
                    307: {"description": "redirect to a presigned S3 URL"},
                    416: {"description": "the range starts past the end; `Content-Range: bytes */SIZE`"}})
async def video_content(
    request: Request, video_id: str,
    redirect: bool = Query(True, description="S3: redirect to a presigned URL (false: stream here)"),
    variant: Literal["video", "thumbnail", "spritesheet"] = Query(  # pab.storage.IMAGE_VARIANTS, and the mp4
        "video", description="video: the mp4; thumbnail: a JPEG of the middle frame; spritesheet: a JPEG of up to "
        "8 evenly spaced frames in one row"),
    svc: VideoAPI = Depends(_auth),
) -> Response:
    """The mp4 (or its JPEG thumbnail or spritesheet): a 307 to an expiring presigned URL on S3, a stream from
    a local folder that honours `Range`."""
    return await svc.content(video_id, redirect, head=request.method == "HEAD", variant=variant)


@router.post("/v1/videos/{video_id}/cancel", response_model=Video, tags=["videos"])
async def cancel_video(video_id: str, svc: VideoAPI = Depends(_auth)) -> Video:
    """Cancel: a queued video never starts; a rendering one stops at its next denoising step. The video stays
    (status `cancelled`); `409` if it already finished."""
    return await svc.cancel(video_id)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, tags=["videos"])
async def delete_video(video_id: str, svc: VideoAPI = Depends(_auth)) -> dict[str, Any]:
    """Delete: a queued or rendering video is aborted, then the video, its sidecar, images and record are
    removed; a later GET is 404."""
    return await svc.delete(video_id)


@router.get("/v1/models", tags=["models"])
async def list_models(svc: VideoAPI = Depends(_auth)) -> dict[str, Any]:
    return await asyncio.to_thread(svc.models)


_PLAYGROUND = Path(__file__).with_name("playground.html")


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    """The playground page: a prompt form and the videos with their progress, played when done (no key: the
    page asks for one and sends it with each API call)."""
    return HTMLResponse(await asyncio.to_thread(_PLAYGROUND.read_text))


@router.get("/metrics", tags=["health"], response_class=Response,
         responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this ingress replica (no key): requests, queue depth, videos by state, render and
    end-to-end latency, steps per second, module calls computed and reused, GPU-seconds, DSP bytes."""
    return Response(_svc(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _count_requests(request: Request, call_next):
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        svc = getattr(request.app.state, "svc", None)
        if svc is not None and hasattr(svc, "metrics"):
            route = request.scope.get("route")
            svc.metrics.request(getattr(route, "path", "unmatched"), request.method, status, time.perf_counter() - t0)


@router.get("/healthz", tags=["health"])
async def healthz(request: Request) -> dict[str, Any]:
    """Always 200: no probe restarts or drains a pod on it, and neither would bring storage back. `status`
    is "degraded" while storage fails, with why under `storage`; `unsaved`: decisions waiting for it."""
    return await _svc(request).health()


_ECHO_CHARS = 200  # of a long input, what a 400 echoes: enough to recognise it (a body may be 1 MiB)


def _short(v: Any) -> Any:
    """An error's `input`, cut where long: a 4,001-character prompt is not sent back whole."""
    if isinstance(v, str) and len(v) > _ECHO_CHARS:
        return f"{v[:_ECHO_CHARS]}... ({len(v)} characters)"
    if isinstance(v, (dict, list, tuple)):
        try:
            long = len(json.dumps(v, default=str)) > 4 * _ECHO_CHARS
        except (ValueError, RecursionError):  # nested past the encoder's depth
            long = True
        if long:
            return f"<{type(v).__name__} of {len(v)} items, not echoed>"
    return v


def _json_safe(v: Any) -> Any:
    """What a 400 echoes of the input, made encodable: NaN/Infinity as text, unpaired surrogates escaped."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {_json_safe(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _param(loc: Any) -> str | None:
    """The field an error is about, dotted ("pab.spatial.range"), without FastAPI's "body"/"query"."""
    return field_path(loc[1:]) or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input as it came; NaN or a lone surrogate there made the error a 500.
    errors = _json_safe(jsonable_encoder([{**e, "input": _short(e["input"])} if "input" in e else e
                                          for e in exc.errors()]))
    ranked = deepest_first(errors, skip=1)
    said = [f"body: not JSON ({e.get('ctx', {}).get('error', e['msg'])})" if e["type"] == "json_invalid"
            else f"{_param(e['loc']) or 'body'}: {error_message(e)}" for e in ranked[:3]]
    message = "; ".join(said) + (f" (and {len(ranked) - 3} more)" if len(ranked) > 3 else "")
    param = _param(ranked[0]["loc"]) if ranked and ranked[0]["type"] != "json_invalid" else None
    # OpenAI's shape for its clients, plus FastAPI's `detail` list (every error, with its `loc`) for the others. 400,
    # not FastAPI's 422: OpenAI (and vLLM) answer a bad parameter with 400, which the SDK raises as
    # BadRequestError; code written against them catches that.
    return JSONResponse({**error_body(400, "invalid_request", message or "invalid request", param),
                         "detail": errors}, status_code=400)  # fmt: skip


def _status_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


# The openai SDK's own header (not a standard one): it retries 408, 409, 429 and 5xx answers unless told not to.
NO_RETRY = ("x-should-retry", "false")


# Starlette's HTTPException, so the router's own 404 and 405 (and the multipart parser's 400) are shaped too.
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code in (204, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    detail = exc.detail if isinstance(exc.detail, dict) else {"code": _status_code(exc.status_code),
                                                             "message": str(exc.detail)}
    headers = dict(exc.headers or {})
    if exc.status_code == 409:  # a state a retry a moment later does not change; the openai SDK retries 409s
        headers.setdefault(NO_RETRY[0], NO_RETRY[1])
    return JSONResponse(error_body(exc.status_code, detail["code"], detail["message"]),
                        status_code=exc.status_code, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug. Starlette logs the traceback after this answer; the client gets its type, not its text. Not retried:
    # the same request meets the same bug, and a create may have queued its video before failing.
    return JSONResponse(error_body(500, "internal_error", f"internal error ({type(exc).__name__}); the server's log "
                                    "has the details"), status_code=500, headers=dict([NO_RETRY]))


async def _storage_error(request: Request, exc: StorageUnavailable) -> JSONResponse:
    # The request was fine and the same one works once storage does: 503 with Retry-After, not a 500.
    cfg = getattr(getattr(request.app.state, "svc", None), "cfg", None)
    retry = getattr(cfg, "retry_after_s", 10)
    return JSONResponse(error_body(503, "storage_unavailable", str(exc)), status_code=503,
                        headers={"Retry-After": str(retry)})


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------

def build_api(svc: VideoAPI | None) -> FastAPI:
    """The HTTP app serving `svc`: Serve builds one per ingress replica (`VideoAPI.__serve_build_asgi_app__`),
    tests one per service under test. With `svc` None every route but / answers 503 "starting"."""
    app = FastAPI(
        title="pab-cluster video API",
        version="1.0",
        description="Text-to-video with Pyramid Attention Broadcast on GPU groups. Create a job, poll it, "
        "download the mp4. Send `Authorization: Bearer <key>`. The official `openai` SDK's `client.videos` works.",
    )
    app.state.svc = svc
    app.include_router(router)
    app.middleware("http")(_count_requests)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Starlette's HTTPException, so the router's own 404 and 405 (and the multipart parser's 400) are shaped too.
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_exception_handler(StorageUnavailable, _storage_error)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus `VideoCreate`, which the create route reads itself (JSON or form) and so does
        not declare as a parameter; a bad request is documented as the 400 it is, not FastAPI's 422."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _, defs = models_json_schema([(VideoCreate, "validation")], ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            for op in (op for path in schema.get("paths", {}).values() for op in path.values()):
                if "422" in op.get("responses", {}):  # what `_validation_error` answers instead
                    op["responses"]["400"] = op["responses"].pop("422")
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
