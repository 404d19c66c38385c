"""What serving adds: one video through `pab serve` over HTTP next to the bare pipeline, same machine.

    python -m bench.serving                         # tiny model on CPU (a GPU model where there is one)
    python -m bench.serving --model opensora-v1.2 --steps 30 --repeat 3

It starts `pab serve` (local Ray, one group, local folder) on a free port, times the bare pipeline
in this process (generate + mp4 encode, after a warm-up), then submits the same request over HTTP and
polls until it completes. Submit-to-completed includes queueing, dispatch to the group, the
generation, the mp4, storage, and up to one poll interval (0.05 s). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from bench.records import append_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bare(model: str, body: dict, repeat: int) -> tuple[list[float], dict]:
    from pab.pipeline import GenerationRequest, Pipeline
    from pab.video import write_mp4

    pipe = Pipeline.from_name(model)
    req = GenerationRequest(model=model, **{k: v for k, v in body.items() if k != "model"})
    times, stages = [], {}
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        res = pipe.generate(req)
        t1 = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            write_mp4(f.name, res.frames, fps=res.request.fps)
        if i:  # the first run warms kernels and caches, as the server's warm-up video does
            times.append(time.perf_counter() - t0)
            stages = {**res.timings, "encode_s": time.perf_counter() - t1}
    return times, _rounded(stages)


def _rounded(timings: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in (timings or {}).items()}


def _served(base: str, body: dict, repeat: int, timeout_s: float) -> tuple[list[float], dict]:
    """Submit-to-completed times, and the last job's stage timings as the server recorded them."""
    times, stages = [], {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            r = client.post("/v1/videos", json=body)
            r.raise_for_status()
            vid = r.json()["id"]
            while True:
                s = client.get(f"/v1/videos/{vid}").json()
                if s["status"] in ("completed", "failed", "cancelled"):
                    break
                if time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"video {vid} not done after {timeout_s}s: {s}")
                time.sleep(0.05)
            if s["status"] != "completed":
                raise RuntimeError(f"video {vid} {s['status']}: {s.get('error')}")
            if i:
                times.append(time.perf_counter() - t0)
                stages = _rounded(s.get("timings"))
    return times, stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--model", default="opensora-v1.2" if gpu else "opensora-v1.2-tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="bench/results/serving.json")
    args = p.parse_args(argv)
    body = {"model": args.model, "prompt": "a red panda eating bamboo", "steps": args.steps, "seed": 1, "pab": "paper"}

    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pab-bench-ray-"))
    out_dir = tempfile.mkdtemp(prefix="pab-bench-serve-")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pab.cli",
            "serve",
            "--port",
            str(port),
            "--model",
            args.model,
            "--output-dir",
            out_dir,
            "--min-groups",
            "1",
            "--max-groups",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"pab serve exited with {server.returncode}")
            time.sleep(1)
        else:
            raise TimeoutError("pab serve did not answer /healthz within 300 s")
        served, served_stages = _served(base, body, args.repeat, args.timeout)
        bare, bare_stages = _bare(args.model, body, args.repeat)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    b, s = statistics.median(bare), statistics.median(served)
    record = {
        "model": args.model,
        "steps": args.steps,
        "pab": "paper",
        "repeat": args.repeat,
        "bare_s": round(b, 3),
        "served_s": round(s, 3),
        "overhead_s": round(s - b, 3),
        "overhead_pct": round(100 * (s - b) / b, 1),
        "target_s": round(0.02 * b + 0.5, 3),
        "bare_all": [round(t, 3) for t in bare],
        "served_all": [round(t, 3) for t in served],
        # where each side's time went (last timed run): the server's job record and the bare pipeline's
        "served_stages": served_stages,
        "bare_stages": bare_stages,
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "date": datetime.date.today().isoformat(),
    }
    print(f"{'model':<22} {'bare s':>8} {'served s':>9} {'overhead s':>11} {'target (2%+0.5s)':>17}")
    print(f"{args.model:<22} {b:>8.2f} {s:>9.2f} {s - b:>11.2f} {record['target_s']:>17.2f}")
    append_records(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
