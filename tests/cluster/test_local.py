"""`pab serve` (cluster.local:main): flags -> app config, and the whole thing in a subprocess (slow)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import av
import httpx
import pytest

from cluster.config import load_config
from cluster.local import _parser, build_config


def test_flags_to_config(tmp_path):
    args = _parser().parse_args(["--output-dir", str(tmp_path), "--api-key", "k", "--max-pending", "3"])
    cfg = load_config(build_config(args, gpus=0))
    assert cfg.models[0].name == "opensora-v1.2-small" and cfg.gpus_per_rank == 0  # CPU: groups hold CPUs
    assert cfg.storage.backend == "local" and cfg.storage.path == str(tmp_path) and cfg.max_pending == 3
    assert [k.get_secret_value() for k in cfg.api_keys] == ["k"]
    args = _parser().parse_args(["--s3-endpoint", "http://127.0.0.1:1", "--bucket", "vids", "--gpus-per-group", "2"])
    cfg = load_config(build_config(args, gpus=8))
    assert cfg.models[0].name == "opensora-v1.2-small" and cfg.models[0].groups[0].gpus == 2
    assert cfg.models[0].groups[0].max_groups == 4 and cfg.gpus_per_rank == 1
    assert cfg.storage.backend == "s3" and cfg.storage.bucket == "vids" and cfg.storage.create_bucket
    with pytest.raises(SystemExit):
        build_config(_parser().parse_args(["--s3-endpoint", "http://x"]), gpus=0)
    args = _parser().parse_args(["--model", "opensora-v1.2", "--checkpoint", "hpcai-tech/OpenSora-STDiT-v3",
                                 "--vae", "hpcai-tech/OpenSora-VAE-v1.2", "--text-encoder", "DeepFloyd/t5-v1_1-xxl"])
    m = load_config(build_config(args, gpus=1)).models[0]  # each part's source reaches the GPU groups' config
    assert (m.checkpoint, m.vae, m.text_encoder) == ("hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2",
                                                     "DeepFloyd/t5-v1_1-xxl")


@pytest.mark.ray
@pytest.mark.slow
def test_pab_serve_end_to_end(tmp_path):
    """`python -m cluster.local` starts its own Ray + Serve; submit, poll, download, then Ctrl-C."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_TMPDIR": "/tmp/raypabsv2", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PAB_API_KEYS": "envkey", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.local", "--port", str(port), "--output-dir",
                             str(tmp_path / "out"), "--num-gpus", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer envkey"}, timeout=30)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if c.get("/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert c.get("/v1/models").json()["data"][0]["id"] == "opensora-v1.2-small"  # the trained, shipped one
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # PAB_API_KEYS reached the ingress
        job = c.post("/v1/videos", json={"prompt": "a fox", "seconds": 2, "size": "32x32", "steps": 4}).json()
        while (rec := c.get(f"/v1/videos/{job['id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline + 120
            time.sleep(0.5)
        assert rec["status"] == "completed", rec
        with av.open(io.BytesIO(c.get(f"/v1/videos/{job['id']}/content").content)) as v:
            assert sum(1 for _ in v.decode(video=0)) == rec["request"]["num_frames"] == 17  # 2 s at 8 fps -> 17
        assert (tmp_path / "out" / "videos" / f"{job['id']}.mp4").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def _ray_processes(tmpdir: str) -> list[str]:
    """Command lines of the Ray processes whose session lives under `tmpdir` (this test's Ray only)."""
    out = subprocess.run(["pgrep", "-af", tmpdir], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("how, phases", [("direct", ["starting"]), ("background-shell", ["running", "starting"])])
def test_pab_serve_stops_promptly_on_sigterm(tmp_path, how, phases):
    """SIGTERM (Kubernetes, `docker stop`) stops `pab serve` as Ctrl-C does, whether it runs or is still starting,
    started directly or in the background from a shell (where SIGINT is ignored), and leaves no Ray behind.
    A direct, running one is the background shell's case minus the ignored SIGINT, and each running case costs
    a whole start-up of Ray and the app on CI's 2 cores, so it is left to the harder one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmpdir = f"/tmp/raypabterm-{how}"
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "cluster.local", "--port", str(port), "--output-dir", str(tmp_path / "out"),
           "--num-gpus", "0"]  # fmt: skip
    log_path = tmp_path / "serve.log"
    for phase in phases:
        with open(log_path, "wb") as log:
            if how == "direct":
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                pid = proc.pid
            else:  # `pab serve &` in a non-interactive shell: the child starts with SIGINT ignored
                pid_file = tmp_path / f"pid-{phase}"
                shell = " ".join(cmd) + f" & echo $! > {pid_file}; wait"
                proc = subprocess.Popen(["bash", "-c", shell], env=env, stdout=log, stderr=subprocess.STDOUT)
                deadline = time.monotonic() + 10
                while not pid_file.exists() or not pid_file.read_text().strip():
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                pid = int(pid_file.read_text())
            try:
                deadline = time.monotonic() + 240
                if phase == "running":  # every deployment up (/healthz answers once the ingress alone is)
                    while "pab serve: http://" not in log_path.read_text():
                        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                        time.sleep(0.5)
                    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
                else:  # Ray is up (Serve's controller logs), the app is still deploying
                    while "ServeController pid=" not in log_path.read_text():
                        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                        time.sleep(0.2)
                    assert "pab serve: http://" not in log_path.read_text()
                t0 = time.monotonic()
                os.kill(pid, signal.SIGTERM)
                assert proc.wait(60) == 0, log_path.read_text()[-3000:]
                took = time.monotonic() - t0
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log_path.read_text()
        assert took < 30, f"{phase}: stopped {took:.0f} s after SIGTERM"
        assert "shutting down" in text, text[-3000:]
        if phase == "running":  # (stopped mid-deploy, Serve's controller logs the replicas it could not finish)
            assert "Traceback" not in text, text[-3000:]
        deadline = time.monotonic() + 20
        while _ray_processes(tmpdir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(tmpdir), _ray_processes(tmpdir)
