"""App config, routing by size, request schema and the job store's paging (no Ray needed)."""

from __future__ import annotations

import time

import pytest
import yaml
from pydantic import ValidationError

from cluster.api import VideoCreate
from cluster.app import deployment_options
from cluster.config import AppConfig, load_config, pool_name, route
from cluster.jobs import JobRecord, JobStore, new_job_id
from pab.storage import storage_from_config

APP_YAML = """
models:
  - name: opensora-v1.2
    checkpoint: s3://models/opensora-v1.2
    groups:
      - {gpus: 4, min_groups: 0, max_groups: 2}
      - {gpus: 1, min_groups: 1, max_groups: 4, max_workload: 2000000}
storage: {backend: s3, endpoint_url: "http://seaweedfs:8333", bucket: videos, prefix: pab}
max_pending: 32
"""


def test_config_file_routing_and_deployment_options(tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text(APP_YAML)
    cfg = load_config({"config_file": str(f), "max_attempts": "2"})  # `serve run` passes strings
    assert cfg.max_attempts == 2 and cfg.max_pending == 32 and cfg.storage.bucket == "videos"
    m = cfg.model("opensora-v1.2")
    assert [p.gpus for p in m.groups] == [1, 4]  # sorted by size
    assert route(m, 51 * 480 * 80).gpus == 1 and route(m, 51 * 480 * 854).gpus == 4
    opts = deployment_options(cfg)[pool_name("opensora-v1.2", 4)]
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["max_ongoing_requests"] == 1
    assert opts["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 1.5}] + [{"GPU": 1.0, "CPU": 1.0}] * 3
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 2
    assert load_config({"model": "latte-1-tiny", "output_dir": str(tmp_path)}).models[0].name == "latte-1-tiny"
    with pytest.raises(ValidationError, match="min_groups"):
        AppConfig(models=[{"name": "x", "groups": [{"gpus": 1, "min_groups": 3, "max_groups": 2}]}])
    with pytest.raises(ValidationError):
        AppConfig(models=[{"name": "x", "groups": [{"gpus": 1, "typo": 1}]}])
    # A pool that may span nodes says so (#17): its replicas' placement groups are PACK, not STRICT_PACK.
    spread = AppConfig(models=[{"name": "x", "groups": [{"gpus": 4, "placement_strategy": "PACK"}]}])
    assert deployment_options(spread)[pool_name("x", 4)]["placement_group_strategy"] == "PACK"
    with pytest.raises(ValidationError, match="placement_strategy"):
        AppConfig(models=[{"name": "x", "groups": [{"gpus": 4, "placement_strategy": "ANYWHERE"}]}])


def test_engine_options_are_typed_and_default_as_measured():
    """A model's `engine` switches (Pipeline.from_name's) reach its groups; a misspelt one is refused by name."""
    cfg = AppConfig(models=[{"name": "x"}, {"name": "y", "engine": {"cuda_graphs": True, "vae_kernels": False}}])
    assert cfg.model("x").engine.changed() == {} and cfg.model("x").engine.vae_kernels
    assert cfg.model("y").engine.changed() == {"cuda_graphs": True, "vae_kernels": False}
    with pytest.raises(ValidationError, match=r"engine\.cuda_graph\s"):
        AppConfig(models=[{"name": "x", "engine": {"cuda_graph": True}}])


def test_serve_config_for_kuberay_validates():
    """The serveConfigV2 shape documented in docs/serving.md passes Serve's own schema."""
    from ray.serve.schema import ServeDeploySchema

    doc = {"applications": [{"name": "pab", "route_prefix": "/", "import_path": "cluster.app:build_app",
                             "args": {"config_file": "/etc/pab/app.yaml"}}]}
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(doc)))


def test_request_schema():
    r = VideoCreate(prompt="p", size="1280x720", seconds="4")
    assert r.seconds == 4.0 and r.engine_request("m")["width"] == 1280 and r.engine_request("m")["height"] == 720
    assert r.engine_request("m")["pab"] == "off"
    p = VideoCreate(prompt="p", pab={"spatial": {"range": 2, "window": [100, 800]}}).engine_request("m")["pab"]
    assert p == {"spatial": {"range": 2, "window": (100.0, 800.0)}}
    for bad in ({"prompt": "p", "size": "1280*720"}, {"prompt": "p", "size": "8x8"}, {"prompt": ""},
                {"prompt": "p", "num_frames": 4, "seconds": 1}, {"prompt": "p", "size": "64x64", "width": 64},
                {"prompt": "p", "pab": "../x.json"}, {"prompt": "p", "seed": 2**31 - 1}, {"prompt": "p", "pab": {"spatial": {"range": 2, "window": [9, 1]}}}):
        with pytest.raises(ValidationError):
            VideoCreate(**bad)


def test_job_store_paging(tmp_path):
    jobs = JobStore(storage_from_config({"backend": "local", "path": str(tmp_path)}))
    ids = []
    for i in range(5):
        rec = JobRecord(id=new_job_id(), model="m", status="queued", created_at=time.time(), prompt=str(i),
                        seconds="1", size="1x1", request={}, seed=i, pool="p")
        jobs.create(rec)
        ids.append(rec.id)
        time.sleep(0.002)  # ids are millisecond-ordered
    assert ids == sorted(ids) and jobs.active_ids() == ids
    page, more = jobs.list(limit=2)
    assert [r.id for r in page] == ids[::-1][:2] and more
    page, more = jobs.list(limit=2, after=page[-1].id)
    assert [r.id for r in page] == ids[::-1][2:4] and more
    page, more = jobs.list(limit=10, order="asc", after=ids[1])
    assert [r.id for r in page] == ids[2:] and not more
    rec = jobs.get(ids[0])
    rec.status = "completed"
    jobs.save(rec)
    assert ids[0] not in jobs.active_ids()
    jobs.request_cancel(ids[1])
    assert jobs.cancel_requested(ids[1]) and not jobs.cancel_requested(ids[2])
    jobs.touch(ids[2], "me")
    assert jobs.lease(ids[2])["owner"] == "me" and jobs.lease(ids[3]) is None
    with pytest.raises(KeyError):
        jobs.get("../../etc/passwd")
