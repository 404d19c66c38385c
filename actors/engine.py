"""The worker's only contact with the engine: build a `pab.pipeline.Pipeline`, run one request dict.

`pipeline_engine` is the default engine factory of `actors.worker.GenerationWorker`. Everything the
serving and bulk layers know about the engine goes through the two functions here, so a change in the
engine's API is a change in this file only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from actors.worker import CancelCallback, EngineOutput, ProgressCallback


def request_fields() -> set[str]:
    """The field names of `pab.pipeline.GenerationRequest`."""
    from pab.pipeline import GenerationRequest

    return {f.name for f in dataclasses.fields(GenerationRequest)}


def to_generation_request(request: dict[str, Any]):
    """A `GenerationRequest` from a plain dict; unknown keys are an error naming them."""
    from pab.pipeline import GenerationRequest

    unknown = sorted(set(request) - request_fields())
    if unknown:
        raise ValueError(f"unknown request field(s) {unknown}; known: {sorted(request_fields())}")
    return GenerationRequest(**request)


class PipelineEngine:
    """A loaded `Pipeline` behind the worker's engine interface."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request with the model's defaults filled in; ValueError if the model cannot take it."""
        return self.pipe.resolve(to_generation_request(request)).to_dict()

    def generate(
        self, request: dict[str, Any], progress: ProgressCallback, should_cancel: CancelCallback
    ) -> EngineOutput:
        res = self.pipe.generate(to_generation_request(request), progress=progress, should_cancel=should_cancel)
        return EngineOutput(
            frames=res.frames,
            request=res.request.to_dict(),
            pab=res.pab,
            pab_stats=res.pab_stats,
            timings=dict(res.timings),
            extra={"timesteps": res.timesteps, "random_weights": res.random_weights, "parallel": res.parallel},
        )


def pipeline_engine(
    model: str, device: str, dtype: str | None = None, checkpoint: str | None = None, parallel: Any = None
) -> PipelineEngine:
    """Load model `model` once on `device` (with DSP when `parallel` is a ParallelContext)."""
    from pab.pipeline import Pipeline

    return PipelineEngine(Pipeline.from_name(model, device=device, dtype=dtype, checkpoint=checkpoint, parallel=parallel))
