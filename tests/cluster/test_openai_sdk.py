"""The official `openai` SDK as the client (#16 item 1): create, retrieve, list and download through
`client.videos`, and its exceptions carrying the server's message.

No Ray: the real ingress app (`VideoAPI` over a local folder) runs under uvicorn in a thread on a loopback
port, so the SDK speaks real HTTP to it (its `create` always sends multipart/form-data). The pool is the
real `VideoGroup.run` on a one-rank group of the real `GenerationWorker` with an engine that returns
black frames at once; the worker encodes and stores a real mp4.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

import cluster.ingress as ingress
import cluster.routes as routes
from actors.worker import EngineOutput, GenerationWorker
from cluster.config import AppConfig, pool_name
from cluster.groups import VideoGroup
from cluster.jobs import JobStore
from pab.storage import storage_from_config

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

# The SDK marks client.videos deprecated (OpenAI's Sora API shuts down in 2026); servers like this one stay.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

MODEL = "opensora-v1.2-tiny"
KEY = "sdk-test-key"
FRAMES = 4


SLOW_STOPPED = threading.Event()  # set when a "slow" render stopped because it was cancelled
RUNS_ENDED: dict[str, threading.Event] = {}  # job id -> set once the group's render thread returned


class BlackFrames:
    """Test double of the engine: reports every step, returns FRAMES black 32x32 frames. A prompt with "slow"
    in it stays at step 1 until cancelled (30 s at most); one with "paced" takes 0.15 s a step; one with "tail"
    takes 3 s after its last step (as a long video's decode does); one with "broken" raises at its first step."""

    def generate(self, request, progress, should_cancel) -> EngineOutput:
        steps = int(request["steps"])
        paced = "paced" in request["prompt"]  # a render one can watch: a step every 0.15 s
        if "slow" in request["prompt"]:
            progress(1, steps)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if should_cancel():
                    SLOW_STOPPED.set()
                    raise RuntimeError("stopped: cancelled")
                time.sleep(0.01)
        # Each step is reported once, in order: a paced render that reported them all again afterwards made the
        # playground's progress bar fall back (56 -> 18) whenever a refresh landed in the second pass.
        for i in range(steps):
            if paced:
                time.sleep(0.15)
            if "broken" in request["prompt"]:
                raise RuntimeError("the engine broke at its first step")
            progress(i + 1, steps)
        if "tail" in request["prompt"]:
            time.sleep(3)
        # what only the render can tell, as the pipeline says it for a prompt longer than its text encoder reads
        said = ["the prompt is 99 text tokens and the model reads the first 32"] if "wordy" in request["prompt"] else []
        return EngineOutput(frames=np.zeros((FRAMES, 32, 32, 3), np.uint8), request={**request, "fps": 8},
                            sidecar={"pab": {"settings": {}, "stats": {"spatial": {"computed": 3, "broadcast": 2}}},
                                     "notices": said})


class OneRankGroup:
    """`actors.group.GpuGroup` for a group of one, without Ray."""

    name, size, broken, info = "sdk-group", 1, None, {"namespace": "test"}

    def __init__(self) -> None:
        self.worker = GenerationWorker(0, 1, MODEL, device="cpu", engine_factory=lambda **kw: BlackFrames())
        self.worker.load()

    def generate(self, request, on_progress=None, should_cancel=None, output=None, timeout_s=None):
        return self.worker.generate(request, on_progress, should_cancel, output)  # a cancel: GenerationCancelled

    def health(self) -> dict:
        return {"group": self.name, "size": self.size, "ranks": [self.worker.health()]}


class Pool:
    """A pool deployment handle (`handle.run.remote(...)`) whose one replica is a real VideoGroup."""

    def __init__(self, group: VideoGroup) -> None:
        self.group, self.run = group, self

    def remote(self, job_id: str, dispatch: int) -> asyncio.Future:
        return asyncio.ensure_future(self.group.run(job_id, dispatch))  # awaitable and cancellable, as Serve's


def _group(config: dict[str, Any]) -> VideoGroup:
    g = VideoGroup.__new__(VideoGroup)  # the Serve replica class, holding a one-rank group instead of Ray actors
    g.cfg = AppConfig(**config)
    g.model_cfg = g.cfg.model(MODEL)
    g.store = storage_from_config(g.cfg.storage)
    g.jobs = JobStore(g.store)
    g.replica = "sdk-replica"
    g.group = OneRankGroup()
    run = g._run

    def tracked(job_id, dispatch, cancel=None):  # `run` returns at once when cancelled; its thread goes on
        try:
            return run(job_id, dispatch, cancel)
        finally:
            RUNS_ENDED.setdefault(job_id, threading.Event()).set()

    g._run = tracked
    return g


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, svc): the ingress app served by uvicorn on a free loopback port, API key KEY."""
    config = {"models": [{"name": MODEL}], "api_keys": [KEY], "retry_backoff_s": 0.05, "heartbeat_s": 0.1,
              "progress_interval_s": 0, "cancel_poll_s": 0.02,
              "storage": {"backend": "local", "path": str(tmp_path_factory.mktemp("store"))}}  # fmt: skip
    cfg = AppConfig(**config)
    group = _group(config)
    svc = ingress.VideoAPI(config, pools={pool_name(m.name, p.gpus): Pool(group) for m in cfg.models
                                          for p in m.groups})  # fmt: skip
    svc._warm_up = lambda: None  # the model check runs on each POST anyway
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(routes.build_api(svc), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True, name="sdk-uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", svc
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


def completed(client, video_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed", "cancelled"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} still {video.status} after {timeout_s}s")


def test_create_retrieve_list_download(client):
    video = client.videos.create(model=MODEL, prompt="a red fox", seconds="4", size="1280x720",
                                 extra_body={"seed": 3, "steps": 2, "pab": "paper"})  # fmt: skip
    assert video.id.startswith("video_") and video.status == "queued" and video.object == "video"
    assert video.model == MODEL and video.size == "1280x720" and video.prompt == "a red fox"
    assert video.request["seed"] == 3 and video.request["steps"] == 2 and video.request["pab"] == "paper"
    assert video.seconds == "4" and video.request["num_frames"] == 32  # "4" over the form: 32 frames at 8 fps

    assert client.videos.retrieve(video.id).id == video.id
    assert video.id in [v.id for v in client.videos.list().data]

    done = completed(client, video.id)
    assert done.status == "completed" and done.progress == 100, done
    # Whole Unix seconds, as OpenAI's Video types them (a typed client decodes them as integers)
    assert all(type(t) is int for t in (done.created_at, done.completed_at)) and done.expires_at is None
    assert done.created_at <= done.completed_at <= time.time()
    content = client.videos.download_content(video.id).content
    assert content[4:8] == b"ftyp" and len(content) == done.size_bytes  # an mp4, whole


def test_the_renders_notices_reach_the_video(client):
    """A notice only the render can give (the prompt cut by the text encoder) is on the completed video, after the
    ingress's own (the duration it cannot render exactly)."""
    video = completed(client, client.videos.create(prompt="a wordy fox", seconds="1", extra_body={"steps": 1}).id)
    assert video.status == "completed"
    assert len(video.notices) == 2 and "1 s at 8 fps" in video.notices[0], video.notices
    assert video.notices[1] == "the prompt is 99 text tokens and the model reads the first 32"


def test_create_and_poll(client):
    video = client.videos.create_and_poll(prompt="a blue fox", extra_body={"num_frames": 17, "steps": 1},
                                          poll_interval_ms=50)  # fmt: skip
    assert video.status == "completed" and video.model == MODEL  # the server's default model


def test_pab_rules_as_json_text_or_as_a_nested_extra_body(client):
    rules = {"spatial": {"range": 2, "window": [450.0, 930.0], "blocks": [0, 1]}}
    for pab in (json.dumps(rules), rules):  # a dict goes out as pab[spatial][window][]=450 ... fields
        video = client.videos.create(prompt="a fox", extra_body={"steps": 1, "pab": pab})
        assert video.request["pab"] == rules  # as given: the kinds left out stay out (the engine computes them)


@pytest.mark.parametrize("extra, field", [
    ({"steps": "many"}, "steps"),
    ({"num_frames": True}, "num_frames"),  # "true": not a frame count
    ({"guidance_scale": float("nan")}, "guidance_scale"),  # the SDK sends "nan"
    ({"guidance_scale": "NaN"}, "guidance_scale"),
    ({"seed": "Infinity"}, "seed"),
    ({"pab": "papr"}, "pab"),
    ({"pab": {"spatial": {"range": 0, "window": [450, 930]}}}, "pab.spatial.range"),
    ({"colour": "red"}, "colour"),
])  # fmt: skip
def test_a_bad_field_is_a_400_naming_it(client, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a fox", extra_body=extra)
    assert e.value.body["param"] == field and field in e.value.message, e.value.body
    # rules with a bad range say only that: not also the step-cache branch of `pab` that nobody meant
    assert "policy: Field required" not in e.value.message and "more)" not in e.value.message, e.value.message


def test_the_sdk_exceptions_carry_the_message(server, client):
    with pytest.raises(openai.NotFoundError, match="no video 'video_0000000000000000000000000000'"):
        client.videos.retrieve("video_0000000000000000000000000000")
    with pytest.raises(openai.AuthenticationError, match="missing or invalid API key"):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).videos.list()
    with pytest.raises(openai.BadRequestError, match="model: unknown model 'sora-2'") as e:
        client.videos.create(prompt="a fox", model="sora-2")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="not both"):
        client.videos.create(prompt="a fox", seconds="4", extra_body={"num_frames": 17})


def test_a_conflict_and_a_bug_have_the_error_shape(server, client, monkeypatch):
    video = completed(client, client.videos.create(prompt="a fox", extra_body={"steps": 1}).id)
    with pytest.raises(openai.ConflictError, match="already completed") as e:
        client.post(f"/videos/{video.id}/cancel", cast_to=object)  # a finished video cannot be cancelled
    assert e.value.body["code"] == "not_cancellable" and e.value.body["type"] == "invalid_request_error"
    # The SDK retries a 409 twice by default; a state that a retry does not change says so (x-should-retry).
    sent = []
    retrying = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=2, timeout=30,
                             http_client=openai.DefaultHttpxClient(event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.ConflictError):
        retrying.post(f"/videos/{video.id}/cancel", cast_to=object)
    assert len(sent) == 1 and e.value.response.headers["x-should-retry"] == "false"

    async def broken(job_id):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(server[1], "view", broken)
    with pytest.raises(openai.InternalServerError, match=r"internal error \(RuntimeError\)") as e:
        client.videos.retrieve(video.id)
    assert "secret detail" not in e.value.message and e.value.body["code"] == "internal_error"
    assert e.value.response.headers["x-should-retry"] == "false"  # the same request meets the same bug


# ----------------------------------------------------------------------------------------------------
# Other clients: JSON bodies keep working, and raw forms are judged like JSON
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def test_a_json_body_still_works(http):
    r = http.post("/v1/videos", json={"prompt": "a fox", "num_frames": 17, "steps": 1, "pab": "off", "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json()["request"]["num_frames"] == 17 and r.json()["seed"] == 5


@pytest.mark.parametrize("fields, field", [
    ({"num_frames": "true"}, "num_frames"),
    ({"guidance_scale": "NaN"}, "guidance_scale"),
    ({"seconds": "-Infinity"}, "seconds"),
    ({"steps": "2.5"}, "steps"),
    ({"seconds": "true"}, "seconds"),  # true is not 1 second
    ({"guidance_scale": "false"}, "guidance_scale"),
])  # fmt: skip
@pytest.mark.parametrize("encoding", ["json", "multipart", "urlencoded"])
def test_a_form_is_judged_like_json(http, fields, field, encoding):
    if encoding == "json":  # the same values as JSON literals (Python's parser takes NaN and Infinity)
        body = "{" + ", ".join(f'"{k}": {v}' for k, v in {"prompt": '"a fox"', **fields}.items()) + "}"
        r = http.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    elif encoding == "multipart":
        r = http.post("/v1/videos", content=_multipart({"prompt": "a fox", **fields}, "b"),
                      headers={"content-type": "multipart/form-data; boundary=b"})
    else:
        r = http.post("/v1/videos", data={"prompt": "a fox", **fields})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"]["param"] == field and field in body["error"]["message"], body
    assert any(field in e["loc"] for e in body["detail"])  # FastAPI's list too, for the existing clients


def _multipart(fields: dict[str, str], boundary: str) -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def test_a_file_is_refused_by_name(http):
    r = http.post("/v1/videos", data={"prompt": "a fox"}, files={"input_reference": ("ref.png", b"\x89PNG", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference", r.text
    assert "image-to-video" in r.json()["error"]["message"]  # why, not only "not permitted"
    # a file where text goes is not text: its name did not become the prompt
    r = http.post("/v1/videos", files={"prompt": ("small.png", b"\x89PNG", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "a file was sent" in r.json()["error"]["message"]
    r = http.post("/v1/videos", json={"prompt": "a fox", "input_reference": "https://example.com/a.png"})
    assert r.status_code == 400 and "image-to-video" in r.json()["error"]["message"], r.text


def test_unknown_routes_and_bad_json_have_the_error_shape(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == {"message": "Not Found", "type": "invalid_request_error",
                                                          "param": None, "code": "not_found"}  # fmt: skip
    r = http.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None and "JSON" in r.json()["error"]["message"]


def test_the_schema_shows_both_bodies(http):
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert {"VideoCreate", "PABSettings", "BroadcastRuleIn"} <= set(spec["components"]["schemas"])


# ----------------------------------------------------------------------------------------------------
# download_content(variant=...): the thumbnail and spritesheet JPEGs (#16 item 1, variants)
# ----------------------------------------------------------------------------------------------------


def _image(data: bytes):
    from PIL import Image

    assert data[:3] == b"\xff\xd8\xff", data[:16]  # JPEG
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_thumbnail_and_spritesheet_variants(server, client, http):
    video = completed(client, client.videos.create(prompt="a fox", extra_body={"num_frames": 17, "steps": 1}).id)
    assert video.status == "completed", video
    thumb = _image(client.videos.download_content(video.id, variant="thumbnail").content)
    assert thumb.format == "JPEG" and thumb.size == (32, 32)  # the frames' size (BlackFrames)
    sheet = _image(client.videos.download_content(video.id, variant="spritesheet").content)
    assert sheet.format == "JPEG" and sheet.size == (32 * FRAMES, 32)  # every one of the 4 frames, in a row
    assert client.videos.download_content(video.id, variant="video").content[4:8] == b"ftyp"  # unchanged

    # Stored beside the mp4 at render time, served with the right type (HEAD too).
    store = server[1].store
    assert store.exists(f"videos/{video.id}.thumbnail.jpg") and store.exists(f"videos/{video.id}.spritesheet.jpg")
    r = http.get(f"/v1/videos/{video.id}/content", params={"variant": "thumbnail"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-disposition"] == f'inline; filename="{video.id}.thumbnail.jpg"'
    r = http.head(f"/v1/videos/{video.id}/content", params={"variant": "spritesheet"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and int(r.headers["content-length"]) > 0


def test_a_video_without_stored_images_gets_them_from_its_mp4(server, client):
    video = completed(client, client.videos.create(prompt="a fox", extra_body={"num_frames": 17, "steps": 1}).id)
    store = server[1].store
    for variant in ("thumbnail", "spritesheet"):  # as a video rendered before the images existed
        store.delete(f"videos/{video.id}.{variant}.jpg")
    assert _image(client.videos.download_content(video.id, variant="thumbnail").content).size == (32, 32)
    assert _image(client.videos.download_content(video.id, variant="spritesheet").content).size == (32 * FRAMES, 32)
    # ... and stored for the next request.
    assert store.exists(f"videos/{video.id}.thumbnail.jpg") and store.exists(f"videos/{video.id}.spritesheet.jpg")

    store.delete(f"videos/{video.id}.thumbnail.jpg")
    store.put_bytes(f"videos/{video.id}.mp4", b"not an mp4")  # damaged: a clear 404, not a 500
    with pytest.raises(openai.NotFoundError, match="could not be decoded"):
        client.videos.download_content(video.id, variant="thumbnail")


def test_an_unknown_variant_is_a_400_naming_it(client):
    video = completed(client, client.videos.create(prompt="a fox", extra_body={"num_frames": 17, "steps": 1}).id)
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.download_content(video.id, variant="poster")  # type: ignore[arg-type]
    assert e.value.body["param"] == "variant" and "variant" in e.value.message, e.value.body


# ---------------------------------------------------------------------------- delete, cancel, idempotency


def _objects(svc, video_id: str) -> list[str]:
    """Every stored object of a video: its record, markers, mp4, sidecar and images."""
    return [k for prefix in ("jobs/records/", "jobs/active/", "jobs/leases/", "videos/")
            for k in svc.store.list(prefix) if video_id in k]  # fmt: skip


def _in_progress(client, video_id: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status == "in_progress" and video.progress > 0:
            return video
        time.sleep(0.02)
    raise AssertionError(f"{video_id} never started rendering")


def test_delete_removes_a_finished_video_and_every_file_of_it(server, client):
    svc = server[1]
    video = completed(client, client.videos.create(prompt="a fox", extra_body={"steps": 1}).id)
    assert any(k.endswith(".mp4") for k in _objects(svc, video.id)) and any(k.endswith(".thumbnail.jpg")
                                                                          for k in _objects(svc, video.id))
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert _objects(svc, video.id) == []
    with pytest.raises(openai.NotFoundError, match="deleted"):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=100)]


def test_delete_aborts_a_render_and_a_late_write_is_swept(server, client):
    svc = server[1]
    SLOW_STOPPED.clear()
    video = client.videos.create(prompt="a slow fox", extra_body={"steps": 4})
    _in_progress(client, video.id)
    assert client.videos.delete(video.id).deleted
    assert SLOW_STOPPED.wait(10), "the render went on after the delete"
    assert RUNS_ENDED.setdefault(video.id, threading.Event()).wait(10), "the group's run did not return"
    assert not svc.store.exists(f"jobs/records/{video.id}.json"), "the stopped render wrote its record back"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    # A render that was finishing as the video was deleted may write its record after; the sweep removes it
    # (and whatever the stopping render itself wrote, such as a lease refreshed as the delete went through).
    svc.store.put_json(f"jobs/records/{video.id}.json", {"late": True})
    svc.store.put_bytes(f"videos/{video.id}.mp4", b"late")
    assert svc.jobs.sweep_deleted(keep_s=3600) >= 2 and _objects(svc, video.id) == []
    assert svc.store.exists(f"jobs/deleted/{video.id}.json")  # kept while a late write may still come
    svc.jobs.sweep_deleted(keep_s=0)
    assert not svc.store.exists(f"jobs/deleted/{video.id}.json") and not svc.store.exists(f"jobs/cancel/{video.id}")


def test_a_remix_renders_the_new_prompt_with_every_setting_and_the_seed_of_its_video(server, client, http):
    source = completed(client, client.videos.create(prompt="a red fox", extra_body={
        "num_frames": 17, "steps": 2, "seed": 11, "pab": "paper", "guidance_scale": 5.5}).id)
    remix = client.videos.remix(source.id, prompt="a grey wolf")
    assert remix.id != source.id and remix.status == "queued" and remix.prompt == "a grey wolf"
    assert remix.remixed_from_video_id == source.id and remix.seed == 11
    assert remix.request == {**source.request, "prompt": "a grey wolf"}
    assert completed(client, remix.id).status == "completed"
    assert client.videos.retrieve(source.id).remixed_from_video_id is None
    sidecars = {v: server[1].store.get_json(f"videos/{v}.json") for v in (source.id, remix.id)}
    assert sidecars[remix.id]["remixed_from_video_id"] == source.id and "remixed_from_video_id" not in sidecars[source.id]

    # Fields given beside the prompt change those settings; the other way of saying one goes with it.
    r = http.post(f"/v1/videos/{source.id}/remix", json={"prompt": "a wolf", "size": "64x48", "seed": 12,
                                                          "cache": "off", "seconds": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    asked = r.json()["request"]
    assert (asked["width"], asked["height"], asked["seed"], asked["steps"]) == (64, 48, 12, 2)
    assert asked["cache"] == "off" and asked["guidance_scale"] == 5.5 and asked["num_frames"] == 24  # 3 s at 8 fps

    # A retried remix with its Idempotency-Key answers the first one's video; the same key for another is a 409.
    key = {"Idempotency-Key": "remix-1"}
    first = client.videos.remix(source.id, prompt="an owl", extra_headers=key)
    assert client.videos.remix(source.id, prompt="an owl", extra_headers=key).id == first.id
    with pytest.raises(openai.ConflictError):
        client.videos.remix(source.id, prompt="a hawk", extra_headers=key)


def test_a_remix_needs_a_completed_video_and_valid_changes(client, http):
    with pytest.raises(openai.NotFoundError):
        client.videos.remix("video_0000000000000000000000000000", prompt="a wolf")
    done = completed(client, client.videos.create(prompt="a fox", extra_body={"steps": 1}).id)
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.remix(done.id, prompt="a wolf", extra_body={"steps": 0})
    assert e.value.body["param"] == "steps"
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.remix(done.id, prompt="   ")
    assert e.value.body["param"] == "prompt"
    r = http.post(f"/v1/videos/{done.id}/remix", json={"size": "32x32"})  # no prompt: it would render the same video
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "new prompt" in r.text, r.text
    SLOW_STOPPED.clear()
    running = client.videos.create(prompt="a slow fox", extra_body={"steps": 4})
    _in_progress(client, running.id)
    with pytest.raises(openai.ConflictError, match="only a completed video can be remixed") as e:
        client.videos.remix(running.id, prompt="a wolf")
    assert e.value.body["code"] == "video_not_completed"
    client.post(f"/videos/{running.id}/cancel", cast_to=object)
    assert SLOW_STOPPED.wait(10)


def test_edit_extend_and_characters_are_refused_saying_why(client):
    done = completed(client, client.videos.create(prompt="a fox", extra_body={"steps": 1}).id)
    mp4 = ("fox.mp4", client.videos.download_content(done.id).content, "video/mp4")
    calls = [(lambda: client.videos.edit(video=mp4, prompt="a wolf"), "editing a video"),
             (lambda: client.videos.extend(video=mp4, prompt="a wolf", seconds="4"), "extending a video"),
             (lambda: client.videos.create_character(name="fox", video=mp4), "characters"),
             (lambda: client.videos.get_character("char_123"), "characters")]  # fmt: skip
    for call, what in calls:
        with pytest.raises(openai.BadRequestError, match=f"{what}.* needs? a video-conditioned model") as e:
            call()
        assert e.value.body["code"] == "unsupported_operation" and "remix" in e.value.message


def test_cancel_is_its_own_route_and_keeps_the_video(server, client, http):
    SLOW_STOPPED.clear()
    video = client.videos.create(prompt="a slow owl", extra_body={"steps": 4})
    r = http.get(f"/v1/videos/{video.id}")
    assert r.headers["openai-poll-after-ms"] == "1000"  # create_and_poll's pace while it is not finished
    _in_progress(client, video.id)
    r = http.post(f"/v1/videos/{video.id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    assert SLOW_STOPPED.wait(10)
    final = completed(client, video.id)
    assert final.status == "cancelled" and client.videos.retrieve(video.id).id == video.id
    assert "openai-poll-after-ms" not in http.get(f"/v1/videos/{video.id}").headers
    assert http.post("/v1/videos/video_0000000000000000000000000/cancel").status_code == 404


def test_an_idempotency_key_answers_the_same_video_also_after_a_restart(server, client):
    svc = server[1]
    before = len(svc.store.list("jobs/records/"))
    first = client.videos.create(prompt="a heron", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-1"})
    again = client.videos.create(prompt="a heron", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-1"})
    assert again.id == first.id and len(svc.store.list("jobs/records/")) == before + 1  # no second render
    with pytest.raises(openai.ConflictError, match="different request") as e:
        client.videos.create(prompt="a crane", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-1"})
    assert e.value.body["code"] == "idempotency_key_reused"
    other = client.videos.create(prompt="a heron", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-2"})
    assert other.id != first.id
    # Another ingress over the same storage (a restart) knows the key: it is stored, not remembered.
    body = ingress.VideoCreate(prompt="a heron", steps=1)
    http_request = type("R", (), {"headers": {"idempotency-key": "k-1", "authorization": f"Bearer {KEY}"}})()
    restarted = ingress.VideoAPI({"models": [{"name": MODEL}], "api_keys": [KEY], "storage": svc.cfg.storage},
                                 pools=svc.pools)  # fmt: skip
    video = asyncio.run(restarted.create(body, routes._idempotency(http_request, body, default_model=MODEL)))
    assert video.id == first.id
    # Naming the model the server defaults to asks for the same video.
    named = client.videos.create(prompt="a heron", model=MODEL, extra_body={"steps": 1},
                                 extra_headers={"Idempotency-Key": "k-1"})  # fmt: skip
    assert named.id == first.id
    # A deleted video frees its key.
    completed(client, first.id)
    client.videos.delete(first.id)
    fresh = client.videos.create(prompt="a heron", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-1"})
    assert fresh.id != first.id


def test_a_key_another_replica_is_creating_answers_409_the_sdk_retries_into_its_video(server, client):
    """Another ingress replica has bound the Idempotency-Key and is still writing its video's record when the same
    request reaches this one. This one answers 409 idempotency_key_in_use with Retry-After: 1, which the SDK
    retries (its default 2 retries), and the retry gets the other replica's video: one video, not two."""
    svc = server[1]
    other = ingress.VideoAPI({"models": [{"name": MODEL}], "api_keys": [KEY], "storage": svc.cfg.storage}, pools={})
    other._warm_up = lambda: None
    body = ingress.VideoCreate(prompt="an ibis", steps=1)
    http_request = type("R", (), {"headers": {"idempotency-key": "k-busy", "authorization": f"Bearer {KEY}"}})()
    key = routes._idempotency(http_request, body, default_model=MODEL)
    write_record = other.jobs.create
    written = threading.Event()  # the record waits for it: the other replica is mid-creation until then
    other.jobs.create = lambda rec: (written.wait(30), write_record(rec))
    made: list = []
    creating = threading.Thread(target=lambda: made.append(asyncio.run(other.create(body, key))))
    creating.start()
    try:
        deadline = time.monotonic() + 10
        while not svc.store.exists(f"jobs/idempotency/{key[0]}.json") and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.ConflictError, match="being handled") as e:  # no retries: the 409 itself
            client.videos.create(prompt="an ibis", extra_body={"steps": 1}, extra_headers={"Idempotency-Key": "k-busy"})
        assert e.value.body["code"] == "idempotency_key_in_use" and e.value.response.headers["retry-after"] == "1"
        assert e.value.response.headers["x-should-retry"] == "true"  # every other 409 says false
        written.set()
        video = client.with_options(max_retries=2).videos.create(prompt="an ibis", extra_body={"steps": 1},
                                                                 extra_headers={"Idempotency-Key": "k-busy"})
    finally:
        written.set()
        creating.join(30)
    assert made and video.id == made[0].id


# ---------------------------------------------------------------------------- metrics


def _scrape(http) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics", headers={"Authorization": ""})  # no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}  # fmt: skip


def test_metrics_count_a_render_as_its_record_says(server, client, http):
    svc = server[1]
    deadline = time.monotonic() + 30
    while svc._active:  # earlier tests' videos finish first: they would count in this window
        assert time.monotonic() < deadline, list(svc._active)
        time.sleep(0.05)
    before = _scrape(http)

    def delta(after, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    video = completed(client, client.videos.create(prompt="a lark", extra_body={"steps": 3}).id)
    deadline = time.monotonic() + 10
    while delta(after := _scrape(http), "pab_videos_finished_total", status="completed") < 1:
        assert time.monotonic() < deadline, "the finished video was never counted"
        time.sleep(0.05)
    rec = svc.jobs.get(video.id)
    assert delta(after, "pab_videos_finished_total", status="completed") == 1
    assert delta(after, "pab_render_seconds_count") == 1
    assert delta(after, "pab_render_seconds_sum") == pytest.approx(rec.timings["run_s"])
    assert delta(after, "pab_end_to_end_seconds_sum") == pytest.approx(rec.timings["total_s"])
    assert delta(after, "pab_denoise_steps_per_second_count") == 1
    # Module calls and cost: the same numbers as the record's (and the sidecar's) `cost`.
    assert delta(after, "pab_module_calls_total", kind="spatial", outcome="computed") == rec.cost["modules_computed"] == 3
    assert delta(after, "pab_module_calls_total", kind="spatial", outcome="reused") == rec.cost["modules_reused"] == 2
    assert rec.cost["rank_seconds"] > 0 and delta(after, "pab_rank_seconds_total") == pytest.approx(rec.cost["rank_seconds"])
    assert rec.cost["gpu_seconds"] == 0 and delta(after, "pab_gpu_seconds_total") == 0  # a CPU group
    assert json.loads(svc.store.get_bytes(f"videos/{video.id}.json"))["cost"] == rec.cost
    assert client.videos.retrieve(video.id).model_extra["cost"] == rec.cost  # the API shows it too
    # Requests by route template and status.
    assert delta(after, "pab_http_requests_total", route="/v1/videos", method="POST", status="200") == 1
    assert delta(after, "pab_http_requests_total", route="/v1/videos/{video_id}", method="GET", status="200") >= 1
    http.get("/v1/videos/video_0000000000000000000000000")
    assert delta(_scrape(http), "pab_http_requests_total", route="/v1/videos/{video_id}", method="GET",
                 status="404") == 1  # fmt: skip
    assert after[("pab_queue_depth", ())] >= 0 and ("pab_jobs", (("state", "queued"),)) in after



def test_list_pages_through_every_video_once_both_ways(server, client):
    """`list` with limit/after/order, iterated as the SDK pages (its `auto_paging_iter`, in this SDK iterating the
    page itself fetches the next ones with `after`): no duplicates, none missing, in order."""
    svc = server[1]
    made = [client.videos.create(prompt=f"a page {i}", extra_body={"steps": 1}).id for i in range(5)]
    stored = sorted(k.removeprefix("jobs/records/").removesuffix(".json") for k in svc.store.list("jobs/records/"))
    asc = [v.id for v in client.videos.list(limit=2, order="asc")]
    desc = [v.id for v in client.videos.list(limit=3, order="desc")]
    assert asc == stored and desc == stored[::-1]  # every video once, in id (= creation) order
    assert set(made) <= set(asc)
    page = client.videos.list(limit=2, after=made[1], order="asc")
    assert [v.id for v in page.data] == [made[2], made[3]] and page.has_more
    # a deleted video's id still pages on from where it was; what is no video id at all is a 400 naming `after`
    completed(client, made[1])
    client.videos.delete(made[1])
    assert [v.id for v in client.videos.list(limit=2, after=made[1], order="asc").data] == [made[2], made[3]]
    with pytest.raises(openai.BadRequestError, match="after: must be a video id") as e:
        client.videos.list(after="zzz")
    assert e.value.body["param"] == "after"


def test_a_bad_size_says_what_is_wrong_without_pydantics_prefix(http):
    r = http.post("/v1/videos", json={"prompt": "a fox", "size": "big"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("size: size must look like"), r.text
