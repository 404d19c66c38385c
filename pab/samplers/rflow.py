"""Rectified-flow sampling as Open-Sora 1.2 does it (official `RFLOW`, VideoSys `RFLOW`).

Conventions of the official code (hpcai-tech/Open-Sora `opensora/schedulers/rf/`, v1.2; the same
code in VideoSys `videosys/schedulers/scheduling_rflow_open_sora.py`):

* Timesteps live on a 0..num_timesteps (= 1000) scale; t = 1000 is pure noise, t = 0 is data.
  Training noises as x_t = (1 - s) x0 + s n with s = t / 1000, and the model is trained to predict
  the velocity v = x0 - n (data minus noise), i.e. the direction of DEcreasing t.
* Sampling starts from s_i = 1 - i / steps (i = 0..steps-1, so 1000, 966.7, ..., 33.3 for 30
  steps), optionally rounded to integers (`use_discrete_timesteps`, off for v1.2), then shifted
  towards the noisy end by the resolution/length-dependent transform

      t' = r t / (1 + (r - 1) t),  t in [0, 1],  r = sqrt(H W / 512^2) * sqrt(F // 17 * 5) * scale

  with H, W in pixels and F in video frames (F // 17 * 5 is the Open-Sora VAE's latent frame count,
  hard-coded there; F == 1 means an image, r_time = 1).
* Euler update `z = z + v * dt`, dt = (t_i - t_{i+1}) / 1000, and for the LAST call dt = t_last / 1000,
  i.e. the final step integrates all the way to t = 0. Sign: dt > 0 and v points to the data.
* x_mask / conditioning frames: the official loop re-noises conditioning frames with a frame mask.
  For text-to-video the mask is all ones, which makes both `torch.where`s in the loop identities
  (the only side effect is a `randn_like` draw from the GLOBAL generator, which changes nothing in
  z). We do text-to-video only, so there is no mask here; the pipeline passes the model an all-true
  x_mask itself.

Precision (where bf16 rounding happens):

* The official loop keeps the timesteps as float32 tensors and computes dt from them unrounded.
  The model (STDiT3.forward: `timestep = timestep.to(dtype)`) casts them to bf16, so a bf16 run
  EMBEDS bf16-rounded timesteps and PAB's window test sees them too. `self.timesteps` holds the
  unrounded floats (what is fed to the model; the cast stays in the model) and `round_timesteps`
  gives the bf16 view. For 480p (480x854) / 51 frames / 30 steps it is exactly the list in
  docs models.md 1.2: 1000, 992, 984, ..., 258, 143.
* The official pipeline builds height / width / num_frames as tensors in the PIPELINE dtype, so
  a bf16 run computes r in bf16 (854 -> 856, r = 4.84375 instead of 4.84312). That moves the float
  timesteps by < 0.04 and changes nothing after bf16 rounding at 480p/51f. `info_dtype=None` (the
  default) computes in float64; `info_dtype=torch.bfloat16` (with float32 timesteps, as the
  official loop) reproduces the official bf16 pipeline's float timesteps and dts bit for bit.
  Do not pass float16: 480 * 854 overflows it (the official fp16 pipeline gets inf/NaN there).
* The latent state: the official z starts in the pipeline dtype but `z + v * dt` with a float32 dt
  tensor promotes it to float32 after the first step. `step` returns at least float32 the same way.
"""

from __future__ import annotations

import torch

from pab.errors import RequestError
from pab.samplers.base import Sampler

NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512


def _num_frames_ratio_input(num_frames: int) -> int:
    """The frame count the official transform scales by: 1 for images, else F // 17 * 5."""
    return 1 if num_frames == 1 else num_frames // 17 * 5


def shift_ratio(height: int, width: int, num_frames: int, scale: float = 1.0) -> float:
    """The transform's r for a video size, in float64: sqrt(H W / 512^2) * sqrt(F // 17 * 5) * scale."""
    frames = 1 if num_frames == 1 else num_frames // 17 * 5
    return (height * width / BASE_RESOLUTION) ** 0.5 * frames**0.5 * scale


def shift_timesteps(s: torch.Tensor, ratio: float) -> torch.Tensor:
    """t' = r s / (1 + (r - 1) s) elementwise on s in [0, 1]: what training applies to its sampled times."""
    return ratio * s / (1 + (ratio - 1) * s)


def timestep_transform(
    t: float,
    *,
    height: int,
    width: int,
    num_frames: int,
    num_timesteps: int = NUM_TIMESTEPS,
    scale: float = 1.0,
    info_dtype: torch.dtype | None = None,
) -> float:
    """Shift timestep `t` (0..num_timesteps scale) by the official resolution/length transform.

    `info_dtype` None computes everything in float64. Any other dtype reproduces the official
    arithmetic: t as a float32 tensor and height/width/num_frames as `info_dtype` tensors (the
    pipeline dtype there), with torch's type promotion doing the rest.
    """
    if info_dtype is None:
        t_dtype = info_dtype = torch.float64
    else:
        t_dtype = torch.float32
    tt = torch.tensor([t], dtype=t_dtype) / num_timesteps
    h = torch.tensor([height], dtype=info_dtype)
    w = torch.tensor([width], dtype=info_dtype)
    f = torch.tensor([num_frames], dtype=info_dtype)
    ratio_space = (h * w / BASE_RESOLUTION).sqrt()
    frames = torch.ones_like(f) if num_frames == 1 else f // 17 * 5
    ratio_time = (frames / 1).sqrt()
    ratio = ratio_space * ratio_time * scale
    new_t = ratio * tt / (1 + (ratio - 1) * tt)
    return float((new_t * num_timesteps).item())


class RFlowSampler(Sampler):
    """Open-Sora 1.2 rectified flow: `num_steps` model calls, Euler steps on the velocity.

    Args:
        num_steps: sampling steps (= model calls); Open-Sora 1.2 uses 30.
        height, width: video size in PIXELS; needed when `use_timestep_transform`.
        num_frames: VIDEO frames (not latent frames); 1 (image) or >= 17 with the transform.
        num_timesteps: the training time scale, 1000.
        use_timestep_transform: the resolution/length shift (True for v1.2 inference).
        use_discrete_timesteps: round the base timesteps to ints before the shift (False in v1.2).
        transform_scale: extra factor on the shift ratio (1.0).
        info_dtype: None for exact float64 math, or the official pipeline's dtype to reproduce its
            float timesteps bit for bit (see the module docstring).
    """

    name = "rflow"

    def __init__(
        self,
        num_steps: int = 30,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_timesteps: int = NUM_TIMESTEPS,
        use_timestep_transform: bool = True,
        use_discrete_timesteps: bool = False,
        transform_scale: float = 1.0,
        info_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_steps < 1:  # a request's `steps` (RequestError: the ingress names the field)
            raise RequestError("steps", f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.num_timesteps = int(num_timesteps)
        self.use_timestep_transform = use_timestep_transform

        base = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
        if use_discrete_timesteps:
            base = [float(int(round(t))) for t in base]
        if use_timestep_transform:
            if height is None or width is None or num_frames is None:
                raise ValueError(
                    "rflow with use_timestep_transform=True needs height and width (pixels) and num_frames "
                    "(video frames): the timestep shift depends on them"
                )
            if num_frames < 1 or height < 1 or width < 1:
                raise ValueError(f"invalid geometry height={height} width={width} num_frames={num_frames}")
            if _num_frames_ratio_input(num_frames) == 0:
                # The official formula gives r = 0 here, i.e. every timestep becomes 0 and sampling
                # does nothing useful. Refuse rather than silently return that.
                raise RequestError(
                    "num_frames",
                    f"num_frames={num_frames}: the official timestep transform uses num_frames // 17 * 5, which is 0 "
                    f"for 2..16 frames and would map every timestep to 0; use num_frames=1 or >= 17"
                )
            ts = [timestep_transform(t, height=height, width=width, num_frames=num_frames, num_timesteps=num_timesteps,
                                     scale=transform_scale, info_dtype=info_dtype) for t in base]  # fmt: skip
        else:
            ts = base
        # The official loop holds timesteps as float32 tensors (torch.tensor([python float])), so in
        # "official" mode keep float32 values and float32 dts; exact mode keeps float64.
        t_dtype = torch.float64 if info_dtype is None else torch.float32
        t = torch.tensor(ts, dtype=t_dtype)
        nxt = torch.cat([t[1:], t.new_zeros(1)])  # last step goes to t = 0 (dt = t_last)
        dts = (t - nxt) / num_timesteps
        self.timesteps = [float(x) for x in t.tolist()]
        self._dts = [float(x) for x in dts.tolist()]

    @property
    def dts(self) -> list[float]:
        """The Euler step sizes dt_i (on the 0..1 scale); they sum to timesteps[0] / num_timesteps."""
        return list(self._dts)

    def _step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        # Work in at least float32: the official z is promoted to float32 by its float32 dt tensor.
        # dt is a Python float; torch applies it in `work` precision, which in official mode
        # (float32 dts) is exactly the official float32 product.
        work = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
        return sample.to(work) + model_output.to(work) * self._dts[i]


def rflow_timesteps(num_steps: int, **kw) -> list[float]:
    """Convenience: the float timesteps `RFlowSampler(num_steps, **kw)` feeds the model."""
    return RFlowSampler(num_steps, **kw).timesteps


__all__ = ["RFlowSampler", "timestep_transform", "rflow_timesteps", "shift_ratio", "shift_timesteps", "NUM_TIMESTEPS"]
