"""Samplers: rectified flow (ours, Open-Sora 1.2), DDIM (Latte-1) and PNDM (Open-Sora-Plan v1.1).

One interface (`Sampler`, see `base.py`), built fresh per generation:

    sampler = build_sampler("rflow", 30, height=480, width=854, num_frames=51)
    z = sampler.init_noise((1, 4, 15, 60, 106), generator, torch.bfloat16, "cuda")
    for i, t in enumerate(sampler.timesteps):     # one per model call
        z = sampler.step(guided_output, i, z)

`sampler.timesteps` are the values fed to the model, one per model call, in call order (PNDM makes
159 calls for 150 steps). They are plain floats; a bf16 model rounds them itself, and
`round_timesteps(sampler.timesteps)` shows what it sees (use that for PAB windows).
"""

from __future__ import annotations

from typing import Any

from pab.samplers.base import Sampler, round_timesteps
from pab.samplers.diffusers_samplers import (
    LATTE_DDIM_CONFIG,
    OPENSORA_PLAN_PNDM_CONFIG,
    DDIMSampler,
    DiffusersSampler,
    PNDMSampler,
)
from pab.samplers.rflow import RFlowSampler, timestep_transform

SAMPLERS: dict[str, type[Sampler]] = {
    "rflow": RFlowSampler,
    "ddim": DDIMSampler,
    "pndm": PNDMSampler,
}

# What each sampler is for and the settings the official pipelines (and the PAB paper) use.
# `num_steps` is the default when build_sampler gets num_steps=None; the rest is documentation of
# the model-specific kwargs (the defaults of the sampler classes already equal these).
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "rflow": {
        "model": "Open-Sora 1.2 (STDiT3)",
        "num_steps": 30,
        "guidance_scale": 7.0,
        "model_output": "velocity: first 4 of the 8 output channels",
        "kwargs": {
            "height": "pixels (required)",
            "width": "pixels (required)",
            "num_frames": "video frames, 1 or >= 17 (required)",
            "num_timesteps": 1000,
            "use_timestep_transform": True,
            "use_discrete_timesteps": False,
            "transform_scale": 1.0,
            "info_dtype": "None = float64 math; torch.bfloat16 = the official bf16 pipeline bit for bit",
        },
    },
    "ddim": {
        "model": "Latte-1",
        "num_steps": 50,
        "guidance_scale": 7.5,
        "model_output": "epsilon: first 4 of the 8 output channels (learned_range variance dropped)",
        "kwargs": {"eta": 0.0, "generator": None, "config": LATTE_DDIM_CONFIG},
    },
    "pndm": {
        "model": "Open-Sora-Plan v1.1 (LatteT2V)",
        "num_steps": 150,
        "model_calls": 159,
        "guidance_scale": 7.5,
        "model_output": "epsilon: first 4 of the 8 output channels",
        "kwargs": {"config": OPENSORA_PLAN_PNDM_CONFIG},
    },
}

# Geometry kwargs the pipeline may pass to every sampler; only rflow's schedule depends on them.
_GEOMETRY = ("height", "width", "num_frames")


def build_sampler(name: str, num_steps: int | None = None, **kw: Any) -> Sampler:
    """A new sampler for one generation.

    Args:
        name: "rflow", "ddim" or "pndm".
        num_steps: sampling steps; None takes `SAMPLER_DEFAULTS[name]["num_steps"]`.
        **kw: model-specific options (see `SAMPLER_DEFAULTS[name]["kwargs"]`). `height`, `width`
            and `num_frames` are accepted by every sampler so a pipeline can pass them uniformly;
            ddim and pndm do not depend on them.

    Example:
        >>> s = build_sampler("pndm", 150)
        >>> len(s.timesteps), s.timesteps[:3]
        (159, [894.0, 891.0, 891.0])
    """
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    if num_steps is None:
        num_steps = SAMPLER_DEFAULTS[name]["num_steps"]
    if cls is not RFlowSampler:
        for key in _GEOMETRY:
            kw.pop(key, None)
    return cls(num_steps, **kw)


__all__ = [
    "Sampler",
    "RFlowSampler",
    "DiffusersSampler",
    "DDIMSampler",
    "PNDMSampler",
    "SAMPLERS",
    "SAMPLER_DEFAULTS",
    "build_sampler",
    "round_timesteps",
    "timestep_transform",
    "LATTE_DDIM_CONFIG",
    "OPENSORA_PLAN_PNDM_CONFIG",
]
