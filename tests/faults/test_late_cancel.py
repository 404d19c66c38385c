"""A cancel that lands after the last step: the cancellation wins, and what the render stored goes with it.

The real ingress and `VideoGroup.run` without Ray (the harness of test_storage_faults.py): the engine
finishes, the cancel marker is written before rank 0 stores the mp4, and the group sees it afterwards.
"""

from __future__ import annotations

from test_storage_faults import BODY, get, service, wait_for  # noqa: F401 - `service` is a fixture

from pab.storage import video_keys


def test_a_cancel_after_the_last_step_wins_and_leaves_no_video(service):  # noqa: F811
    client, svc, engine, folder = service
    engine.gate.set()
    plain, job_id = engine.generate, []

    def generate(request, progress, should_cancel):
        out = plain(request, progress, should_cancel)
        svc.jobs.request_cancel(job_id[0])  # too late to stop a step: rank 0 still encodes and stores
        return out

    engine.generate = generate
    job = client.post("/v1/videos", json=BODY).json()
    job_id.append(job["id"])
    final = wait_for(lambda: (lambda v: v if v["status"] in ("cancelled", "completed") else None)(
        get(client, job["id"])), what="the render to end")
    assert final["status"] == "cancelled" and engine.finished == 1, final
    assert not any((folder / key).exists() for key in video_keys(job["id"]))  # mp4 and sidecar
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409  # a cancelled video has none
