"""Fixtures of the bulk-job tests: a SeaweedFS S3 server and a Ray cluster that accepts job submissions.

The Ray cluster is its own `ray start --head --block` process (not the session's `ray.init()` of
tests/actors and tests/cluster): jobs need the dashboard's job server, and a separate process keeps
this module independent of whichever Ray the test process holds. All its ports are picked free, so
parallel test sessions on one machine never collide; SIGTERM to `ray start --block` stops exactly the
processes it started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support.sessionfixtures import s3_server  # noqa: F401 - fixture
from support.ports import free_ports
from support.weed import ACCESS_KEY, SECRET_KEY

VENV_BIN = str(Path(sys.executable).parent)


class RayJobCluster:
    """`ray start --head --block` with fake GPUs, the dashboard on loopback, and S3 credentials in its env.

    The credentials reach the job driver and its actors through the cluster's environment, as a
    Kubernetes Secret does through the pod's (k8s/ray-job.bulk.yaml).
    """

    def __init__(self, root: Path, num_cpus: int, num_gpus: int, env: dict[str, str]) -> None:
        self.root = root
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        # Ray's socket paths must stay short: a fresh short folder under /tmp, not pytest's tmp_path.
        self.tmpdir = tempfile.mkdtemp(prefix="rayj8-", dir="/tmp")
        self.env = {
            # Not the test process's own Ray (another fixture may have exported its address).
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
            "RAY_TMPDIR": self.tmpdir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1", **env,
        }
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout_s: float = 180.0) -> "RayJobCluster":
        # Every port named: one Ray picks itself is a `bind(0)` port, which anything on the machine may take
        # before Ray binds it, and `ray start --block` ends the whole cluster when one of its processes dies.
        gcs, dash, agent, agent_grpc, client, metrics, rt_env, nm, om = free_ports(9)
        cmd = [
            f"{VENV_BIN}/ray", "start", "--head", "--block", f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--ray-client-server-port={client}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}", "--disable-usage-stats",
        ]
        self.log = self.root / "ray-start.log"
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.address = f"http://127.0.0.1:{dash}"
        self._wait_ready(timeout_s)
        return self

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def _wait_ready(self, timeout_s: float) -> None:
        # The job server answers only once the head's dashboard agent is up: probe with list_jobs.
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-3000:]}")
            try:
                self.client().list_jobs()
                probe = self.client().submit_job(entrypoint="python -c pass")
                while not self.client().get_job_status(probe).is_terminal():
                    time.sleep(0.3)
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"Ray job server not ready after {timeout_s}s: {last!r}\n{self.log.read_text()[-3000:]}")

    def report(self) -> str:
        """Whether the cluster still runs, and the tail of `ray start`'s log (which, when one of Ray's processes
        died, says which and tails its own log): what a failed test shows beside its traceback."""
        rc = self.proc.poll() if self.proc is not None else None
        state = "not started" if self.proc is None else "running" if rc is None else f"exited ({rc})"
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray's colours
        return f"`ray start --block` {state}; {self.log}:\n{text[-6000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops the processes it started
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the job cluster shows the cluster's state and `ray start`'s log tail (CI keeps no files)."""
    report = yield
    cluster = item.funcargs.get("ray_jobs") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(cluster, RayJobCluster):
        report.sections.append(("Ray job cluster", cluster.report()))
    return report


@pytest.fixture(scope="module")
def ray_jobs(tmp_path_factory, s3_server):  # noqa: F811 - the imported fixture, asked for by name
    cluster = RayJobCluster(
        tmp_path_factory.mktemp("ray"), num_cpus=4, num_gpus=2,
        env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"},
    ).start()
    yield cluster
    cluster.stop()
