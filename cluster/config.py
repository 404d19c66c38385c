"""Configuration of the Serve app: models, their GPU-group pools, storage, queue, retries, auth.

`build_app(args)` takes this as a dict (the `args:` of a Serve config / RayService `serveConfigV2`,
or `serve run cluster.app:build_app config_file=app.yaml`). Example:

```yaml
models:
  - name: opensora-v1.2
    checkpoint: s3://models/opensora-v1.2
    groups:                              # pools of groups, by size
      - {gpus: 1, min_groups: 1, max_groups: 4, max_workload: 2000000}   # frames*height*width <= 2M
      - {gpus: 4, min_groups: 0, max_groups: 2}                          # everything bigger
storage: {backend: s3, endpoint_url: "http://seaweedfs:8333", bucket: videos, prefix: pab}
max_pending: 64
```
API keys come from `PAB_API_KEYS` (comma-separated) in the ingress's environment, plus `api_keys`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from pab.engine import EngineOptions
from pab.storage import StorageConfig


class PoolConfig(BaseModel):
    """A pool of identical GPU groups: one Serve deployment, one replica per group."""

    model_config = ConfigDict(extra="forbid")
    gpus: int = Field(1, ge=1, le=64, description="ranks (GPUs) per group")
    min_groups: int = Field(1, ge=0)
    max_groups: int = Field(1, ge=1)
    initial_groups: int | None = Field(None, ge=0)
    max_workload: int | None = Field(
        None, ge=1, description="route requests with num_frames*height*width up to this here (None: no limit)"
    )
    cfg_parallel: bool = Field(False, description="split the CFG halves over two halves of the group")
    autoscaling: dict[str, Any] = Field(default_factory=dict, description="Serve autoscaling_config overrides")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement of a group's bundles: STRICT_PACK keeps a group on one node (a "
        "group larger than every node waits, and says so); PACK lets it span nodes when none can hold it, DSP's "
        "all-to-alls then crossing the network",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources a group asks for (in its first bundle; STRICT_PACK "
        "keeps the group on that node), so it lands only on nodes that advertise them, e.g. the pods of one "
        "KubeRay worker group (rayStartParams.resources)",
    )

    @model_validator(mode="after")
    def _check(self) -> "PoolConfig":
        if self.min_groups > self.max_groups:
            raise ValueError(f"min_groups ({self.min_groups}) > max_groups ({self.max_groups})")
        if self.cfg_parallel and self.gpus % 2:
            raise ValueError("cfg_parallel needs an even number of gpus per group")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a model from `pab models`, e.g. opensora-v1.2 or latte-1-tiny")
    checkpoint: str | None = Field(None, description="local folder, s3://bucket/prefix or Hugging Face repo id (in "
                                   "the local cache); None = random weights (a -small model: its shipped ones)")
    vae: str | None = Field(None, description="the VAE's own source, in the same forms; None = the checkpoint's")
    text_encoder: str | None = Field(None, description="the text encoder's own source; None = the checkpoint's")
    dtype: str | None = None
    device: str = "auto"
    groups: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig()])
    engine: EngineOptions = Field(default_factory=EngineOptions)
    max_workload: int | None = Field(
        None, ge=1, description="refuse a request with num_frames*height*width above this with a 400 naming the "
        "limit (None: take any size the model can render; the largest pool gets what no pool's limit takes)",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.groups:
            raise ValueError(f"model {self.name} needs at least one group pool")
        sizes = [g.gpus for g in self.groups]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"model {self.name}: two pools with the same gpus per group")
        self.groups.sort(key=lambda g: g.gpus)
        return self


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig(name="opensora-v1.2-tiny")])
    storage: StorageConfig = Field(default_factory=StorageConfig.from_env)
    api_keys: list[SecretStr] = Field(default_factory=list, description="bearer tokens (plus PAB_API_KEYS)")
    auth: bool | None = Field(None, description="require a key; default: only when some key is configured")

    # Queue, retries, leases.
    max_pending: int = Field(64, ge=1, description="jobs accepted but not finished, per ingress replica")
    retry_after_s: int = Field(10, ge=1, description="Retry-After of a 429, and of a 503 while storage fails")
    max_attempts: int = Field(3, ge=1, description="tries on different groups before a job fails")
    max_storage_failures: int = Field(
        5, ge=1, description="renders lost because storage refused the result before a job fails (each waits "
        "until storage takes writes again)")
    retry_backoff_s: float = Field(1.0, ge=0)
    heartbeat_s: float = Field(5.0, gt=0, description="lease refresh period")
    stale_after_s: float = Field(60.0, gt=0, description="a lease this old means nobody holds the job")
    reconcile_interval_s: float = Field(5.0, gt=0)
    progress_interval_s: float = Field(0.5, ge=0, description="at most one progress write per this many seconds")
    cancel_poll_s: float = Field(0.5, gt=0)

    # Groups.
    gpus_per_rank: float = Field(1.0, ge=0)
    cpus_per_rank: float = Field(1.0, ge=0)
    group_replica_cpus: float = Field(0.5, ge=0, description="CPUs of the Serve replica driving a group")
    group_start_timeout_s: float = Field(900.0, gt=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(900.0, ge=0, description="let a running video finish on downscale")
    engine_factory: str | None = Field(None, description="'module:function' engine factory; None = pab.pipeline")
    cache_dir: str | None = None

    # Ingress.
    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.5, ge=0)
    ingress_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources of an ingress replica, to pin it to CPU nodes"
    )
    ingress_max_ongoing_requests: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        if not self.models:
            raise ValueError("configure at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in {names}")
        return self

    @property
    def default_model(self) -> str:
        return self.models[0].name

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_args(self) -> dict[str, Any]:
        """A plain dict that rebuilds this config in a replica (secrets included: never log it)."""
        d = self.model_dump(mode="json")
        d["storage"] = self.storage.to_args()
        d["api_keys"] = [k.get_secret_value() for k in self.api_keys]
        return d


def pool_name(model: str, gpus: int) -> str:
    """Deployment name of a pool, e.g. 'group-opensora-v1-2-tiny-2gpu'."""
    return f"group-{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}-{gpus}gpu"


def workload(request: dict[str, Any]) -> int:
    """What a resolved request asks of a group, num_frames*height*width: what pools and `max_workload` limit."""
    return request["num_frames"] * request["height"] * request["width"]


def route(model: ModelConfig, workload: int) -> PoolConfig:
    """The pool for a request of `workload` = num_frames*height*width: the smallest group that takes it.

    Pools are sorted by size; a pool without `max_workload` takes anything; a request bigger than
    every limit goes to the largest groups.
    """
    for pool in model.groups:
        if pool.max_workload is None or workload <= pool.max_workload:
            return pool
    return model.groups[-1]


def load_config(args: dict[str, Any] | None) -> AppConfig:
    """An AppConfig from Serve `args`: inline fields, and/or `config_file` naming a YAML file."""
    args = dict(args or {})
    base: dict[str, Any] = {}
    if "config_file" in args:
        import yaml

        base = yaml.safe_load(Path(args.pop("config_file")).read_text()) or {}
    # `serve run cluster.app:build_app model=latte-1-tiny` passes flat strings: a shortcut for one model.
    if "model" in args:
        base["models"] = [{"name": args.pop("model")}]
    if "output_dir" in args:
        base["storage"] = {"backend": "local", "path": args.pop("output_dir")}
    base.update(args)
    return AppConfig(**base)
