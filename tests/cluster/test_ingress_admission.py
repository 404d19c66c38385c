"""What the ingress admits, in process (no Ray): what the model cannot take (PAB blocks it lacks) is a 400
with its range, a size off its patch grid is reported (#19 item 6), and the cache field takes presets,
policies and its old name. Hostile bodies and the burst are in tests/faults/test_hostile_requests.py."""

import contextlib

import pytest
from fastapi.testclient import TestClient

import cluster.ingress as ingress
import cluster.routes as routes


@contextlib.contextmanager
def serving(tmp_path, model: str, **settings):
    """The real VideoAPI on a local folder, serving `model` (with its config's `settings`); accepted jobs are
    never started."""
    svc = ingress.VideoAPI({"models": [{"name": model, **settings}],
                            "storage": {"backend": "local", "path": str(tmp_path)}}, pools={})  # fmt: skip
    svc._ensure_background = lambda: None
    svc._start = lambda job_id: None
    yield TestClient(routes.build_api(svc), raise_server_exceptions=False)


@pytest.fixture
def served(tmp_path):
    with serving(tmp_path, "opensora-v1.2-tiny") as client:
        yield client


@pytest.mark.parametrize("block", [999999, -1, 2])
def test_pab_blocks_the_model_lacks_are_a_400_with_its_range(served, block):
    rule = {"range": 2, "window": [450, 930], "blocks": [0, block]}
    r = served.post("/v1/videos", json={"prompt": "a fox", "pab": {"spatial": rule}})
    assert r.status_code == 400, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "pab", "spatial", "blocks"], error
    assert f"block {block} does not exist" in error["msg"] and "opensora-v1.2-tiny has blocks 0-1" in error["msg"]


def test_a_block_the_model_has_is_accepted(served):
    rule = {"range": 2, "window": [450, 930], "blocks": [1]}
    r = served.post("/v1/videos", json={"prompt": "a fox", "pab": {"spatial": rule}})
    assert r.status_code == 200, r.text
    assert r.json()["request"]["pab"]["spatial"]["blocks"] == [1] and r.json()["notices"] == []


@pytest.mark.parametrize(
    "body, size, said",
    [
        ({"height": 100}, "96x96", "height 100 is not a multiple of 16"),  # the tiny model's default width is 96
        ({"size": "65x64"}, "64x64", "width 65 is not a multiple of 16"),
        ({"size": "96x64"}, "96x64", None),
    ],
)
def test_the_video_reports_the_size_it_renders_and_why(served, body, size, said):
    created = served.post("/v1/videos", json={"prompt": "a fox", **body})
    assert created.status_code == 200, created.text
    video = served.get(f"/v1/videos/{created.json()['id']}").json()
    assert video["size"] == size
    if said is None:
        assert video["notices"] == []
    else:
        [notice] = video["notices"]
        assert said in notice and f"the video is {size}" in notice


@pytest.mark.parametrize("seconds, frames, said", [(1, 17, "1 s at 8 fps is 8 frames"), (4, 32, None), (2.1, 17, None)])
def test_a_duration_the_model_cannot_render_says_what_it_renders_and_why(served, seconds, frames, said):
    """Open-Sora 1.2 takes no frame count from 2 to 16: one second is 17 frames, and the video says so. A count
    within a frame of the duration asked (2.1 s is 16.8 frames) says nothing."""
    created = served.post("/v1/videos", json={"prompt": "a fox", "seconds": seconds})
    assert created.status_code == 200, created.text
    video = served.get(f"/v1/videos/{created.json()['id']}").json()
    assert video["request"]["num_frames"] == frames and video["seconds"] == f"{frames / 8:g}"
    if said is None:
        assert video["notices"] == []
    else:
        [notice] = video["notices"]
        assert said in notice and "cannot render" in notice and "or >= 17" in notice
        assert notice.endswith("the video has 17 frames, 2.125 s")


def test_a_duration_past_the_frame_limit_is_a_400(served):
    """`seconds` may not ask for more frames than `num_frames` may (1,024): 120 s at 120 fps is 14,400."""
    r = served.post("/v1/videos", json={"prompt": "a fox", "seconds": 120, "fps": 120})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seconds", r.text
    assert "14400 frames" in r.text and "at most 1024" in r.text and "8.53333 s" in r.text
    r = served.post("/v1/videos", json={"prompt": "a fox", "seconds": 120, "fps": 8})  # 960 frames: taken
    assert r.status_code == 200 and r.json()["request"]["num_frames"] == 960, r.text


def test_cache_presets_policies_and_the_old_name(served):
    """A preset the model is not calibrated for is a 400 saying how to calibrate; a policy given in full and
    PAB rules under `cache` are accepted as asked; `pab` and `cache` must not disagree."""
    r = served.post("/v1/videos", json={"prompt": "a fox", "cache": "teacache-slow"})
    assert r.status_code == 400 and "pab calibrate --model opensora-v1.2-tiny --checkpoint DIR" in r.text, r.text
    policy = {"policy": "magcache", "threshold": 0.2, "ratios": [1.0, 0.95], "max_skips": 2}
    r = served.post("/v1/videos", json={"prompt": "a fox", "cache": policy})
    assert r.status_code == 200, r.text
    assert r.json()["request"]["cache"] == policy  # as asked; the policy that ran (defaults filled) is `cache`
    r = served.post("/v1/videos", json={"prompt": "a fox", "cache": {"spatial": {"range": 2, "window": [1, 900]}}})
    assert r.status_code == 200 and r.json()["request"]["cache"]["spatial"]["range"] == 2, r.text
    r = served.post("/v1/videos", json={"prompt": "a fox", "cache": "paper", "pab": {"spatial": {"range": 3,
                                                                                                 "window": [1, 9]}}})
    assert r.status_code == 400 and "disagree" in r.text, r.text


def test_a_calibrated_model_takes_its_presets_by_name(tmp_path):
    with serving(tmp_path, "opensora-v1.2-small") as client:  # its cache.json ships beside its weights
        r = client.post("/v1/videos", json={"prompt": "a fox", "cache": "magcache-fast"})
        assert r.status_code == 200 and r.json()["request"]["cache"] == "magcache-fast", r.text
        r = client.post("/v1/videos", json={"prompt": "a fox", "cache": "magcache-fastest"})
        assert r.status_code == 400 and "'magcache-fast', 'magcache-slow', 'teacache-fast'" in r.text, r.text
        assert r.json()["error"]["param"] == "cache"
        # the same unknown name under the older field: the 400 names the field the body used
        r = client.post("/v1/videos", json={"prompt": "a fox", "pab": "magcache-fastest"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pab", r.text
        # GET /v1/models names them (the playground's cache menu lists them)
        [info] = client.get("/v1/models").json()["data"]
        assert info["cache_presets"] == ["off", "paper", "fixed-fast", "fixed-slow", "magcache-fast", "magcache-slow",
                                         "teacache-fast", "teacache-slow"]  # fmt: skip


FIXED = {"policy": "fixed", "reuse": [5], "reuse_of": 3}  # a reused step outside its schedule


@pytest.mark.parametrize("model, body, param, said", [
    ("opensora-plan-v1.1-tiny", {"num_frames": 6}, "num_frames", "the CausalVAE encodes 4k+1 frames"),
    ("opensora-plan-v1.1-tiny", {"steps": 2}, "steps", "PNDM needs at least 4 steps"),
    ("opensora-v1.2-tiny", {"num_frames": 5}, "num_frames", "use num_frames=1 or >= 17"),
    ("opensora-v1.2-tiny", {"cache": {"temporal": {"range": 2, "window": [450, 930], "blocks": [5]}}},
     "cache.temporal.blocks", "block 5 does not exist"),
    ("opensora-v1.2-tiny", {"pab": {"temporal": {"range": 2, "window": [450, 930], "blocks": [5]}}},
     "pab.temporal.blocks", "block 5 does not exist"),
    ("opensora-v1.2-tiny", {"cache": FIXED}, "cache.reuse", "a fixed policy needs reuse_of > 0 steps"),
    ("opensora-v1.2-tiny", {"pab": FIXED}, "pab.reuse", "a fixed policy needs reuse_of > 0 steps"),
    ("opensora-v1.2-tiny", {"cache": {"policy": "teacache"}}, "cache.threshold", 'needs "policy" and "threshold"'),
    ("opensora-v1.2-tiny", {"cache": "fastest"}, "cache", "unknown cache 'fastest'"),
    ("opensora-v1.2-tiny", {"pab": "fastest"}, "pab", "unknown cache 'fastest'"),
])  # fmt: skip
def test_the_models_checks_name_the_field_they_refuse(tmp_path, model, body, param, said):
    """The engine's errors carry their field (pab.errors.RequestError): the 400 names it, under the name the
    body gave the cache, in OpenAI's `param` and in FastAPI's `loc`."""
    with serving(tmp_path, model) as client:
        r = client.post("/v1/videos", json={"prompt": "a fox", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and said in r.json()["error"]["message"], r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", *param.split(".")] and said in error["msg"], error


def test_a_damaged_calibration_beside_the_weights_is_the_servers_error_not_the_requests(tmp_path):
    """A cache.json the server cannot read is a 500 naming the file and what to do, for any request (not a 400
    blaming the body); once fixed, the next request is accepted without a restart."""
    import shutil

    from pab.models import shipped_checkpoint

    weights = tmp_path / "weights"
    shutil.copytree(shipped_checkpoint("opensora-v1.2-small"), weights)
    (weights / "cache.json").write_text("{not json")
    svc = ingress.VideoAPI({"models": [{"name": "opensora-v1.2-small", "checkpoint": str(weights)}],
                            "storage": {"backend": "local", "path": str(tmp_path / "store")}}, pools={})  # fmt: skip
    svc._start = lambda job_id: None
    client = TestClient(routes.build_api(svc), raise_server_exceptions=False)
    r = client.post("/v1/videos", json={"prompt": "a fox", "num_frames": 17})
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "model_misconfigured" and error["type"] == "server_error", error
    assert str(weights / "cache.json") in error["message"] and "Fix or remove it" in error["message"], error
    (weights / "cache.json").unlink()
    r = client.post("/v1/videos", json={"prompt": "a fox", "num_frames": 17})
    assert r.status_code == 200, r.text


def test_a_check_that_names_no_field_is_about_the_body(served, monkeypatch):
    """A plain ValueError from the checks (none is raised for a valid body today) is still a 400, about the body."""

    def broken(request, seconds):
        raise ValueError("the steps field is mentioned here, but no field is named")

    monkeypatch.setattr(served.app.state.svc, "_resolve", broken)
    r = served.post("/v1/videos", json={"prompt": "a fox", "steps": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text  # never guessed from the text


def test_a_full_queue_refuses_before_the_models_checks(tmp_path, monkeypatch):
    """429 costs no validation work (a burst is mostly refusals); a video posted once there is room is accepted."""
    with serving(tmp_path, "opensora-v1.2-tiny") as client:
        svc = client.app.state.svc
        resolved = []
        real = svc._resolve
        monkeypatch.setattr(svc, "_resolve", lambda *a: resolved.append(1) or real(*a))
        svc._active.update({f"job-{i}": None for i in range(svc.cfg.max_pending)})
        r = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 17})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and resolved == []
        svc._active.clear()
        r = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 17, "precision": "fp8"})
        assert r.status_code == 200 and resolved == [1], r.text


def test_each_app_serves_its_own_service_and_none_yet_is_starting(tmp_path):
    """The routes hold no service of their own: two apps in one process (two replicas' worth) do not mix, and an
    app whose service is not built yet answers 503 "starting"."""
    with serving(tmp_path / "a", "opensora-v1.2-tiny") as a, serving(tmp_path / "b", "latte-1-tiny") as b:
        assert [m["id"] for m in a.get("/v1/models").json()["data"]] == ["opensora-v1.2-tiny"]
        assert [m["id"] for m in b.get("/v1/models").json()["data"]] == ["latte-1-tiny"]
        made = a.post("/v1/videos", json={"prompt": "a fox"}).json()
        assert a.get(f"/v1/videos/{made['id']}").status_code == 200
        assert b.get(f"/v1/videos/{made['id']}").status_code == 404  # b's storage never saw it
    starting = TestClient(routes.build_api(None), raise_server_exceptions=False)
    r = starting.get("/v1/videos")
    assert r.status_code == 503 and r.json()["error"]["code"] == "starting", r.text
    assert starting.get("/").status_code == 200  # the playground page needs no service


@pytest.mark.parametrize("body, field", [
    ({"size": "128x96"}, "size"),  # the default 17 frames: 208,896
    ({"num_frames": 48}, "num_frames"),  # of the default 96x64
    ({"seconds": "6"}, "seconds"),
    ({"height": 256, "width": 256}, "width"),
])
def test_a_video_above_the_models_max_workload_is_a_400_naming_the_limit(tmp_path, body, field):
    with serving(tmp_path, "opensora-v1.2-tiny", max_workload=17 * 96 * 96) as client:
        assert client.post("/v1/videos", json={"prompt": "a fox", "size": "96x96"}).status_code == 200  # at it
        r = client.post("/v1/videos", json={"prompt": "a fox", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and "this server renders at most 156,672 with opensora-v1.2-tiny" in \
            error["message"] and "Ask for fewer frames or a smaller size" in error["message"], error
        assert len(client.get("/v1/videos").json()["data"]) == 1  # the refused one left no job
