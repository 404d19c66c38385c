"""One rank of a GPU group: load a model once, join the group's process group, render videos. No Ray here.

The split follows vLLM's executor/worker: `actors.group.GpuGroup` (the Ray side) creates one
`GenerationWorker` per GPU inside a Ray actor and drives the lifecycle by calling, on every rank,

    worker = GenerationWorker(rank, world_size, "opensora-v1.2", checkpoint="s3://ckpt/opensora-v1.2")
    worker.init_distributed("tcp://127.0.0.1:29500")    # all ranks at once; NCCL on GPU, gloo on CPU
    worker.load()                                        # once; the model stays loaded
    result = worker.generate({"prompt": "a red fox", "seed": 7}, progress_cb, cancel_cb)
    worker.health()

The same calls work without Ray (a plain process per GPU, or one process with `world_size=1`).

The only contact with the engine is the engine factory (default `actors.engine.pipeline_engine`):
`factory(model=, device=, dtype=, checkpoint=, vae=, text_encoder=, parallel=) -> engine` with
`engine.generate(request: dict, progress, should_cancel) -> EngineOutput`. Tests may pass another
factory (a callable or a "module:function" string).

Invariants: one generation at a time per worker (the model holds per-generation PAB hooks), and every
rank of a group receives the same request, so every rank takes the same steps and the same decision to
stop (cancellation is agreed with an all-reduce each step, see `_agreed_cancel`).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pab.errors import GenerationCancelled
from pab.seeds import draw_seed

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


# Each render encodes into a scratch folder named after its process; one whose process is gone (a worker killed
# mid-render: no cleanup runs) holds a partial mp4, and a loading worker removes it.
_SCRATCH = "pab-video-"


def sweep_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch folders of renders whose process has died; returns what was removed."""
    import shutil

    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{_SCRATCH}*-*"):
        pid = path.name[len(_SCRATCH):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to sweep
        return True
    return True


class WorkerError(RuntimeError):
    """The worker is not in a state to do what was asked (not loaded, busy, ...)."""


@dataclass
class EngineOutput:
    """What an engine returns for one video; `frames` is None on ranks other than 0."""

    frames: Any  # numpy uint8 (F, H, W, 3) or None
    request: dict[str, Any]  # the resolved request: every default filled in, seed included
    # What the engine records of the render, in the sidecar's shape (`pab.pipeline.GenerationResult.sidecar`):
    # pab {settings, stats}, cache {policy, stats}, timesteps, notices, parallel, ... The worker adds the group.
    sidecar: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    def generate(
        self, request: dict[str, Any], progress: ProgressCallback, should_cancel: CancelCallback
    ) -> EngineOutput: ...


# An engine whose generate() also takes `frame_sink` and `cancel_decode` (and has `resolve(request)`) says so with
# `streams_frames = True`: rank 0 then encodes the mp4 on a thread while the engine decodes the frames, and a cancel
# stops the decode too.


@dataclass
class VideoOutput:
    """Ask rank 0 to store the video itself: `storage` is a `pab.storage.StorageConfig` dict."""

    storage: dict[str, Any]
    video_id: str
    sidecar: dict[str, Any] = field(default_factory=dict)  # extra sidecar fields (job id, timings, ...)


def resolve_factory(factory: Callable[..., Engine] | str | None) -> Callable[..., Engine]:
    """A callable engine factory from a callable, a "module:function" string, or None (the real pipeline)."""
    if factory is None:
        factory = "actors.engine:pipeline_engine"
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        if not name:
            raise ValueError(f"engine factory {factory!r} must look like 'package.module:function'")
        return getattr(importlib.import_module(module), name)
    return factory


def resolve_device(device: str | None) -> str:
    """'auto' (or None): the first visible CUDA device when torch sees one, else 'cpu'."""
    if device in (None, "auto"):
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------


class GenerationWorker:
    """One rank: owns one device, one loaded model and this rank's end of the group's process group.

    Args:
        rank, world_size: this rank and the group size; all ranks render the same video together.
        model: a model name from `pab models` (e.g. "opensora-v1.2", "latte-1-tiny").
        checkpoint: None (random weights), a local folder, "s3://bucket/prefix" (cached on disk) or a Hugging
            Face repo id in the local cache (pab/checkpoint.py).
        vae, text_encoder: a part's own source, in the same forms; None = the checkpoint's.
        device: "auto" (cuda:0 of the GPUs this process sees, else cpu), "cpu", "cuda:1", ...
        dtype: "bfloat16", "float32", ... or None for the engine's default (bf16 on GPU, fp32 on CPU).
        cfg_parallel: split the two classifier-free-guidance halves over two halves of the group.
        cache_dir: where S3 checkpoints are cached (default $PAB_CACHE_DIR or ~/.cache/pab).
        s3: StorageConfig fields for reaching the checkpoint bucket (endpoint, credentials).
        engine_factory: see the module docstring.
        engine_options: more keyword arguments for the factory, e.g. {"cuda_graphs": True} (the pipeline's
            switches); none are passed when empty, so a factory that takes none keeps working.
        dist_timeout_s: timeout of every collective; a rank that never answers fails the others after it.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: str,
        checkpoint: str | None = None,
        device: str | None = "auto",
        dtype: str | None = None,
        *,
        vae: str | None = None,
        text_encoder: str | None = None,
        cfg_parallel: bool = False,
        cache_dir: str | None = None,
        s3: dict[str, Any] | None = None,
        engine_factory: Callable[..., Engine] | str | None = None,
        engine_options: dict[str, Any] | None = None,
        dist_timeout_s: float = 600.0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        if cfg_parallel and world_size % 2:
            raise ValueError(f"cfg_parallel needs an even group size, got {world_size}")
        self.rank, self.world_size, self.model = rank, world_size, model
        self.checkpoint, self.dtype, self.cfg_parallel = checkpoint, dtype, cfg_parallel
        self.sources = {"checkpoint": checkpoint, "vae": vae, "text_encoder": text_encoder}
        self.device = resolve_device(device)
        self._pending_cancel: tuple | None = None
        self.cache_dir, self.s3 = cache_dir, s3
        self.engine_factory = engine_factory
        self.engine_options = dict(engine_options or {})
        self.dist_timeout_s = dist_timeout_s
        self.engine: Engine | None = None
        self.distributed = False
        self._store: Any = None  # rank 0's rendezvous store (torch.distributed.TCPStore), kept while the group is
        self.load_info: dict[str, Any] = {}
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._events: list[tuple[int, int]] = []  # (step, total) of the current generation
        self._generations = 0

    # ------------------------------------------------------------------ lifecycle

    def host_store(self, host: str) -> int:
        """Rank 0: open the group's rendezvous store on a port the OS picks as it binds; return that port.

        The other ranks then join `tcp://host:port` (`init_distributed`). Binding at once leaves no window in
        which another process can take a port picked earlier.
        """
        from pab.parallel.launch import rendezvous_store

        if self._store is None:
            self._store = rendezvous_store(host, self.world_size, self.dist_timeout_s)
        return self._store.port

    def init_distributed(self, init_method: str | None, backend: str | None = None) -> None:
        """Join the group's process group (all ranks call this at once). A group of one needs none.

        With a `tcp://host:port` init method, rank 0 serves the store it opened in `host_store` and the others
        connect to it. Any other init method, or rank 0 without a store of its own, goes to torch as it is.
        """
        import datetime
        from urllib.parse import urlparse

        import torch
        import torch.distributed as dist

        from pab.parallel.launch import join_store

        if self.world_size == 1 or self.distributed:
            return
        if backend is None:
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            os.environ.setdefault("LOCAL_RANK", self.device.partition(":")[2] or "0")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails, not hangs
            torch.cuda.set_device(torch.device(self.device))
        timeout = datetime.timedelta(seconds=self.dist_timeout_s)
        url = urlparse(init_method or "")
        if url.scheme == "tcp" and (self.rank != 0 or self._store is not None):
            store = self._store or join_store(url.hostname, url.port, self.world_size, self.dist_timeout_s)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)  # fmt: skip
        self.distributed = True
        log.info("rank %d/%d joined %s via %s", self.rank, self.world_size, backend, init_method)

    def load(self) -> dict[str, Any]:
        """Resolve the checkpoint (downloading it once) and build the engine; idempotent."""
        if self.engine is not None:
            return self.load_info
        t0 = time.perf_counter()
        sweep_scratch()
        from pab.checkpoint import fetch_s3  # here: importing the worker must not import torch

        # S3 sources are downloaded here, once per machine; folders and Hugging Face ids go to the pipeline.
        sources = {k: str(fetch_s3(v, self.cache_dir, self.s3)) if v and v.startswith("s3://") else v
                   for k, v in self.sources.items()}  # fmt: skip
        t1 = time.perf_counter()
        parallel = None
        if self.world_size > 1:
            from pab.parallel import ParallelConfig, init_parallel

            cfg = 2 if self.cfg_parallel else 1
            parallel = init_parallel(ParallelConfig(sp=self.world_size // cfg, cfg=cfg), timeout_s=self.dist_timeout_s)
        factory = resolve_factory(self.engine_factory)
        self.engine = factory(model=self.model, device=self.device, dtype=self.dtype, parallel=parallel, **sources,
                              **self.engine_options)  # fmt: skip
        self.load_info = {"checkpoint_dir": sources["checkpoint"], "fetch_s": t1 - t0,
                          "load_s": time.perf_counter() - t1}
        return self.load_info

    def shutdown(self) -> None:
        """Leave the process group and drop the model."""
        self.engine = None
        if self.distributed:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            finally:
                self.distributed = False
        self._store = None

    # ------------------------------------------------------------------ generation

    def request_cancel(self) -> None:
        """Stop the running generation at its next step (thread-safe; any rank may be asked)."""
        self._cancel.set()

    def progress(self, since: int = 0) -> list[tuple[int, int]]:
        """(step, total) events of the running (or last) generation, from index `since` on."""
        return list(self._events[since:])

    def _agreed_cancel(self, cancel_cb: CancelCallback | None) -> bool:
        """True on every rank once any rank wants to stop: one tiny all-reduce (MAX) per step.

        Ranks must leave the denoising loop at the same step, or the others would wait forever in the
        next all-to-all for a rank that is gone.
        """
        local = self._cancel.is_set() or bool(cancel_cb and cancel_cb())
        if not self.distributed:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.full((1,), int(local), dtype=torch.int32, device=self.device)  # a fill: no host copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not self.device.startswith("cuda"):
            return bool(flag.item())  # gloo: the all-reduce has already finished
        # On GPUs, reading the flag now would wait for the stream to drain (a host sync per step, which lets
        # the GPU run dry while the CPU queues the next step). Instead the flag goes to pinned memory behind
        # an event, and each step reads the previous step's agreement: that event completed long ago, so
        # nothing waits. Every rank reads the same lagged value at the same step, so they still stop together,
        # one step later than they would with a blocking read.
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self._pending_cancel = self._pending_cancel, (host, done)
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0][0])

    def generate(
        self,
        request: dict[str, Any],
        progress_cb: ProgressCallback | None = None,
        cancel_cb: CancelCallback | None = None,
        output: VideoOutput | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Render one video with the whole group. Every rank gets the same request (seed included).

        Rank 0 returns the video: with `output` it writes `videos/<id>.mp4` and its JSON sidecar to
        storage and returns where; without, the result carries the mp4 bytes under "mp4". Other ranks
        return their timings only. Raises pab.errors.GenerationCancelled if cancelled, `pab.storage.StorageUnavailable`
        if storage does not take the video.
        """
        if self.engine is None:
            raise WorkerError("generate() before load()")
        if not self._busy.acquire(blocking=False):
            raise WorkerError(f"rank {self.rank} is already rendering a video: one at a time per group")
        try:
            return self._generate(dict(request), progress_cb, cancel_cb, output)
        finally:
            self._busy.release()

    def _generate(self, request, progress_cb, cancel_cb, output) -> dict[str, Any]:
        if request.get("seed") is None:
            if self.world_size > 1:
                raise ValueError("a parallel group needs the seed set by the caller "
                                 "(every rank must draw the same noise)")
            request["seed"] = draw_seed()
        request.setdefault("model", self.model)
        self._cancel.clear()
        self._events = []
        self._pending_cancel = None  # GPU groups: the previous step's cancel agreement (see _agreed_cancel)
        cancelled = False

        def on_step(step: int, total: int) -> None:
            self._events.append((step, total))
            if progress_cb is not None:
                progress_cb(step, total)

        def should_cancel() -> bool:
            nonlocal cancelled
            cancelled = self._agreed_cancel(cancel_cb)
            return cancelled

        def cancel_decode() -> bool:  # rank 0 decodes alone: a local check, no all-reduce
            nonlocal cancelled
            cancelled = cancelled or self._cancel.is_set() or bool(cancel_cb and cancel_cb())
            return cancelled

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH}{os.getpid()}-") as tmp:
            path = Path(tmp) / "video.mp4"
            writer, streaming = None, {}
            if self.rank == 0 and getattr(self.engine, "streams_frames", False):
                from pab.video import Mp4Writer

                fps = int(self.engine.resolve(request).get("fps") or 8)
                writer = Mp4Writer(path, fps, background=True)
                streaming = {"frame_sink": writer.write, "cancel_decode": cancel_decode}
            try:
                out = self.engine.generate(request, on_step, should_cancel, **streaming)
            except Exception as e:
                if writer is not None:
                    writer.abort()
                if cancelled and not isinstance(e, GenerationCancelled):
                    raise GenerationCancelled(f"cancelled after {len(self._events)} step(s)") from e
                raise
            self._generations += 1
            timings = {**out.timings, "engine_s": time.perf_counter() - t0}
            if self.rank != 0:
                return {"rank": self.rank, "timings": timings}
            try:
                return self._finish_rank0(out, timings, output, path, writer)
            finally:
                if writer is not None:
                    writer.abort()  # after close() a no-op; after a failure it stops the encoder thread

    def _finish_rank0(
        self, out: EngineOutput, timings: dict[str, float], output: Any, path: Path, writer: Any
    ) -> dict[str, Any]:
        """Finish the mp4 at `path` (`writer` has encoded the frames as they came, or there is none yet), then
        store it or return its bytes."""
        from pab.video import write_mp4

        fps = int(out.request.get("fps") or 8)
        result: dict[str, Any] = {
            **out.sidecar,
            # what the video file is, read off the frames and the resolved request
            "rank": 0, "request": out.request, "model": self.model, "seed": out.request.get("seed"),
            "num_frames": int(out.frames.shape[0]), "height": int(out.frames.shape[1]),
            "width": int(out.frames.shape[2]), "fps": fps,
            "group": {"world_size": self.world_size, "device": self.device, "dtype": self.dtype,
                      "cfg_parallel": self.cfg_parallel},
        }  # fmt: skip
        pab_stats = (result.get("pab") or {}).get("stats") or {}
        t = time.perf_counter()
        if writer is not None:
            writer.close()  # the frames were encoded during the decode: waits for the last ones only
        else:
            write_mp4(path, out.frames, fps)
        timings["encode_s"] = time.perf_counter() - t
        result["timings"] = timings
        result["cost"] = request_cost(timings, pab_stats, result.get("parallel"), self.world_size,
                                      self.device)  # fmt: skip
        if output is None:
            result["mp4"] = path.read_bytes()
            return result
        if isinstance(output, dict):
            output = VideoOutput(**output)
        from pab.storage import storage_failure, storage_from_config, unavailable

        images = _still_images(out.frames, timings)
        t = time.perf_counter()
        sidecar = {**result, **output.sidecar}
        try:
            ref = storage_from_config(output.storage).put_video(output.video_id, path, sidecar, images)
        except Exception as e:
            if not storage_failure(e):
                raise
            # Typed, so the group stays up (only the upload failed) and the caller retries once storage is back.
            raise unavailable(output.storage, f"store video {output.video_id}", e) from e
        timings["store_s"] = time.perf_counter() - t
        result["video"] = {"key": ref.key, "sidecar_key": ref.sidecar_key, "uri": ref.uri,
                           "size_bytes": ref.size_bytes}
        return result

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """Cheap liveness report; never blocks on a running generation."""
        return {
            "rank": self.rank, "world_size": self.world_size, "model": self.model, "device": self.device,
            "pid": os.getpid(), "loaded": self.engine is not None, "distributed": self.distributed,
            "busy": self._busy.locked(), "step": self._events[-1] if self._events else None,
            "generations": self._generations,
        }


def request_cost(timings: dict[str, float], pab_stats: dict[str, Any], parallel: dict[str, Any] | None,
                 world_size: int, device: str) -> dict[str, float]:  # fmt: skip
    """What one video cost the group: GPU-seconds (the engine's time on every rank, 0 on CPU), rank-seconds, DSP
    bytes sent (rank 0's count times the ranks: the splits are even up to one frame) and module calls."""
    engine_s = float(timings.get("engine_s", 0.0))
    rank_s = engine_s * world_size
    moved = int(((parallel or {}).get("comm") or {}).get("bytes_moved", 0)) * world_size
    return {
        "gpu_seconds": rank_s if str(device).startswith("cuda") else 0.0,
        "rank_seconds": rank_s,
        "bytes_sent": float(moved),
        "modules_computed": float(sum(int(c.get("computed", 0)) for c in pab_stats.values())),
        "modules_reused": float(sum(int(c.get("broadcast", 0)) for c in pab_stats.values())),
    }


def _still_images(frames: Any, timings: dict[str, float]) -> dict[str, bytes]:
    """The thumbnail and spritesheet JPEGs stored beside the mp4 (`GET .../content?variant=`).

    Made here from the frames already in memory (a few ms), so every backend serves them as plain objects
    (S3: a presigned URL). A failure costs only the images: the ingress derives them from the mp4 instead.
    """
    from pab.video import spritesheet_jpeg, thumbnail_jpeg

    t = time.perf_counter()
    try:
        images = {"thumbnail": thumbnail_jpeg(frames), "spritesheet": spritesheet_jpeg(frames)}
    except Exception:  # noqa: BLE001
        log.exception("could not make the thumbnail and spritesheet; the ingress will derive them from the mp4")
        return {}
    timings["images_s"] = time.perf_counter() - t
    return images
