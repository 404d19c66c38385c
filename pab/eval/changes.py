"""How much each kind of module's output changes from one denoising step to the next (PAB's U-curve).

PAB rests on one observation (Zhao et al. 2024, Fig. 2): attention outputs change a lot in the first and
last steps and little in between, least for cross-attention. This measures it on a real generation:

    curves = measure_changes(pipeline, [GenerationRequest(...), ...])
    curves.mean["spatial"]  # per step i >= 1: mean over modules and requests of |o_i - o_{i-1}| / |o_{i-1}|

Plain forward hooks on `transformer.broadcast_targets()` record every call's output; the request runs with
PAB off (a broadcast output would read as "no change"). Nothing stays attached afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch


@dataclass
class ChangeCurves:
    """Per kind: the timesteps and the mean relative change of the outputs at each step (step 0 has none)."""

    timesteps: list[float]
    mean: dict[str, list[float]] = field(default_factory=dict)
    requests: int = 0

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps, "mean_relative_change": self.mean, "requests": self.requests}


def measure_changes(pipeline, requests: list) -> ChangeCurves:
    """Run `requests` (PAB forced off) and average each kind's step-to-step relative output change."""
    targets = pipeline.transformer.broadcast_targets()
    changes: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))  # kind -> step -> values
    timesteps: list[float] = []
    for request in requests:
        prev: dict[int, torch.Tensor] = {}
        calls: dict[int, int] = {}
        handles = []

        def hook(kind: str, key: int, prev: dict = prev, calls: dict = calls):  # this request's dicts
            def record(_module, _args, out):
                out = out[0] if isinstance(out, tuple) else out
                step = calls.get(key, 0)  # one call per module per step (the CFG halves are one batch)
                calls[key] = step + 1
                o = out.detach().float()
                if key in prev:
                    changes[kind][step].append(float((o - prev[key]).norm() / prev[key].norm().clamp_min(1e-12)))
                prev[key] = o

            return record

        for kind, modules in targets.items():
            for m in modules:
                handles.append(m.register_forward_hook(hook(kind, id(m))))
        try:
            result = pipeline.generate(replace(request, pab="off"), decode=False)
        finally:
            for h in handles:
                h.remove()
        timesteps = result.timesteps
    curves = ChangeCurves(timesteps=timesteps, requests=len(requests))
    for kind, by_step in changes.items():
        curves.mean[kind] = [float("nan")] + [sum(v) / len(v) for _, v in sorted(by_step.items())]
    return curves
