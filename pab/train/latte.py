"""Latte-1 at the `-small` size: its per-frame AutoencoderKL (4x, `FrameVAE.random("small")`), DDPM noise prediction.

VAE loss, per frame: L1 + MSE of the round trip through a posterior sample, and a small KL. Calibration
sets the AutoencoderKL's `latents_mean` / `latents_std` (per channel) so the DiT sees unit-variance latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pab.models.frame_vae import FrameVAE
from pab.train.diffusion import DDPMRecipe

NAME = "latte-1-small"


class LatteRecipe(DDPMRecipe):
    name = NAME

    def new_vae(self) -> FrameVAE:
        return FrameVAE.random("small", seed=0)

    def vae_loss(self, vae: FrameVAE, video: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
        frames = video.transpose(1, 2).flatten(0, 1)  # (B·F, 3, H, W)
        post = vae.vae.encode(frames).latent_dist
        rec = vae.vae.decode(post.sample()).sample.float()
        return F.l1_loss(rec, frames) + F.mse_loss(rec, frames) + kl_weight * post.kl().mean()

    def raw_latents(self, vae: FrameVAE, video: torch.Tensor) -> torch.Tensor:
        return vae.vae.encode(video.transpose(1, 2).flatten(0, 1)).latent_dist.mode()  # (B·F, 4, h, w)

    def set_latent_stats(self, vae: FrameVAE, mean: list[float], std: list[float]) -> dict:
        vae.set_latent_stats(mean, std)
        return {"latents_mean": mean, "latents_std": std}

    def export_vae(self, vae: FrameVAE, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        vae.vae.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        vae.vae.float()
