"""Open-Sora-Plan v1.1 at the `-small` size: its CausalVAE (4x in time and space) and DDPM noise prediction.

VAE loss: L1 + MSE of the round trip through a posterior sample, and a small KL. Calibration sets the
config's `latents_mean` / `latents_std` (per channel) so the DiT sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from pab.models import VAE_SPECS
from pab.models.opensora_plan_vae import CausalVAE
from pab.train.common import export_weights
from pab.train.diffusion import DDPMRecipe

NAME = "opensora-plan-v1.1-small"


class OpenSoraPlanRecipe(DDPMRecipe):
    name = NAME

    def new_vae(self) -> CausalVAE:
        return VAE_SPECS["opensora-plan-vae-v1.1"].build("small")

    def vae_loss(self, vae: CausalVAE, video: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
        mean, logvar = vae.encode_moments(video).float().chunk(2, dim=1)  # (B, 4, t, h, w) each
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = vae.decode_latents(z).float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3, 4)).mean()
        return F.l1_loss(rec, video) + F.mse_loss(rec, video) + kl_weight * kl

    def raw_latents(self, vae: CausalVAE, video: torch.Tensor) -> torch.Tensor:
        return vae.encode_moments(video).chunk(2, dim=1)[0]  # (B, 4, t, h, w)

    def set_latent_stats(self, vae: CausalVAE, mean: list[float], std: list[float]) -> dict:
        vae.config = dataclasses.replace(vae.config, latents_mean=tuple(mean), latents_std=tuple(std))
        return {"latents_mean": mean, "latents_std": std}

    def export_vae(self, vae: CausalVAE, folder: Path) -> None:
        export_weights(vae.state_dict(), dataclasses.asdict(vae.config), folder)
