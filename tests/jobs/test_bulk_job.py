"""End to end: a 20-row manifest (3 bad rows) rendered as Ray jobs into a real SeaweedFS S3 bucket.

Everything is real: `pab bulk submit` (jobs.cli) talks to a Ray job server, the job runs
`python -m jobs.render`, which starts GPU groups (actors.group.GpuGroup, fake GPUs) running the real
engine with a tiny model on CPU, and rank 0 writes mp4s and sidecars to S3.

The first run is killed with SIGKILL halfway; the second run (different group layout: one group of
two ranks, so DSP is on) must finish the job. "Nothing rendered twice" is proven from evidence the job
cannot fake: the bucket has versioning on, so every PUT of a video leaves a version, and each of the 17
videos must have exactly one. The videos that existed when the first run died must be byte-identical
(same version id and ETag) afterwards, and each sidecar names the run that rendered it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import cli
from pab.video import read_video

BUCKET = "bulk"
OUT = "out/batch1"
MODEL = "opensora-v1.2-tiny"
# Tiny but not instant (about 0.3-1 s a video on 2 shared cores), so a kill can land halfway.
RENDER = ["--model", MODEL, "--num-frames", "17", "--height", "48", "--width", "64", "--steps", "8", "--fps", "8",
          "--progress-every", "2", "--start-timeout", "300"]
KILL_AFTER_VIDEOS = 5


def manifest() -> tuple[bytes, dict[str, str]]:
    """20 rows: 17 good ones (a few with per-row overrides) and 3 bad ones, with the reason each is bad."""
    ids = [f"clip-{i:02d}" for i in range(17)]
    rows = [{"id": i, "prompt": f"a small animal number {n} in the snow", "num_frames": None, "seed": None,
             "steps": None} for n, i in enumerate(ids)]
    rows[3]["num_frames"] = 1  # a still image
    rows[4]["seed"] = 1234
    rows[5]["steps"] = 4
    bad = {
        "empty-prompt": "empty prompt",
        # the model's sampler cannot take 2..16 frames: the engine's own check says so while the job plans
        "five-frames": "the model cannot take it: num_frames: ",
        "clip-07": "duplicate id 'clip-07' (first at row",
    }
    rows.insert(6, {"id": "empty-prompt", "prompt": "   ", "num_frames": None, "seed": None, "steps": None})
    rows.insert(11, {"id": "five-frames", "prompt": "a cat", "num_frames": 5, "seed": None, "steps": None})
    rows.append({"id": "clip-07", "prompt": "the same id again", "num_frames": None, "seed": None, "steps": None})
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("num_frames", pa.int32()),
                        ("seed", pa.int64()), ("steps", pa.int32())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    assert len(rows) == 20
    return buf.getvalue(), bad


def video_versions(s3) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=f"{OUT}/videos/"):
        for v in page.get("Versions", []):
            if v["Key"].endswith(".mp4"):
                out.setdefault(v["Key"], []).append(v)
    return out


def mp4_count(s3) -> int:
    resp = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{OUT}/videos/")
    return sum(o["Key"].endswith(".mp4") for o in resp.get("Contents", []))


def rendered_ids(log: str) -> list[str]:
    return re.findall(r"rendered row=\d+ id='([^']+)'", log)


@pytest.mark.faults
@pytest.mark.slow
def test_bulk_render_killed_halfway_resumes_without_rendering_twice(s3_server, ray_jobs, capsys):
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    data, bad = manifest()
    s3.put_object(Bucket=BUCKET, Key="manifests/batch1.parquet", Body=data)
    args = ["--manifest", f"s3://{BUCKET}/manifests/batch1.parquet", "--output", f"s3://{BUCKET}/{OUT}",
            "--s3-endpoint", s3_server.endpoint, *RENDER]
    client = ray_jobs.client()

    # ---- run 1: two groups of one GPU, killed (SIGKILL of the driver) once a few videos exist.
    run1 = f"bulk-run1-{uuid.uuid4().hex[:6]}"
    assert cli.main(["submit", "--address", ray_jobs.address, "--submission-id", run1, "--no-wait", "--",
                     *args, "--groups", "2", "--group-size", "1"]) == 0
    deadline = time.monotonic() + 240
    pid = None
    while time.monotonic() < deadline:
        status = client.get_job_status(run1)
        assert not status.is_terminal(), f"run 1 ended before it could be killed:\n{client.get_job_logs(run1)}"
        if pid is None and (m := re.search(r"driver pid (\d+)", client.get_job_logs(run1))):
            pid = int(m.group(1))
        if pid is not None and mp4_count(s3) >= KILL_AFTER_VIDEOS:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"run 1 made no progress:\n{client.get_job_logs(run1)}")
    while not client.get_job_status(run1).is_terminal():
        time.sleep(0.5)
    assert client.get_job_status(run1).value == "FAILED"
    log1 = client.get_job_logs(run1)
    # The groups' rank actors die with their driver; give an in-flight upload time to land (or not).
    time.sleep(3)
    before = video_versions(s3)
    assert KILL_AFTER_VIDEOS <= len(before) < 17, f"kill was not halfway: {len(before)} videos"
    assert not any(o["Key"].endswith("results.parquet")
                   for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=OUT).get("Contents", []))
    run2_started = time.time()

    # ---- run 2: same manifest, one group of two GPUs (DSP), waits and streams the job log.
    run2 = f"bulk-run2-{uuid.uuid4().hex[:6]}"
    capsys.readouterr()
    rc = cli.main(["submit", "--address", ray_jobs.address, "--submission-id", run2, "--", *args,
                   "--groups", "1", "--group-size", "2"])
    streamed = capsys.readouterr()
    log2 = client.get_job_logs(run2)
    print(f"---- run 1 log (killed):\n{log1}\n---- run 2 log:\n{log2}")  # pytest shows them on failure
    assert rc == 0, log2
    assert "SUCCEEDED" in streamed.err and "progress: done 20/20" in streamed.out
    # The other `pab bulk` commands, against the same job server.
    for argv, expected in ((["status", run1], "FAILED"), (["status", run2], "SUCCEEDED"),
                           (["logs", run2], "results: s3://bulk/out/batch1/results.parquet (20 rows)"),
                           (["list"], run1), (["stop", run2], "not running")):
        assert cli.main([*argv, "--address", ray_jobs.address]) == 0
        assert expected in capsys.readouterr().out, argv
    for command in ("status", "stop", "logs"):  # an id the server does not know: one line, no traceback
        assert cli.main([command, "no-such-job", "--address", ray_jobs.address]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pab bulk {command}: ") and "no-such-job" in err and "pab bulk list" in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err

    # ---- 17 videos, each written exactly once; the ones from run 1 untouched.
    after = video_versions(s3)
    assert len(after) == 17
    assert {k: len(v) for k, v in after.items()} == {k: 1 for k in after}, "a video was written twice"
    for key, (v,) in before.items():
        (w,) = after[key]
        assert (w["VersionId"], w["ETag"]) == (v["VersionId"], v["ETag"])
        assert w["LastModified"].timestamp() < run2_started
    for key in set(after) - set(before):
        assert after[key][0]["LastModified"].timestamp() >= run2_started - 1

    # Who rendered what: the job logs and the sidecars agree, and no id was rendered by both runs.
    r1, r2 = rendered_ids(log1), rendered_ids(log2)
    assert len(r2) == len(set(r2)) and not set(r1) & set(r2)
    adopted = re.findall(r"adopted row=\d+ id='([^']+)'", log2)
    sidecar_runs = {}
    for key in after:
        sidecar = json.loads(s3.get_object(Bucket=BUCKET, Key=key[:-4] + ".json")["Body"].read())
        assert sidecar["state"] == "completed"
        sidecar_runs[sidecar["manifest_id"]] = sidecar["run_id"]
    assert {i for i, r in sidecar_runs.items() if r == run2} == set(r2)
    assert set(r1) <= {i for i, r in sidecar_runs.items() if r == run1}
    assert len(set(r1) | set(r2) | set(adopted)) <= 17 and set(sidecar_runs) == {f"clip-{i:02d}" for i in range(17)}
    n1 = len(before)
    assert f"20 rows, 3 bad, {n1} already rendered, {17 - n1} to render" in log2
    assert re.search(r"progress: done \d+/20 \(completed \d+, failed \d+, resumed \d+\), remaining \d+, "
                     r"[\d.]+ videos/min, ETA", log2)

    # ---- the results table: 20 rows, 17 completed with their videos, 3 failures explained.
    results = pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{OUT}/results.parquet")["Body"].read()))
    rows = results.to_pylist()
    assert [r["row"] for r in rows] == list(range(20))
    done = [r for r in rows if r["status"] == "completed"]
    failed = {r["id"]: r for r in rows if r["status"] == "failed"}
    assert len(done) == 17 and len(failed) == 3 and set(failed) == set(bad)
    for ident, reason in bad.items():
        assert reason in failed[ident]["error"], failed[ident]
    assert failed["clip-07"]["row"] == 19  # the later duplicate fails; the first clip-07 rendered
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{OUT}/videos/")["Contents"]}
    # per completed clip: the mp4, its sidecar and the two still images the API serves (thumbnail, spritesheet)
    parts = (".mp4", ".json", ".thumbnail.jpg", ".spritesheet.jpg")
    assert keys == {f"{OUT}/videos/{r['id']}{ext}" for r in done for ext in parts}  # no leftover intent of a failure
    assert {r["output_uri"] for r in done} == {f"s3://{BUCKET}/{k}" for k in after}
    resumed = {r["id"] for r in done if r["resumed"]}
    assert resumed == {i for i, r in sidecar_runs.items() if r == run1}
    assert all(r["seed"] is not None for r in done)
    assert next(r for r in done if r["id"] == "clip-04")["seed"] == 1234
    assert all(r["timings"] and r["render_s"] > 0 for r in done if not r["resumed"])

    # ---- the videos are real mp4s with the requested shapes.
    for r in done:
        frames, fps = read_video(s3.get_object(Bucket=BUCKET, Key=r["output_uri"].split("/", 3)[3])["Body"].read())
        assert frames.shape == ((1 if r["id"] == "clip-03" else 17), 48, 64, 3) and fps == 8


@pytest.mark.faults
@pytest.mark.slow
def test_a_group_no_node_can_hold_fails_every_row_with_the_reason(s3_server, ray_jobs, capsys):
    """On a running cluster (so no local check applies) a group of 4 GPUs, where no node has more than 2: the
    job ends once --start-timeout passes, non-zero, and results.parquet says why for every row (#19)."""
    s3 = s3_server.client()
    bucket = "never-" + uuid.uuid4().hex[:6]
    s3.create_bucket(Bucket=bucket)
    data, _ = manifest()
    s3.put_object(Bucket=bucket, Key="m.parquet", Body=data)
    run = f"bulk-never-{uuid.uuid4().hex[:6]}"
    args = ["--manifest", f"s3://{bucket}/m.parquet", "--output", f"s3://{bucket}/out", "--s3-endpoint",
            s3_server.endpoint, *RENDER[:-2], "--start-timeout", "15", "--group-size", "4"]  # fmt: skip
    t0 = time.monotonic()
    assert cli.main(["submit", "--address", ray_jobs.address, "--submission-id", run, "--", *args]) != 0
    assert time.monotonic() - t0 < 120
    said = capsys.readouterr().err  # the log was streamed; the end says how the job ended, not the whole log again
    assert said.strip() == f"job {run}: FAILED (Job entrypoint command failed with exit code 1)", said[-2000:]
    client = ray_jobs.client()
    assert client.get_job_status(run).value == "FAILED"
    log = client.get_job_logs(run)
    why = "no node of the cluster can hold the group: it needs 4 CPU and 4 GPU on one node, the largest node has"
    assert why in log, log  # said while waiting, not only at the end
    rows = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key="out/results.parquet")["Body"].read())).to_pylist()
    assert len(rows) == 20 and all(r["status"] == "failed" for r in rows)
    unrendered = [r for r in rows if r["error"].startswith("not rendered:")]
    assert len(unrendered) == 17 and all(why in r["error"] and "got no resources in 15s" in r["error"]
                                         for r in unrendered)  # fmt: skip
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="out/videos/").get("KeyCount")
