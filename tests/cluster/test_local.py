"""`pab serve` (cluster.local:main): flags -> app config, and the whole thing in a subprocess (slow)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest

from cluster.config import load_config
from cluster.local import _parser, build_config
from support.ports import free_ports


def test_flags_to_config(tmp_path):
    args = _parser().parse_args(["--output-dir", str(tmp_path), "--api-key", "k", "--max-pending", "3"])
    cfg = load_config(build_config(args, gpus=0))
    assert cfg.models[0].name == "opensora-v1.2-small" and cfg.gpus_per_rank == 0  # CPU: groups hold CPUs
    assert cfg.storage.backend == "local" and cfg.storage.path == str(tmp_path) and cfg.max_pending == 3
    assert [k.get_secret_value() for k in cfg.api_keys] == ["k"]
    assert cfg.models[0].max_workload == 16 * 17 * 64 * 64  # on the CPU: 16x the model's default video
    for flag, limit in (("0", None), ("500", 500)):
        cfg = load_config(build_config(_parser().parse_args(["--max-workload", flag]), gpus=0))
        assert cfg.models[0].max_workload == limit
    args = _parser().parse_args(["--s3-endpoint", "http://127.0.0.1:1", "--bucket", "vids", "--gpus-per-group", "2"])
    cfg = load_config(build_config(args, gpus=8))
    assert cfg.models[0].name == "opensora-v1.2-small" and cfg.models[0].groups[0].gpus == 2
    assert cfg.models[0].groups[0].max_groups == 4 and cfg.gpus_per_rank == 1
    assert cfg.storage.backend == "s3" and cfg.storage.bucket == "vids" and cfg.storage.create_bucket
    assert cfg.models[0].max_workload is None  # with GPUs no limit unless one is asked for
    with pytest.raises(SystemExit):
        build_config(_parser().parse_args(["--s3-endpoint", "http://x"]), gpus=0)
    args = _parser().parse_args(["--model", "opensora-v1.2", "--checkpoint", "hpcai-tech/OpenSora-STDiT-v3",
                                 "--vae", "hpcai-tech/OpenSora-VAE-v1.2", "--text-encoder", "DeepFloyd/t5-v1_1-xxl"])
    m = load_config(build_config(args, gpus=1)).models[0]  # each part's source reaches the GPU groups' config
    assert (m.checkpoint, m.vae, m.text_encoder) == ("hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2",
                                                     "DeepFloyd/t5-v1_1-xxl")


def _ray_processes(tmpdir: str) -> list[str]:
    """Command lines of the Ray processes whose session lives under `tmpdir` (this test's Ray only)."""
    out = subprocess.run(["pgrep", "-af", tmpdir], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _start(tmp_path, tmpdir: str, port: int, how: str, **env_extra: str) -> tuple[subprocess.Popen, int]:
    """`pab serve` (python -m cluster.local, CPU only) started directly, or `&` in a non-interactive shell,
    where the child starts with SIGINT ignored. Returns the process to wait on and the server's pid."""
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1", **env_extra}  # fmt: skip
    cmd = [sys.executable, "-m", "cluster.local", "--port", str(port), "--output-dir", str(tmp_path / "out"),
           "--num-gpus", "0"]  # fmt: skip
    with open(tmp_path / "serve.log", "wb") as log:
        if how in ("direct", "group"):  # group: its own process group, which Ray's processes join
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=how == "group")
            return proc, proc.pid
        pid_file = tmp_path / "pid"
        pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", "-c", " ".join(cmd) + f" & echo $! > {pid_file}; wait"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, int(pid_file.read_text())


def _kill(proc: subprocess.Popen, pid: int) -> None:
    """After a failed check: the server (not only the shell that started it) goes."""
    for p in {proc.pid, pid}:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop(tmp_path, tmpdir: str, proc: subprocess.Popen, pid: int, sig: signal.Signals, clean: bool,
          group: bool = False) -> None:  # fmt: skip
    """Send `sig` (to its whole process group with `group`: systemd's stop, `kill -- -PGID`); `pab serve` exits 0
    within 30 s, says so, and leaves no Ray process behind. `clean`: no traceback in its log (stopped mid-deploy,
    Serve's controller logs the replicas it could not finish)."""
    log_path = tmp_path / "serve.log"
    t0 = time.monotonic()
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            _kill(proc, pid)
    text = log_path.read_text()
    assert took < 30, f"stopped {took:.0f} s after {sig.name}"
    assert "shutting down" in text, text[-3000:]
    if clean:
        assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 20
    while _ray_processes(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(tmpdir), _ray_processes(tmpdir)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.slow
def test_pab_serve_end_to_end_then_sigterm(tmp_path):
    """`pab serve &` from a shell starts its own Ray + Serve (whatever address a stale Ray left); submit, poll, download; then SIGTERM (Kubernetes,
    `docker stop`) stops it as Ctrl-C does, although the shell left SIGINT ignored, and leaves no Ray behind.
    One start-up of Ray and the app serves both checks: each costs tens of seconds on CI's 2 cores."""
    port, tmpdir = free_ports(1)[0], "/tmp/raypabsv2"
    # The address of a Ray long gone, as a killed `ray start` leaves it: ray.init() joined it and refused num_cpus.
    stale = Path(tmpdir) / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("192.0.2.1:6379")
    proc, pid = _start(tmp_path, tmpdir, port, "background-shell", PAB_API_KEYS="envkey")
    log_path = tmp_path / "serve.log"
    try:
        deadline = time.monotonic() + 240
        while "pab serve: http://" not in log_path.read_text():  # every deployment up
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer envkey"}, timeout=30)
        assert c.get("/healthz").status_code == 200
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
    except BaseException:
        _kill(proc, pid)
        raise
    _stop(tmp_path, tmpdir, proc, pid, signal.SIGTERM, clean=True)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("how, sig", [("direct", signal.SIGINT), ("background-shell", signal.SIGTERM),
                                      ("group", signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm-background-shell", "sigterm-process-group"])
def test_pab_serve_stops_promptly_while_starting(tmp_path, how, sig):
    """Ctrl-C, or SIGTERM to one started in the background, while Ray is up and the app still deploying (tens
    of seconds on a small machine): it stops within seconds, not once the app is up. SIGTERM to its process
    group reaches Ray's own processes too, so Serve's controller is gone before `pab serve` asks it to stop."""
    port, tmpdir = free_ports(1)[0], f"/tmp/raypabterm-{how}"
    proc, pid = _start(tmp_path, tmpdir, port, how)
    log_path = tmp_path / "serve.log"
    deadline = time.monotonic() + 240
    try:
        while "ServeController pid=" not in log_path.read_text():  # Ray is up (Serve's controller logs)
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert "pab serve: http://" not in log_path.read_text()
    except BaseException:
        _kill(proc, pid)
        raise
    _stop(tmp_path, tmpdir, proc, pid, sig, clean=False, group=how == "group")
