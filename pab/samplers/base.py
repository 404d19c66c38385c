"""The one step interface every sampler offers the pipeline.

A `Sampler` belongs to ONE generation: it is built per request (`build_sampler(...)`), walks its
`timesteps` once, and is then thrown away. Nothing in it is shared between requests, so two
generations running at the same time (or one after another on a cached model) never see each
other's state. The pipeline's loop is

    sampler = build_sampler(name, steps, **geometry)
    z = sampler.init_noise(shape, generator, dtype, device)
    for i, t in enumerate(sampler.timesteps):          # one entry per MODEL CALL
        out = model(z, t, ...)                         # CFG combine + channel slice in the pipeline
        z = sampler.step(out, i, z)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Sampler:
    """Base class: timesteps fed to the model, the initial noise and the per-call update.

    Subclasses set `self.timesteps` (list of float, one per model call, in call order) and
    `self.num_steps` (the user-facing step count; PNDM makes more model calls than steps), and
    implement `_step`.
    """

    name: str = ""
    timesteps: list[float]
    num_steps: int
    # Initial-noise scale (`init_noise_sigma` in diffusers); 1.0 for all three samplers we ship.
    init_noise_sigma: float = 1.0

    def __init__(self) -> None:
        self._next_index = 0

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)

    def init_noise(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Standard normal noise of `shape`, scaled by `init_noise_sigma`.

        The noise is drawn in float32 on the generator's device (CPU if no generator) and then cast
        to `dtype` and moved to `device`. So one seed gives the same noise whatever the pipeline's
        dtype or device is (a CPU generator on a GPU run gives the CPU run's noise), which is what
        makes a request reproducible across machines. For float32 and bfloat16 on CPU this equals
        drawing directly in `dtype`.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=gen_device)
        if self.init_noise_sigma != 1.0:
            noise = noise * self.init_noise_sigma
        return noise.to(device=device, dtype=dtype)

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance `sample` using the model's (guided, channel-sliced) output at model call `i`.

        Calls must come in order i = 0, 1, ..., len(timesteps) - 1, exactly once each: the
        multistep samplers (PNDM) keep history, and a skipped or repeated call would silently give
        a wrong video, so it raises instead.
        """
        if i != self._next_index:
            raise RuntimeError(
                f"{type(self).__name__}.step called with i={i}, expected i={self._next_index}: steps must be "
                f"taken in order, once each (build a new sampler for each generation)"
            )
        if i >= len(self.timesteps):
            raise RuntimeError(
                f"step index {i}: this sampler has finished its {len(self.timesteps)} model calls "
                f"(build a new sampler for each generation)"
            )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}; "
                f"slice the model's learned-sigma/variance channels off (first C channels) before step()"
            )
        out = self._step(model_output, i, sample)
        self._next_index += 1
        return out

    def _step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, model_calls={len(self.timesteps)})"


def round_timesteps(timesteps: Sequence[float], dtype: torch.dtype = torch.bfloat16) -> list[float]:
    """The timesteps as a model running in `dtype` sees them.

    VideoSys' / Open-Sora's STDiT3.forward does `timestep = timestep.to(dtype)` on the float32
    timestep tensor the sampler hands it, so a bf16 model embeds bf16-rounded timesteps, and PAB's
    window test (`int(timestep[0])` inside the blocks) compares bf16-rounded values. This mirrors
    that: float -> float32 (the tensor the official loop builds) -> `dtype`.
    """
    t = torch.tensor(list(timesteps), dtype=torch.float64).to(torch.float32).to(dtype)
    return [float(x) for x in t.tolist()]
