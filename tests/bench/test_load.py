"""bench/load.py: the load test runs end to end on the multi-node test cluster at a tiny size, and its checks catch
what they are there to catch."""

import asyncio
import email.utils
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.load import check_exactly_once, percentiles, retry_after, run_clients, summarize

ROOT = Path(__file__).resolve().parents[2]


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after("3") == 3.0 and retry_after(" 1.5 ") == 1.5
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after(when) <= 30
    assert retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0  # a date past: at once
    assert retry_after(None) == retry_after("soon") == 1.0


def test_percentiles_interpolate_between_ranks():
    p = percentiles([float(i) for i in range(1, 101)])
    assert p == {"n": 100, "p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0}
    assert percentiles([])["p50"] is None


def test_exactly_once_names_lost_duplicated_and_unknown_jobs():
    def done(j, **kw):
        return {"status": "completed", "video_key": f"videos/{j}.mp4", "dispatch": 1, "attempts": 0, **kw}

    records = {"a": done("a"), "b": done("b", dispatch=2, attempts=1), "w": done("w")}
    ok = check_exactly_once(["a", "b"], records, {"a": 1, "b": 1, "w": 1}, [], {"w"})
    assert ok["ok"] and ok["completed"] == 2 and ok["video_objects"] == 2
    assert ok["dispatched_again"] == 1 and ok["retried"] == 1  # counted, not failures
    bad = check_exactly_once(
        ["a", "b", "c", "c", "d"],
        {"a": done("a"), "b": {"status": "in_progress"}, "c": done("c"), "d": done("c"), "x": done("x")},
        {"a": 2, "c": 1, "d": 1, "y": 1},
        ["b"],
    )
    assert not bad["ok"]
    assert bad["duplicate_ids"] == 1 and bad["lost"] == ["b"] and bad["missing_video"] == ["b"]
    assert bad["rendered_twice"] == ["a"] and bad["unknown_records"] == ["x"] and bad["unknown_videos"] == ["y"]
    assert bad["still_active"] == ["b"] and bad["record_video_key_wrong"] == ["d"] and bad["completed"] == 3


def test_clients_wait_out_retry_after_and_take_every_request_once():
    """Against a stub server: a 429 with Retry-After is waited out (not less) and sent again; each index is
    submitted by one client only; a video is polled until completed."""
    from fastapi import FastAPI, Response

    app = FastAPI()
    seen, refused, jobs = [], {}, {}

    @app.post("/v1/videos")
    async def create(body: dict, response: Response):
        i = body["seed"]
        if i % 3 == 0 and i not in refused:  # every third request is refused once
            refused[i] = time.monotonic()
            response.status_code = 429
            response.headers["Retry-After"] = "1"
            return {"error": {"code": "queue_full"}}
        seen.append((i, time.monotonic()))
        jobs[f"video_{i}"] = time.monotonic()
        return {"id": f"video_{i}", "status": "queued"}

    @app.get("/v1/videos/{vid}")
    async def get(vid: str):
        done = time.monotonic() - jobs[vid] > 0.1
        return {"id": vid, "status": "completed" if done else "in_progress"}

    transport = httpx.ASGITransport(app=app)
    outcomes, wall = asyncio.run(run_clients("http://stub", 10, 4, lambda i: {"seed": i}, 0.02, 30,
                                             transport=transport))  # fmt: skip
    assert sorted(i for i, _ in seen) == list(range(10))  # each request accepted once
    assert [o.status for o in outcomes] == ["completed"] * 10
    assert {o.index for o in outcomes if o.rejected} == {0, 3, 6, 9}
    for i, t_refused in refused.items():
        t_accepted = dict(seen)[i]
        assert t_accepted - t_refused >= 1.0  # Retry-After honoured
    s = summarize(outcomes, {}, wall)
    assert s["http_429"] == 4 and s["waited_s"] == 4.0 and s["retry_after_s"] == [1.0]
    assert s["latency_s"]["submit"]["n"] == 10 and s["latency_s"]["submit_refused"]["n"] == 4
    assert s["latency_s"]["end_to_end"]["n"] == 10 and s["latency_s"]["end_to_end"]["p50"] >= 0.1
    first = {o.index: o for o in outcomes}[3]
    assert first.first_try_to_done_s >= first.end_to_end_s + 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_load_on_the_multinode_cluster(tmp_path):
    """20 videos from 8 clients against head + 2 workers of 2 fake GPUs (2 groups of 2), a queue bound of 4:
    clients get 429s and wait them out, every video completes exactly once (one mp4 version each in the
    versioned bucket), and the ingress's CPU per request is measured."""
    out = tmp_path / "load.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "bench.load", "--requests", "20", "--clients", "8", "--workers", "2",
           "--max-pending", "4", "--steps", "4", "--timeout-s", "120", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["requests"] == rec["accepted"] == rec["completed"] == 20 and not rec["not_completed"]
    chk = rec["check"]
    assert chk["ok"] and chk["video_objects"] == 20 and not chk["lost"] and not chk["rendered_twice"]
    assert rec["http_429"] > 0 and rec["retry_after_s"] == [1.0] and rec["waited_s"] == rec["http_429"] * 1.0
    for k in ("submit", "end_to_end", "end_to_end_record"):
        p = rec["latency_s"][k]
        assert p["n"] == 20 and 0 < p["p50"] <= p["p95"] <= p["p99"] <= p["max"], (k, p)
    # a video is 4 steps of 50 ms on its group at least, and the client sees it no earlier than the record says
    assert rec["latency_s"]["end_to_end"]["p50"] >= 0.2
    cpu = rec["cpu"]
    assert cpu["ingress_s"] > 0 and cpu["ingress_ms_per_request"] > 0 and cpu["proxy_ms_per_request"] > 0
    # the ingress counted what the clients sent: 20 accepted, the 429s, every poll (plus one /metrics scrape)
    by_kind = cpu["http_by_kind"]
    assert by_kind["POST /v1/videos 200"] == 20 and by_kind["POST /v1/videos 429"] == rec["http_429"]
    assert by_kind["GET /v1/videos/{video_id} 200"] == rec["polls"] - rec["poll_errors"]
    assert cpu["http_requests"] == sum(by_kind.values()) == 20 + rec["http_429"] + by_kind["GET /v1/videos/{video_id} 200"] + 1
    assert rec["cluster"] == {"nodes": 3, "gpus": 4, "node_addresses": ["127.0.0.1"]}  # loopback only
    assert rec["config"]["groups"] == 2
    assert "exactly once: yes" in proc.stdout and "p99" in proc.stdout
