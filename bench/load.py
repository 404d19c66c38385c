"""A load test of the Serve app on a multi-node Ray cluster: N videos from C concurrent HTTP clients, loopback only.

    python -m bench.load                                # head + 3 workers of 2 fake GPUs, SeaweedFS S3 (started here)
    python -m bench.load --requests 20 --clients 8      # a small run
    python -m bench.load --address 127.0.0.1:6379 --s3-endpoint http://127.0.0.1:8333   # an existing cluster

What runs: the multi-node test cluster of tests/multinode (`LocalCluster`: one raylet per node, the ingress and
the Serve proxy on the head, S3 the only storage) with the whole app deployed as in production, except the
engine: the test double of tests/actors/fake_engine.py (a real all-reduce between a group's ranks per step, then
`--step-s` of sleep), so a video costs `--steps` x `--step-s` on its group plus everything around it (records,
leases, dispatch, mp4 + images + sidecar to S3). `--engine pipeline` renders with the real pipeline and the
`-tiny` model (random weights) instead. With `--address` the app is deployed on a running Ray cluster (e.g. one
from `python tests/multinode/localcluster.py`, whose processes must be able to import tests/actors) and its
videos go to a new versioned bucket at `--s3-endpoint`.

Each client takes the next request, POSTs it and polls `GET /v1/videos/{id}` every `--poll-s` until it is
finished, then takes the next; a 429 (the ingress's queue bound, `--max-pending`, below the number of clients on
purpose) or a 503 is waited out for its `Retry-After` and sent again, and counted. Nothing runs past
`--requests` or `--timeout-s`.

Measured: submit latency (each POST), end to end (the accepted POST sent -> the poll that sees `completed`, so
up to one poll interval late; the job record's own created -> completed beside it), 429s and the time waited,
and the CPU time of the ingress replica's process and of the Serve HTTP proxy's (read on their node, through
Ray's actor table and psutil, before and after), per HTTP request the ingress answered (its /metrics) and per
video. Checked from the bucket, which has versioning on so every PUT leaves a version: each accepted job has
exactly one record, completed, and exactly one mp4 version; no other video or record exists; nothing is left
active. Prints a table, writes a JSON record; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import email.utils
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
APP, KEY = "pabload", "load-key"
MODEL = "opensora-v1.2-tiny"
PROMPT = "a red circle moving left on a black background"
PREFIX = "pab/load"
TERMINAL = ("completed", "failed", "cancelled")


# ---------------------------------------------------------------------------------------------- the clients


@dataclass
class Outcome:
    """One request as its client saw it."""

    index: int
    job_id: str | None = None
    status: str = "not_sent"  # not_sent, rejected (gave up), error, or the job's last status seen
    submit_s: list[float] = field(default_factory=list)  # every POST: 429/503s first, the accepted one last
    rejected: int = 0  # 429s
    unavailable: int = 0  # 503s
    waited_s: float = 0.0  # time spent honouring Retry-After
    retry_after_s: list[float] = field(default_factory=list)  # what each 429/503 asked for
    end_to_end_s: float | None = None  # accepted POST sent -> completed seen
    first_try_to_done_s: float | None = None  # first POST sent -> completed seen (429 waits included)
    polls: int = 0
    poll_errors: int = 0
    error: str | None = None


def retry_after(value: str | None, default: float = 1.0) -> float:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return default
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


async def _one(client: httpx.AsyncClient, i: int, body: dict, poll_s: float, deadline: float) -> Outcome:
    out = Outcome(i)
    t_first = time.perf_counter()
    while True:  # submit, honouring Retry-After
        if time.monotonic() > deadline:
            out.status, out.error = "rejected", "deadline before the request was accepted"
            return out
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/videos", json=body)
        except httpx.HTTPError as e:
            out.status, out.error = "error", f"POST: {type(e).__name__}: {e}"
            return out  # no retry without an Idempotency-Key: it could create the video twice
        out.submit_s.append(time.perf_counter() - t0)
        if r.status_code in (429, 503):
            wait = retry_after(r.headers.get("retry-after"))
            out.retry_after_s.append(wait)
            if r.status_code == 429:
                out.rejected += 1
            else:
                out.unavailable += 1
            out.waited_s += wait
            await asyncio.sleep(wait)
            continue
        if r.status_code != 200:
            out.status, out.error = "error", f"POST {r.status_code}: {r.text[:300]}"
            return out
        out.job_id, out.status = r.json()["id"], r.json()["status"]
        break
    while out.status not in TERMINAL:  # poll until finished
        if time.monotonic() > deadline:
            out.error = "deadline before the video finished"
            return out
        await asyncio.sleep(poll_s)
        out.polls += 1
        try:
            r = await client.get(f"/v1/videos/{out.job_id}")
        except httpx.HTTPError:
            out.poll_errors += 1
            continue
        if r.status_code != 200:
            out.poll_errors += 1
            continue
        out.status = r.json()["status"]
    if out.status == "completed":
        now = time.perf_counter()
        out.end_to_end_s = now - t0
        out.first_try_to_done_s = now - t_first
    else:
        out.error = json.dumps(r.json().get("error"))
    return out


async def run_clients(base: str, n: int, c: int, body_of, poll_s: float, timeout_s: float, key: str = KEY,
                      transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Outcome], float]:  # fmt: skip
    """`n` requests from `c` concurrent clients (each: submit, poll until finished, next); the outcomes, the wall."""
    deadline = time.monotonic() + timeout_s
    todo = iter(range(n))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits, transport=transport) as client:  # fmt: skip

        async def worker():
            for i in todo:  # one iterator shared by the clients: every index is taken once
                outcomes.append(await _one(client, i, body_of(i), poll_s, deadline))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    outcomes.extend(Outcome(i) for i in todo)  # never started before the deadline
    return sorted(outcomes, key=lambda o: o.index), wall


# ---------------------------------------------------------------------------------------------- the figures


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """n, p50/p95/p99 (linear interpolation between closest ranks) and max, in seconds."""
    import numpy as np

    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), 4), "p95": round(float(p95), 4),
            "p99": round(float(p99), 4), "max": round(float(a.max()), 4)}  # fmt: skip


def check_exactly_once(accepted: list[str], records: dict[str, dict | None], mp4_versions: dict[str, int],
                       active: list[str], extra_ids: set[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """What the bucket says about the accepted jobs.

    `records`: job id -> its stored record (None when missing) for every record in the bucket; `mp4_versions`:
    job id -> versions of `videos/<id>.mp4` for every mp4 in the bucket; `active`: ids still marked active;
    `extra_ids`: jobs outside the measured ones that may be there (the warm-up's).
    """
    want = set(accepted)
    dup_accepted = len(accepted) - len(want)  # the API gave two requests the same id
    lost = sorted(j for j in want if (records.get(j) or {}).get("status") != "completed")
    missing_video = sorted(j for j in want if mp4_versions.get(j, 0) == 0)
    rendered_twice = sorted(j for j in want | set(extra_ids) if mp4_versions.get(j, 0) > 1)
    unknown_records = sorted(set(records) - want - set(extra_ids))
    unknown_videos = sorted(set(mp4_versions) - want - set(extra_ids))
    # the record points at the video it completed with
    wrong_key = sorted(j for j in want if j not in lost and records[j].get("video_key") != f"videos/{j}.mp4")
    ok = not (dup_accepted or lost or missing_video or rendered_twice or unknown_records or unknown_videos or active
              or wrong_key)  # fmt: skip
    return {"ok": ok, "accepted": len(want), "completed": sum(1 for j in want if j not in lost),
            "duplicate_ids": dup_accepted, "lost": lost, "missing_video": missing_video,
            "rendered_twice": rendered_twice, "unknown_records": unknown_records, "unknown_videos": unknown_videos,
            "still_active": sorted(active), "record_video_key_wrong": wrong_key,
            # not failures: a job dispatched again (its driver replaced) or retried on another group (one died)
            "dispatched_again": sum(1 for j in want if (records.get(j) or {}).get("dispatch", 1) > 1),
            "retried": sum(1 for j in want if (records.get(j) or {}).get("attempts", 0) > 0),
            "video_objects": sum(v for j, v in mp4_versions.items() if j in want)}  # fmt: skip


def bucket_state(s3, bucket: str, prefix: str) -> tuple[dict[str, dict], dict[str, int], list[str]]:
    """(records by job id, mp4 versions by job id, active ids) as stored under `prefix`."""
    records: dict[str, dict] = {}
    for key in _keys(s3, bucket, f"{prefix}/jobs/records/"):
        job = key.rsplit("/", 1)[1].removesuffix(".json")
        records[job] = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    versions: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=f"{prefix}/videos/"):
        for v in page.get("Versions", []):
            name = v["Key"].rsplit("/", 1)[1]
            if name.endswith(".mp4"):
                versions[name[: -len(".mp4")]] = versions.get(name[: -len(".mp4")], 0) + 1
    active = [k.rsplit("/", 1)[1] for k in _keys(s3, bucket, f"{prefix}/jobs/active/")]
    return records, versions, active


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip


def http_requests(base: str) -> dict[str, float]:
    """Requests the ingress replica has answered, by "METHOD route status" (its /metrics: pab_http_requests_total)."""
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        m = re.match(r"pab_http_requests_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[f"{labels['method']} {labels['route']} {labels['status']}"] = float(m.group(2))
    return out


# ---------------------------------------------------------------------------------------------- process CPU


def serve_processes(app: str) -> dict[str, tuple[int, str]]:
    """The ingress replica's and the HTTP proxy's processes: name -> (pid, node id), from the GCS's actor table
    (what Ray's state API reads, without needing the dashboard, which the test cluster does not start)."""
    from ray._private.state import actors

    out = {}
    for a in actors(actor_state_name="ALIVE").values():
        cls = a["ActorClassName"]
        if cls == f"ServeReplica:{app}:VideoAPI":
            out["ingress"] = (a["Pid"], a["Address"]["NodeID"])
        elif cls == "ProxyActor":
            out.setdefault("proxy", (a["Pid"], a["Address"]["NodeID"]))
    if "ingress" not in out:
        raise RuntimeError(f"no live ingress replica of app {app!r} in Ray's actor table")
    return out


def cpu_seconds(procs: dict[str, tuple[int, str]]) -> dict[str, float]:
    """User + system CPU seconds of each process so far, read by a task on its own node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def read(pid: int) -> float:
        import psutil  # Ray ships it (ray/thirdparty_files)

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    refs = {name: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
            for name, (pid, node) in procs.items()}  # fmt: skip
    return {name: ray.get(ref, timeout=60) for name, ref in refs.items()}


# ---------------------------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(args) -> dict[str, str]:
    tests = ROOT / "tests"
    return {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "FAKE_ENGINE_STEP_S": str(args.step_s),
            "PYTHONPATH": os.pathsep.join([str(tests / "actors"), str(ROOT)])}  # fmt: skip


def app_config(args, storage: dict, ingress_resources: dict[str, float]) -> dict[str, Any]:
    gpus = args.gpus_per_group
    return {
        "models": [{"name": MODEL, "groups": [{"gpus": gpus, "min_groups": args.groups, "max_groups": args.groups}]}],
        "storage": storage, "api_keys": [KEY], "engine_factory": "fake_engine:make" if args.engine == "fake" else None,
        "max_pending": args.max_pending, "retry_after_s": args.retry_after,
        "cpus_per_rank": 0.5, "group_replica_cpus": 0.25, "ingress_cpus": 0.25, "ingress_resources": ingress_resources,
        "group_start_timeout_s": 300.0, "graceful_shutdown_timeout_s": 5.0,
    }  # fmt: skip


class Target:
    """The cluster the load runs against: started here (`LocalCluster`) or reached at `--address`."""

    def __init__(self, args) -> None:
        self.args, self.lc, self.bucket = args, None, "load-" + uuid.uuid4().hex[:8]
        self.own_serve = False

    def __enter__(self) -> "Target":
        a = self.args
        if not a.address:  # Ray's nodes on 127.0.0.1 too, not the machine's address (read when ray is imported)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        from ray import serve

        if a.address:
            sys.path.insert(0, str(ROOT / "tests"))
            from support.weed import ACCESS_KEY, SECRET_KEY

            ray.init(address=a.address, log_to_driver=False, runtime_env={"env_vars": _job_env(a)})
            self.s3_endpoint, key, secret = a.s3_endpoint, a.s3_key or ACCESS_KEY, a.s3_secret or SECRET_KEY
            head = {"pab-head": 1} if ray.cluster_resources().get("pab-head") else {}
            nodes = [n for n in ray.nodes() if n["Alive"]]
            self.machine = {"nodes": len(nodes), "gpus": int(ray.cluster_resources().get("GPU", 0))}
        else:
            sys.path.insert(0, str(ROOT / "tests" / "multinode"))
            from localcluster import HEAD_RESOURCE, LocalCluster

            self.lc = LocalCluster(workers=a.workers, gpus=a.gpus, cpus=4).start()
            self.lc.connect(env={"FAKE_ENGINE_STEP_S": str(a.step_s)})
            self.s3_endpoint = self.lc.s3.endpoint
            from support.weed import ACCESS_KEY as key
            from support.weed import SECRET_KEY as secret

            head = {HEAD_RESOURCE: 1}
            self.machine = {"nodes": 1 + a.workers, "gpus": a.workers * a.gpus}
        self.machine["node_addresses"] = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
        if a.groups is None:  # as many groups as the GPUs fill
            a.groups = max(1, self.machine["gpus"] // a.gpus_per_group)
        if a.max_pending is None:  # half the clients: the 429 path is part of the load; never below the groups
            a.max_pending = max(a.groups, a.clients // 2)
        import boto3
        from botocore.config import Config

        self.s3 = boto3.session.Session().client(
            "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", aws_access_key_id=key,
            aws_secret_access_key=secret, config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )  # fmt: skip
        self.s3.create_bucket(Bucket=self.bucket)
        self.s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        storage = {"backend": "s3", "endpoint_url": self.s3_endpoint, "bucket": self.bucket, "prefix": PREFIX,
                   "access_key_id": key, "secret_access_key": secret}  # fmt: skip

        from cluster.app import build_app

        try:  # a Serve already running there keeps its proxy (and port), and is left running at the end
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
            self.own_serve = False
        except ValueError:
            self.own_serve = True
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": a.port or _free_port()})
        from ray.serve.context import _get_global_client

        self.base = f"http://127.0.0.1:{_get_global_client().http_config.port}"
        serve.run(build_app(app_config(a, storage, head)), name=APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + a.start_timeout_s
        while not self._ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app was not RUNNING and healthy within {a.start_timeout_s}s")
            time.sleep(1)
        return self

    def _ready(self) -> bool:
        from ray import serve

        app = serve.status().applications.get(APP)
        if app is None or app.status != "RUNNING":
            return False
        try:
            return httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.delete(APP)
                if self.lc is None and self.own_serve:
                    serve.shutdown()
        finally:
            if self.lc is not None:
                self.lc.shutdown()
            elif ray.is_initialized():
                ray.shutdown()


# ---------------------------------------------------------------------------------------------- main


def warm_up(base: str, n: int, body: dict, timeout_s: float) -> list[str]:
    """One video per group, all at once, waited for: groups started, the ingress's imports done."""
    ids = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        for i in range(n):
            while (r := c.post("/v1/videos", json={**body, "seed": 10_000 + i})).status_code in (429, 503):
                time.sleep(retry_after(r.headers.get("retry-after")))
            r.raise_for_status()
            ids.append(r.json()["id"])
        deadline = time.monotonic() + timeout_s
        for job in ids:
            while (s := c.get(f"/v1/videos/{job}").json())["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"warm-up video {job} not finished after {timeout_s}s")
                time.sleep(0.2)
            if s["status"] != "completed":
                raise RuntimeError(f"warm-up video {job} {s['status']}: {s.get('error')}")
    return ids


def summarize(outcomes: list[Outcome], records: dict[str, dict], wall: float, groups: int = 0) -> dict[str, Any]:
    done = [o for o in outcomes if o.status == "completed"]
    accepted_submit = [o.submit_s[-1] for o in outcomes if o.job_id]
    refused_submit = [t for o in outcomes for t in (o.submit_s[:-1] if o.job_id else o.submit_s)]
    server_e2e = [records[o.job_id]["completed_at"] - records[o.job_id]["created_at"] for o in done
                  if (records.get(o.job_id) or {}).get("completed_at")]  # fmt: skip
    timings: dict[str, list[float]] = {}
    for o in done:
        for k, v in ((records.get(o.job_id) or {}).get("timings") or {}).items():
            if isinstance(v, (int, float)):
                timings.setdefault(k, []).append(float(v))
    return {
        # where a video's time went, from the records the groups wrote: queue_s (created -> a group took it),
        # run_s (on the group: engine, mp4, images, storage, records), total_s, the engine's own stages
        "record_timings_s": {k: percentiles(v) for k, v in sorted(timings.items())},
        "groups_busy": round(sum(timings.get("run_s", [])) / (groups * wall), 3) if groups and wall else None,
        "latency_s": {
            "submit": percentiles(accepted_submit),
            "submit_refused": percentiles(refused_submit),
            "end_to_end": percentiles([o.end_to_end_s for o in done]),
            "end_to_end_record": percentiles(server_e2e),
            "first_try_to_done": percentiles([o.first_try_to_done_s for o in done]),
        },
        "requests": len(outcomes),
        "accepted": sum(1 for o in outcomes if o.job_id),
        "completed": len(done),
        "not_completed": {o.job_id or f"#{o.index}": f"{o.status}: {o.error}" for o in outcomes
                          if o.status != "completed"},  # fmt: skip
        "http_429": sum(o.rejected for o in outcomes),
        "http_503": sum(o.unavailable for o in outcomes),
        "requests_refused_at_least_once": sum(1 for o in outcomes if o.rejected or o.unavailable),
        "most_429_one_request": max((o.rejected for o in outcomes), default=0),  # no queue behind a 429: no order
        "retry_after_s": sorted({w for o in outcomes for w in o.retry_after_s}),
        "waited_s": round(sum(o.waited_s for o in outcomes), 2),
        "polls": sum(o.polls for o in outcomes),
        "poll_errors": sum(o.poll_errors for o in outcomes),
        "wall_s": round(wall, 2),
        "videos_per_s": round(len(done) / wall, 3) if wall else None,
    }


def table(rec: dict[str, Any]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    rows = [("submit: POST accepted", "submit"), ("submit: POST refused (429/503)", "submit_refused"),
            ("end to end: POST -> completed seen", "end_to_end"),
            ("end to end: the record's created -> completed", "end_to_end_record"),
            ("first POST -> completed (Retry-After waits)", "first_try_to_done")]  # fmt: skip
    lines = [f"{'latency (ms)':<46} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"]
    for label, k in rows:
        p = rec["latency_s"][k]
        lines.append(f"{label:<46} {p['n']:>5} {ms(p['p50']):>7} {ms(p['p95']):>7} {ms(p['p99']):>7} {ms(p['max']):>7}")
    chk, cpu, t = rec["check"], rec["cpu"], rec["record_timings_s"]
    lines += [
        "",
        f"requests {rec['requests']}, clients {rec['clients']}: accepted {rec['accepted']}, completed "
        f"{rec['completed']} in {rec['wall_s']} s ({rec['videos_per_s']} videos/s)",
        f"on a group (p50): run {ms(t.get('run_s', {}).get('p50'))} ms, of which the engine "
        f"{ms(t.get('denoise_s', {}).get('p50'))} ms; queued {ms(t.get('queue_s', {}).get('p50'))} ms; groups busy "
        f"{'-' if rec['groups_busy'] is None else format(rec['groups_busy'], '.0%')} of the wall",
        f"429s {rec['http_429']} (503s {rec['http_503']}) on {rec['requests_refused_at_least_once']} requests (at "
        f"most {rec['most_429_one_request']} on one), "
        f"Retry-After {rec['retry_after_s']} s honoured: {rec['waited_s']} s waited in all",
        f"exactly once: {'yes' if chk['ok'] else 'NO'} ({chk['video_objects']} mp4 versions for {chk['accepted']} "
        f"accepted jobs; lost {len(chk['lost'])}, rendered twice {len(chk['rendered_twice'])}, unknown records "
        f"{len(chk['unknown_records'])}, unknown videos {len(chk['unknown_videos'])}, still active "
        f"{len(chk['still_active'])}); dispatched again {chk['dispatched_again']}, retried {chk['retried']}",
        f"ingress replica CPU {cpu['ingress_s']} s: {cpu['ingress_ms_per_request']} ms per HTTP request "
        f"({cpu['http_requests']} answered), {cpu['ingress_ms_per_video']} ms per video; Serve proxy "
        f"{cpu.get('proxy_ms_per_request')} ms per request; the clients {cpu['client_s']} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", "-n", type=int, default=500, help="videos to ask for")
    p.add_argument("--clients", "-c", type=int, default=64, help="concurrent clients")
    p.add_argument("--address", default=None, help="a running Ray cluster (else one is started here)")
    p.add_argument("--local", action="store_true", help="start the multi-node test cluster here (the default)")
    p.add_argument("--s3-endpoint", default=None, help="with --address: the S3 endpoint for the videos' bucket")
    p.add_argument("--s3-key", default=None, help="with --address: S3 access key (default: the test server's)")
    p.add_argument("--s3-secret", default=None)
    p.add_argument("--workers", type=int, default=3, help="local: worker nodes")
    p.add_argument("--gpus", type=int, default=2, help="local: fake GPUs per worker node")
    p.add_argument("--gpus-per-group", type=int, default=2)
    p.add_argument("--groups", type=int, default=None, help="groups in the pool (default: as many as the GPUs fill)")
    p.add_argument("--engine", choices=["fake", "pipeline"], default="fake",
                   help="fake: tests/actors/fake_engine.py; pipeline: the real pipeline with the -tiny model")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per video")
    p.add_argument("--step-s", type=float, default=0.05, help="fake engine: seconds per step")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", default="32x32")
    p.add_argument("--max-pending", type=int, default=None, help="the ingress's queue bound (default: clients/2, at least the groups)")
    p.add_argument("--retry-after", type=int, default=1, help="the app's Retry-After (s) of a 429")
    p.add_argument("--poll-s", type=float, default=0.25, help="a client's poll interval")
    p.add_argument("--timeout-s", type=float, default=1200, help="the load's time limit (clients stop at it)")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--port", type=int, default=None, help="Serve's HTTP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--out", default=None, help="JSON record (default bench/results/load-<mode>-n<N>-c<C>.json)")
    a = p.parse_args(argv)
    if a.address and not a.s3_endpoint:
        p.error("--address needs --s3-endpoint (the videos go to a new versioned bucket there)")
    if a.address and a.local:
        p.error("--address and --local exclude each other")
    mode = "address" if a.address else "local"
    out = Path(a.out or ROOT / "bench" / "results" / f"load-{mode}-n{a.requests}-c{a.clients}.json")
    w, h = (int(x) for x in a.size.split("x"))
    body = {"model": MODEL, "prompt": PROMPT, "num_frames": a.frames, "size": a.size, "steps": a.steps,
            "pab": "off"}  # fmt: skip

    t_start = time.perf_counter()
    with Target(a) as target:
        t_ready = time.perf_counter()
        print(f"app up on {target.base} after {t_ready - t_start:.1f} s ({a.groups} groups of {a.gpus_per_group}); "
              f"bucket {target.bucket}", flush=True)  # fmt: skip
        warm = warm_up(target.base, a.groups, body, a.start_timeout_s)
        procs = serve_processes(APP)
        cpu0, http0, load0 = cpu_seconds(procs), http_requests(target.base), os.getloadavg()[0]
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        outcomes, wall = asyncio.run(run_clients(target.base, a.requests, a.clients, lambda i: {**body, "seed": i},
                                                 a.poll_s, a.timeout_s))  # fmt: skip
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1, http1, load1 = cpu_seconds(procs), http_requests(target.base), os.getloadavg()[0]
        if serve_processes(APP) != procs:
            print("warning: the ingress or proxy process changed during the load; its CPU figure is partial")
        records, versions, active = bucket_state(target.s3, target.bucket, PREFIX)

    accepted = [o.job_id for o in outcomes if o.job_id]
    rec: dict[str, Any] = {
        "bench": "load", "mode": mode, "clients": a.clients, **summarize(outcomes, records, wall, a.groups),
        "check": check_exactly_once(accepted, records, versions, active, set(warm)),
    }  # fmt: skip
    by_kind = {k: int(v - http0.get(k, 0)) for k, v in sorted(http1.items()) if v - http0.get(k, 0)}
    n_http = sum(by_kind.values())
    d_ing = cpu1["ingress"] - cpu0["ingress"]
    rec["cpu"] = {"http_requests": int(n_http), "http_by_kind": by_kind, "ingress_s": round(d_ing, 2),
                  "ingress_ms_per_request": round(1000 * d_ing / n_http, 2) if n_http else None,
                  "ingress_ms_per_video": round(1000 * d_ing / rec["completed"], 2) if rec["completed"] else None}
    # this process: the clients (and the Ray driver), on the same cores as the cluster
    rec["cpu"]["client_s"] = round(client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime, 2)
    if "proxy" in cpu0:
        d_proxy = cpu1["proxy"] - cpu0["proxy"]
        rec["cpu"].update(proxy_s=round(d_proxy, 2),
                          proxy_ms_per_request=round(1000 * d_proxy / n_http, 2) if n_http else None)
    rec["config"] = {"engine": a.engine, "model": MODEL, "steps": a.steps, "step_s": a.step_s if a.engine == "fake"
                     else None, "frames": a.frames, "size": a.size, "groups": a.groups, "gpus_per_group":
                     a.gpus_per_group, "max_pending": a.max_pending, "retry_after_s": a.retry_after,
                     "poll_s": a.poll_s, "timeout_s": a.timeout_s, "warm_up_videos": len(warm),
                     "width": w, "height": h}  # fmt: skip
    rec["cluster"] = target.machine
    rec["machine"] = f"cpu ({os.cpu_count()} cores, {platform.machine()}), loopback"
    rec["loadavg_1m"] = {"before": round(load0, 2), "after": round(load1, 2)}  # the whole machine, all of it
    rec["setup_s"] = round(t_ready - t_start, 1)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    rec["commit"] = rev.stdout.strip() or None
    rec["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(table(rec))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}")
    ok = rec["check"]["ok"] and rec["completed"] == rec["requests"]
    if not ok:
        print("FAILED: " + json.dumps({k: rec["check"][k] for k in ("lost", "rendered_twice", "unknown_records",
              "unknown_videos", "still_active")} | {"not_completed": rec["not_completed"]})[:2000])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
