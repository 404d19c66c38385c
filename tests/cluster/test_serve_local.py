"""The Serve app over real HTTP with the local-folder backend: a real Ray cluster with 4 fake GPUs,
groups of 2 ranks running the real engine (opensora-v1.2-tiny, DSP over gloo) on CPU.

One app for the module (deploying is the slow part). Tests run in file order and build on each other
only through the app, not through shared state.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from conftest import deploy, poll, running_replicas, wait_for

APP, KEY = "pabl", "local-test-key"
POOL = "group-opensora-v1-2-tiny-2gpu"
SMALL = {"prompt": "a red fox", "num_frames": 17, "size": "32x32", "steps": 6}
# Several seconds per video on 2 shared cores: long enough to act on it while it renders.
LONG = {"prompt": "a long video", "num_frames": 17, "size": "64x64", "steps": 150}
# About 10-25 s per video here: longer than a second group takes to start, so two groups overlap.
LOAD = {"prompt": "a busy day", "num_frames": 17, "size": "128x128", "steps": 600}


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def app(serve_port, tmp_path_factory):
    from ray import serve

    out = tmp_path_factory.mktemp("videos")
    config = {
        "models": [{"name": "opensora-v1.2-tiny", "groups": [{
            "gpus": 2, "min_groups": 1, "max_groups": 2,
            "autoscaling": {"upscale_delay_s": 1.0, "downscale_delay_s": 8.0, "look_back_period_s": 2.0},
        }]}],
        "storage": {"backend": "local", "path": str(out)},
        "api_keys": [KEY, "second-key"],
        "max_pending": 4, "retry_after_s": 7, "max_attempts": 3,
        "heartbeat_s": 1.0, "stale_after_s": 6.0, "reconcile_interval_s": 1.0, "retry_backoff_s": 0.5,
        "cpus_per_rank": 0.5, "group_replica_cpus": 0.25, "ingress_cpus": 0.25,
        "health_check_period_s": 2.0, "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 60.0,
    }
    client = deploy(config, APP, serve_port, KEY)
    yield client, out
    client.close()
    serve.delete(APP)


def test_auth_validation_and_docs(app):
    client, _ = app
    base = str(client.base_url)
    import httpx

    anon = httpx.Client(base_url=base, timeout=30)
    assert anon.get("/healthz").status_code == 200  # no key needed
    r = anon.post("/v1/videos", json=SMALL)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert anon.get("/v1/videos", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert anon.get("/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200
    assert KEY not in r.text
    # Malformed or out-of-range requests: 400 naming the field.
    cases = {
        "steps": {**SMALL, "steps": 0},
        "size": {**SMALL, "size": "big"},
        "prompt": {**SMALL, "prompt": "   "},
        "seed": {**SMALL, "seed": -1},
        "guidance_scale": {**SMALL, "guidance_scale": 1e9},
        "model": {**SMALL, "model": "no-such-model"},
        "num_frames": {**SMALL, "num_frames": 5},  # the engine's rule: Open-Sora takes 1 or >= 17 frames
        "pab": {**SMALL, "pab": {"spatial": {"range": 0, "window": [100, 800]}}},
        "colour": {**SMALL, "colour": "red"},  # unknown field
    }
    for field, body in cases.items():
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 400, (field, r.text)
        locs = [d["loc"] for d in r.json()["detail"]]
        assert any(field in loc for loc in locs), (field, r.json())
    r = client.post("/v1/videos", json={**SMALL, "seconds": 2})
    assert r.status_code == 400 and "not both" in r.text
    r = client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert client.get("/v1/videos/video_nope").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content", "/v1/models", "/healthz"} <= set(
        spec["paths"])
    assert client.get("/docs").status_code == 200


def test_submit_poll_download(app):
    client, out = app
    r = client.post("/v1/videos", json={**SMALL, "pab": "paper", "seed": 42})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("video_") and job["size"] == "32x32"
    final, seen = poll(client, job["id"])
    assert final["status"] == "completed", final
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress) and final["progress"] == 100  # follows the steps, never backwards
    assert final["step"] == final["total_steps"] == 6
    assert {"queue_s", "run_s", "denoise_s", "decode_s", "encode_s"} <= set(final["timings"])
    assert final["pab"]["settings"]["spatial"] is not None  # the paper preset, resolved
    r = client.get(f"/v1/videos/{job['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert decode(r.content).shape == (17, 32, 32, 3)
    # Seeking through Serve's proxy (#19 item 5): Range, HEAD and 416 reach the player intact.
    url, n = f"/v1/videos/{job['id']}/content", len(r.content)
    assert r.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == r.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{n}"
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(n)
    past = client.get(url, headers={"Range": f"bytes={n}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{n}"
    import json

    side = json.loads((out / "videos" / f"{job['id']}.json").read_text())
    assert side["seed"] == 42 and side["model"] == "opensora-v1.2-tiny" and side["job_id"] == job["id"]
    assert side["request"]["steps"] == 6 and "stats" in side["pab"] and "denoise_s" in side["timings"]
    listing = client.get("/v1/videos", params={"limit": 1}).json()
    assert listing["data"][0]["id"] == job["id"] and listing["object"] == "list"


def test_cancel_stops_at_next_step(app):
    client, _ = app
    job = client.post("/v1/videos", json=LONG).json()
    wait_for(lambda: client.get(f"/v1/videos/{job['id']}").json()["step"] >= 2, 120, "rendering")
    r = client.post(f"/v1/videos/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    final, _ = poll(client, job["id"], timeout_s=60)
    assert final["status"] == "cancelled" and final["step"] < LONG["steps"]
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert client.post(f"/v1/videos/{job['id']}/cancel").status_code == 409


def test_two_groups_autoscale_backpressure_and_rank_death(app, ray_session):
    """Under load the pool grows to two groups that render at the same time; a full queue gets 429;
    killing a rank mid-video makes the job finish on a healthy group; idle, the pool shrinks back."""
    ray = ray_session
    client, _ = app
    assert running_replicas(APP, POOL) == 1
    ids = []
    for i in range(4):
        r = client.post("/v1/videos", json={**LOAD, "seed": i})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    r = client.post("/v1/videos", json=SMALL)
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["code"] == "queue_full"

    wait_for(lambda: running_replicas(APP, POOL) == 2, 180, "a second group")

    def in_progress():
        recs = [client.get(f"/v1/videos/{i}").json() for i in ids]
        return [r for r in recs if r["status"] == "in_progress" and r["step"] >= 1]

    def two_one_early():
        # The victim must still have steps to go: a rank killed once its part is done (the last steps,
        # or the decode on rank 0) costs nothing, and the video rightly finishes on its first attempt.
        rs = in_progress()
        return rs if len(rs) == 2 and min(r["step"] / r["total_steps"] for r in rs) < 0.5 else None

    both = wait_for(two_one_early, 180, "two videos rendering, one in its first half")
    assert len({r["group"]["name"] for r in both}) == 2  # on two different groups at the same time

    victim = min(both, key=lambda r: r["step"] / r["total_steps"])
    ray.kill(ray.get_actor(f"{victim['group']['name']}-rank1", namespace=victim["group"]["namespace"]))
    finals = [poll(client, i, timeout_s=300)[0] for i in ids]
    assert [f["status"] for f in finals] == ["completed"] * 4, [(f["status"], f["error"]) for f in finals]
    redone = next(f for f in finals if f["id"] == victim["id"])
    assert redone["attempts"] == 1 and redone["group"]["name"] != victim["group"]["name"]
    for f in finals:
        assert decode(client.get(f"/v1/videos/{f['id']}/content").content).shape == (17, 128, 128, 3)
    # That two groups rendered at the same time is what `both` saw. The final records cannot show it: the
    # victim's record carries its retry's start, and if the replacement group comes up late the retry and the
    # queued videos all run one after another on the surviving group (a check of overlapping final spans
    # failed that way in CI).
    wait_for(lambda: running_replicas(APP, POOL) == 1, 120, "scale back to one group")
