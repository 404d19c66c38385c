"""A multi-node Ray cluster on this one machine, with a real SeaweedFS S3 server: what tests/multinode runs on.

    python tests/multinode/localcluster.py                 # head + 3 workers of 2 fake GPUs, S3; Ctrl-C stops it
    python tests/multinode/localcluster.py --workers 4 --gpus 2 --root /tmp/mn

`ray.cluster_utils.Cluster` starts one raylet per "node" (its own object store, temp folder and logs): a head
with no GPU (the ingress and the Serve controller live there, as on the CPU head pod of k8s/ray-service.yaml)
and workers with `--gpus` fake GPUs each. Each node's processes see their own `PAB_CACHE_DIR`, as each pod has
its own disk, so an `s3://` checkpoint is downloaded once per node (`pab.checkpoint.s3_downloads` counts
them). Storage is S3 only: no folder is shared between the nodes.

Logical CPUs are faked larger than the machine's 2 cores (`--cpus` per node) so that fractional-CPU actors
never wait on scheduling; the real work is small (the fake engine, or a -tiny model).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))  # support/: the shared SeaweedFS test server and Ray helpers

from support.raysession import wait_for  # noqa: E402, F401 - the multi-node tests import it from here
from support.weed import ACCESS_KEY, SECRET_KEY, WeedS3  # noqa: E402

HEAD_RESOURCE = "pab-head"  # the head node's custom resource: pins the ingress there (never on a GPU node)
# Fail over fast: the GCS declares a node dead after 4 missed health checks 1 s apart (default: 5 x 3 s), each
# allowed 2 s, so a raylet starved of CPU for a moment on 2 shared cores is not taken for a lost one.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                 "health_check_failure_threshold": 4}
# What every worker process of a test driver sees: one thread each on 2 shared cores, and the test doubles.
# Serve's 5 s for its HTTP proxy to come up is missed on a loaded 2-core host (as in tests/support/raysession.py).
JOB_ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
           "PYTHONPATH": os.pathsep.join([str(TESTS / "actors"), str(TESTS.parent)])}


class LocalCluster:
    """A head and `workers` worker nodes, `gpus` fake GPUs each, plus a SeaweedFS S3 server (`s3`).

    Nodes are `ray._private.node.Node`s; `name(node)` is "head" or "worker-<i>", `node_id` their Ray id.
    """

    def __init__(self, root: str | Path | None = None, workers: int = 3, gpus: int = 2, cpus: int = 4,
                 head_cpus: int = 4, s3: WeedS3 | None = None) -> None:  # fmt: skip
        # Ray's socket paths must stay short: a fresh short folder under /tmp, not pytest's tmp_path.
        self.root = Path(root or tempfile.mkdtemp(prefix="pabmn-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers, self.gpus, self.cpus, self.head_cpus = workers, gpus, cpus, head_cpus
        self.s3 = s3
        self._own_s3 = s3 is None
        self.cluster = None
        self.names: dict[str, str] = {}  # node id -> name
        self._count = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LocalCluster":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from ray.cluster_utils import Cluster

        # Ray writes the cluster's address under $RAY_TMPDIR (for `address="auto"`): ours, not a shared /tmp/ray.
        self._tmpdir_env = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.root)
        (self.root / "ray").mkdir(exist_ok=True)
        if self.s3 is None:
            self.s3 = WeedS3(self.root / "weed").start()
        env = self._node_env("head")
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=self.head_cpus, num_gpus=0, resources={HEAD_RESOURCE: 100},
            temp_dir=str(self.root / "head"), include_dashboard=False, object_store_memory=200 * 2**20,
            env_vars=env, _system_config=SYSTEM_CONFIG,
        ))  # fmt: skip
        self.names[self.cluster.head_node.node_id] = "head"
        for _ in range(self.workers):
            self.add_worker()
        self.cluster.wait_for_nodes()
        return self

    def _node_env(self, name: str) -> dict[str, str]:
        """A node's own environment: its checkpoint cache (its "disk") and the S3 credentials of its pod."""
        (self.root / name / "cache").mkdir(parents=True, exist_ok=True)
        return {"PAB_CACHE_DIR": str(self.root / name / "cache"), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}

    def add_worker(self):
        name = f"worker-{self._count}"
        self._count += 1
        node = self.cluster.add_node(
            num_cpus=self.cpus, num_gpus=self.gpus, temp_dir=str(self.root / name),
            object_store_memory=200 * 2**20, env_vars=self._node_env(name),
        )  # fmt: skip
        self.names[node.node_id] = name
        return node

    def ensure_workers(self, n: int) -> None:
        """Add worker nodes until `n` are alive (a test that removed one leaves the next the same cluster)."""
        while len(self.cluster.worker_nodes) < n:
            self.add_worker()
        self.cluster.wait_for_nodes()

    def remove(self, node_id: str, graceful: bool = False) -> str:
        """Kill a worker node's raylet and every process on it (a lost pod); its name."""
        node = self.node(node_id)
        self.cluster.remove_node(node, allow_graceful=graceful)
        return self.names[node_id]

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self._own_s3 and self.s3 is not None:
            self.s3.stop()
        if getattr(self, "_tmpdir_env", None) is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._tmpdir_env
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, env: dict[str, str] | None = None) -> None:
        """This process as a driver of the cluster, its workers with JOB_ENV (+ `env`)."""
        import ray

        ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": {**JOB_ENV, **(env or {})}})

    # ------------------------------------------------------------------ looking at it

    @property
    def address(self) -> str:
        return self.cluster.address

    def node(self, node_id: str):
        for n in self.cluster.list_all_nodes():
            if n.node_id == node_id:
                return n
        raise KeyError(f"no live node {node_id} (known: {self.names})")

    def alive_workers(self) -> list[str]:
        return [n.node_id for n in self.cluster.worker_nodes]

    def cache_dir(self, node_id: str) -> Path:
        return self.root / self.names[node_id] / "cache"

    def downloads(self) -> dict[str, list[dict[str, Any]]]:
        """S3 checkpoint downloads by node name (every node ever started, removed ones included)."""
        from pab.checkpoint import s3_downloads

        return {name: s3_downloads(self.root / name / "cache") for name in self.names.values()}

    def storage_config(self, bucket: str, **extra) -> dict[str, Any]:
        return self.s3.storage_config(bucket, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start the multi-node test cluster (and S3) until Ctrl-C.")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--gpus", type=int, default=2, help="fake GPUs per worker node")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs per worker node")
    p.add_argument("--root", default=None, help="folder for the nodes' temp dirs, caches and S3 data")
    a = p.parse_args(argv)
    # Ctrl-C, and SIGTERM (`kill`, or a shell's background job, which ignores SIGINT): stop it all the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    lc = LocalCluster(a.root, a.workers, a.gpus, a.cpus).start()
    try:
        print(f"Ray: {lc.address}  (ray.init(address=...) or RAY_ADDRESS={lc.address})")
        print(f"S3:  {lc.s3.endpoint}  key {ACCESS_KEY} / {SECRET_KEY}")
        for node_id, name in lc.names.items():
            print(f"  {name:9s} {node_id}  cache {lc.root / name / 'cache'}")
        print("Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        lc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
