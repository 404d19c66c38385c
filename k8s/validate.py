"""Offline validation of our KubeRay manifests against the KubeRay v1.7.0 CRD schemas.

No API server is needed: each CRD's ``openAPIV3Schema`` (from ``k8s/crds/*.yaml.gz``, unmodified
upstream copies, see ``k8s/crds/SOURCE.txt``) is used as a JSON schema. Two adjustments make jsonschema
judge a manifest the way the API server does, and catch what the API server would silently drop:

1. Schema ``default``s are applied and ``null``s dropped before validation (the API server defaults
   first; otherwise e.g. ``minReplicas``, which the CRD marks both required and defaulted, falsely fails).
2. ``additionalProperties: false`` is added to every object schema that lists ``properties`` and does not
   carry ``x-kubernetes-preserve-unknown-fields``. The API server *prunes* unknown fields without an
   error, so a misspelt ``shutdownAfterJobFinish`` would deploy and be ignored; here it is an error.

On top of the schema: ``metadata`` (opaque in CRDs) is checked for known ObjectMeta keys and a valid
name, ``serveConfigV2`` (an opaque string to Kubernetes) is validated with Ray's own
``ray.serve.schema.ServeDeploySchema``, its ``deployments[]`` overrides are checked against the deployments
the application really builds (its builder run on its ``args`` and the overrides applied by Serve's own code,
see ``serve_override_errors``), ``runtimeEnvYAML`` must parse, and a few controller-side rules
(``ray-operator/controllers/ray/utils/validation.go``) that no schema expresses are checked.
The PodDisruptionBudget next to them is checked against a closed policy/v1 schema (``core_schema``).
``kustomization.yaml`` is rendered as ``kubectl kustomize`` renders it (``render_kustomization``): its
``images:`` must reach every container of its resources and pin each image (a release tag or a digest), as
must every image a manifest applied on its own names. Secret references must not be ``optional``.
Not covered: CEL ``x-kubernetes-validations`` and ``format: int32`` ranges.

Usage::

    python k8s/validate.py k8s/*.yaml        # exit 1 and one line per problem if anything is wrong
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml.gz",
    "RayJob": "ray.io_rayjobs.yaml.gz",
    "RayService": "ray.io_rayservices.yaml.gz",
}
# Longest names the operator accepts: it derives Service/Job names from them (KubeRay validation.go).
MAX_NAME_LEN = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations", "generateName"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


# ----------------------------------------------------------------------------------------------------
# Schema loading
# ----------------------------------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict:
    """The strict ``openAPIV3Schema`` of ``kind`` at ``version`` (see the module docstring)."""
    if kind not in CRD_FILES:
        raise KeyError(f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    with gzip.open(CRD_DIR / CRD_FILES[kind], "rt") as f:
        crd = yaml.safe_load(f)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _close_objects(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    raise KeyError(f"CRD {kind} has no version {version!r}")


def _label_selector_schema() -> dict:
    """``metav1.LabelSelector`` as the KubeRay CRDs embed it (in pod affinity terms)."""
    spec = crd_schema("RayCluster")["properties"]["spec"]["properties"]
    affinity = spec["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]["affinity"]
    term = affinity["properties"]["podAffinity"]["properties"]["preferredDuringSchedulingIgnoredDuringExecution"]
    return copy.deepcopy(term["items"]["properties"]["podAffinityTerm"]["properties"]["labelSelector"])


# Built-in kinds that go with the custom resources. No CRD describes them; these schemas are written from the
# Kubernetes API reference (policy/v1, all fields), closed like the CRD schemas so a misspelt field is an error.
_INT_OR_PERCENT = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}]}


@functools.cache
def core_schema(api: str, kind: str) -> dict:
    if (api, kind) == ("policy/v1", "PodDisruptionBudget"):
        spec = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "minAvailable": _INT_OR_PERCENT,
                "maxUnavailable": _INT_OR_PERCENT,
                "selector": _label_selector_schema(),
                "unhealthyPodEvictionPolicy": {"enum": ["IfHealthyBudget", "AlwaysAllow"]},
            },
        }
    else:
        raise KeyError(f"no schema for {api} {kind}; known: policy/v1 PodDisruptionBudget and the ray.io kinds")
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                       "spec": spec},
    }


def _close_objects(schema: Any) -> Any:
    """Add ``additionalProperties: false`` to every object schema that lists its properties."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _close_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            _close_objects(value)
    return schema


def apply_defaults(instance: Any, schema: dict) -> Any:
    """Return ``instance`` with ``null``s dropped and the schema's ``default``s filled in, as the API server does."""
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in instance.items():
            if value is None:
                continue
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            out[key] = apply_defaults(value, sub)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = apply_defaults(copy.deepcopy(sub["default"]), sub)
        return out
    if isinstance(instance, list):
        items = schema.get("items", {})
        return [apply_defaults(v, items if isinstance(items, dict) else {}) for v in instance]
    return instance


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


def schema_errors(doc: dict) -> list[str]:
    """CRD-schema problems of one custom resource, as ``path: message`` lines."""
    kind = doc.get("kind")
    api = doc.get("apiVersion", "")
    try:
        schema = crd_schema(kind, api.split("/", 1)[1]) if api.startswith("ray.io/") else core_schema(api, kind)
    except KeyError as e:
        return [f"kind: {e.args[0]}"]
    instance = apply_defaults(doc, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def metadata_errors(doc: dict) -> list[str]:
    """ObjectMeta checks the CRD schema leaves out (``metadata`` is an opaque object there)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing"]
    out = [f"metadata.{k}: unknown ObjectMeta field" for k in meta if k not in OBJECT_META_KEYS]
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-") + "-x"
    limit = MAX_NAME_LEN.get(doc.get("kind"), 63)
    if not DNS1035.match(name):
        out.append(f"metadata.name: {name!r} is not a DNS-1035 label (lower case, digits, '-')")
    elif len(name) > limit:
        out.append(f"metadata.name: {name!r} is longer than {limit} characters")
    for key in ("labels", "annotations"):
        value = meta.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            out.append(f"metadata.{key}: values must be strings")
    return out


def serve_config_errors(text: str) -> list[str]:
    """Validate a ``serveConfigV2`` string with Ray Serve's own config schema (what ``serve deploy`` uses).

    Ray's schema ignores unknown keys (a misspelt ``route_prefx`` would deploy with the default), so
    keys are also checked against the schema's fields, model by model.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"spec.serveConfigV2: not YAML: {e}"]
    errors = [f"spec.serveConfigV2.{p}: unknown field" for p in _unknown_keys(ServeDeploySchema, cfg, [])]
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        errors += [f"spec.serveConfigV2.{_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    return errors


def built_deployments(app: dict, code_version: str = "") -> tuple[dict, dict]:
    """What Serve's controller builds for one ``serveConfigV2`` application, before its ``deployments[]``.

    Returns ``(infos, code_options)``: ``DeploymentInfo`` per deployment name, made the way the controller
    makes them (``ray.serve._private``: the builder called with ``args``, ``build_app``,
    ``deploy_args_to_deployment_info``), and per name the option values the code set explicitly. Needs the
    application's code importable (it is, where the image's packages are installed). No Ray is started.
    """
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info
    from ray.serve._private.utils import import_attr

    application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app.get("args"))
    built = build_app(application, name=app.get("name", "default"))
    infos, code_options = {}, {}
    for d in built.deployments:
        config = d._deployment_config
        fields = type(config).model_fields
        set_by_code = {k: getattr(config, k) for k in config.user_configured_option_names if k in fields}
        if config.autoscaling_config is not None:
            set_by_code["autoscaling_config"] = config.autoscaling_config.model_dump(
                include=config.autoscaling_config.model_fields_set)
        code_options[d.name] = set_by_code
        config = config.model_copy()
        config.version = code_version
        infos[d.name] = deploy_args_to_deployment_info(
            deployment_name=d.name,
            deployment_config_proto_bytes=config.to_proto_bytes(),
            replica_config_proto_bytes=d._replica_config.to_proto_bytes(),
            deployer_job_id="",
            app_name=built.name,
            ingress=d.name == built.ingress_deployment_name,
            route_prefix=app.get("route_prefix", "/") if d.name == built.ingress_deployment_name else None,
        )
    return infos, code_options


def effective_deployments(app: dict, code_version: str = "") -> dict:
    """``DeploymentInfo`` per deployment as Serve runs it: the code's, with the ``deployments[]`` overrides
    applied by Serve's own ``override_deployment_info`` (whatever an override names replaces the code's value
    whole: an ``autoscaling_config`` here is a complete one)."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve.schema import ServeApplicationSchema

    infos, _ = built_deployments(app, code_version)
    return override_deployment_info(infos, ServeApplicationSchema.model_validate(app))


def serve_override_errors(text: str) -> list[str]:
    """``deployments[]`` overrides that Serve would reject or that silently undo the code's settings.

    * a ``name`` the application does not build: Serve fails the whole app (``Deployment ... does not exist``);
    * an ``autoscaling_config`` that leaves out a key the code sets: the override replaces the code's config
      whole, so that key falls to Serve's default;
    * autoscaling that can never add a replica (``target_ongoing_requests`` above ``max_ongoing_requests``).
    """
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return []  # reported by serve_config_errors
    out = []
    for i, app in enumerate((cfg or {}).get("applications") or []):
        where = f"spec.serveConfigV2.applications.{i}"
        overrides = app.get("deployments") or []
        if not overrides or not isinstance(app, dict) or "import_path" not in app:
            continue
        try:
            infos, code_options = built_deployments(app)
        except Exception as e:  # noqa: BLE001 - whatever stops Serve from building the app
            out.append(f"{where}: cannot build {app['import_path']} with its args to check deployments[]: "
                       f"{type(e).__name__}: {e}")
            continue
        for j, o in enumerate(overrides):
            name = o.get("name")
            if name not in infos:
                out.append(f"{where}.deployments.{j}.name: {name!r} is not a deployment the app builds "
                           f"({sorted(infos)}); Serve fails the app")
                continue
            code_autoscaling = code_options[name].get("autoscaling_config") or {}
            if isinstance(o.get("autoscaling_config"), dict):
                missing = sorted(set(code_autoscaling) - set(o["autoscaling_config"]))
                if missing:
                    out.append(f"{where}.deployments.{j}.autoscaling_config: replaces the code's whole config; "
                               f"add {missing} (the code sets {({k: code_autoscaling[k] for k in missing})}, "
                               f"left out they become Serve's defaults)")
        if out:
            continue
        try:
            effective = effective_deployments(app)
        except Exception as e:  # noqa: BLE001 - what Serve's controller would reject
            out.append(f"{where}.deployments: Serve rejects the overrides: {type(e).__name__}: {e}")
            continue
        for name, info in effective.items():
            auto, dc = info.deployment_config.autoscaling_config, info.deployment_config
            if auto is not None and auto.target_ongoing_requests > dc.max_ongoing_requests:
                out.append(f"{where}: deployment {name}: target_ongoing_requests {auto.target_ongoing_requests} > "
                           f"max_ongoing_requests {dc.max_ongoing_requests}, so autoscaling never adds a replica")
    return out


def _models_in(annotation: Any) -> list[type]:
    """The pydantic model classes an annotation allows (through Optional, Union, List)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _unknown_keys(model: type, data: Any, path: list) -> list[str]:
    """Dotted paths of keys in `data` that pydantic `model` has no field (or alias) for."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {n: n for n in fields} | {f.alias: n for n, f in fields.items() if f.alias}
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(_path(path + [key]))
            continue
        annotation = fields[names[key]].annotation
        for sub in _models_in(annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                where = path + [key, i] if isinstance(value, list) else path + [key]
                out += _unknown_keys(sub, item, where)
    return out


def runtime_env_errors(text: str) -> list[str]:
    """``runtimeEnvYAML`` must be a YAML mapping that Ray's ``RuntimeEnv`` accepts."""
    from ray.runtime_env import RuntimeEnv

    try:
        env = yaml.safe_load(text)
        if not isinstance(env, dict):
            return ["spec.runtimeEnvYAML: must be a YAML mapping"]
        RuntimeEnv(**env)
    except Exception as e:  # noqa: BLE001 - report whatever Ray rejects
        return [f"spec.runtimeEnvYAML: {type(e).__name__}: {e}"]
    return []


def cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, RayClusterSpec) pairs inside a RayCluster, RayService or RayJob."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield "spec", spec
    elif doc.get("kind") == "RayService" and "rayClusterConfig" in spec:
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]
    elif doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]


def _version(text: Any) -> tuple[int, ...]:
    """``"2.60.0"`` -> ``(2, 60, 0)``; anything unparsable -> ``()`` (sorts below every version)."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def _optional_secret_refs(node: Any, path: list) -> list[str]:
    """Paths of Secret references marked ``optional: true`` (env ``secretKeyRef``, ``envFrom`` ``secretRef``,
    ``secret`` volumes and projections)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef", "secret") and isinstance(value, dict) and value.get("optional"):
                out.append(_path(path + [key]))
            out += _optional_secret_refs(value, path + [key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _optional_secret_refs(value, path + [i])
    return out


def _kuberay_reads(text: str) -> bool:
    """Whether KubeRay's getResourcesMap parses a rayStartParams.resources value: surrounding quotes, backticks
    and spaces stripped, then JSON. Ray's documented escaped form ('"{\\"a\\": 1}"') keeps its backslashes."""
    try:
        return isinstance(json.loads(str(text).strip("'\"` ")), dict)
    except ValueError:
        return False


def controller_errors(doc: dict) -> list[str]:
    """A subset of the operator's own validation (``validation.go``) that no schema expresses."""
    out = []
    spec = doc.get("spec") or {}
    for where, cluster in cluster_specs(doc):
        autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
        groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
        for name, group in groups:
            pod = (group.get("template") or {}).get("spec") or {}
            if not pod.get("containers"):
                out.append(f"{where}.{name}: needs at least one container")
            params = group.get("rayStartParams") or {}
            if "resources" in params and not _kuberay_reads(params["resources"]):
                out.append(f"{where}.{name}.rayStartParams.resources: KubeRay v1.7 cannot parse "
                           f"{params['resources']!r} (it strips quotes, then reads JSON), so it adds no num-gpus "
                           "either; use the group's resources: {name: \"1\"} instead")
            for key in ("num-cpus", "num-gpus", "memory"):
                if key in params and key.replace("num-", "").upper() in (group.get("resources") or {}):
                    out.append(f"{where}.{name}: {key} set in both rayStartParams and resources")
            if autoscaling and pod.get("restartPolicy") not in (None, "Never"):
                out.append(f"{where}.{name}: autoscaler v2 needs restartPolicy Never or unset")
            if name != "headGroupSpec":
                lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2147483647)
                if lo > hi:
                    out.append(f"{where}.{name}: minReplicas {lo} > maxReplicas {hi}")
    for where, cluster in cluster_specs(doc):  # validation.go: ValidateRayClusterSpec, auth options
        auth = cluster.get("authOptions")
        if auth is None:
            continue
        if "mode" not in auth:
            out.append(f"{where}.authOptions.mode: unset, so no authentication (KubeRay v1.7.0 turns it on only "
                       "for mode: token, whatever its docs say about a default)")
        if auth.get("mode") == "token" and _version(cluster.get("rayVersion")) < (2, 52, 0):
            out.append(f"{where}.authOptions: mode token needs rayVersion 2.52.0 or later")
        if auth.get("enableK8sTokenAuth"):
            if doc.get("kind") != "RayCluster":
                out.append(f"{where}.authOptions.enableK8sTokenAuth: not supported for a {doc.get('kind')}")
            if auth.get("secretName"):
                out.append(f"{where}.authOptions: enableK8sTokenAuth and secretName are mutually exclusive")
    out += [f"{p}: optional Secret reference: a missing Secret would start the pod without it, silently, "
            "instead of failing with an event that names it" for p in _optional_secret_refs(doc, [])]
    if doc.get("kind") == "PodDisruptionBudget":  # what the API server's validation adds to the schema
        if "minAvailable" in spec and "maxUnavailable" in spec:
            out.append("spec: minAvailable and maxUnavailable are mutually exclusive")
        selector = spec.get("selector") or {}
        if not (selector.get("matchLabels") or selector.get("matchExpressions")):
            out.append("spec.selector: empty, so the budget covers every pod in the namespace")
        # Our budgets cover Ray pods, owned by a RayCluster, which has no scale subresource. The disruption
        # controller then cannot count the expected pods for maxUnavailable or a percentage, and the budget
        # allows no eviction at all ("Arbitrary workload resources" in the Kubernetes PDB docs).
        if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int):
            out.append("spec: Ray pods' owner (RayCluster) has no scale subresource: use an integer minAvailable "
                       "(maxUnavailable or a percentage blocks every eviction)")
    if doc.get("kind") == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
            out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        if "rayClusterSpec" in spec and "clusterSelector" in spec:
            out.append("spec: rayClusterSpec and clusterSelector are mutually exclusive")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and not (isinstance(spec[key], int) and spec[key] > 0):
                out.append(f"spec.{key}: must be a positive integer")
    return out


def validate_document(doc: dict) -> list[str]:
    """Every problem found in one KubeRay custom resource or PodDisruptionBudget (empty list = valid)."""
    if not isinstance(doc, dict):
        return ["document: not a mapping"]
    errors = schema_errors(doc) + metadata_errors(doc) + controller_errors(doc)
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayService" and "serveConfigV2" in spec:
        errors += serve_config_errors(spec["serveConfigV2"])
        errors += serve_override_errors(spec["serveConfigV2"])
    if doc.get("kind") == "RayJob" and "runtimeEnvYAML" in spec:
        errors += runtime_env_errors(spec["runtimeEnvYAML"])
    return errors


def load_documents(path: str | Path) -> list[dict]:
    """All YAML documents in a file, empty ones skipped."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ----------------------------------------------------------------------------------------------------
# Images and the kustomization that sets them
# ----------------------------------------------------------------------------------------------------

KUSTOMIZATION = "kustomization.yaml"
# What this renderer understands; any other key would change the output in ways it does not reproduce.
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images"}
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# A release tag: 1.2, 1.2.3, v1.2.3, 1.2.3-rc.1, 1.2.3+build (a tag you push once; "latest", "main" etc. move).
VERSION_TAG = re.compile(r"^v?[0-9]+(\.[0-9]+){1,2}([-+][0-9A-Za-z.-]+)?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``(name, tag, digest)`` of an image reference (``registry:5000/a/b:tag@sha256:...``)."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest or None
    return rest, None, digest or None


def image_errors(image: str) -> list[str]:
    """An image must be pinned: by digest, or by a release tag (never ``latest`` or none, which move)."""
    name, tag, digest = split_image(image)
    if digest is not None:
        return [] if DIGEST.match(digest) else [f"image {image!r}: digest is not sha256:<64 hex digits>"]
    if tag is None or not VERSION_TAG.match(tag):
        return [f"image {image!r}: not pinned (want a release tag like 1.2.3 or a sha256 digest, not "
                f"{tag or 'no tag'!r}, which can point to another image tomorrow)"]
    return []


def pod_containers(node: Any) -> Iterator[dict]:
    """Every container of a resource: any item of a ``containers`` or ``initContainers`` list, at any depth.

    The same rule kustomize's image transformer uses for kinds it does not know (its ``LegacyFilter``), which
    is how ``images:`` reaches the pods inside a RayService, RayJob or RayCluster.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from pod_containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_containers(value)


def apply_image(image: str, rule: dict) -> str:
    """``image`` after one kustomize ``images:`` entry that matched its name."""
    name, tag, digest = split_image(image)
    name = rule.get("newName", name)
    tag = str(rule["newTag"]) if "newTag" in rule else tag
    digest = rule.get("digest", digest)
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def load_kustomization(directory: str | Path) -> dict:
    with open(Path(directory) / KUSTOMIZATION) as f:
        return yaml.safe_load(f) or {}


def render_kustomization(directory: str | Path) -> list[dict]:
    """``kubectl kustomize DIR`` for what our kustomization uses: its resources with ``images:`` applied."""
    directory = Path(directory)
    k = load_kustomization(directory)
    docs = [d for r in k.get("resources") or [] for d in load_documents(directory / r)]
    for doc in docs:
        for c in pod_containers(doc):
            for rule in k.get("images") or []:
                if "image" in c and split_image(c["image"])[0] == rule.get("name"):
                    c["image"] = apply_image(c["image"], rule)
                    break
    return docs


def kustomization_errors(directory: str | Path) -> list[str]:
    """A kustomization that this module can render, whose resources exist in its folder and are valid, and
    whose ``images:`` reach every container and pin each image."""
    directory = Path(directory)
    k = load_kustomization(directory)
    out = [f"{key}: not rendered by validate.py (only {sorted(KUSTOMIZATION_KEYS)})" for key in k
           if key not in KUSTOMIZATION_KEYS]
    if k.get("kind", "Kustomization") != "Kustomization":
        out.append(f"kind: {k.get('kind')!r} (want Kustomization)")
    resources = k.get("resources") or []
    for r in resources:
        if not (directory / r).is_file() or "/" in r:
            out.append(f"resources: {r!r} is not a file in {directory.name}/ (kustomize loads no file outside it)")
    rules = k.get("images") or []
    for i, rule in enumerate(rules):
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown or "name" not in rule:
            out.append(f"images.{i}: needs name, may have newName/newTag/digest; unknown {sorted(unknown)}")
    if out:
        return out
    names = {rule["name"] for rule in rules}
    for r in resources:
        for doc in load_documents(directory / r):
            out += [f"{r}: {e}" for e in validate_document(doc)]
            for c in pod_containers(doc):
                if split_image(c.get("image", ""))[0] not in names:
                    out.append(f"{r}: container {c.get('name')} image {c.get('image')!r} is not set by images:")
    for doc in render_kustomization(directory):
        for c in pod_containers(doc):
            out += [f"rendered {doc.get('kind')}/{doc['metadata'].get('name')}: {e}" for e in image_errors(c["image"])]
    return sorted(set(out), key=out.index)


def validate_file(path: str | Path) -> list[str]:
    """Problems in every document of a manifest file, prefixed with ``file[doc index] Kind/name``.

    A ``kustomization.yaml`` is checked as a whole (``kustomization_errors``). In any other file, an image that
    the kustomization next to it does not set must be pinned itself.
    """
    path = Path(path)
    if path.name == KUSTOMIZATION:
        return [f"{path.name}: {e}" for e in kustomization_errors(path.parent)]
    sibling = path.parent / KUSTOMIZATION
    mapped = {rule.get("name") for rule in load_kustomization(path.parent).get("images") or []} \
        if sibling.is_file() else set()
    out = []
    for i, doc in enumerate(load_documents(path)):
        label = f"{path.name}[{i}] {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        errors = validate_document(doc)
        for c in pod_containers(doc):
            if split_image(c.get("image", ""))[0] not in mapped:
                errors += image_errors(c.get("image", ""))
        out += [f"{label}: {e}" for e in errors]
    return out


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    problems = [p for path in paths for p in validate_file(path)]
    for p in problems:
        print(p)
    print(f"{len(paths)} file(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
