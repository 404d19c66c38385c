"""Downloading a video from the local-folder backend, in process (no Ray): `Range` and HEAD work so
players can seek (#19 item 5). The real VideoAPI over a real folder; only the job record is written
by hand, as a finished render would leave it."""

import pytest
from fastapi.testclient import TestClient

import cluster.ingress as ingress
import cluster.routes as routes
from cluster.jobs import JobRecord, new_job_id

BODY = bytes(range(256)) * 40  # 10240 bytes, every offset recognisable
SIZE = len(BODY)


@pytest.fixture
def done(tmp_path):
    """(client, id of a completed video whose file holds BODY)."""
    svc = ingress.VideoAPI({"models": [{"name": "opensora-v1.2-tiny"}],
                            "storage": {"backend": "local", "path": str(tmp_path)}}, pools={})  # fmt: skip
    svc._ensure_background = lambda: None  # no leases or recovery loop: only the download is under test
    job_id = new_job_id()
    ref = svc.store.put_video(job_id, BODY, sidecar={})
    svc.jobs.create(JobRecord(id=job_id, created_at=0, model="opensora-v1.2-tiny", prompt="a fox", seconds="1",
                              size="32x32", request={}, seed=0, status="completed", pool="p",
                              video_key=ref.key))  # fmt: skip
    return TestClient(routes.build_api(svc), raise_server_exceptions=False), job_id


def get(client, job_id, range_=None, method="GET"):
    headers = {"Range": range_} if range_ else {}
    return client.request(method, f"/v1/videos/{job_id}/content", headers=headers)


def test_full_download_says_it_takes_ranges(done):
    r = get(*done)
    assert r.status_code == 200 and r.content == BODY
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-length"] == str(SIZE)
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers["content-disposition"] == f'inline; filename="{done[1]}.mp4"'


@pytest.mark.parametrize("range_,start,end", [
    ("bytes=0-9", 0, 9),
    ("bytes=10-", 10, SIZE - 1),
    ("bytes=-5", SIZE - 5, SIZE - 1),
    ("bytes=5000-5000", 5000, 5000),
    ("bytes=100-999999999", 100, SIZE - 1),  # an end past the file is cut to the file
])  # fmt: skip
def test_a_range_is_a_206_with_exactly_those_bytes(done, range_, start, end):
    r = get(*done, range_)
    assert r.status_code == 206, r.text
    assert r.content == BODY[start:end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert r.headers["content-length"] == str(end - start + 1)
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-type"] == "video/mp4"


@pytest.mark.parametrize("range_", ["bytes=999999999-", f"bytes={SIZE}-"])
def test_a_range_past_the_end_is_a_416_naming_the_size(done, range_):
    r = get(*done, range_)
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{SIZE}"
    assert r.json()["error"]["code"] == "range_not_satisfiable" and f"*/{SIZE}" in r.json()["error"]["message"]


@pytest.mark.parametrize("range_", ["bytes=abc", "items=0-1", "bytes=5-1"])
def test_a_malformed_range_is_a_400_in_the_error_shape(done, range_):
    """Starlette's own answer was plain text; every error of the API is in OpenAI's shape."""
    r = get(*done, range_)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "invalid_range" and range_ in r.json()["error"]["message"]


def test_head_answers_like_get_without_the_body(done):
    r = get(*done, method="HEAD")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(SIZE) and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "video/mp4"
    r = get(*done, "bytes=0-9", method="HEAD")
    assert r.status_code == 206 and r.content == b"" and r.headers["content-range"] == f"bytes 0-9/{SIZE}"


def test_unknown_or_unfinished_videos_keep_their_errors(done):
    client, job_id = done
    unknown = new_job_id()
    assert get(client, unknown, "bytes=0-9").status_code == 404
    assert get(client, unknown, method="HEAD").status_code == 404
    svc = client.app.state.svc
    rec = svc.jobs.get(job_id)
    rec.status = "in_progress"
    svc.jobs.create(rec)
    assert get(client, job_id, "bytes=0-9").status_code == 409
    rec.status = "completed"
    svc.jobs.create(rec)
    svc.store.delete(rec.video_key)  # the record says done but the file went away
    r = get(client, job_id, "bytes=0-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_range_goes_through_auth(tmp_path):
    svc = ingress.VideoAPI({"models": [{"name": "opensora-v1.2-tiny"}], "api_keys": ["k"],
                            "storage": {"backend": "local", "path": str(tmp_path)}}, pools={})  # fmt: skip
    svc._ensure_background = lambda: None
    client = TestClient(routes.build_api(svc), raise_server_exceptions=False)
    assert client.get("/v1/videos/video_x/content", headers={"Range": "bytes=0-9"}).status_code == 401
    assert client.head("/v1/videos/video_x/content").status_code == 401


def test_a_backend_without_files_streams_and_head_reads_nothing(done):
    """S3 with `redirect=false` streams through the ingress: no ranges there, and HEAD fetches no bytes."""
    client, job_id = done
    store = client.app.state.svc.store
    store.local_path = lambda key: None  # what S3Storage answers
    r = get(client, job_id, "bytes=0-9")
    assert r.status_code == 200 and r.content == BODY and "accept-ranges" not in r.headers
    store.iter_bytes = lambda *a, **k: pytest.fail("HEAD opened the object")
    r = get(client, job_id, method="HEAD")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(SIZE)
    assert r.headers["content-type"] == "video/mp4"
