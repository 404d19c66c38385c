"""Bulk rendering: a Parquet manifest of prompts in, one mp4 + JSON sidecar per row and a results table out.

One GPU, on a machine with Ray installed (a local Ray starts by itself)::

    python -m jobs.render --manifest prompts.parquet --output outputs/batch1 --model opensora-v1.2 --pab paper

A cluster (the code travels with the job; S3 credentials come from the cluster's environment)::

    ray job submit --address http://head:8265 --working-dir . -- \\
        python -m jobs.render --manifest s3://prompts/batch1.parquet --output s3://videos/batch1 \\
        --model opensora-v1.2 --group-size 2 --groups 4 --steps 30 --pab paper
    pab bulk submit --manifest s3://prompts/batch1.parquet --output s3://videos/batch1 --group-size 2 --groups 4

On Kubernetes, k8s/ray-job.bulk.yaml runs the same command on a cluster that is deleted afterwards.

What it does:

* reads the manifest (a local path or ``s3://bucket/key``); a file that is not Parquet or lacks the
  ``id``/``prompt`` columns stops the job at once (exit code 2) with a message saying what to fix;
* plans every row (`jobs.manifest.plan_rows`): a bad row is reported, never fatal (a row whose ``model``
  column names another model than ``--model`` is one: a job loads one model);
* asks the output storage what earlier runs finished (`jobs.ledger.Ledger`) and renders only the rest,
  so re-running after a crash is safe and renders nothing twice;
* starts ``--groups`` GPU groups of ``--group-size`` GPUs (`actors.group.GpuGroup`, the same group and
  worker code the Serve app uses) and keeps each busy with one row at a time; rank 0 of a group writes
  ``<output>/videos/<key>.mp4`` and its sidecar ``<key>.json`` (key = the row id, or a slug + hash of
  it when the id is not a safe file name);
* logs progress (done, failed, remaining, rate, ETA) and one ``rendered``/``failed`` line per row;
* writes ``<output>/results.parquet`` (`jobs.results.SCHEMA`), one row per manifest row.

One run at a time writes an output (`jobs.lock.RunLock`): a second one started while the first runs stops at
once (exit code 2), naming it.

Exit code: 0 when every row was handled (failed rows included: see the results table), 1 when rows
were left unrendered because no GPU group could run, the groups could not write the output (the first rows all
failed so: the run stops there, rather than fail every row) or another run took the output over, 2 for bad arguments,
a bad manifest, an output that cannot be opened or read or that another run is writing, 130 after Ctrl-C (no
row starts after it; the results table is written, and the next run renders what was left, the rows then
rendering included), 143 after SIGTERM (`pab bulk stop`, `ray job stop`, a pod being deleted), handled as Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pab.engine import EngineOptions
from pab.request import add_options, from_options
from pab.storage import (
    NotFound, Storage, StorageConfig, StorageUnavailable, storage_errors, storage_from_config, video_keys,
)
from jobs.ledger import STATE_COMPLETED, Ledger
from jobs.lock import OutputBusy, RunLock
from jobs.manifest import ManifestError, RenderSettings, RowPlan, plan_rows, read_manifest
from jobs.results import RESULTS_KEY, ResultRow, to_parquet_bytes

log = logging.getLogger("jobs.render")


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


class ResourceError(RuntimeError):
    """The cluster can never hold one group as asked."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jobs.render`` (also used by ``pab bulk submit`` to check arguments)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.render",
        description="Render every row of a Parquet manifest on GPU groups; resumable.",
        allow_abbrev=False,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--manifest", required=True, help="Parquet manifest: a path or s3://bucket/key")
    io.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    io.add_argument("--s3-endpoint", default=None,
                    help="S3 endpoint URL (default: $PAB_S3_ENDPOINT, $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, AWS)")
    io.add_argument("--dry-run", action="store_true",
                    help="check the manifest, and each row against the model's rules, and report what would render")
    io.add_argument("--take-over", action="store_true",
                    help="start although the output's run lease names another run (only once you know it is dead; "
                         "a dead run's lease frees itself 2 minutes after its last refresh)")

    g = p.add_argument_group("model and GPU groups")
    g.add_argument("--model", default="opensora-v1.2", help="model name (`pab models`), e.g. opensora-v1.2-tiny")
    g.add_argument("--checkpoint", default=None, help="checkpoint folder, s3://bucket/prefix or Hugging Face repo id "
                                                      "(local cache); none = random weights")
    g.add_argument("--vae", default=None, help="the VAE's own source (same forms); none = the checkpoint's")
    g.add_argument("--text-encoder", default=None, help="the text encoder's own source; none = the checkpoint's")
    g.add_argument("--group-size", type=int, default=1, help="GPUs per group (sequence parallel degree)")
    g.add_argument("--groups", type=int, default=1, help="groups rendering at once")
    g.add_argument("--placement-strategy", default="STRICT_PACK", choices=["STRICT_PACK", "PACK", "SPREAD"],
                   help="Ray placement of a group: STRICT_PACK keeps it on one node; PACK lets a group larger than "
                        "any node span several")
    g.add_argument("--cfg-parallel", action="store_true", help="split the CFG halves over the group (even size)")
    g.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto (GPU if the rank sees one), cpu or cuda")
    EngineOptions.add_arguments(g)  # --[no-]compile, --[no-]cuda-graphs, --[no-]vae-kernels
    g.add_argument("--gpus-per-rank", type=float, default=1.0, help="0 renders on CPU-only nodes")
    g.add_argument("--cpus-per-rank", type=float, default=1.0)
    g.add_argument("--max-attempts", type=int, default=3,
                   help="tries per row when its group breaks (a row the model rejects is not retried)")
    g.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds a group may take to get GPUs and load (autoscaling included)")
    g.add_argument("--row-timeout", type=float, default=None,
                   help="seconds one video may take before its group is rebuilt")
    g.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    g.add_argument("--ray-address", default=None, help="Ray cluster (default: the job's, else a new local Ray)")

    d = p.add_argument_group("defaults for per-row settings (a manifest column of the same name wins)")
    add_options(d, helps={"seed": "seed for rows without one (default: derived from the row's id)"}, seed=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("group_size", "groups", "max_attempts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.defaults = from_options(args, RenderSettings)
    except ValueError as e:
        parser.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------
# Storage locations
# ----------------------------------------------------------------------------------------------------


def _endpoint(arg: str | None) -> str | None:
    env = os.environ
    return arg or env.get("PAB_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def storage_config_for(uri: str, endpoint: str | None = None) -> StorageConfig:
    """A StorageConfig rooted at an output URI: ``s3://bucket/prefix``, ``file:///dir`` or a plain path."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"bad S3 URI {uri!r}: use s3://bucket/prefix")
        return StorageConfig(
            backend="s3", bucket=bucket, prefix=prefix.strip("/"), endpoint_url=_endpoint(endpoint),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI {uri!r}: use a path or s3://bucket/prefix")
    return StorageConfig(backend="local", path=uri)


def read_uri(uri: str, endpoint: str | None = None) -> bytes:
    """Bytes of a file given as a path or ``s3://bucket/key``."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ManifestError(f"bad manifest URI {uri!r}: use s3://bucket/key.parquet")
        store = storage_from_config(storage_config_for(f"s3://{bucket}", endpoint))
        try:
            return store.get_bytes(key)
        except NotFound:
            raise ManifestError(f"manifest {uri} does not exist") from None
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {path} is a folder; give the .parquet file") from None


# ----------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counts for the job log; thread-safe."""

    total: int
    completed: int = 0
    failed: int = 0
    resumed: int = 0
    rendered: int = 0  # videos rendered by this run (the rate and ETA are based on these)
    first_render: float | None = None  # when the first group took its first row
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rendering(self) -> None:
        with self._lock:
            self.first_render = self.first_render or time.monotonic()

    def add(self, status: str, rendered: bool = False, resumed: bool = False) -> None:
        with self._lock:
            if status == STATE_COMPLETED:
                self.completed += 1
            else:
                self.failed += 1
            self.rendered += rendered
            self.resumed += resumed

    def line(self) -> str:
        with self._lock:
            done = self.completed + self.failed
            remaining = self.total - done
            # Rate over rendering time only: group start-up (GPUs, model load) is not a per-video cost.
            elapsed = time.monotonic() - self.first_render if self.first_render else 0.0
            rate = self.rendered / elapsed if self.rendered and elapsed > 0 else 0.0
            eta = f"{remaining / rate:.0f}s" if rate > 0 else ("0s" if remaining == 0 else "unknown")
            return (
                f"progress: done {done}/{self.total} (completed {self.completed}, failed {self.failed}, "
                f"resumed {self.resumed}), remaining {remaining}, {rate * 60:.1f} videos/min, ETA {eta}"
            )


def engine_check(model: str, checkpoint: str | None) -> Callable[[dict[str, Any]], str | None]:
    """The model's own checks on a row's request, weight-free (`actors.engine.plan_request`, as the ingress runs
    them), once per distinct settings: a manifest of thousands of rows has a handful. Returns the refusal naming
    its field, or None. Preset names are left to the groups where the weights (and their calibration) are on S3."""
    from actors.engine import model_calibration, plan_request

    try:
        calibration, unchecked = model_calibration(model, checkpoint)
    except ValueError as e:  # a damaged cache.json: the groups load it too, and say so on every row
        log.warning("the calibration beside %s's weights cannot be read (%s); preset names are checked by the "
                    "groups", model, e)  # fmt: skip
        calibration, unchecked = None, True
    seen: dict[str, str | None] = {}

    def check(request: dict[str, Any]) -> str | None:
        settings = json.dumps({k: v for k, v in request.items() if k not in ("prompt", "seed")}, sort_keys=True,
                              default=str)  # fmt: skip
        if settings not in seen:
            try:
                plan_request(dict(request), calibration, names_unchecked=unchecked)
                seen[settings] = None
            except ValueError as e:
                field = getattr(e, "field", "")
                seen[settings] = f"{field}: {e}" if field else str(e)
        return seen[settings]

    return check


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------


class BulkRender:
    """One run of a bulk render: plan, resume, render on GPU groups, write results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = submission_id() or f"run-{uuid.uuid4().hex[:8]}"
        self.out_config = storage_config_for(args.output, args.s3_endpoint)
        with storage_errors(self.out_config, "open the output"):  # e.g. a path under a file: one line, exit 2
            self.store: Storage = storage_from_config(self.out_config)
        self.ledger = Ledger(self.store)
        self.results: dict[int, ResultRow] = {}
        self._results_lock = threading.Lock()
        self.progress: Progress | None = None
        self._all_done = threading.Event()
        self._stop = threading.Event()  # Ctrl-C, SIGTERM, or the output taken over: no group takes another row
        self._how: str | None = None  # what interrupted the run: `_INTERRUPTS`' keys
        self._rendering = False
        self._sigterm_before: Any = None  # the handler `_stop_on_sigterm` replaced; `run` puts it back
        self._storage_strikes = 0  # rows the groups could not store while no row of this run was stored
        self.unrendered_reason: str | None = None
        self.lock = RunLock(self.store, self.run_id, args.output)
        self.lost_output: str | None = None  # why another run holds the output now

    # ------------------------------------------------------------------ planning

    def plan(self) -> tuple[list[RowPlan], list[RowPlan]]:
        """(all plans, the ones to render now); fills results for bad, finished and adopted rows."""
        a = self.args
        table = read_manifest(read_uri(a.manifest, a.s3_endpoint), source=a.manifest)
        plans = plan_rows(table, a.model, a.defaults, engine_check(a.model, a.checkpoint))
        ignored = [c for c in table.column_names if c not in ("id", "prompt") and c not in RenderSettings.model_fields]
        if ignored:
            log.info("manifest columns not used for rendering: %s", ignored)
        self.progress = Progress(total=len(plans))
        with storage_errors(self.out_config, "read what earlier runs rendered"):  # no bucket, bad credentials
            found = self.ledger.scan(plans)
        todo: list[RowPlan] = []
        for plan in plans:
            if not plan.ok:
                self._finish(ResultRow(plan.row, plan.id, "failed", seed=_seed(plan), error=plan.error))
                log.info("failed row=%d id=%r: %s", plan.row, plan.id, plan.error)
                continue
            f = found[plan.row]
            if f.action == "render":
                if f.reason:
                    log.info("row=%d id=%r renders again: %s", plan.row, plan.id, f.reason)
                todo.append(plan)
                continue
            sidecar = f.sidecar
            if f.action == "adopt" and not a.dry_run:
                sidecar = self.ledger.adopt(plan, sidecar, self.run_id)
                log.info("adopted row=%d id=%r: %s", plan.row, plan.id, f.reason)
            self._finish(self._completed(plan, sidecar, resumed=True))
        log.info(
            "manifest %s: %d rows, %d bad, %d already rendered, %d to render with %s on %d group(s) of %d",
            a.manifest, len(plans), sum(not p.ok for p in plans), self.progress.completed, len(todo),
            a.model, a.groups, a.group_size,
        )
        return plans, todo

    def _completed(self, plan: RowPlan, sidecar: dict[str, Any], resumed: bool, attempts: int = 0,
                   render_s: float | None = None, timings: dict[str, float] | None = None) -> ResultRow:
        mp4, side = video_keys(plan.key)
        return ResultRow(
            plan.row, plan.id, "completed", output_uri=self.store.uri(mp4), sidecar_uri=self.store.uri(side),
            seed=plan.request["seed"], render_s=render_s,
            timings=timings if timings is not None else sidecar.get("timings"),
            attempts=attempts, resumed=resumed, fingerprint=plan.fingerprint,
        )

    def _finish(self, row: ResultRow, rendered: bool = False) -> None:
        with self._results_lock:
            self.results[row.row] = row
            if len(self.results) == self.progress.total:
                self._all_done.set()
        self.progress.add(row.status, rendered=rendered, resumed=row.resumed)

    # ------------------------------------------------------------------ rendering

    def _new_group(self, index: int):
        from actors.group import GpuGroup

        a = self.args
        return GpuGroup(
            a.model, a.group_size, checkpoint=a.checkpoint, vae=a.vae, text_encoder=a.text_encoder, device=a.device,
            dtype=a.dtype,
            cfg_parallel=a.cfg_parallel, gpus_per_rank=a.gpus_per_rank, cpus_per_rank=a.cpus_per_rank,
            placement_strategy=a.placement_strategy,
            # An S3 checkpoint is reached like the output: same endpoint, AWS-environment credentials.
            s3={"endpoint_url": _endpoint(a.s3_endpoint), "region": self.out_config.region},
            name=f"bulk-{self.run_id[-8:]}-g{index}", start_timeout_s=a.start_timeout,
            engine_options=EngineOptions.from_args(a).changed(),
        )

    def _connect(self) -> None:
        """Join the Ray cluster: the job's own (RAY_ADDRESS), `--ray-address`, or a new local one."""
        import ray

        if not ray.is_initialized():
            local = not self.args.ray_address and not os.environ.get("RAY_ADDRESS")
            # "local": a new Ray, not the one /tmp/ray/ray_current_cluster names (a `ray start` left running or
            # long gone), which ray.init() would join.
            ray.init(address="local" if local else self.args.ray_address, log_to_driver=True)
            # Once this run shuts Ray down (at exit, after Ctrl-C), a group thread's next Ray call must fail,
            # not start a second local Ray (Ray connects anew on first use unless told not to).
            try:
                from ray._private import auto_init_hook

                auto_init_hook.enable_auto_connect = False
            except ImportError:  # moved in a later Ray: the stop flag alone keeps the groups from new work
                pass
            if local:
                self._fit_local(ray.cluster_resources())

    def _fit_local(self, resources: dict[str, float]) -> None:
        """A Ray started here has no autoscaler: a group it cannot hold would wait for ever. Without any GPU,
        render on the CPU (as `pab serve` does); too few GPUs or CPUs for one group is an error saying so."""
        a = self.args
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        if a.gpus_per_rank > 0 and gpus == 0 and a.device in ("auto", "cpu"):
            log.warning("no GPU on this machine: rendering on the CPU (pass --gpus-per-rank 0 to say so)")
            a.gpus_per_rank = 0.0
        if a.gpus_per_rank * a.group_size > gpus or a.cpus_per_rank * a.group_size > cpus:
            raise ResourceError(
                f"a group of {a.group_size} needs {a.gpus_per_rank * a.group_size:g} GPU and "
                f"{a.cpus_per_rank * a.group_size:g} CPU, but the local Ray has {gpus:g} GPU and {cpus:g} CPU; "
                "use a smaller --group-size, --gpus-per-rank/--cpus-per-rank, or --ray-address of a larger cluster"
            )

    def render(self, todo: list[RowPlan]) -> None:
        """Render `todo` on `--groups` groups, one thread per group pulling rows from a shared queue."""
        self._connect()
        self._stop_on_sigterm()
        work: queue.Queue[tuple[RowPlan, int]] = queue.Queue()
        for plan in todo:
            work.put((plan, 1))
        threads: list[threading.Thread] = []
        self._rendering = True
        try:  # from the first group's start: a Ctrl-C may come as soon as one renders
            for i in range(self.args.groups):
                threads.append(threading.Thread(target=self._group_loop, args=(i, work), name=f"group-{i}",
                                                daemon=True))  # fmt: skip
                threads[-1].start()
            # Wait until every row has a result, or every group gave up. A group still waiting for GPUs
            # when the others have finished the work is not waited for (the job ends, Ray cleans it up).
            next_line = time.monotonic() + self.args.progress_every
            while not self._all_done.wait(timeout=0.5) and any(t.is_alive() for t in threads):
                if time.monotonic() >= next_line:
                    log.info(self.progress.line())
                    next_line += self.args.progress_every
        except KeyboardInterrupt as e:
            # Ctrl-C or SIGTERM: no group takes another row; the rows rendering now keep their intent, so the next
            # run renders them again. The results table is written for what finished.
            self._stop.set()
            self._how = _SIGTERM if isinstance(e, Stopped) else _CTRL_C
            self.unrendered_reason = f"{self._how}; run the job again to render it"
            log.warning("%s: no more rows start; %s", self._how, self.progress.line())
        finally:
            self._rendering = False
        # Every group gave up (or the run was interrupted): what is still queued cannot render in this run.
        while not work.empty():
            plan, attempt = work.get_nowait()
            self._row_failed(plan, attempt - 1, f"not rendered: {self.unrendered_reason or 'no GPU group left'}")

    def _stop_on_sigterm(self) -> None:
        """SIGTERM stops the run as Ctrl-C does, so the results table is written: Ray's own driver handler (set by
        ray.init) only exits. Past the rendering, a SIGTERM lets the table be finished."""
        if threading.current_thread() is not threading.main_thread():
            return  # a signal handler can only be set, and a signal only lands, in the main thread

        def stop(signum: int, frame: Any) -> None:
            if self._rendering:
                raise Stopped()
            log.warning("SIGTERM: writing the results table, then stopping")

        self._sigterm_before = signal.signal(signal.SIGTERM, stop)

    def _group_loop(self, index: int, work: queue.Queue) -> None:
        group = self._new_group(index)
        try:
            try:
                if self._stop.is_set():
                    return
                group.start()
                log.info("group %s ready in %.1fs", group.name, group.info.get("start_s", 0.0))
            except Exception as e:  # noqa: BLE001 - reported, the other groups go on
                self.unrendered_reason = f"group {index} could not start: {e}"
                log.error("%s", self.unrendered_reason)
                return
            while not self._stop.is_set():
                try:
                    plan, attempt = work.get_nowait()
                except queue.Empty:
                    return
                if not self._render_one(group, plan, attempt, work):
                    return
        finally:
            group.shutdown()

    def _render_one(self, group, plan: RowPlan, attempt: int, work: queue.Queue) -> bool:
        """Render one row; False if the group is gone for good (the row is queued again or failed)."""
        from actors.group import GenerationError, GroupError

        extra = {
            "state": STATE_COMPLETED, "manifest_id": plan.id, "manifest_row": plan.row,
            "fingerprint": plan.fingerprint, "run_id": self.run_id, "attempt": attempt,
            "job": {"manifest": self.args.manifest, "output": self.args.output},
        }
        self.progress.rendering()
        t0 = time.monotonic()
        try:
            self.ledger.mark_rendering(plan, self.run_id)
            result = group.generate(
                plan.request,
                output={"storage": self.out_config.to_args(), "video_id": plan.key, "sidecar": extra},
                timeout_s=self.args.row_timeout,
            )
        except GenerationError as e:
            # The model rejected the request on every rank: not retried.
            self._row_failed(plan, attempt, str(e))
            return True
        except GroupError as e:  # GroupFailed / GroupUnavailable: a rank died or hung, the group is gone
            log.warning("row=%d id=%r attempt %d: group %s broke: %s", plan.row, plan.id, attempt, group.name, e)
            if attempt < self.args.max_attempts:
                work.put((plan, attempt + 1))
            else:
                self._row_failed(plan, attempt, f"gave up after {attempt} attempts: {e}")
            try:
                group.rebuild()
                return True
            except Exception as e2:  # noqa: BLE001
                self.unrendered_reason = f"group could not be rebuilt: {e2}"
                log.error("%s", self.unrendered_reason)
                return False
        except Exception as e:  # noqa: BLE001 - e.g. storage unreachable: report the row, keep the group
            log.exception("row=%d id=%r failed outside the group", plan.row, plan.id)
            self._row_failed(plan, attempt, f"{type(e).__name__}: {e}")
            if isinstance(e, StorageUnavailable):
                self._storage_failed(e)
            return True
        render_s = time.monotonic() - t0
        row = self._completed(plan, {}, resumed=False, attempts=attempt, render_s=render_s,
                              timings=result.get("timings"))
        row.output_uri = result["video"]["uri"]
        self._finish(row, rendered=True)
        log.info("rendered row=%d id=%r key=%s -> %s in %.2fs on %s (attempt %d, run %s)",
                 plan.row, plan.id, plan.key, row.output_uri, render_s, group.name, attempt, self.run_id)
        for notice in result.get("notices") or []:  # where the video differs from the row (its sidecar keeps them)
            log.info("notice row=%d id=%r: %s", plan.row, plan.id, notice)
        return True

    def _storage_failed(self, err: StorageUnavailable) -> None:
        """A group could not store its video. Before any row of this run was stored, `_STORAGE_STRIKES` such rows
        mean the groups cannot write the output at all (no credentials on the workers, say): stop, rather than
        render every row of the manifest for nothing, and leave the rest for a run once that is fixed."""
        with self._results_lock:
            self._storage_strikes += 1
            enough = max(_STORAGE_STRIKES, self.args.groups)  # each group's first row may fail at once
            if self.progress.rendered or self._storage_strikes < enough or self._stop.is_set():
                return
            self.unrendered_reason = (
                f"the GPU groups could not write the output ({self._storage_strikes} rows failed so, none stored; the "
                f"last: {err}); let the cluster write {self.args.output}, then run the job again")
            self._stop.set()
        log.error("stopping: %s", self.unrendered_reason)

    def _row_failed(self, plan: RowPlan, attempts: int, error: str) -> None:
        mp4, side = video_keys(plan.key)
        try:
            # Drop the intent (nothing of this row is in storage), unless the output is another run's now: the
            # intent may be that run's.
            if self.lost_output is None and not self.store.exists(mp4):
                self.store.delete(side)
        except Exception as e:  # noqa: BLE001 - the next run re-renders it either way
            log.warning("could not clean up %s: %s", side, e)
        self._finish(ResultRow(plan.row, plan.id, "failed", seed=_seed(plan), error=error, attempts=attempts,
                               fingerprint=plan.fingerprint))
        log.info("failed row=%d id=%r: %s", plan.row, plan.id, error)

    # ------------------------------------------------------------------ results

    def write_results(self) -> str:
        rows = [self.results[i] for i in sorted(self.results)]
        self.store.put_bytes(RESULTS_KEY, to_parquet_bytes(rows), "application/vnd.apache.parquet")
        return self.store.uri(RESULTS_KEY)

    def run(self) -> int:
        log.info("run %s: driver pid %d, manifest %s, output %s", self.run_id, os.getpid(), self.args.manifest,
                 self.args.output)
        if self.args.dry_run:  # reads only: no lease
            _, todo = self.plan()
            log.info("dry run: would render %d row(s): %s", len(todo), [p.id for p in todo][:20])
            return 0
        with storage_errors(self.out_config, "take the output's run lease"):
            self.lock.acquire(force=self.args.take_over)  # OutputBusy: another run writes here
        self.lock.start_refreshing(self._output_lost)
        try:
            return self._run()
        finally:
            self.lock.release()
            if self._sigterm_before is not None:
                signal.signal(signal.SIGTERM, self._sigterm_before)

    def _output_lost(self, reason: str) -> None:
        """Another run took the output over (this one was taken for dead): start no more rows, write no results."""
        self.lost_output = reason
        self.unrendered_reason = reason
        self._stop.set()
        log.error("%s: no more rows start here, and the results table is that run's to write", reason)

    def _run(self) -> int:
        t0 = time.monotonic()
        plans, todo = self.plan()
        if todo:
            self.render(todo)
        if self.lost_output is not None:
            return 1
        lost = (f"{self._how} while it rendered; the next run renders it" if self._how
                else self.unrendered_reason or "the job lost track of this row (see the log)")
        for plan in plans:  # every manifest row gets a results row, whatever happened above
            if plan.row not in self.results:
                self._finish(ResultRow(plan.row, plan.id, "failed", seed=_seed(plan), error=f"not rendered: {lost}"))
        uri = self.write_results()
        log.info(self.progress.line())
        log.info("results: %s (%d rows) in %.1fs", uri, len(self.results), time.monotonic() - t0)
        if self._how is not None:
            return _INTERRUPTS[self._how]
        unrendered = sum(1 for r in self.results.values() if r.error and r.error.startswith("not rendered:"))
        return 1 if unrendered else 0


_STORAGE_STRIKES = 3  # rows the groups could not store, none stored, before a run stops (`_storage_failed`)


_CTRL_C, _SIGTERM = "interrupted (Ctrl-C)", "stopped (SIGTERM)"
_INTERRUPTS = {_CTRL_C: 130, _SIGTERM: 143}  # the exit codes a shell gives them


class Stopped(KeyboardInterrupt):
    """SIGTERM while rows render: handled as Ctrl-C is (`BulkRender._stop_on_sigterm`)."""


def submission_id() -> str | None:
    """The Ray job's submission id when running as a Ray job, else None.

    The job supervisor hands the driver its job config (with metadata ``job_submission_id``) in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (ray/dashboard/modules/job/job_supervisor.py).
    """
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def _seed(plan: RowPlan) -> int | None:
    return plan.request["seed"] if plan.request else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    args = parse_args(argv)
    try:
        return BulkRender(args).run()
    except (ManifestError, ResourceError, StorageUnavailable, OutputBusy) as e:
        what = {ManifestError: "bad manifest", ResourceError: "cannot render here",
                OutputBusy: "output busy"}.get(type(e), "bad output")  # fmt: skip
        log.error("%s: %s", what, e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before rendering started (planning, reading the manifest): nothing to keep
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
