"""The real Ray autoscaler on this one machine: a head started by `ray start --autoscaling-config`, GPU worker
nodes that the autoscaler adds and removes through Ray's fake multi-node provider (#17 item 4).

    python tests/multinode/autoscaling.py                  # the burst, 3 variants: bench/results/autoscale-cpu.json
    python tests/multinode/autoscaling.py --variant fast --requests 12 --max-groups 3 --out /tmp/as.json
    python tests/multinode/autoscaling.py --hold           # start the cluster only, until Ctrl-C

What runs is Ray's own: `ray start --head --autoscaling-config=<json>` with `RAY_FAKE_CLUSTER=1` starts the
monitor, which runs the autoscaler (v2, as `autoscalerOptions.version` in k8s/ray-service.yaml) every second
(`AUTOSCALER_UPDATE_INTERVAL_S=1`). Its node provider, `FakeMultiNodeProvider`, "launches" a node as one more
raylet on this machine (`ray._private.node.Node` in the monitor's process) and terminates it by killing that
raylet's processes, after draining it, exactly where the KubeRay provider would create and delete a pod.

The worker node types come from k8s/ray-service.yaml the way the autoscaler in a KubeRay head pod gets them (Ray's
own `_derive_autoscaling_config_from_ray_cr`): one per GPU worker group, with its GPUs and the custom resource of
its `rayStartParams` (`gpu-1`: `pab-gpu-1`, `gpu-2`: `pab-gpu-2`), here from 0 nodes, at most 2 each, CPUs scaled
down to this machine. The upscaling speed is the manifest's (`upscalingMode: Default`: 1000); the idle timeout is
short (15 s, the manifest's is 300 s). The head stands in for the head pod and for the `cpu` worker group (it
advertises `pab-ingress`, where the ingress is pinned).

Unlike `ray.cluster_utils.AutoscalingCluster`, this never runs `ray stop` (which stops every Ray on the machine:
other test clusters, a CI session's own). Everything runs in its own temp folder (`root`), on free ports, and in
its own session: `ray start --block` is a child of this process in a new process group, whose reaper ends that
group when it dies (also when this process is killed: the child gets SIGKILL on our death). `shutdown()` stops
exactly that: the process group, every descendant of `ray start` (the provider's raylets are the monitor's
children, core workers the raylets'), and any process whose command line names `root`; SIGTERM first, then SIGKILL.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # support/: the shared SeaweedFS test server
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from localcluster import SYSTEM_CONFIG, wait_for  # noqa: E402
from support.ports import free_ports  # noqa: E402
from support.weed import ACCESS_KEY, SECRET_KEY, WeedS3  # noqa: E402

from cluster.watchdog import _stat, descendants, running, terminate  # noqa: E402

MANIFEST = REPO / "k8s" / "ray-service.yaml"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_ID
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
INGRESS_RESOURCE = "pab-ingress"
# What every worker process of a driver sees (as tests/multinode/localcluster.py's JOB_ENV).
JOB_ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
           "PYTHONPATH": os.pathsep.join([str(TESTS / "actors"), str(REPO)])}
OBJECT_STORE = 100 * 2**20  # per node: nothing big travels through the object store here


# ---------------------------------------------------------------------------------------------- the manifest


def manifest_shape(path: Path = MANIFEST) -> dict[str, Any]:
    """What the fake cluster takes from the RayService: the autoscaling config that Ray's KubeRay integration
    derives from its `rayClusterConfig` (the one the autoscaler in the head pod runs with: node types from the
    worker groups' `rayStartParams` and container limits, `upscaling_speed` from `upscalingMode`, the idle
    timeout), the autoscaler's version, and the pools of the Serve app's first model (gpus -> their `resources`)."""
    import yaml
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = yaml.safe_load(path.read_text())
    rc = doc["spec"]["rayClusterConfig"]
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "pab", "namespace": "default"},
                                                      "spec": rc})  # fmt: skip
    model = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["models"][0]
    return {"derived": derived, "autoscaler_version": rc.get("autoscalerOptions", {}).get("version", "v1"),
            "pools": {p["gpus"]: p.get("resources", {}) for p in model["groups"]}}  # fmt: skip


def node_types(shape: dict[str, Any], max_workers: int = 2, cpus_per_gpu: float = 1.0) -> dict[str, Any]:
    """The fake cluster's worker node types: the manifest's GPU worker groups as Ray derives them (their GPUs and
    custom resources), all from 0 nodes, at most `max_workers` each, CPUs scaled down to this machine (one
    logical CPU a GPU: a rank and its Serve replica) and no memory resource."""
    derived = shape["derived"]
    out = {}
    for name, t in derived["available_node_types"].items():
        gpus = t["resources"].get("GPU", 0)
        if name == derived["head_node_type"] or not gpus:
            continue  # the head, and the cpu group: the head plays both here (head_resources)
        resources = {k: v for k, v in t["resources"].items() if k not in ("CPU", "memory")}
        out[name] = {
            "resources": {"CPU": math.ceil(cpus_per_gpu * gpus), **resources, "object_store_memory": OBJECT_STORE},
            "node_config": {}, "min_workers": 0, "max_workers": min(max_workers, t["max_workers"]),
        }  # fmt: skip
    return out


def head_resources(shape: dict[str, Any]) -> dict[str, float]:
    """The custom resources of the manifest's CPU worker groups (`pab-ingress`), which the head advertises here."""
    derived = shape["derived"]
    return {k: v for name, t in derived["available_node_types"].items()
            if name != derived["head_node_type"] and not t["resources"].get("GPU")
            for k, v in t["resources"].items() if k not in ("CPU", "memory")}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the cluster


class FakeAutoscalingCluster:
    """A head (`ray start --head --autoscaling-config`) whose autoscaler adds worker nodes of `worker_types`.

    `gpu_nodes()` lists the live worker nodes; `address` is the GCS address a driver connects to.
    """

    def __init__(self, worker_types: dict[str, Any], root: str | Path | None = None, head_cpus: int = 2,
                 head_resources: dict[str, float] | None = None, idle_timeout_s: float = 15.0,
                 upscaling_speed: float = 1000.0, autoscaler_v2: bool = True, s3: WeedS3 | None = None) -> None:  # fmt: skip
        # Ray's socket paths must stay short: a fresh short folder under /tmp.
        self.root = Path(root or tempfile.mkdtemp(prefix="pabas-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.worker_types = worker_types
        self.head_cpus, self.idle_timeout_s, self.upscaling_speed = head_cpus, idle_timeout_s, upscaling_speed
        self.head_resources = {INGRESS_RESOURCE: 100, **(head_resources or {})}
        self.v2 = autoscaler_v2
        self.s3, self._own_s3 = s3, s3 is None
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._known: dict[int, int] = {}  # pid -> start time of every process seen in our tree

    def config(self, gcs_address: str) -> dict[str, Any]:
        """The autoscaling config `ray start` gets: Ray's fake_multi_node/example.yaml's shape (the pip wheel does
        not ship that file, so the provider is named as an "external" module, which needs no defaults file)."""
        types = {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}, **self.worker_types}
        provider = {"type": "external", "module": PROVIDER, "gcs_address": gcs_address, "use_node_id_as_ip": True,
                    "disable_node_updaters": True, "disable_launch_config_check": True}
        if self.v2:
            provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        return {
            "cluster_name": f"pabas-{self.root.name}", "provider": provider,
            "max_workers": sum(t["max_workers"] for t in self.worker_types.values()),
            "available_node_types": types, "head_node_type": "ray.head.default",
            "upscaling_speed": self.upscaling_speed, "idle_timeout_minutes": self.idle_timeout_s / 60.0,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> "FakeAutoscalingCluster":
        import ray

        if self.s3 is None:
            self.s3 = WeedS3(self.root / "weed").start()
        ip = ray.util.get_node_ip_address()
        gcs, agent, client, metrics, env_agent, node_mgr, obj_mgr = free_ports(7)
        self.address = f"{ip}:{gcs}"
        cfg_path = self.root / "autoscaling.json"
        cfg_path.write_text(json.dumps(self.config(self.address), indent=1))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(self.root),
               # every node's processes: S3 credentials as the pods get them from a Secret
               "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
               "PAB_CACHE_DIR": str(self.root / "cache")}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        if self.v2:
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                       RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin, "start", "--head", "--block", f"--autoscaling-config={cfg_path}",
            f"--temp-dir={self.root / 'ray'}", f"--port={gcs}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(self.head_resources)}", f"--object-store-memory={OBJECT_STORE}",
            "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", "--disable-usage-stats",
            f"--system-config={json.dumps(SYSTEM_CONFIG, separators=(',', ':'))}",
        ]  # fmt: skip
        self._log = open(self.root / "ray-start.log", "wb")
        # Its own session: `ray start --block`'s reaper ends its process group when it dies, which must not be ours.
        # It dies with us (PR_SET_PDEATHSIG), so a killed test run leaves no cluster behind.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while b"Ray runtime started" not in (self.root / "ray-start.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "ray-start.log").read_text(errors="replace")[-3000:]
                self.shutdown()
                raise RuntimeError(f"ray start --head did not come up ({self.proc.returncode}): {log}")
            time.sleep(0.2)
        self._note_tree()
        self._guard = _start_guard(self.proc.pid, [self.s3.proc.pid] if self._own_s3 and self.s3.proc else [])
        return self

    def connect(self, env: dict[str, str] | None = None) -> None:
        """This process as a driver of the cluster, its workers with JOB_ENV (+ `env`)."""
        import ray

        ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": {**JOB_ENV, **(env or {})}})

    def gpu_nodes(self) -> list[dict[str, Any]]:
        """Live worker nodes (not the head): [{node_id, type, resources}], `type` the worker group's name."""
        import ray

        by_resource = {k: name for name, t in self.worker_types.items() for k in t["resources"] if k.startswith("pab-")}
        out = []
        for n in ray.nodes():
            res = n.get("Resources", {})
            if n.get("Alive") and res.get("GPU", 0) > 0:
                kind = next((by_resource[k] for k in res if k in by_resource), "?")
                out.append({"node_id": n["NodeID"], "type": kind, "resources": res})
        return out

    def monitor_log(self) -> str:
        logs = sorted((self.root / "ray").glob("session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    # ------------------------------------------------------------------ stopping exactly what we started

    def _ours(self) -> dict[int, int]:
        """Our live processes now: `ray start`'s descendants, its process group, and any naming our folder."""
        found: dict[int, int] = {}
        if self.proc is not None and running(self.proc.pid):
            st = _stat(self.proc.pid)
            if st is not None:
                found[self.proc.pid] = st[2]
            found.update(descendants(self.proc.pid))
        root = (str(self.root) + "/").encode()  # a path under it: never another folder whose name starts so
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                cmdline = (entry / "cmdline").read_bytes()
                pgid = os.getpgid(pid)
            except OSError:
                continue
            if root in cmdline or (self.proc is not None and pgid == self.proc.pid):
                st = _stat(pid)
                if st is not None and st[0] not in ("Z", "X"):
                    found[pid] = st[2]
        found.pop(os.getpid(), None)
        return found

    def _note_tree(self) -> None:
        self._known.update(self._ours())

    def shutdown(self, grace_s: float = 5.0) -> int:
        """Stop every process of this cluster (and its S3 server, and remove its folder); how many were stopped."""
        import ray

        if ray.is_initialized() and self.address and ray.get_runtime_context().gcs_address == self.address:
            ray.shutdown()
        self._note_tree()
        alive = {p: s for p, s in self._known.items() if running(p, s)}
        n = len(alive)
        # `_ours` while waiting: an orphan reparented to init names our folder still
        self._known.update(terminate(alive, grace_s, group=self.proc.pid if self.proc is not None else None,
                                     refresh=self._ours, settle=2.0))  # fmt: skip
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "_guard", None) is not None:
            self._guard.kill()
            self._guard.wait(5)
        left = {p: s for p, s in self._known.items() if running(p, s)}
        if self._own_s3 and self.s3 is not None:
            self.s3.stop()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if left:
            raise RuntimeError(f"processes of {self.root} still running after SIGKILL: {sorted(left)}")
        shutil.rmtree(self.root, ignore_errors=True)
        return n


def _start_guard(ray_start: int, extra: list[int]) -> subprocess.Popen:
    """A small process of its own that stops the cluster if this one dies without `shutdown()` (SIGKILL, a CI
    timeout). `ray start` dies with us (PR_SET_PDEATHSIG) and its head processes with it, but the raylets the
    autoscaler started are the monitor's children, which linger a minute (until they give up on the GCS) and
    leave a log monitor behind; and the S3 server is our child."""
    return subprocess.Popen([sys.executable, __file__, "--guard", str(os.getpid()), str(ray_start), *map(str, extra)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def guard(parent: int, ray_start: int, extra: list[int], interval_s: float = 1.0, grace_s: float = 3.0) -> None:
    """Note `ray_start`'s descendants (and `extra`) every `interval_s` while `parent` lives; once it is gone, SIGTERM
    those still running, SIGKILL them after `grace_s`. Returns at once when `ray_start` and all noted are gone."""
    first = _stat(parent)
    if first is None:
        return
    known: dict[int, int] = {}
    for pid in [ray_start, *extra]:
        st = _stat(pid)
        if st is not None:
            known[pid] = st[2]
    while running(parent, first[2]):
        if running(ray_start, known.get(ray_start)):
            known.update(descendants(ray_start))  # a raylet the autoscaler started, and its workers
        known = {p: s for p, s in known.items() if running(p, s)}
        if not known:
            return  # stopped by shutdown()
        time.sleep(interval_s)
    terminate(known, grace_s)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def cluster_from_manifest(idle_timeout_s: float = 15.0, max_workers: int = 2) -> FakeAutoscalingCluster:
    """A fake cluster shaped like k8s/ray-service.yaml: its GPU worker groups from 0 nodes, its upscaling speed and
    autoscaler version, the CPU group's resources on the head; a short idle timeout (the manifest's is 5 min)."""
    shape = manifest_shape()
    return FakeAutoscalingCluster(node_types(shape, max_workers=max_workers), head_resources=head_resources(shape),
                                  idle_timeout_s=idle_timeout_s, upscaling_speed=shape["derived"]["upscaling_speed"],
                                  autoscaler_v2=shape["autoscaler_version"] == "v2")  # fmt: skip


def start_serve(timeout_attempts: int = 3) -> int:
    """Serve with its HTTP proxy on the head only, on a free loopback port (as tests/multinode/conftest.py)."""
    from ray import serve
    from ray.exceptions import RayActorError

    (port,) = free_ports(1)
    for attempt in range(timeout_attempts):
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            return port
        except RayActorError:  # the proxy killed before it started on a starved host
            if attempt == timeout_attempts - 1:
                raise
            serve.shutdown()
            time.sleep(2)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- the scenario

APP, KEY = "pabas", "as-key"
MODEL = "opensora-v1.2-tiny"  # the real engine, random weights: fast on CPU
# 600 steps: ~3 s a video on a shared core (~5 ms a step), so that the queue outlasts the second group's start
# (~10 s: a node, then a Python worker importing torch and building the model).
VIDEO = {"prompt": "a fox the autoscaler made room for", "num_frames": 17, "size": "32x32", "steps": 600}
# Serve's knobs of the manifest's pools, shortened so the test runs in a minute or two; the Ray autoscaler's
# are the cluster's (idle timeout, upscaling speed).
POOL_AUTOSCALING = {"target_ongoing_requests": 1, "metrics_interval_s": 1.0, "look_back_period_s": 2.0,
                    "upscale_delay_s": 0.0, "downscale_delay_s": 5.0}


def app_config(storage: dict[str, Any], pool_resources: dict[str, float], max_groups: int,
               autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "models": [{"name": MODEL, "groups": [{
            "gpus": 1, "min_groups": 0, "max_groups": max_groups, "resources": pool_resources,
            "autoscaling": {**POOL_AUTOSCALING, **(autoscaling or {})}}]}],
        "storage": storage, "api_keys": [KEY], "max_attempts": 3, "max_pending": 64,
        "heartbeat_s": 1.0, "stale_after_s": 30.0, "reconcile_interval_s": 1.0, "retry_backoff_s": 0.5,
        "cpus_per_rank": 0.5, "group_replica_cpus": 0.25, "ingress_cpus": 0.25,
        "ingress_resources": {INGRESS_RESOURCE: 1},  # on the head, as on the manifest's cpu group
        "health_check_period_s": 2.0, "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 5.0,
        "group_start_timeout_s": 300.0,
    }  # fmt: skip


def deploy(config: dict[str, Any], port: int, timeout_s: float = 240.0):
    """The app at "/"; an authenticated httpx client once it answers."""
    import httpx
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def ready():
        try:
            return (serve.status().applications[APP].status == "RUNNING"
                    and client.get("/v1/videos").status_code == 200)  # fmt: skip
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_for(ready, timeout_s, "app RUNNING", interval_s=0.5)
    return client


def pool_replicas(pool: str) -> dict[str, int]:
    """The pool's replicas by state name (RUNNING, STARTING, ...)."""
    from ray import serve

    d = serve.status().applications[APP].deployments.get(pool)
    return {str(getattr(k, "value", k)): v for k, v in (d.replica_states if d else {}).items()}


def burst(cluster: FakeAutoscalingCluster, client, pool: str, n: int = 8, video: dict | None = None,
          timeout_s: float = 300.0, poll_s: float = 0.25) -> dict[str, Any]:  # fmt: skip
    """Send `n` videos at once to an idle pool at 0 groups on 0 GPU nodes, and watch until every video finished
    and the GPU nodes are gone again. Returns the record: times from the burst (s), peaks, each job's outcome."""
    video = {**VIDEO, **(video or {})}
    assert not cluster.gpu_nodes(), "the burst must start from 0 GPU nodes"
    assert pool_replicas(pool).get("RUNNING", 0) == 0, "the burst must start from 0 groups"
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(n) as ex:
        posted = list(ex.map(lambda i: client.post("/v1/videos", json={**video, "seed": i}), range(n)))
    t_posted = time.monotonic() - t0
    codes = [r.status_code for r in posted]
    jobs = {r.json()["id"]: None for r in posted if r.status_code == 200}
    ev: dict[str, float] = {}
    nodes_seen: dict[str, dict[str, Any]] = {}  # node id -> {type, up_s, down_s}
    peak_nodes = peak_groups = 0
    infeasible_seen = False
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        t = time.monotonic() - t0
        nodes = cluster.gpu_nodes()
        live = {n["node_id"] for n in nodes}
        for nd in nodes:
            nodes_seen.setdefault(nd["node_id"], {"type": nd["type"], "up_s": round(t, 2), "down_s": None})
        for nid, info in nodes_seen.items():
            if nid not in live and info["down_s"] is None:
                info["down_s"] = round(t, 2)
        running_groups = pool_replicas(pool).get("RUNNING", 0)
        peak_nodes, peak_groups = max(peak_nodes, len(nodes)), max(peak_groups, running_groups)
        if nodes:
            ev.setdefault("first_node_s", t)
        if running_groups:
            ev.setdefault("first_group_ready_s", t)
        if running_groups >= 2:
            ev.setdefault("second_group_ready_s", t)
        if len(nodes) >= 2:
            ev.setdefault("second_node_s", t)
        for job_id, rec in jobs.items():
            if rec is None or rec["status"] not in ("completed", "failed", "cancelled"):
                r = client.get(f"/v1/videos/{job_id}")
                if r.status_code == 200:
                    jobs[job_id] = rec = r.json()
                    if rec["status"] in ("completed", "failed", "cancelled"):
                        rec["_done_s"] = t
                    err = rec.get("error") or {}
                    infeasible_seen |= err.get("code") == "no_node_fits_group"
        finished = [r["_done_s"] for r in jobs.values() if r is not None and "_done_s" in r]
        if finished:
            ev.setdefault("first_video_done_s", min(finished))
        if len(finished) == len(jobs):
            ev.setdefault("queue_drained_s", max(r["_done_s"] for r in jobs.values()))
            if running_groups == 0 and not pool_replicas(pool).get("STOPPING", 0):
                ev.setdefault("groups_zero_s", t)
            if not nodes and nodes_seen:
                ev.setdefault("nodes_zero_s", t)
                break
        time.sleep(poll_s)
    statuses = {j: (r or {}).get("status") for j, r in jobs.items()}
    return {
        "requests": n, "post_codes": codes, "posted_s": round(t_posted, 2),
        "statuses": statuses, "failed": sum(s != "completed" for s in statuses.values()),
        "attempts": sorted((r or {}).get("attempts", 0) for r in jobs.values()),
        "groups_used": sorted({((r or {}).get("group") or {}).get("name", "?") for r in jobs.values()}),
        "queue_s": sorted(round(((r or {}).get("timings") or {}).get("queue_s", -1), 2) for r in jobs.values()),
        "run_s": sorted(round(((r or {}).get("timings") or {}).get("run_s", -1), 2) for r in jobs.values()),
        "events_s": {k: round(v, 2) for k, v in ev.items()},
        "peak_gpu_nodes": peak_nodes, "peak_groups": peak_groups,
        "nodes": list(nodes_seen.values()), "no_node_fits_group_seen": infeasible_seen,
    }  # fmt: skip


def scenario(requests: int = 8, max_groups: int = 2, idle_timeout_s: float = 15.0, max_workers: int = 2,
             autoscaling: dict[str, Any] | None = None, out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The whole measurement: cluster up, app deployed at 0 groups, one burst, everything down again."""
    from cluster.config import pool_name

    c = cluster_from_manifest(idle_timeout_s, max_workers)
    t_start = time.monotonic()
    c.start()
    try:
        c.connect()
        port = start_serve()
        storage = c.s3.storage_config("as-" + uuid.uuid4().hex[:6], prefix="pab/as")
        client = deploy(app_config(storage, manifest_shape()["pools"][1], max_groups, autoscaling), port)
        setup_s = time.monotonic() - t_start
        record = burst(c, client, pool_name(MODEL, 1), n=requests)
        # Each finished video is in the bucket at the size its record there says (S3 is the only storage).
        from pab.storage import storage_from_config

        store = storage_from_config(storage)
        stored = 0
        for job_id in record["statuses"]:
            saved = store.get_json(f"jobs/records/{job_id}.json")
            key = saved.get("video_key")
            stored += bool(key) and store.exists(key) and store.size(key) == saved.get("size_bytes")
        record["videos_stored"] = stored
        # What the autoscaler itself logged: each launch and each idle removal, by node type.
        record["autoscaler_events"] = [line.split(" -- ", 1)[-1] for line in c.monitor_log().splitlines()
                                       if "event_logger" in line]
        record.update(setup_s=round(setup_s, 1), knobs={
            "serve_autoscaling": {**POOL_AUTOSCALING, **(autoscaling or {}), "min_replicas": 0,
                                  "max_replicas": max_groups},
            "idle_timeout_s": idle_timeout_s, "upscaling_speed": c.upscaling_speed,
            "autoscaler": "v2" if c.v2 else "v1", "update_interval_s": 1,
            "node_types": {k: v["resources"] for k, v in c.worker_types.items()},
        }, video=VIDEO, model=MODEL, cpus=os.cpu_count())  # fmt: skip
        client.close()
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
        return record
    finally:
        c.shutdown()


# What `python tests/multinode/autoscaling.py` measures, each on a fresh cluster: Serve's knobs of the pool (over
# POOL_AUTOSCALING) and the size of the burst.
VARIANTS = {
    # The test's: Serve reacts within a second or two.
    "fast": {"requests": 8, "autoscaling": {}},
    # From 0 groups Serve asks for ceil(1 x upscaling_factor) groups at once, instead of one until it runs.
    "upscaling-factor-2": {"requests": 8, "autoscaling": {"upscaling_factor": 2}},
    # The manifest's upscaling knobs (downscale shortened: its 600 s would only add a wait), a longer queue.
    "manifest-upscaling": {"requests": 16, "autoscaling": {"metrics_interval_s": 10.0, "look_back_period_s": 30.0,
                                                           "upscale_delay_s": 30.0}},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The Ray autoscaler on one machine: a burst from 0 GPU nodes.")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all, one after another")
    p.add_argument("--requests", type=int, default=None, help="instead of the variant's")
    p.add_argument("--max-groups", type=int, default=2)
    p.add_argument("--idle-timeout-s", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "autoscale-cpu.json")
    p.add_argument("--hold", action="store_true", help="only start the cluster and wait for Ctrl-C")
    p.add_argument("--guard", nargs="+", type=int, metavar="PID", help=argparse.SUPPRESS)  # _start_guard's process
    a = p.parse_args(argv)
    if a.guard:
        guard(a.guard[0], a.guard[1], a.guard[2:])
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if a.hold:
        c = cluster_from_manifest(a.idle_timeout_s).start()
        try:
            print(f"Ray: {c.address}  (the autoscaler adds {', '.join(c.worker_types)} nodes on demand)")
            print(f"S3:  {c.s3.endpoint}  key {ACCESS_KEY} / {SECRET_KEY}\nCtrl-C stops it.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            c.shutdown()
        return 0
    out: dict[str, Any] = {"what": "a burst of videos to a 1-GPU pool at 0 groups on 0 GPU nodes; times in s from "
                           "the burst's first POST (tests/multinode/autoscaling.py)",
                           "load_before": os.getloadavg()[0], "variants": {}}  # fmt: skip
    failed = 0
    for name in a.variant or list(VARIANTS):
        v = VARIANTS[name]
        rec = scenario(a.requests or v["requests"], a.max_groups, a.idle_timeout_s, autoscaling=v["autoscaling"])
        print(name, json.dumps({k: rec[k] for k in ("events_s", "failed", "groups_used", "nodes")}), flush=True)
        out["variants"][name] = rec
        failed += rec["failed"]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
