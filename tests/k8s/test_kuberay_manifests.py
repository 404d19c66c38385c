"""Offline checks of k8s/*.yaml and the Dockerfile: KubeRay v1.7.0 CRD schemas, Ray's Serve schema, real code.

No Kubernetes API server here, so `k8s/validate.py` validates each custom resource with jsonschema
against the CRD's own openAPIV3Schema (k8s/crds/*.yaml.gz, unmodified v1.7.0 copies) with unknown
fields rejected, and the embedded serveConfigV2 with `ray.serve.schema.ServeDeploySchema`. On top of
that these tests make sure the manifests point at code that exists and fit together: the Serve
import path builds the real app from the manifest's args, the RayJob entrypoint parses with the real
`jobs.render` command line, GPU groups fit the GPU pods, versions match the Dockerfile, and every
Secret the manifests reference is one docs/kubernetes.md tells you to create.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
sys.path.insert(0, str(K8S))

import validate  # noqa: E402  (k8s/validate.py)

MANIFESTS = {"ray-service.yaml": "RayService", "ray-job.bulk.yaml": "RayJob", "ray-cluster.yaml": "RayCluster"}
OTHERS = {"gpu-pdb.yaml": "PodDisruptionBudget"}  # built-in kinds that go with the RayService
KUSTOMIZATION = "kustomization.yaml"  # sets the image of the RayService (`kubectl apply -k k8s/`)


def load(name: str) -> dict:
    (doc,) = validate.load_documents(K8S / name)
    return doc


def cluster_spec(doc: dict) -> dict:
    return dict(validate.cluster_specs(doc))[
        {"RayCluster": "spec", "RayService": "spec.rayClusterConfig", "RayJob": "spec.rayClusterSpec"}[doc["kind"]]
    ]


def containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_pods(doc: dict) -> list[tuple[int, int, float, int]]:
    """(GPUs per pod, CPUs per pod, max pods) of every GPU worker group."""
    out = []
    for g in cluster_spec(doc).get("workerGroupSpecs", []):
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            out.append((int(limits["nvidia.com/gpu"]), float(limits["cpu"]), g.get("maxReplicas", g.get("replicas"))))
    return out


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# ----------------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_is_valid_for_the_kuberay_crd(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == MANIFESTS[name]
    assert validate.validate_document(doc) == []


def test_every_yaml_in_k8s_is_covered_and_crds_stay_gzipped():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*MANIFESTS, *OTHERS, KUSTOMIZATION])
    assert sorted(p.name for p in (K8S / "crds").iterdir() if p.suffix != ".txt") == [
        "ray.io_rayclusters.yaml.gz", "ray.io_rayjobs.yaml.gz", "ray.io_rayservices.yaml.gz"]
    # the command-line form too, as the docs run it (k8s/*.yaml, the kustomization included)
    assert validate.main([str(p) for p in sorted(K8S.glob("*.yaml"))]) == 0


def _set(doc: dict, path: str, value=None, rename: str | None = None) -> dict:
    """A copy of `doc` with the field at dotted `path` (list indexes as numbers) renamed or set."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if rename is not None:
        node[rename] = node.pop(last)
    else:
        node[last] = value
    return doc


# A misspelt field is what the API server silently prunes; here each one must be an error naming it.
TYPOS = [
    ("ray-job.bulk.yaml", "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish",
     "Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    ("ray-service.yaml", "spec.rayClusterConfig.enableInTreeAutoscaling", "enableInTreeAutoScaling",
     "'enableInTreeAutoScaling' was unexpected"),
    ("ray-cluster.yaml", "spec.workerGroupSpecs.0.maxReplicas", "maxReplica", "'maxReplica' was unexpected"),
    ("ray-service.yaml", "spec.rayClusterConfig.workerGroupSpecs.1.template.spec.containers.0.resources",
     "resource", "'resource' was unexpected"),
    ("ray-job.bulk.yaml", "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.env.2.valueFrom",
     "valuefrom", "'valuefrom' was unexpected"),
    ("ray-cluster.yaml", "metadata.labels", "label", "metadata.label: unknown ObjectMeta field"),
]


@pytest.mark.parametrize("name,path,typo,message", TYPOS, ids=[t[2] for t in TYPOS])
def test_a_misspelt_field_fails_validation(name, path, typo, message):
    errors = validate.validate_document(_set(load(name), path, rename=typo))
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("path,value,message", [
    ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0, "0 is not of type 'string'"),
    ("spec.rayClusterConfig.workerGroupSpecs.1.template.spec.containers.0.resources.limits.nvidia.com/gpu", "2x",
     "does not match"),
    ("spec.rayClusterConfig.rayVersion", 2.6, "2.6 is not of type 'string'"),
    ("metadata.name", "pab_service", "not a DNS-1035 label"),
    # Ray's documented escaped form: KubeRay v1.7 strips the quotes and fails on the backslashes.
    ("spec.rayClusterConfig.workerGroupSpecs.1.rayStartParams.resources", '"{\\"pab-gpu-1\\": 1}"',
     "KubeRay v1.7 cannot parse"),
])
def test_wrong_values_fail_validation(path, value, message):
    doc = copy.deepcopy(load("ray-service.yaml"))
    node = doc
    keys = re.split(r"\.(?!com/)", path)  # "nvidia.com/gpu" is one key
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = value
    errors = validate.validate_document(doc)
    assert any(message in e for e in errors), errors


def test_serve_config_is_validated_with_rays_own_schema():
    doc = load("ray-service.yaml")
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config(doc))  # what `serve deploy` and KubeRay's Serve accept
    bad = serve_config(doc)
    bad["applications"][0]["import_pth"] = bad["applications"][0].pop("import_path")
    bad_doc = _set(doc, "spec.serveConfigV2", yaml.safe_dump(bad))
    assert any("serveConfigV2.applications.0.import_path: Field required" in e
               for e in validate.validate_document(bad_doc))
    # Ray's schema ignores unknown keys; validate.py reports them (they would deploy as defaults).
    bad = serve_config(doc)
    bad["http_options"]["request_timeout"] = 10
    bad["applications"][0]["route_prefx"] = "/v2"
    errors = validate.validate_document(_set(doc, "spec.serveConfigV2", yaml.safe_dump(bad)))
    assert "spec.serveConfigV2.http_options.request_timeout: unknown field" in " ".join(errors)
    assert "spec.serveConfigV2.applications.0.route_prefx: unknown field" in " ".join(errors)
    bad = serve_config(doc)
    bad["http_options"]["port"] = "eighty"
    errors = validate.validate_document(_set(doc, "spec.serveConfigV2", yaml.safe_dump(bad)))
    assert any("http_options.port: Input should be a valid integer" in e for e in errors), errors


def test_controller_rules_the_schema_cannot_express():
    job = load("ray-job.bulk.yaml")
    assert any("ttlSecondsAfterFinished: needs shutdownAfterJobFinishes" in e
               for e in validate.validate_document(_set(job, "spec.shutdownAfterJobFinishes", False)))
    assert any("submissionMode" in e for e in validate.validate_document(_set(job, "spec.submissionMode", "K8sJob")))
    cluster = load("ray-cluster.yaml")
    assert any("minReplicas 5 > maxReplicas 4" in e
               for e in validate.validate_document(_set(cluster, "spec.workerGroupSpecs.0.minReplicas", 5)))


# ----------------------------------------------------------------------------------------------------
# The manifests point at real code and fit together


def test_serve_import_path_builds_the_real_app_from_the_manifest_args():
    doc = load("ray-service.yaml")
    (app_cfg,) = serve_config(doc)["applications"]
    module, _, attr = app_cfg["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    from cluster.app import build_app, deployment_options
    from cluster.config import load_config

    assert builder is build_app
    from ray.serve import Application

    assert isinstance(builder(app_cfg["args"]), Application)  # AppConfig accepts every arg (extra="forbid")
    with pytest.raises(Exception, match="max_group"):
        builder({**app_cfg["args"], "models": [{**app_cfg["args"]["models"][0],
                                                 "groups": [{"gpus": 1, "max_group": 2}]}]})
    # Every pool's group fits one GPU pod (STRICT_PACK), and all pools at their live max_replicas (the code's
    # options with the manifest's deployments[] overrides, as Serve applies them) fit the GPU pods.
    pods = gpu_pods(doc)
    options = deployment_options(load_config(app_cfg["args"]))
    effective = validate.effective_deployments(app_cfg)
    assert options and pods and set(options) < set(effective)
    demand = 0
    for name in options:
        bundles = effective[name].replica_config.placement_group_bundles
        auto = effective[name].deployment_config.autoscaling_config
        gpus, cpus = sum(b.get("GPU", 0) for b in bundles), sum(b.get("CPU", 0) for b in bundles)
        assert any(gpus <= g and cpus <= c for g, c, _ in pods), (name, bundles, pods)
        assert auto.max_replicas >= auto.min_replicas
        demand += gpus * auto.max_replicas
    assert demand <= sum(g * n for g, _, n in pods)
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    # Storage in the args is the S3 the pods' credentials are for; the API requires keys.
    assert app_cfg["args"]["storage"]["backend"] == "s3" and app_cfg["args"]["auth"] is True


def test_rayjob_entrypoint_runs_the_real_bulk_renderer_and_fits_the_cluster():
    doc = load("ray-job.bulk.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.render"]
    assert importlib.util.find_spec(argv[2]) is not None
    from jobs.render import parse_args

    args = parse_args(argv[3:])  # raises SystemExit on any unknown or bad option
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    from pab.models import get_spec

    get_spec(args.model)  # a model the engine knows
    pods = gpu_pods(doc)
    assert any(args.group_size <= g for g, _, _ in pods)
    assert args.groups * args.group_size <= sum(g * n for g, _, n in pods)
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert validate.runtime_env_errors(doc["spec"]["runtimeEnvYAML"]) == [] and "env_vars" in env


def test_versions_match_the_dockerfile_and_pyproject():
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    (docker_ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert ray_pin.endswith(f"=={docker_ray}") and docker_ray == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M)
    assert pyproject["project"]["requires-python"] == ">=3.11"
    for name in MANIFESTS:
        assert cluster_spec(load(name))["rayVersion"] == docker_ray


def test_dockerfile_copies_what_exists_and_imports_real_modules():
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        sources = [s for s in line.split()[:-1] if not s.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), src
    packages = set(re.findall(r"^COPY --chown=\S+ (\w+) \./\1$", dockerfile, re.M))
    assert packages == {"pab", "actors", "cluster", "jobs"}
    (check,) = re.findall(r'python -c "import ([\w., ]+)"$', dockerfile, re.M)
    for module in (m.strip() for m in check.split(",")):
        assert importlib.util.find_spec(module) is not None, module


def test_secrets_are_referenced_never_inlined_and_documented():
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    created = {}
    command = r"kubectl create secret generic (\S+)((?: \\\n\s*--from-literal=\S+| --from-literal=\S+)+)"
    for name, literals in re.findall(command, docs):
        created[name] = set(re.findall(r"--from-literal=([A-Za-z_][A-Za-z0-9_]*)=", literals))
    refs = set()
    for name in MANIFESTS:
        for c in containers(load(name)):
            for e in c.get("env", []):
                assert not re.search(r"(SECRET|KEY)", e["name"]) or "valueFrom" in e, f"{name}: {e['name']} inlined"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    for name in MANIFESTS:  # GCS fault tolerance's Redis password
        ref = cluster_spec(load(name)).get("gcsFaultToleranceOptions", {}).get("redisPassword", {})
        assert "value" not in ref, f"{name}: the Redis password is inlined"
        if "valueFrom" in ref:
            refs.add((ref["valueFrom"]["secretKeyRef"]["name"], ref["valueFrom"]["secretKeyRef"]["key"]))
        auth = cluster_spec(load(name)).get("authOptions", {})
        if auth.get("secretName"):  # KubeRay reads the token from this key (utils.RAY_AUTH_TOKEN_SECRET_KEY)
            refs.add((auth["secretName"], "auth_token"))
        # A missing Secret must stop the pod with an event naming it, not start it without the value.
        assert validate._optional_secret_refs(load(name), []) == [], name
    assert refs == {("pab-s3", "AWS_ACCESS_KEY_ID"), ("pab-s3", "AWS_SECRET_ACCESS_KEY"), ("pab-api-keys", "keys"),
                    ("pab-redis", "password"), ("pab-ray-token", "auth_token")}
    for secret, key in refs:
        assert key in created.get(secret, set()), f"docs/kubernetes.md does not create secret {secret} key {key}"
    # The variable the API keys land in is the one the ingress reads.
    assert "PAB_API_KEYS" in (REPO / "cluster" / "ingress.py").read_text()


# ----------------------------------------------------------------------------------------------------
# What a review against KubeRay v1.7.0's samples and controller asked for (#17 item 7)


def test_the_default_request_lands_on_a_warm_group():
    """The shipped routing sends a request at the model's defaults to a pool that keeps groups running, so
    the common case never waits for the autoscaler to add a GPU pod; bigger videos go to the larger groups."""
    from cluster.config import load_config, pool_name, route
    from pab.models import get_spec

    (app_cfg,) = serve_config(load("ray-service.yaml"))["applications"]
    live = validate.effective_deployments(app_cfg)  # min_replicas as Serve runs it (deployments[] overrides)
    for model in load_config(app_cfg["args"]).models:
        d = get_spec(model.name).defaults
        pool = route(model, d.num_frames * d.height * d.width)
        assert live[pool_name(model.name, pool.gpus)].deployment_config.autoscaling_config.min_replicas >= 1
        assert route(model, 102 * 720 * 1280).gpus > pool.gpus  # 720p 4 s: DSP on a larger group


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_shared_memory_is_kuberays_sized_to_the_pod(name):
    """KubeRay mounts /dev/shm sized to the container's memory limit unless one is mounted already; our own
    16Gi volume capped Ray's object store (30% of memory) at ~15 GiB on 128Gi pods."""
    for c in containers(load(name)):
        assert all(m["mountPath"] != "/dev/shm" for m in c.get("volumeMounts", [])), c["name"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_gpu_pods_ask_for_their_gpu_product(name):
    for g in cluster_spec(load(name)).get("workerGroupSpecs", []):
        spec = g["template"]["spec"]
        if "nvidia.com/gpu" in spec["containers"][0]["resources"]["limits"]:
            assert spec.get("nodeSelector", {}).get("nvidia.com/gpu.product"), g["groupName"]


def test_gpu_pods_outlive_serves_graceful_shutdown():
    """Serve waits graceful_shutdown_timeout_s for a group to finish its video; the pod must not be killed
    before that (Kubernetes' default grace period is 30 s)."""
    doc = load("ray-service.yaml")
    (app_cfg,) = serve_config(doc)["applications"]
    for g in cluster_spec(doc)["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        container = spec["containers"][0]
        if "nvidia.com/gpu" in container["resources"]["limits"]:
            # `ray start --block` drains the node on SIGTERM only this long (Ray's default 30 s), then kills the
            # group mid-video: longer than Serve's wait, inside the pod's grace period.
            env = {e["name"]: e.get("value") for e in container["env"]}
            drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
            assert app_cfg["args"]["graceful_shutdown_timeout_s"] < drain < spec["terminationGracePeriodSeconds"]


def test_the_rayjob_frees_its_gpus_and_never_waits_days_for_a_pod():
    spec = load("ray-job.bulk.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] <= 120
    assert spec["preRunningDeadlineSeconds"] <= 3600 < spec["activeDeadlineSeconds"]
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert "command" not in submitter  # KubeRay supplies `ray job submit ... -- <entrypoint>`
    limits = submitter["resources"]["limits"]
    cpu = limits["cpu"]
    assert "nvidia.com/gpu" not in limits and (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)) <= 1
    assert submitter["image"] == containers(load("ray-job.bulk.yaml"))[0]["image"]


def advertised(group: dict) -> dict[str, float]:
    """The custom Ray resources a worker group's pods start with: the group's `resources`, which KubeRay turns into
    `ray start --resources` and Ray's autoscaler reads (CPU, GPU and memory there are not custom)."""
    assert "resources" not in group.get("rayStartParams", {}), "KubeRay v1.7 cannot parse it: k8s/validate.py"
    return {k: float(v) for k, v in (group.get("resources") or {}).items() if k not in ("CPU", "GPU", "memory")}


def test_each_pool_has_its_own_worker_group_and_the_ingress_stays_on_cpu_pods():
    """A 2-GPU group needs both GPUs of one pod; 1-GPU groups spread over 2-GPU pods would strand it. Each pool
    asks (in its first bundle) for a resource only its own worker group advertises, one unit per pod."""
    from cluster.app import deployment_options
    from cluster.config import load_config, pool_name

    doc = load("ray-service.yaml")
    (app_cfg,) = serve_config(doc)["applications"]
    cfg = load_config(app_cfg["args"])
    groups = cluster_spec(doc)["workerGroupSpecs"]
    options = deployment_options(cfg)
    for model in cfg.models:
        for pool in model.groups:
            assert pool.resources, pool
            (first, *_) = options[pool_name(model.name, pool.gpus)]["placement_group_bundles"]
            assert all(first[k] == v for k, v in pool.resources.items())
            (owner,) = [g for g in groups if set(pool.resources) & set(advertised(g))]
            limits = owner["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == pool.gpus  # the pod is exactly one group
            assert all(advertised(owner)[k] == v for k, v in pool.resources.items())
            assert owner["maxReplicas"] >= pool.max_groups and owner["minReplicas"] <= pool.min_groups
    (home,) = [g for g in groups if set(cfg.ingress_resources) & set(advertised(g))]
    assert "nvidia.com/gpu" not in home["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_service_survives_a_head_restart_and_says_what_an_upgrade_needs():
    doc = load("ray-service.yaml")
    ft = cluster_spec(doc)["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    text = (K8S / "ray-service.yaml").read_text()
    assert "room for a second cluster" in text  # what NewCluster needs is said where it is chosen


# Serve settings that change often: deployments[] overrides, not args


def service_app() -> dict:
    (app_cfg,) = serve_config(load("ray-service.yaml"))["applications"]
    return app_cfg


def test_deployment_overrides_name_what_the_app_deploys():
    """Serve fails the whole app on an override for a deployment it does not build: the names must be the
    ones build_app gives (VideoAPI, and cluster.config.pool_name per pool), and each pool's bounds are there."""
    from cluster.config import load_config, pool_name

    app_cfg = service_app()
    cfg = load_config(app_cfg["args"])
    from_code = {"VideoAPI"} | {pool_name(m.name, p.gpus) for m in cfg.models for p in m.groups}
    built, _ = validate.built_deployments(app_cfg)  # Ray's own build of the real app from the manifest's args
    assert set(built) == from_code
    names = [o["name"] for o in app_cfg["deployments"]]
    assert len(names) == len(set(names)) and set(names) <= from_code
    overrides = {o["name"]: o for o in app_cfg["deployments"]}
    for m in cfg.models:
        for p in m.groups:
            auto = overrides[pool_name(m.name, p.gpus)]["autoscaling_config"]
            # /v1/models reports the args' bounds: the shipped manifest says the same in both places
            assert (auto["min_replicas"], auto["max_replicas"]) == (p.min_groups, p.max_groups)
    assert "ingress_replicas" not in app_cfg["args"] and "num_replicas" in overrides["VideoAPI"]


@pytest.mark.parametrize("edit,message", [
    (lambda ds: ds[1].update(name="group-opensora-v1.2-1gpu"),
     "'group-opensora-v1.2-1gpu' is not a deployment the app builds"),
    (lambda ds: ds[1]["autoscaling_config"].pop("target_ongoing_requests"),
     "replaces the code's whole config; add ['target_ongoing_requests']"),
    (lambda ds: ds[2]["autoscaling_config"].update(target_ongoing_requests=2),
     "target_ongoing_requests 2.0 > max_ongoing_requests 1, so autoscaling never adds a replica"),
])
def test_a_bad_deployment_override_fails_validation(edit, message):
    doc = load("ray-service.yaml")
    cfg = serve_config(doc)
    edit(cfg["applications"][0]["deployments"])
    errors = validate.validate_document(_set(doc, "spec.serveConfigV2", yaml.safe_dump(cfg)))
    assert any(message in e for e in errors), errors


def _versions(app_cfg: dict) -> dict:
    """Serve's DeploymentVersion per deployment, as its controller computes it for this application config."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve._private.version import DeploymentVersion
    from ray.serve.schema import ServeApplicationSchema

    code_version = get_app_code_version(ServeApplicationSchema.model_validate(app_cfg))
    out = {}
    for name, info in validate.effective_deployments(app_cfg, code_version).items():
        rc = info.replica_config
        out[name] = DeploymentVersion(info.version, deployment_config=info.deployment_config,
                                      ray_actor_options=rc.ray_actor_options,
                                      placement_group_bundles=rc.placement_group_bundles,
                                      placement_group_strategy=rc.placement_group_strategy,
                                      max_replicas_per_node=rc.max_replicas_per_node, route_prefix=info.route_prefix)
    return out


def test_override_edits_reach_running_groups_and_args_edits_restart_them():
    """Why the knobs are in deployments[]: Serve updates running replicas for an override edit, while the same
    change made through `args` changes the app's code version and restarts (reloads) every GPU group."""
    app_cfg = service_app()
    before = _versions(app_cfg)
    tuned = copy.deepcopy(app_cfg)
    for o in tuned["deployments"]:
        if "autoscaling_config" in o:
            o["autoscaling_config"].update(max_replicas=o["autoscaling_config"]["max_replicas"] + 1,
                                           downscale_delay_s=120, upscale_delay_s=10, look_back_period_s=60)
        else:
            o.update(num_replicas=o["num_replicas"] + 1, max_ongoing_requests=o["max_ongoing_requests"] * 2)
    after = _versions(tuned)
    groups = [n for n in before if n != "VideoAPI"]
    assert groups
    for name in before:
        assert before[name] != after[name], name  # the edit took effect...
        assert not before[name].requires_actor_restart(after[name]), name  # ...without a restart
    assert after[groups[0]].deployment_config.autoscaling_config.downscale_delay_s == 120
    assert after["VideoAPI"].deployment_config.max_ongoing_requests == 400
    through_args = copy.deepcopy(app_cfg)
    through_args["args"]["max_pending"] += 1
    restarted = _versions(through_args)
    assert all(before[n].requires_actor_restart(restarted[n]) for n in groups)


# The PodDisruptionBudget of the service's GPU pods


def kuberay_pod_labels(group: dict, cluster: str, node_type: str) -> dict[str, str]:
    """A Ray pod's labels as KubeRay v1.7.0 sets them (common/pod.go labelPod): its own, then the template's,
    which win except for ray.io/node-type, ray.io/group and ray.io/cluster."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group.get("groupName", "headgroup"), "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    fixed = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    mine = (group["template"].get("metadata") or {}).get("labels") or {}
    return labels | {k: v for k, v in mine.items() if k not in fixed}


def test_the_gpu_pdb_is_valid_and_a_budget_that_would_block_every_eviction_is_not():
    pdb = load("gpu-pdb.yaml")
    assert pdb["apiVersion"] == "policy/v1" and pdb["kind"] == "PodDisruptionBudget"
    assert validate.validate_document(pdb) == []
    def errors(doc):
        return " ".join(validate.validate_document(doc))
    assert "'minAvailble' was unexpected" in errors(_set(pdb, "spec.minAvailable", rename="minAvailble"))
    spec = {k: v for k, v in pdb["spec"].items() if k != "minAvailable"}
    for bad in ({"maxUnavailable": 1}, {"minAvailable": "50%"}):  # RayCluster has no scale subresource
        assert "use an integer minAvailable" in errors(_set(pdb, "spec", {**spec, **bad}))
    assert "mutually exclusive" in errors(_set(pdb, "spec", {**pdb["spec"], "maxUnavailable": 1}))
    assert "covers every pod" in errors(_set(pdb, "spec.selector", {}))
    assert "is not one of" in errors(_set(pdb, "spec.unhealthyPodEvictionPolicy", "Always"))


def test_the_gpu_pdb_covers_the_services_gpu_pods_and_nothing_else():
    """Selected: every GPU pod of the RayService, whatever its RayCluster is called (an upgrade makes a new one);
    not its head or CPU pods, nor the RayJob's or the dev cluster's. At least one GPU pod stays Ready, and a drain
    can go on as soon as one more is (minAvailable within the warm minimum)."""
    selector = load("gpu-pdb.yaml")["spec"]["selector"]["matchLabels"]
    assert selector and not any(k.startswith("ray.io/") for k in selector)
    covered = []
    for name in MANIFESTS:
        spec = cluster_spec(load(name))
        groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec.get("workerGroupSpecs", [])]
        for node_type, group in groups:
            for cluster in (f"{name.split('.')[0]}-abcde", f"{name.split('.')[0]}-fghij"):
                labels = kuberay_pod_labels(group, cluster, node_type)
                gpu = "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
                selected = all(labels.get(k) == v for k, v in selector.items())
                assert selected == (name == "ray-service.yaml" and gpu), (name, group.get("groupName"))
                covered += [group.get("groupName")] if selected else []
    assert sorted(set(covered)) == ["gpu-1", "gpu-2"]
    warm = sum(g["minReplicas"] for g in cluster_spec(load("ray-service.yaml"))["workerGroupSpecs"]
               if g.get("groupName") in covered)
    assert 1 <= load("gpu-pdb.yaml")["spec"]["minAvailable"] <= warm


# The image: a kustomize images: override, pinned


def rendered_images(directory: Path) -> set[str]:
    return {c["image"] for d in validate.render_kustomization(directory) for c in validate.pod_containers(d)}


def test_the_service_image_comes_from_the_kustomization_pinned_and_the_others_match_it():
    """`kubectl apply -k k8s/` gives every container of the RayService the kustomization's image, pinned by a
    release tag or a digest; the RayJob and the dev cluster (applied on their own) name the same image."""
    k = validate.load_kustomization(K8S)
    assert set(k["resources"]) == {"ray-service.yaml", *OTHERS}
    assert validate.kustomization_errors(K8S) == []
    (rule,) = k["images"]
    raw = {c["image"] for c in containers(load("ray-service.yaml"))}
    assert raw == {rule["name"]}  # a name for kustomize to replace, not an image anyone could pull
    (image,) = rendered_images(K8S)
    assert validate.image_errors(image) == [] and validate.split_image(image)[0] != rule["name"]
    for name in ("ray-job.bulk.yaml", "ray-cluster.yaml"):
        assert {c["image"] for c in validate.pod_containers(load(name))} == {image}, name
    # the RayJob's submitter pod (a container list of its own) is covered by the same rule
    assert load("ray-job.bulk.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_validate_renders_the_kustomization_as_kubectl_does(tmp_path):
    for p in K8S.glob("*.yaml"):
        shutil.copy(p, tmp_path / p.name)
    k = validate.load_kustomization(tmp_path)
    k["images"][0].update(newName="reg.internal:5000/team/pab", digest="sha256:" + "ab" * 32)
    (tmp_path / KUSTOMIZATION).write_text(yaml.safe_dump(k))
    for directory in (K8S, tmp_path):
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
        def key(d):
            return d["kind"], d["metadata"]["name"]
        assert sorted(validate.render_kustomization(directory), key=key) == sorted(
            (d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    assert rendered_images(tmp_path) == {"reg.internal:5000/team/pab:0.1.0@sha256:" + "ab" * 32}


@pytest.mark.parametrize("image,ok", [
    ("registry.example.com/pab/pab-cluster:0.1.0", True),
    ("reg:5000/pab/pab-cluster:v1.2.3-rc.1", True),
    ("pab@sha256:" + "0" * 64, True),
    ("pab:latest", False),
    ("reg:5000/pab", False),  # no tag at all means latest; the port is not a tag
    ("pab:main", False),
    ("pab@sha256:abc", False),
])
def test_an_image_must_be_pinned(image, ok):
    assert (validate.image_errors(image) == []) is ok


@pytest.mark.parametrize("edit,message", [
    (lambda k: k["images"][0].update(newTag="latest"), "not pinned"),
    (lambda k: k["images"][0].update(name="pab"), "image 'pab-cluster' is not set by images:"),
    (lambda k: k.update(namePrefix="x-"), "namePrefix: not rendered by validate.py"),
    (lambda k: k["resources"].append("../ray-job.bulk.yaml"), "is not a file in"),
])
def test_a_bad_kustomization_fails_validation(tmp_path, edit, message):
    for p in K8S.glob("*.yaml"):
        shutil.copy(p, tmp_path / p.name)
    k = validate.load_kustomization(tmp_path)
    edit(k)
    (tmp_path / KUSTOMIZATION).write_text(yaml.safe_dump(k))
    errors = validate.validate_file(tmp_path / KUSTOMIZATION)
    assert any(message in e for e in errors), errors


def test_an_unpinned_image_in_a_manifest_applied_on_its_own_fails_validation(tmp_path):
    doc = load("ray-job.bulk.yaml")
    node = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    node["image"] = validate.split_image(node["image"])[0] + ":latest"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert any("not pinned" in e for e in validate.validate_file(tmp_path / "job.yaml"))


# Secrets and the dashboard / job API


def test_an_optional_secret_reference_fails_validation():
    doc = load("ray-service.yaml")
    path = "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.env"
    env = copy.deepcopy(_get(doc, path))
    for e in env:
        if "valueFrom" in e:
            e["valueFrom"]["secretKeyRef"]["optional"] = True
            break
    errors = validate.validate_document(_set(doc, path, env))
    assert any("optional Secret reference" in e and ".env." in e for e in errors), errors


def _get(doc: dict, path: str):
    node = doc
    for p in path.split("."):
        node = node[int(p)] if p.isdigit() else node[p]
    return node


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_the_dashboard_job_api_and_gcs_need_ray_s_token(name):
    """KubeRay's authOptions token mode: RAY_AUTH_MODE=token and the token on every Ray container (and the
    RayJob's submitter), checked by the dashboard, the job API and GCS. Only an explicit mode turns it on."""
    doc = load(name)
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token" and not spec["authOptions"].get("enableK8sTokenAuth")
    base = {"RayService": "spec.rayClusterConfig", "RayJob": "spec.rayClusterSpec", "RayCluster": "spec"}[doc["kind"]]
    def errors(d):
        return " ".join(validate.validate_document(d))
    no_mode = {k: v for k, v in spec["authOptions"].items() if k != "mode"} or {"secretName": "x"}
    assert "authOptions.mode: unset, so no authentication" in errors(_set(doc, f"{base}.authOptions", no_mode))
    assert "needs rayVersion 2.52.0 or later" in errors(_set(doc, f"{base}.rayVersion", "2.51.0"))
    k8s_auth = _set(doc, f"{base}.authOptions.enableK8sTokenAuth", True)
    assert ("not supported for a" in errors(k8s_auth)) is (doc["kind"] != "RayCluster")
    assert "is not one of ['disabled', 'token']" in errors(_set(doc, f"{base}.authOptions.mode", "Token"))


def test_the_service_token_is_a_secret_of_ours_and_kuberay_makes_the_others():
    """The service's token survives upgrades (a Secret we create, docs/kubernetes.md); the RayJob's short-lived
    cluster and the dev cluster get one made by KubeRay (a Secret named after the RayCluster)."""
    assert cluster_spec(load("ray-service.yaml"))["authOptions"]["secretName"] == "pab-ray-token"
    assert "secretName" not in cluster_spec(load("ray-job.bulk.yaml"))["authOptions"]
    assert "secretName" not in cluster_spec(load("ray-cluster.yaml"))["authOptions"]
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert "kubectl get secret pab-dev -o jsonpath='{.data.auth_token}'" in docs  # how a client gets it


# The docs: waiting for Ready, and the autoscaling knobs next to the manifests

# Condition types of KubeRay v1.7.0 (apis/ray/v1: rayservice_types.go, raycluster_types.go); the RayJob has
# none to wait on, only status fields.
CONDITIONS = {"RayService": {"Ready", "UpgradeInProgress", "RollbackInProgress", "Suspending", "Suspended"},
              "RayCluster": {"RayClusterProvisioned", "HeadPodReady", "ReplicaFailure", "RayClusterSuspending",
                             "RayClusterSuspended"},
              "RayJob": set()}
DOCS = [REPO / "docs" / "kubernetes.md", K8S / "README.md"]


def test_the_docs_wait_for_ready_on_what_the_manifests_create():
    """Every `kubectl wait` in the docs names a resource the manifests create and a condition KubeRay sets
    (or a status field its CRD has): a typo there waits out its whole timeout and then fails."""
    names = {(load(n)["kind"].lower(), load(n)["metadata"]["name"]): load(n)["kind"] for n in MANIFESTS}
    waits = [w for d in DOCS for w in re.findall(r"kubectl wait (--for=\S+) (\w+)/([\w-]+)", d.read_text())]
    assert ("--for=condition=Ready", "rayservice", "pab") in waits
    for for_, kind, name in waits:
        assert (kind, name) in names, (kind, name)
        if for_.startswith("--for=condition="):
            condition = for_.removeprefix("--for=condition=").split("=")[0]
            assert condition in CONDITIONS[names[kind, name]], for_
        else:
            (field,) = re.findall(r"--for=jsonpath='\{\.status\.(\w+)\}'=\w+", for_)
            status = validate.crd_schema(names[kind, name])["properties"]["status"]["properties"]
            assert field in status, for_
    assert sum(1 for d in DOCS for _ in re.finditer("kubectl wait --for=condition=Ready rayservice/pab",
                                                     d.read_text())) == 2  # the guide and k8s/README.md


def knob_rows(text: str) -> dict[str, str]:
    """`| `knob` | value | ... |` table rows of k8s/README.md."""
    return dict(re.findall(r"^\| `(\w+)`(?: / `\w+`)? \| ([^|]+) \|", text, re.M))


def test_the_autoscaling_knobs_are_documented_next_to_the_manifests_with_their_values():
    """k8s/README.md's tables say what the manifests set, read back the way Ray reads them: Serve's options via
    its own override code, the Ray autoscaler's via the config it derives from the RayCluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from cluster.config import load_config, pool_name

    text = (K8S / "README.md").read_text()
    rows = knob_rows(text)
    app_cfg = service_app()
    live = validate.effective_deployments(app_cfg)
    set_in_manifest = {k for o in app_cfg["deployments"] for k in o.get("autoscaling_config", {})}
    assert set_in_manifest - {"max_replicas"} <= set(rows)  # every knob the manifest sets is there
    bounds = {int(g): (int(lo), int(hi)) for lo, hi, g in re.findall(r"(\d+) / (\d+) \((\d+)-GPU\)",
                                                                     rows["min_replicas"])}
    cfg = load_config(app_cfg["args"])
    pools = [(m.name, p.gpus) for m in cfg.models for p in m.groups]
    assert sorted(bounds) == sorted(g for _, g in pools)
    for model, gpus in pools:
        auto = live[pool_name(model, gpus)].deployment_config.autoscaling_config
        for knob in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s", "upscale_delay_s",
                     "downscale_delay_s"):
            assert float(rows[knob]) == getattr(auto, knob), knob
        assert (auto.min_replicas, auto.max_replicas) == bounds[gpus]
        assert auto.downscale_to_zero_delay_s is None  # "unset", as the table says
    spec = cluster_spec(load("ray-service.yaml"))
    ray_cfg = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "pab-abcde", "namespace": "default"},
                                                      "spec": spec})
    assert float(rows["upscaling_speed"]) == ray_cfg["upscaling_speed"]
    assert float(rows["idle_timeout_s"]) == ray_cfg["idle_timeout_minutes"] * 60
    assert all("idle_timeout_s" not in t for t in ray_cfg["available_node_types"].values())  # no per-group one
    documented = {g: int(n) for n, g in re.findall(r"(\d+) \(`([\w-]+)`\)", rows["max_workers"])}
    assert documented == {g: t["max_workers"] for g, t in ray_cfg["available_node_types"].items() if t["max_workers"]}
    (grace,) = re.findall(r"`graceful_shutdown_timeout_s` (\d+)", text)
    (term,) = re.findall(r"`terminationGracePeriodSeconds` (\d+)", text)
    assert int(grace) == app_cfg["args"]["graceful_shutdown_timeout_s"]
    assert {int(term)} == {g["template"]["spec"].get("terminationGracePeriodSeconds")
                           for g in spec["workerGroupSpecs"] if g["groupName"].startswith("gpu")}
