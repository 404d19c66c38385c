"""Open-Sora 1.2 at the `-small` size: the recipe `pab.train.stages` trains it with.

* VAE: the Open-Sora VAE (a per-frame AutoencoderKL, then the causal temporal VAE) trained end to end on
  17-frame 64x64 clips: L1 + MSE of the full round trip and of the 2D stage alone, MSE of the temporal
  stage on the spatial latents, and a small KL on both posteriors. The latents' per-channel mean and std
  become the VAE's `shift` / `scale`, so the DiT sees unit-variance latents as in the release.
* DiT: STDiT3 on rectified flow as Open-Sora trains it: s from a logit-normal, shifted by the same
  resolution/length transform the sampler applies (with the small size's transform scale that is r = 1 at
  64x64 px: no shift, see `OpenSora12.sampler_options`), x_s = (1 - s) x0 + s n, target x0 - n. A dropped
  caption becomes the model's learned null caption (`y_embedding`), the CFG negative at inference.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pab.families import get_family
from pab.models.opensora_vae import SPATIAL_LATENT_SCALE, OpenSoraVAE, OpenSoraVAEConfig
from pab.models.stdit3 import STDiT3
from pab.samplers.rflow import NUM_TIMESTEPS, shift_ratio, shift_timesteps
from pab.train.common import export_weights, geometry
from pab.train.stages import Recipe, build_text_parts as _build_text_parts

NAME = "opensora-v1.2-small"


class OpenSoraRecipe(Recipe):
    name = NAME

    def __init__(self) -> None:
        F_, H, W, _ = geometry(NAME)
        self.ratio = shift_ratio(H, W, F_, get_family(NAME).sampler_options("small").get("transform_scale", 1.0))
        self.dit_record = {"time_shift_ratio": self.ratio}

    def new_vae(self) -> OpenSoraVAE:
        return OpenSoraVAE(OpenSoraVAEConfig.from_size("small"))

    def vae_loss(self, vae, video):
        return vae_loss(vae, video)

    calibration_batch = 64

    def raw_latents(self, vae: OpenSoraVAE, video: torch.Tensor) -> torch.Tensor:
        vae.scale.fill_(1.0)  # the VAE's own normalisation off: (b, 4, t, h, w) as encoded
        vae.shift.fill_(0.0)
        return vae.encode(video)

    def set_latent_stats(self, vae: OpenSoraVAE, mean: list[float], std: list[float]) -> dict:
        """The VAE's `shift` / `scale` (its config's too), as Open-Sora's VAE normalises."""
        vae.shift.copy_(torch.tensor(mean).view_as(vae.shift))
        vae.scale.copy_(torch.tensor(std).view_as(vae.scale))
        vae.config.shift, vae.config.scale = tuple(mean), tuple(std)
        return {"shift": list(mean), "scale": list(std)}

    def export_vae(self, vae: OpenSoraVAE, folder: Path) -> None:
        export_weights(vae.state_dict(), vae.config.to_dict(), folder)

    def dit_loss(self, dit, z, y, mask, gen):
        F_, H, W, fps = geometry(NAME)
        return flow_loss(dit, z, y, mask, gen, fps, (F_, H, W), self.ratio)

    def null_text(self, dit, t5, tokenizer, max_length, device):
        return dit.y_embedder.y_embedding  # (L_max, D): Open-Sora's learned-null caption


def build_text_parts(seed: int = 0):
    """The small T5 and word tokenizer of Open-Sora 1.2 small (its vocabulary includes the prompt suffix)."""
    return _build_text_parts(NAME, seed)


def vae_loss(vae: OpenSoraVAE, video: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    """The round trip (2D posterior mean, temporal posterior sampled); video (B, 3, F, H, W) in [-1, 1], one chunk."""
    B, _, T, _, _ = video.shape
    frames = video.transpose(1, 2).flatten(0, 1)  # (B·F, 3, H, W)
    post2d = vae.spatial_vae.module.encode(frames).latent_dist
    x_z = post2d.mean * SPATIAL_LATENT_SCALE  # (B·F, 4, h, w); the mean: a sampled target made the loss spiky
    x_z = x_z.unflatten(0, (B, T)).transpose(1, 2)  # (B, 4, F, h, w)
    mean, logvar = vae.temporal_vae.encode(x_z).float().chunk(2, dim=1)  # each (B, 4, t, h, w)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    x_z_rec = vae.temporal_vae.decode(z, T)  # (B, 4, F, h, w)
    both = torch.cat([x_z_rec, x_z], 0).transpose(1, 2).flatten(0, 1) / SPATIAL_LATENT_SCALE
    rec, rec2d = vae.spatial_vae.module.decode(both).sample.float().unflatten(0, (2 * B, T)).transpose(1, 2).chunk(2)
    pixel = sum(F.l1_loss(r, video) + F.mse_loss(r, video) for r in (rec, rec2d))
    # On the unscaled 2D latents: weighted this strongly, the temporal stage learns its job fastest.
    latent = F.mse_loss(x_z_rec.float(), x_z.detach().float()) / SPATIAL_LATENT_SCALE**2
    kl = post2d.kl().mean() + 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3, 4)).mean()
    return pixel + latent + kl_weight * kl


def flow_loss(
    dit: STDiT3, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, fps: int, size: tuple,
    ratio: float,
) -> torch.Tensor:
    """Rectified-flow loss of one batch of normalised latents z (B, C, t, h, w); y (B, L, D) text, mask (B, L);
    training times shifted by `ratio` as the sampler shifts its timesteps."""
    B = z.shape[0]
    F_, H, W = size
    s = torch.sigmoid(torch.randn(B, generator=gen)).to(z.device)  # logit-normal in (0, 1)
    s = shift_timesteps(s.double(), ratio).float()
    noise = torch.randn(z.shape, generator=gen).to(z.device)
    s_ = s.view(B, 1, 1, 1, 1)
    x_t = (1 - s_) * z + s_ * noise
    out = dit(x_t, s * NUM_TIMESTEPS, y[:, None], mask=mask, fps=torch.full((B,), float(fps), device=z.device),
              height=float(H), width=float(W))  # fmt: skip
    return F.mse_loss(out[:, : z.shape[1]].float(), z - noise)
