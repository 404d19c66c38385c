"""What every model family answers for the pipeline; each family's file says how it does it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pab.models import MODEL_SPECS, VAE_SPECS, ModelSpec, build
from pab.models.vae import VideoVAE
from pab.precision import Fp8Config

Text = tuple[torch.Tensor, "torch.Tensor | None"]  # (2, L, D) text of [cond, uncond], (2, L) keep-mask or None


class Family:
    """One model family: how its VAE loads, how its text becomes the CFG batch's conditioning, and how its
    transformer is called. Stateless; the pipeline holds the loaded parts and passes them in."""

    name: str = ""
    # PAB's `paper` preset: attention ranges (spatial, temporal, cross) in one timestep window, and the MLP's
    # (range, window, blocks). The PAB paper's / VideoSys' settings (../shared/reference/pab.md 2.6); the
    # reference code triggers MLP reuse on exact timesteps, which rarely fire outside the one resolution they
    # were tuned for, so it is written with the same window-and-range rule as attention over their span.
    paper_pab: dict[str, Any] | None = None
    # TeaCache's published rescaling polynomial for the full-size official model (its authors' evaluation code,
    # the fit of the official output's change to the first block's modulated input), with the slow/fast
    # thresholds it was evaluated at. A calibration file beside the weights (`pab calibrate`) takes precedence.
    published_teacache: tuple[float, ...] | None = None
    # Where this family's fp8 requests use fp8 (the pipeline's `fp8_config` until a caller sets its own): each
    # widening beyond the default is kept where the trained small model stays >= 30 dB against its float32 video
    # (issue #20's error bar; docs/quality.md).
    fp8 = Fp8Config()

    @property
    def spec(self) -> ModelSpec:
        return MODEL_SPECS[self.name]

    def dsp_plan(self, transformer: nn.Module) -> Any:
        """The DSP plan (pab.parallel.dsp.DSPPlan) of this family's transformer: which inputs carry frames."""
        raise NotImplementedError(f"no sequence-parallel plan for {self.name}")

    def sampler_options(self, size: str) -> dict[str, Any]:
        """Options of a size's sampler beyond the official ones (none by default)."""
        return {}

    def new_sampler(self, size: str, steps: int | None, *, height: int, width: int, num_frames: int) -> Any:
        """A fresh sampler for one request of this size (ValueError for a geometry the sampler cannot take)."""
        from pab.samplers import build_sampler

        return build_sampler(self.spec.sampler, steps, height=height, width=width, num_frames=num_frames,
                             **self.sampler_options(size))  # fmt: skip

    def load_vae(self, size: str, folder: Path | None, device: torch.device, dtype: torch.dtype) -> VideoVAE:
        """The VAE from `folder` (config.json + *.safetensors), or with random weights (the size's config)."""
        vae_name = self.spec.vae
        if folder is not None:
            vae = VAE_SPECS[vae_name].load(size, folder, device)
        else:
            vae = build(f"{vae_name}-tiny" if size == "tiny" else vae_name, seed=0)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def text(self, encoder: Any, transformer: nn.Module, prompt: str, negative: str, dtype: torch.dtype) -> Text:
        """Conditional and unconditional text for one forward of batch 2: the encoder's full masked output."""
        emb, mask = encoder.encode([prompt, negative])
        return trim_text(emb.to(dtype), mask)

    def forward(
        self, transformer: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
        request: Any,
    ) -> torch.Tensor:  # fmt: skip
        """The transformer's raw output (B, C_out, T, h, w) on latents z (B, C, T, h, w) at timesteps t (B,)."""
        raise NotImplementedError


def trim_text(y: torch.Tensor, mask: torch.Tensor) -> Text:
    """Drop text columns no sample keeps, once per generation; an all-kept mask becomes None.

    Open-Sora's STDiT3 does the same cut inside every forward, at the price of a host sync per step
    (which lets the GPU run dry while the CPU queues the next step's kernels). Cut here, the model sees
    no mask in the common case and the denoising loop has no host syncs. Masked keys add nothing to
    the softmax, so the result is unchanged.
    """
    keep = int(mask.any(dim=0).nonzero().max()) + 1
    y, mask = y[:, :keep], mask[:, :keep]
    return y, (None if bool(mask.all()) else mask)


def truncated_text(encoder: Any, prompt: str, negative: str, dtype: torch.dtype) -> Text:
    """Latte's and Open-Sora-Plan's text: both embeddings cut to the prompt's real token count, no mask."""
    emb, _ = encoder.encode([prompt], trim=True)
    neg, _ = encoder.encode([negative])
    return torch.cat([emb, neg[:, : emb.shape[1]]]).to(dtype), None
