"""`pab serve`: the whole service on this machine (local Ray, Serve, a model, a storage backend).

    pab serve                                           # tiny model on CPU (no GPU) -> ./outputs
    pab serve --port 8080 --model opensora-v1.2 --checkpoint /ckpt/opensora-v1.2 --gpus-per-group 2
    pab serve --s3-endpoint http://127.0.0.1:8333 --bucket videos   # credentials: AWS_* environment
    pab serve --config app.yaml                         # the full app config (see docs/serving.md)

It starts (or joins, with --ray-address or RAY_ADDRESS) a Ray cluster, starts Serve's HTTP proxy on --host/--port,
deploys `cluster.app:build_app` and runs until Ctrl-C. API keys: PAB_API_KEYS (comma-separated) or
--api-key; without any the API is open and a warning says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any


# On the CPU a video this many times the model's default is refused unless --max-workload says otherwise: the
# small model's default renders in about 3 s there (2 cores), and a 720p one sat for minutes in its decode alone.
CPU_WORKLOAD_FACTOR = 16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pab serve", description="Serve text-to-video over HTTP on this machine.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="YAML app config; the flags below override its fields")
    p.add_argument("--model", help="model to serve (default: opensora-v1.2-small, trained here and shipped)")
    p.add_argument("--checkpoint", help="the weights: local folder, s3://bucket/prefix or Hugging Face repo id "
                                        "(read from the local cache; README 'Checkpoints')")
    p.add_argument("--vae", help="the VAE's own source (same forms), e.g. hpcai-tech/OpenSora-VAE-v1.2")
    p.add_argument("--text-encoder", help="the text encoder's own source, e.g. DeepFloyd/t5-v1_1-xxl")
    p.add_argument("--gpus-per-group", type=int, default=None, help="ranks per group (sequence parallel degree)")
    p.add_argument("--min-groups", type=int, default=None)
    p.add_argument("--max-groups", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="local folder for videos and job records (default ./outputs)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL; with --bucket, store in S3 instead of a folder")
    p.add_argument("--bucket", help="S3 bucket (created if missing)")
    p.add_argument("--prefix", default="", help="S3 key prefix")
    p.add_argument("--api-key", action="append", default=[], help="accepted bearer token (repeatable)")
    p.add_argument("--max-pending", type=int, default=None, help="queue bound; beyond it POST gets 429")
    p.add_argument("--max-workload", type=int, default=None, metavar="N",
                   help="refuse a video above N = num_frames*height*width with a 400, for every model (default: no "
                   f"limit with GPUs; {CPU_WORKLOAD_FACTOR}x the model's default video on the CPU, where a big one "
                   "takes hours; 0: no limit)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster instead of starting one (default: $RAY_ADDRESS if set)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs for a local Ray (default: detected)")
    p.add_argument("--app-name", default="pab")
    return p


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def build_config(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """The app config dict for these flags on a machine with `gpus` GPUs."""
    cfg: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
    if args.model or "models" not in cfg:
        # The small model trained here: real videos without any download, on a CPU or a GPU.
        model = args.model or "opensora-v1.2-small"
        cfg["models"] = [{"name": model}]
    m = cfg["models"][0]
    for key in ("checkpoint", "vae", "text_encoder"):
        if getattr(args, key, None):
            m[key] = getattr(args, key)
    if any(v is not None for v in (args.gpus_per_group, args.min_groups, args.max_groups)) or "groups" not in m:
        pool = (m.get("groups") or [{}])[0]
        pool["gpus"] = args.gpus_per_group or pool.get("gpus", 1)
        pool["min_groups"] = args.min_groups if args.min_groups is not None else pool.get("min_groups", 1)
        pool["max_groups"] = args.max_groups if args.max_groups is not None else pool.get(
            "max_groups", max(1, gpus // pool["gpus"]) if gpus else 1)
        m["groups"] = [pool]
    if args.bucket:
        cfg["storage"] = {"backend": "s3", "bucket": args.bucket, "endpoint_url": args.s3_endpoint,
                          "prefix": args.prefix, "create_bucket": True}
    elif args.s3_endpoint:
        raise SystemExit("pab serve: --s3-endpoint needs --bucket")
    elif args.output_dir or "storage" not in cfg:
        cfg["storage"] = {"backend": "local", "path": os.path.abspath(args.output_dir or "outputs")}
    if not gpus:
        # CPU only: groups hold CPUs instead of GPUs.
        cfg.setdefault("gpus_per_rank", 0)
    if args.api_key:
        cfg["api_keys"] = list(cfg.get("api_keys", [])) + args.api_key
    if args.max_pending is not None:
        cfg["max_pending"] = args.max_pending
    for each in cfg["models"]:
        if args.max_workload is not None:
            each["max_workload"] = args.max_workload or None
        elif not gpus and "max_workload" not in each:
            each["max_workload"] = CPU_WORKLOAD_FACTOR * _default_workload(each.get("name", ""))
    return cfg


def _default_workload(model: str) -> int:
    """num_frames*height*width of the model's default video; 1 for a name `load_config` will refuse."""
    from pab.models import get_spec, split_name

    try:
        d = get_spec(model).defaults_for(split_name(model)[1])
    except (KeyError, ValueError):
        return 1
    return d.num_frames * d.height * d.width


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.config import load_config

    gpus = args.num_gpus if args.num_gpus is not None else _gpu_count()
    try:
        config = build_config(args, gpus)
        load_config(config)  # fail here, with the reason, not inside a replica
    except (ValueError, OSError) as e:
        print(f"pab serve: {e}", file=sys.stderr)
        return 2
    # SIGINT / SIGTERM (Ctrl-C; what Kubernetes and `docker stop` send) mean: stop, also while Ray and the app
    # are still starting (tens of seconds on a small machine). The handler only records the signal: raising
    # from it inside Ray's calls can abort the process; the deploy is awaited here, a second at a time. Only
    # during ray.init itself (a few seconds) do Ray's own handlers answer a signal.
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    def install() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    install()
    try:
        if not ray.is_initialized():
            if args.ray_address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=args.ray_address)  # None: RAY_ADDRESS
            else:
                # A local Ray on a small machine: Serve kills an HTTP proxy that is not up within 5 s, which a
                # loaded 2-core host can miss (the proxy's Python start alone takes seconds); allow 60 s.
                # Set before ray.init so the Serve controller, started from this process's cluster, sees it.
                os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
                # Logical CPUs: the ingress and group drivers mostly wait; the ranks do the work.
                # "local": a new Ray even where /tmp/ray/ray_current_cluster names another (a `ray start` left
                # running, or a stale one): ray.init() would join that and refuse num_cpus, with a traceback.
                ray.init(address="local", num_gpus=gpus, num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False)
                # This process owns that Ray: if it is SIGKILLed, the watchdog ends what it started.
                from cluster.watchdog import start_watchdog

                start_watchdog(ready_s=10)  # Ray's processes are known to it before Serve starts more
        install()  # again: ray.init installed Ray's (Python) and its core worker's (C++, which aborts) handlers
        serve.start(http_options={"host": args.host, "port": args.port})
        # Deploy without waiting inside Serve, then wait here, where a stop signal is seen within a second.
        target = serve.RunTarget(build_app(config), name=args.app_name, route_prefix="/")
        serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        while not stop.wait(1.0):
            app = serve.status().applications.get(args.app_name)
            state = str(getattr(app, "status", ""))
            if state.endswith("RUNNING"):
                break
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                print(f"pab serve: the app failed to deploy: {getattr(app, 'message', '')}", file=sys.stderr)
                return 1
        if stop.is_set():
            print(f"pab serve: {received[0] if received else 'stopped'} while starting; shutting down", flush=True)
            return 0
        url = f"http://{args.host}:{args.port}"
        print(f"pab serve: {url}/v1/videos  (docs: {url}/docs)  model {config['models'][0]['name']}", flush=True)
        while not stop.wait(1.0):
            pass
        print("pab serve: shutting down", flush=True)
    finally:
        # Queued and unfinished jobs stay in storage; the next `pab serve` on it adopts and renders them.
        try:
            if ray.is_initialized():
                _stop_serve(serve.shutdown, SERVE_SHUTDOWN_S)
        finally:
            ray.shutdown()  # also what a half-done ray.init started
    return 0


# How long Serve may take to stop its replicas before Ray is stopped under it.
SERVE_SHUTDOWN_S = 10.0


def _stop_serve(shutdown: Any, timeout_s: float) -> None:
    """Run Serve's `shutdown` on a daemon thread for at most `timeout_s`, and watch the Ray this process started.

    A stop signal sent to the process group (systemd's stop, `kill -- -PGID`) reaches Ray's own processes too.
    Then serve.shutdown() waits tens of seconds on a cluster that is going, and Ray's core worker ends this
    process with status 1 inside ray.shutdown() once its raylet goes. So when one of them has died, what is left
    of that Ray is ended here and the process exits 0: a stop that was asked for."""
    done = threading.Event()

    def run() -> None:
        try:
            shutdown()
        except Exception as e:  # noqa: BLE001 - stopping anyway; the reason is worth a line
            print(f"pab serve: stopping Serve: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="serve-shutdown").start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.25):
        dead = _dead_ray_processes()
        if dead:
            print(f"pab serve: the signal reached Ray's own processes too ({', '.join(dead)} ended); stopping "
                  "what is left of them", flush=True)
            _end_own_ray()
        if time.monotonic() > deadline:
            print(f"pab serve: Serve did not stop within {timeout_s:g} s; stopping Ray", file=sys.stderr, flush=True)
            return


def _dead_ray_processes() -> list[str]:
    """Which processes of the Ray that ray.init started here have died ([] for a Ray joined by address)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return sorted({kind for kind, _ in node.dead_processes()}) if node is not None else []


def _end_own_ray() -> None:
    import ray

    ray._private.worker._global_node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
