"""DDIM (Latte-1) and PNDM (Open-Sora-Plan v1.1) through diffusers' own schedulers.

We do not re-implement these: each `DiffusersSampler` builds a FRESH diffusers scheduler from a
config dict (never a shared instance: PNDM keeps its multistep history and a call counter inside
the scheduler object, so sharing one across requests would mix two generations' histories), calls
`set_timesteps(num_steps)` and forwards `step(model_output, t_i, sample)`.

Configs (the values the official pipelines run with):

* Latte-1 (`maxin-cn/Latte-1/scheduler/scheduler_config.json`, VideoSys `LattePipeline`):
  DDIMScheduler, linear betas 1e-4..0.02, 1000 train steps, timestep_spacing "leading",
  steps_offset 0 (not in the file: default), set_alpha_to_one True (default), prediction_type
  epsilon, clip_sample False; eta 0 in the pipeline (deterministic). The file also says
  `variance_type: learned_range`; DDIMScheduler has no such option, the pipeline handles it by
  taking eps = the first 4 of the transformer's 8 output channels. 50 steps -> 980, 960, ..., 20, 0.
* Open-Sora-Plan v1.1 (VideoSys `OpenSoraPlanPipeline`, version v110): `PNDMScheduler()` with all
  defaults: linear betas 1e-4..0.02, skip_prk_steps False, set_alpha_to_one False, steps_offset 0,
  "leading". 150 steps -> 159 model calls: 12 Runge-Kutta (PRK) evaluations over the first three
  steps (894, 891, 891, 888, 888, 885, 885, 882, 882, 879, 879, 876) then 147 PLMS calls
  (876, 870, ..., 6, 0).

Both have `init_noise_sigma` 1 and an identity `scale_model_input`, so the pipeline needs neither.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDIMScheduler, PNDMScheduler

from pab.errors import RequestError
from pab.samplers.base import Sampler

LATTE_DDIM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "thresholding": False,
}

OPENSORA_PLAN_PNDM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# Keys a real checkpoint's scheduler_config.json may carry that are not constructor arguments of
# the scheduler class; they are dropped (with no effect) when loading such a file.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_use_default_values", "variance_type"}


def _config_keys(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


class DiffusersSampler(Sampler):
    """Our step interface over one private instance of a diffusers scheduler."""

    scheduler_cls: type = DDIMScheduler
    default_config: dict[str, Any] = {}

    def __init__(
        self,
        num_steps: int,
        *,
        config: dict[str, Any] | None = None,
        step_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if num_steps < 1:  # a request's `steps` (RequestError: the ingress names the field)
            raise RequestError("steps", f"num_steps must be >= 1, got {num_steps}")
        cfg = dict(self.default_config)
        if config is not None:
            cfg.update({k: v for k, v in config.items() if k not in _BOOKKEEPING})
        cfg.update(overrides)
        unknown = set(cfg) - _config_keys(self.scheduler_cls)
        if unknown:
            raise TypeError(
                f"{self.name}: unknown scheduler option(s) {sorted(unknown)}; "
                f"{self.scheduler_cls.__name__} takes {sorted(_config_keys(self.scheduler_cls))}"
            )
        self.scheduler = self.scheduler_cls(**cfg)  # private to this generation
        self.scheduler.set_timesteps(num_steps)
        self.num_steps = int(num_steps)
        self._model_t = [int(t) for t in self.scheduler.timesteps.tolist()]
        self.timesteps = [float(t) for t in self._model_t]
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        self._step_kwargs = dict(step_kwargs or {})

    def _step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        # Python-int timestep: diffusers indexes its CPU alpha tables with it, whatever the device.
        return self.scheduler.step(model_output, self._model_t[i], sample, return_dict=False, **self._step_kwargs)[0]


class DDIMSampler(DiffusersSampler):
    """Latte-1's DDIM. `eta` > 0 adds noise each step and then needs `generator` for reproducibility."""

    name = "ddim"
    scheduler_cls = DDIMScheduler
    default_config = LATTE_DDIM_CONFIG

    def __init__(
        self,
        num_steps: int = 50,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        config: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(num_steps, config=config, step_kwargs={"eta": eta, "generator": generator}, **overrides)


class PNDMSampler(DiffusersSampler):
    """Open-Sora-Plan v1.1's PNDM (PRK warm-up + PLMS): more model calls than steps."""

    name = "pndm"
    scheduler_cls = PNDMScheduler
    default_config = OPENSORA_PLAN_PNDM_CONFIG

    # The PRK warm-up runs over the last `pndm_order` (4) timesteps; fewer steps break diffusers' schedule.
    min_steps = 4

    def __init__(self, num_steps: int = 150, *, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        if num_steps < self.min_steps:
            raise RequestError("steps", f"PNDM needs at least {self.min_steps} steps (its Runge-Kutta warm-up), got "
                               f"{num_steps}")  # fmt: skip
        super().__init__(num_steps, config=config, **overrides)


__all__ = ["DiffusersSampler", "DDIMSampler", "PNDMSampler", "LATTE_DDIM_CONFIG", "OPENSORA_PLAN_PNDM_CONFIG"]
