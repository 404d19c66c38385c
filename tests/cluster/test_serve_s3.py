"""The Serve app with a real SeaweedFS S3 backend: presigned downloads, size routing between pools of
1-GPU and 2-GPU groups, and an ingress Serve stops that loses no job (real engine, opensora-v1.2-tiny)."""

from __future__ import annotations

import io
import uuid

import av
import httpx
import numpy as np
import pytest
from conftest import deploy, poll, wait_for

from cluster.jobs import JobStore
from pab.storage import storage_from_config

APP, KEY = "pabs", "s3-test-key"
SMALL = {"prompt": "a small fox", "num_frames": 17, "size": "32x32", "steps": 5}  # 17*32*32 = 17408
BIG = {"prompt": "a big fox", "num_frames": 17, "size": "48x48", "steps": 5}  # over the 1-GPU limit


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def app(serve_port, s3_server):
    from ray import serve

    storage = s3_server.storage_config("videos-" + uuid.uuid4().hex[:6], prefix="pab/test", presign_expiry_s=120)
    config = {
        "models": [{"name": "opensora-v1.2-tiny", "groups": [
            {"gpus": 1, "min_groups": 1, "max_groups": 1, "max_workload": 17 * 32 * 32},
            {"gpus": 2, "min_groups": 1, "max_groups": 1},
        ]}],
        "storage": storage,
        "api_keys": [KEY], "max_attempts": 1,
        "heartbeat_s": 1.0, "stale_after_s": 5.0, "reconcile_interval_s": 1.0, "retry_backoff_s": 0.5,
        "cpus_per_rank": 0.5, "group_replica_cpus": 0.25, "ingress_cpus": 0.25,
        "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
    }
    client = deploy(config, APP, serve_port, KEY)
    yield client, storage_from_config(storage)
    client.close()
    serve.delete(APP)


def test_s3_submit_poll_presigned_download(app):
    client, store = app
    job = client.post("/v1/videos", json={**SMALL, "seed": 7, "pab": "paper"}).json()
    final, seen = poll(client, job["id"])
    assert final["status"] == "completed", final
    assert [s["progress"] for s in seen] == sorted(s["progress"] for s in seen) and final["progress"] == 100
    assert final["group"]["gpus"] == 1  # small: the 1-GPU pool
    r = client.get(f"/v1/videos/{job['id']}/content", follow_redirects=False)
    assert r.status_code == 307 and "X-Amz-Signature=" in r.headers["location"]
    video = httpx.get(r.headers["location"])  # the presigned URL itself, no API key
    assert video.status_code == 200 and decode(video.content).shape == (17, 32, 32, 3)
    side = store.get_json(f"videos/{job['id']}.json")
    assert side["seed"] == 7 and side["request"]["prompt"] == SMALL["prompt"] and side["pab"]["settings"]["spatial"]
    assert {"denoise_s", "encode_s"} <= set(side["timings"])
    streamed = client.get(f"/v1/videos/{job['id']}/content", params={"redirect": "false"})  # through the API
    assert streamed.status_code == 200 and streamed.content == video.content
    # HEAD (#19 item 5): the same redirect, or the size without the bytes when streamed here.
    assert client.head(f"/v1/videos/{job['id']}/content", follow_redirects=False).status_code == 307
    head = client.head(f"/v1/videos/{job['id']}/content", params={"redirect": "false"})
    assert head.status_code == 200 and head.headers["content-length"] == str(len(video.content))
    thumb = client.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"}, follow_redirects=True)
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:3] == b"\xff\xd8\xff"  # #16 item 1
    assert store.get_json(f"jobs/records/{job['id']}.json")["status"] == "completed"  # the record is in S3
    assert not store.exists(f"jobs/active/{job['id']}")


def test_routes_by_request_size(app):
    client, _ = app
    big = client.post("/v1/videos", json=BIG).json()
    small = client.post("/v1/videos", json=SMALL).json()
    fb, fs = poll(client, big["id"])[0], poll(client, small["id"])[0]
    assert fb["status"] == fs["status"] == "completed"
    assert fb["group"]["gpus"] == 2 and fs["group"]["gpus"] == 1
    content = client.get(f"/v1/videos/{big['id']}/content", follow_redirects=True).content
    assert decode(content).shape == (17, 48, 48, 3)


def test_cancel_a_queued_and_a_rendering_job(app):
    client, store = app
    busy = client.post("/v1/videos", json={**SMALL, "steps": 400}).json()  # on the 1-GPU pool's only group
    wait_for(lambda: client.get(f"/v1/videos/{busy['id']}").json()["step"] >= 1, 120, "rendering")
    waiting = client.post("/v1/videos", json=SMALL).json()  # the 1-GPU group is busy: it waits
    assert client.get(f"/v1/videos/{waiting['id']}").json()["status"] == "queued"
    r = client.post(f"/v1/videos/{waiting['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # never starts
    assert client.post(f"/v1/videos/{busy['id']}/cancel").json()["cancel_requested"]
    final, _ = poll(client, busy["id"], timeout_s=60)
    assert final["status"] == "cancelled" and 1 <= final["step"] < 400
    assert client.get(f"/v1/videos/{waiting['id']}").json()["status"] == "cancelled"
    assert not store.exists(f"videos/{waiting['id']}.mp4") and not store.exists(f"videos/{busy['id']}.mp4")


@pytest.mark.faults
def test_an_ingress_serve_stops_hands_its_queued_job_over_and_loses_none(app, ray_session):
    """Serve stops the ingress replica (a redeploy, a downscale): it releases the video it queues to the next
    replica, the rendering one stays with its group, and both complete. A crashed ingress's videos are taken over
    once their leases go stale (tests/multinode/test_node_loss.py)."""
    ray = ray_session
    client, store = app
    before = [d["id"] for d in client.get("/v1/videos", params={"limit": 100}).json()["data"]]
    running = client.post("/v1/videos", json={**SMALL, "size": "64x64", "steps": 400}).json()
    wait_for(lambda: client.get(f"/v1/videos/{running['id']}").json()["status"] == "in_progress", 120, "rendering")
    # Same pool (2 GPUs: both are over the 1-GPU limit), which is busy: this one waits in the ingress's dispatch queue.
    queued = client.post("/v1/videos", json={**SMALL, "size": "32x48"}).json()
    assert client.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#VideoAPI")]
    assert len(names) == 1
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    # What Serve's controller does to stop a replica: its graceful shutdown (which calls VideoAPI.__del__), then kill.
    ray.get(replica.perform_graceful_shutdown.remote(), timeout=60)
    jobs = JobStore(store)
    assert jobs.lease(queued["id"]).get("released") and jobs.lease(queued["id"])["owner"].startswith("ingress:")
    assert not jobs.lease(running["id"]).get("released")  # its group goes on touching it
    ray.kill(replica, no_restart=True)
    wait_for(lambda: _healthy(client), 180, "a new ingress replica")

    after = [d["id"] for d in client.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert set(before) | {running["id"], queued["id"]} <= set(after)  # no record lost
    for job in (running, queued):
        final, _ = poll(client, job["id"], timeout_s=180)
        assert final["status"] == "completed", final
        assert decode(client.get(f"/v1/videos/{job['id']}/content", follow_redirects=True).content).shape[0] == 17
    # The queued job was taken over by the new ingress (dispatched again), not lost with the old one.
    assert jobs.get(queued["id"]).dispatch >= 2


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz", timeout=5).status_code == 200 and client.get("/v1/videos").status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.faults
def test_job_fails_with_reason_after_max_attempts(app, ray_session):
    """max_attempts=1: the group dies mid-video, the job fails and says why (last: it breaks a group)."""
    ray = ray_session
    client, _ = app
    job = client.post("/v1/videos", json={**SMALL, "size": "64x64", "steps": 400}).json()
    rec = wait_for(lambda: (lambda r: r if r["step"] >= 1 else None)(client.get(f"/v1/videos/{job['id']}").json()),
                   120, "rendering")
    ray.kill(ray.get_actor(f"{rec['group']['name']}-rank0", namespace=rec["group"]["namespace"]))
    final, _ = poll(client, job["id"], timeout_s=60)
    assert final["status"] == "failed" and final["attempts"] == 1
    assert final["error"]["code"] == "group_failed" and "rank 0 died" in final["error"]["message"], final["error"]
