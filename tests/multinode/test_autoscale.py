"""The Ray autoscaler adding GPU nodes for a burst and removing them when idle (#17 item 4).

Its own cluster (tests/multinode/autoscaling.py): a head started by `ray start --autoscaling-config`, the real
Ray autoscaler (v2) with Ray's fake multi-node provider, worker node types read from k8s/ray-service.yaml's GPU
worker groups (`gpu-1`: 1 GPU + `pab-gpu-1`, `gpu-2`: 2 GPUs + `pab-gpu-2`), 0 nodes of each at the start.
The Serve app has one pool of 1-GPU groups, 0 to 2 groups, asking for `pab-gpu-1` as the manifest's pool does;
the engine is the real one (opensora-v1.2-tiny, random weights), the storage SeaweedFS S3.

Checked: the burst is accepted; Serve asks for groups, and the autoscaler answers each with a `gpu-1` node (never
a `gpu-2` one); two groups run at the peak; every video completes on its first try and is in the bucket; after
the last video Serve removes the groups, and the idle timeout later the autoscaler removes the nodes, back to 0.
The times (from the burst to the first group ready, to the queue drained, to the nodes gone) are printed and
written to bench/out/autoscale-test.json; `python tests/multinode/autoscaling.py` records them in bench/results.

It runs before the folder's other tests (their cluster is started on first use) and stops its own cluster,
never another Ray on the machine.
"""

from __future__ import annotations

import json

import pytest
from autoscaling import REPO, scenario

IDLE_TIMEOUT_S = 15.0
REQUESTS = 8


def _leave_other_ray() -> None:
    """This process drives one Ray at a time: leave the session's single-node one (its fixtures start it again)."""
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_burst_from_zero_gpu_nodes_scales_out_drains_and_scales_back_to_zero():
    _leave_other_ray()
    out = REPO / "bench" / "out" / "autoscale-test.json"
    rec = scenario(requests=REQUESTS, max_groups=2, idle_timeout_s=IDLE_TIMEOUT_S, out=out)
    ev = rec["events_s"]
    print("\nautoscale:", json.dumps({k: rec[k] for k in ("events_s", "peak_gpu_nodes", "peak_groups", "nodes")}))

    # The burst was accepted and every video completed once, on its first try, stored in S3.
    assert rec["post_codes"] == [200] * REQUESTS
    assert rec["failed"] == 0, rec["statuses"]
    assert rec["attempts"] == [0] * REQUESTS  # no try lost to a group that failed
    assert rec["videos_stored"] == REQUESTS

    # Scale-out: from 0 GPU nodes, the autoscaler started gpu-1 nodes only (the pool asks for pab-gpu-1), one
    # per group, and Serve ran two groups at the peak.
    assert rec["peak_gpu_nodes"] >= 2 and rec["peak_groups"] == 2, rec
    assert len(rec["groups_used"]) == 2, rec["groups_used"]  # the second group took videos off the queue
    assert {n["type"] for n in rec["nodes"]} == {"gpu-1"}, rec["nodes"]
    launched = [e for e in rec["autoscaler_events"] if e.startswith("Adding")]
    assert launched and all("gpu-1" in e for e in launched), rec["autoscaler_events"]

    # The order of events, every one of them seen within the scenario's time limit.
    assert {"first_node_s", "first_group_ready_s", "second_node_s", "second_group_ready_s", "queue_drained_s",
            "groups_zero_s", "nodes_zero_s"} <= set(ev), ev
    assert ev["first_node_s"] <= ev["first_group_ready_s"] <= ev["queue_drained_s"]
    assert ev["second_node_s"] <= ev["second_group_ready_s"] <= ev["queue_drained_s"]
    assert ev["queue_drained_s"] <= ev["groups_zero_s"] <= ev["nodes_zero_s"]

    # Scale-down: Serve removed the groups, then every node went after it had been idle for the timeout (the
    # autoscaler's own log says "idle"), and not before.
    removed = [e for e in rec["autoscaler_events"] if e.startswith("Removing")]
    assert sum(int(e.split()[1]) for e in removed) == len(rec["nodes"]) and all("(idle)" in e for e in removed)
    assert all(n["down_s"] is not None for n in rec["nodes"])
    assert ev["nodes_zero_s"] - ev["groups_zero_s"] >= IDLE_TIMEOUT_S - 3.0, ev
