"""The DDPM noise-prediction objective Latte-1 and Open-Sora-Plan v1.1 were trained with, as a recipe base.

Both samplers (Latte's DDIM, Open-Sora-Plan's PNDM) run on the linear beta schedule 1e-4..0.02 over 1000
steps (`pab.samplers.diffusers_samplers`); training draws t uniformly from those 1000, noises the latents
to x_t = sqrt(a_t) z + sqrt(1 - a_t) n and regresses n on the first C output channels. The released models
also learn a variance (`learned_range`, the other C channels) that DDIM and PNDM never read; the small
models leave those channels untrained. A dropped caption becomes the T5 encoding of "" (the pipelines'
negative prompt), kept at the caption's length as the pipelines cut the negative to the prompt's.
"""

from __future__ import annotations

import torch

from pab.samplers.diffusers_samplers import LATTE_DDIM_CONFIG
from pab.train.stages import Recipe


def alphas_cumprod(device: torch.device | str = "cpu") -> torch.Tensor:
    """(1000,) float64 cumulative alphas of the linear schedule both samplers use."""
    c = LATTE_DDIM_CONFIG
    betas = torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(device)


class DDPMRecipe(Recipe):
    """Noise prediction through the family's forward; subclasses supply the VAE's part."""

    min_snr_gamma = 5.0
    dit_record = {"objective": "ddpm epsilon, linear betas 1e-4..0.02, t ~ U{0..999}, min-SNR-5 weights"}

    def dit_loss(self, dit, z, y, mask, gen):
        B = z.shape[0]
        t = torch.randint(0, 1000, (B,), generator=gen)
        a = alphas_cumprod()[t]
        # Min-SNR-gamma (Hang et al. 2023), for an epsilon target: min(SNR, gamma) / SNR. The nearly clean steps
        # (SNR > gamma), whose gradients otherwise dominate and conflict, count less; the steps that place and
        # colour the objects count in full.
        snr = a / (1 - a)
        weight = (snr.clamp(max=self.min_snr_gamma) / snr).float().to(z.device)
        a = a.float().to(z.device).view(B, 1, 1, 1, 1)
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        out = self.forward(dit, x_t, t.to(z.device), y, mask)
        per_clip = (out[:, : z.shape[1]].float() - noise).pow(2).flatten(1).mean(1)  # (B,)
        return (weight * per_clip).mean()

    def null_text(self, dit, t5, tokenizer, max_length, device):
        tok = tokenizer([""], max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        out = t5(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        return out.last_hidden_state[0]  # (L, D)
