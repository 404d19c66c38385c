"""Hostile requests to the ingress, in process (no Ray): malformed numbers and text get a 400 naming the
field, never a 500 (#19 items 1 and 6), nesting past the parser's limit too, and the queue bound holds under
a burst of concurrent POSTs (#19 item 2).

Schema validation happens before the service is asked for anything, so a stand-in service is enough there;
the burst drives the real VideoAPI.create with jobs that never start."""

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import cluster.ingress as ingress
import cluster.routes as routes

RECEIVED = []


@pytest.fixture
def client():
    async def create(body, idempotency=None):  # what the service would render; answers a recognisable status
        RECEIVED.append(body)
        raise ingress.api_error(409, "stand_in", "received")

    svc = SimpleNamespace(_ensure_background=lambda: None, check_key=lambda creds: None, create=create,
                          cfg=SimpleNamespace(default_model="opensora-v1.2-tiny"))
    RECEIVED.clear()
    return TestClient(routes.build_api(svc), raise_server_exceptions=False)


BAD = [
    ('{"prompt": "a", "guidance_scale": NaN}', "guidance_scale"),
    ('{"prompt": "a", "guidance_scale": Infinity}', "guidance_scale"),
    ('{"prompt": "a", "seconds": NaN}', "seconds"),
    ('{"prompt": "a", "seconds": -Infinity}', "seconds"),
    ('{"prompt": "a", "pab": {"spatial": {"range": 2, "window": [NaN, 930]}}}', "window"),
    ('{"prompt": "a \\ud800 fox"}', "prompt"),
    ('{"prompt": "a", "negative_prompt": "\\udfff"}', "negative_prompt"),
    ('{"prompt": "a", "num_frames": true}', "num_frames"),
    ('{"prompt": "a", "steps": false}', "steps"),
    ('{"prompt": "a", "pab": {"spatial": {"range": true, "window": [450, 930]}}}', "range"),
    ('{"prompt": "a", "pab": {"spatial": {"range": 2, "window": [450, 930], "blocks": [true]}}}', "blocks"),
    ('{"prompt": "a", "cache": "../../etc/rules.json"}', "cache"),  # a name, never a path on the server
    ('{"prompt": "a", "cache": {"policy": "teacache", "threshold": NaN}}', "threshold"),
    ('{"prompt": "a", "cache": {"policy": "fastcache", "threshold": 0.1}}', "policy"),
    ('{"prompt": "a", "cache": {"policy": "magcache", "threshold": 0.1, "max_skips": true}}', "max_skips"),
    # true is not 1 for the real-valued fields either (a 1 s video, a guidance of 1.0)
    ('{"prompt": "a", "seconds": true}', "seconds"),
    ('{"prompt": "a", "guidance_scale": true}', "guidance_scale"),
    ('{"prompt": "a", "pab": {"spatial": {"range": 2, "window": [false, 930]}}}', "window"),
    ('{"prompt": "a", "cache": {"policy": "teacache", "threshold": true}}', "threshold"),
    ('{"prompt": "a", "model": ""}', "model"),  # not "the server's default model"
]


@pytest.mark.parametrize("body,field", BAD)
def test_bad_numbers_and_text_are_a_400_naming_the_field(client, body, field):
    r = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    errors = r.json()["detail"]  # valid JSON, whatever the input held
    assert any(field in [str(x) for x in e["loc"]] for e in errors), errors
    json.dumps(errors, allow_nan=False)  # strictly encodable: no NaN came back
    assert not RECEIVED


@pytest.mark.parametrize("depth", [100, 100_000])  # 100,000 is far past the parser's limit, and under 1 MiB
@pytest.mark.parametrize("open_,close", [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_bodies_are_a_400(client, depth, open_, close):
    """Nesting past the JSON parser's recursion limit is "not JSON", and nesting inside it fails the schema:
    a 400 in OpenAI's error shape either way, never a 500."""
    body = '{"prompt": "a", "pab": ' + open_ * depth + ("1" if open_ != "[" else "") + close * depth + "}"
    r = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["type"] == "invalid_request_error" and not RECEIVED


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_its_limit_is_a_413_before_it_is_parsed(client, chunked):
    """1 MiB of JSON (a request is a few KB): refused by its Content-Length, or while a chunked upload streams."""
    body = json.dumps({"prompt": "a", "negative_prompt": "x" * (routes.MAX_JSON_BYTES + 10)}).encode()
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    r = client.post("/v1/videos", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "body_too_large" and "1 MiB" in r.json()["error"]["message"]
    assert not RECEIVED


def test_a_400_echoes_a_long_input_cut(client):
    """A field over its limit is named, and its value comes back cut, not whole."""
    r = client.post("/v1/videos", json={"prompt": "a", "negative_prompt": "y" * 50_000})
    assert r.status_code == 400 and len(r.content) < 2_000, len(r.content)
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "negative_prompt"] and error["input"].endswith("(50000 characters)")


def test_a_good_body_reaches_the_service(client):
    body = {"prompt": "a red circle \u00e9\U0001f600", "num_frames": 17, "guidance_scale": 4.5,
            "pab": {"spatial": {"range": 2, "window": [450, 930], "blocks": [0, 3]}}}  # fmt: skip
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "stand_in", r.text
    assert RECEIVED[0].num_frames == 17 and RECEIVED[0].prompt == body["prompt"]


def test_the_queue_bound_holds_under_a_burst(tmp_path):
    """32 POSTs at once against max_pending 8 while the job store is slow: exactly 8 accepted (#19 item 2)."""
    import asyncio
    import time

    from fastapi import HTTPException

    from cluster.api import VideoCreate

    svc = ingress.VideoAPI({"models": [{"name": "opensora-v1.2-tiny"}], "max_pending": 8,
                            "storage": {"backend": "local", "path": str(tmp_path)}}, pools={})  # fmt: skip
    svc._ensure_background = lambda: None  # no leases or recovery loop: only the admission path is under test
    write = svc.jobs.create
    svc.jobs.create = lambda rec: (time.sleep(0.05), write(rec))[1]  # a store with some latency

    async def burst():
        never = asyncio.Event()
        svc._start = lambda job_id: svc._active.setdefault(job_id, asyncio.ensure_future(never.wait()))
        body = VideoCreate(prompt="a fox", num_frames=17, steps=2)
        results = await asyncio.gather(*(svc.create(body) for _ in range(32)), return_exceptions=True)
        for task in svc._active.values():
            task.cancel()
        return results

    results = asyncio.run(burst())
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, HTTPException)]
    assert len(accepted) == 8 and len(refused) == 24, [r for r in results if isinstance(r, BaseException)][:3]
    assert all(r.status_code == 429 and r.headers["Retry-After"] for r in refused)
    assert len(svc._active) == 8 and svc._reserved == 0
