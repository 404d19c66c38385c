"""`build_app(args)`: the Serve application (ingress + one deployment per GPU-group pool).

    serve run cluster.app:build_app model=latte-1-tiny output_dir=outputs
    serve run cluster.app:build_app config_file=app.yaml
    # Serve config / KubeRay RayService serveConfigV2:
    applications:
      - name: pab
        import_path: cluster.app:build_app
        args: {config_file: /etc/pab/app.yaml}

Each pool is a deployment whose replicas are GPU groups: `placement_group_bundles` reserves the
group's GPUs (STRICT_PACK, one node) per replica, `max_ongoing_requests=1` keeps one video per
group, and autoscaling between `min_groups` and `max_groups` follows the queued videos.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from actors.group import group_bundles
from cluster.config import AppConfig, load_config, pool_name
from cluster.groups import VideoGroup
from cluster.ingress import VideoAPI

DEFAULT_AUTOSCALING = {"target_ongoing_requests": 1, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}


def deployment_options(cfg: AppConfig) -> dict[str, dict[str, Any]]:
    """Serve options per pool deployment name (exposed so tests and `serve build` users can see them)."""
    out = {}
    for m in cfg.models:
        for p in m.groups:
            autoscaling = {**DEFAULT_AUTOSCALING, "min_replicas": p.min_groups, "max_replicas": p.max_groups}
            if p.initial_groups is not None:
                autoscaling["initial_replicas"] = p.initial_groups
            autoscaling.update(p.autoscaling)
            out[pool_name(m.name, p.gpus)] = dict(
                max_ongoing_requests=1,
                autoscaling_config=autoscaling,
                placement_group_bundles=group_bundles(p.gpus, cfg.gpus_per_rank, cfg.cpus_per_rank,
                                                      first_bundle_extra_cpus=cfg.group_replica_cpus,
                                                      resources=p.resources),
                placement_group_strategy=p.placement_strategy,
                ray_actor_options={"num_cpus": cfg.group_replica_cpus, "num_gpus": 0},
                health_check_period_s=cfg.health_check_period_s,
                health_check_timeout_s=cfg.health_check_timeout_s,
                graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
            )
    return out


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The whole app from `args` (see `cluster.config`)."""
    cfg = load_config(args)
    cfg_args = cfg.to_args()
    options = deployment_options(cfg)
    pools = {}
    for m in cfg.models:
        for p in m.groups:
            name = pool_name(m.name, p.gpus)
            pools[name] = serve.deployment(VideoGroup, name=name, **options[name]).bind(cfg_args, m.name, p.gpus)
    ingress = serve.deployment(
        serve.ingress()(VideoAPI),
        name="VideoAPI",
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_cpus, "resources": cfg.ingress_resources},
    )
    return ingress.bind(cfg_args, pools)
