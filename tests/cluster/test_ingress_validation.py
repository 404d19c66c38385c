"""Malformed numbers and text get a 422 naming the field, never a 500 (#19 items 1 and 6).

The ingress app alone, in process (no Ray): validation happens before the service is asked for anything,
so a stand-in service that refuses every call is enough."""

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import cluster.ingress as ingress


RECEIVED = []


@pytest.fixture
def client():
    async def create(body):  # what the service would render; answers a recognisable status instead
        RECEIVED.append(body)
        raise ingress._error(409, "stand_in", "received")

    ingress._instance["svc"] = SimpleNamespace(_ensure_background=lambda: None, check_key=lambda creds: None,
                                               create=create)  # fmt: skip
    RECEIVED.clear()
    try:
        yield TestClient(ingress.api, raise_server_exceptions=False)
    finally:
        ingress._instance.pop("svc", None)


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
    ('{"prompt": "a", "pab": {"spatial": {"range": 2, "window": [450, 930], "blocks": [-1]}}}', "blocks"),
    ('{"prompt": "a", "pab": {"spatial": {"range": 2, "window": [450, 930], "blocks": [999999]}}}', "blocks"),
]


@pytest.mark.parametrize("body,field", BAD)
def test_bad_numbers_and_text_are_a_422_naming_the_field(client, body, field):
    r = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]  # valid JSON, whatever the input held
    assert any(field in [str(x) for x in e["loc"]] for e in errors), errors
    json.dumps(errors, allow_nan=False)  # strictly encodable: no NaN came back
    assert not RECEIVED


def test_a_good_body_reaches_the_service(client):
    body = {"prompt": "a red circle \u00e9\U0001f600", "num_frames": 17, "guidance_scale": 4.5,
            "pab": {"spatial": {"range": 2, "window": [450, 930], "blocks": [0, 3]}}}  # fmt: skip
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "stand_in", r.text
    assert RECEIVED[0].num_frames == 17 and RECEIVED[0].prompt == body["prompt"]
