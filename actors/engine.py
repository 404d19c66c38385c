"""The worker's only contact with the engine: build a `pab.pipeline.Pipeline`, run one request dict.

`pipeline_engine` is the default engine factory of `actors.worker.GenerationWorker`. Everything the
serving and bulk layers know about the engine goes through the two functions here, so a change in the
engine's API is a change in this file only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from actors.worker import CancelCallback, EngineOutput, ProgressCallback
from pab.errors import RequestError, about


def request_fields() -> set[str]:
    """The field names of `pab.pipeline.GenerationRequest`."""
    from pab.pipeline import GenerationRequest

    return {f.name for f in dataclasses.fields(GenerationRequest)}


def to_generation_request(request: dict[str, Any]):
    """A `GenerationRequest` from a plain dict; unknown keys are a RequestError naming them."""
    from pab.pipeline import GenerationRequest

    unknown = sorted(set(request) - request_fields())
    if unknown:
        raise RequestError(unknown[0], f"unknown request field(s) {unknown}; known: {sorted(request_fields())}")
    return GenerationRequest(**request)


class PipelineEngine:
    """A loaded `Pipeline` behind the worker's engine interface."""

    streams_frames = True  # generate() takes frame_sink and cancel_decode: rank 0 encodes while the VAE decodes

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request with the model's defaults filled in; a RequestError (a ValueError naming the field) if the
        model cannot take it."""
        return self.pipe.resolve(to_generation_request(request)).to_dict()

    def generate(
        self, request: dict[str, Any], progress: ProgressCallback, should_cancel: CancelCallback,
        frame_sink: Callable[[Any], None] | None = None, cancel_decode: Callable[[], bool] | None = None,
    ) -> EngineOutput:  # fmt: skip
        res = self.pipe.generate(to_generation_request(request), progress=progress, should_cancel=should_cancel,
                                 frame_sink=frame_sink, cancel_decode=cancel_decode)  # fmt: skip
        sidecar = res.sidecar()  # the one sidecar shape; the worker adds the file's and the group's fields
        return EngineOutput(frames=res.frames, request=sidecar.pop("request"), sidecar=sidecar,
                            timings=sidecar.pop("timings"))  # fmt: skip


def pipeline_engine(
    model: str, device: str, dtype: str | None = None, checkpoint: str | None = None, parallel: Any = None,
    vae: str | None = None, text_encoder: str | None = None, **engine: bool,
) -> PipelineEngine:  # fmt: skip
    """Load model `model` once on `device` (with DSP when `parallel` is a ParallelContext); `engine` holds the
    switches of `pab.engine.EngineOptions` turned on (serving's `engine` block, `pab bulk`'s flags)."""
    from pab.engine import EngineOptions
    from pab.pipeline import Pipeline

    pipe = Pipeline.from_name(model, device=device, dtype=dtype, checkpoint=checkpoint, parallel=parallel, vae=vae,
                              text_encoder=text_encoder, engine=EngineOptions(**engine))  # fmt: skip
    return PipelineEngine(pipe)


# ----------------------------------------------------------------------------------------------------
# Checking a request without loading weights (the HTTP ingress answers 422 before queueing)
# ----------------------------------------------------------------------------------------------------

_META_VAES: dict[str, Any] = {}


def meta_vae(model: str) -> Any:
    """The model's VAE on the meta device (no weights, no memory): what answers which frame counts it takes."""
    if model not in _META_VAES:
        from types import SimpleNamespace

        from pab.models import build, get_spec, sized_name, split_name

        vae, size = get_spec(model).vae, split_name(model)[1]
        if vae == "sd-vae":  # per-frame VAE: any frame count
            _META_VAES[model] = SimpleNamespace(latent_frames=lambda n: n, spatial_factor=8)
        else:
            _META_VAES[model] = build(sized_name(vae, size), device="meta")
    return _META_VAES[model]


def check_request(request: dict[str, Any]) -> dict[str, Any]:
    """The resolved request (model defaults filled in) or a RequestError saying what the model can take and which
    field it is about.

    Runs the engine's own checks (`pab.pipeline.resolve_request`, the sampler's among them) without any
    weights: a VAE on the meta device answers which frame counts it takes.
    """
    return plan_request(request)[0]


def model_calibration(model: str, checkpoint: str | None = None) -> tuple[dict[str, Any] | None, bool]:
    """What the weight-free checks hold cache presets against: the step-reuse calibration beside `model`'s weights
    when they are on this machine (a folder, the shipped `-small` weights, a Hugging Face cache), and whether
    preset names go unchecked here (weights on S3 are only read by the GPU groups). ValueError for a calibration
    file that cannot be read."""
    from pab.caching import load_calibration
    from pab.checkpoint import resolve_sources

    if checkpoint is not None and checkpoint.startswith("s3://"):
        return None, True
    try:
        sources = resolve_sources(model, checkpoint)
    except ValueError:
        return None, False
    return load_calibration(sources.calibration if sources else None), False


def plan_request(
    request: dict[str, Any], calibration: dict[str, Any] | None = None, names_unchecked: bool = False
) -> tuple[dict[str, Any], str, list[str]]:
    """`check_request`, plus the size of the video the model will render ("WxH") and the notices on it.

    A cache preset is checked against `calibration`; with `names_unchecked` (the weights, and so their
    calibration, are not on this machine) a preset name is left to the group that loads them.
    """
    from pab.pipeline import rendered_size, resolve_request, size_notices

    with about("model"):
        vae = meta_vae(request["model"])
    asked = to_generation_request(request)
    spec = asked.cache_spec()  # a RequestError when cache and pab disagree
    unchecked = names_unchecked and isinstance(spec, str) and spec not in ("off", "paper")
    r = resolve_request(dataclasses.replace(asked, cache=None, pab="off") if unchecked else asked, vae, calibration)
    if unchecked:
        r = dataclasses.replace(r, cache=asked.cache, pab=asked.pab)
    height, width = rendered_size(vae, r.height, r.width)
    return r.to_dict(), f"{width}x{height}", size_notices(r.model, vae, r)


def frames_for_seconds(model: str, seconds: float, fps: int | None) -> tuple[int, int, list[str]]:
    """(num_frames, fps, notices) for a duration: the smallest frame count the model takes that lasts `seconds`.

    Where that is more than a frame longer than asked (a model takes only some frame counts: Open-Sora 1.2
    none from 2 to 16, Open-Sora-Plan 4k + 1), the notice says so and why, as the video's size notices do.
    """
    from pab.models import get_spec, split_name
    from pab.request import MAX_FRAMES

    with about("model"):
        d = get_spec(model).defaults_for(split_name(model)[1])
    fps = fps or d.fps
    want = max(1, round(seconds * fps))
    if want > MAX_FRAMES:  # the limit num_frames has: a duration may not ask for more frames than it may
        raise RequestError("seconds", f"{seconds:g} s at {fps} fps is {want} frames; a video has at most {MAX_FRAMES} "
                           f"(ask for at most {MAX_FRAMES / fps:g} s, or a lower fps)")
    refused: ValueError | None = None
    for n in range(want, min(want + 256, MAX_FRAMES + 1)):
        try:
            check_request({"model": model, "prompt": "x", "num_frames": n, "fps": fps, "steps": 1, "seed": 0})
        except ValueError as e:
            refused = refused or e
            continue
        if n - seconds * fps <= 1 + 1e-9:
            return n, fps, []
        return n, fps, [f"{seconds:g} s at {fps} fps is {want} frames, which {model} cannot render ({refused}); "
                        f"the video has {n} frames, {n / fps:g} s"]  # fmt: skip
    raise RequestError("seconds", f"no frame count from {want} to {n} works for {model} ({refused})")


def model_defaults(model: str) -> dict[str, Any]:
    """The defaults the model's official pipeline uses (tiny models have their own)."""
    import dataclasses as dc

    from pab.models import get_spec, split_name

    return dc.asdict(get_spec(model).defaults_for(split_name(model)[1]))
