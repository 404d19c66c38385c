"""Latte-1: LatteTransformer3DModel, Stable Diffusion's per-frame AutoencoderKL, DDIM; text cut to the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pab.families.base import Family, Text, truncated_text
from pab.models.vae import VideoVAE


class Latte1(Family):
    name = "latte-1"

    def load_vae(self, size: str, checkpoint: Path | None, device: torch.device, dtype: torch.dtype) -> VideoVAE:
        from pab.models.frame_vae import FrameVAE

        if checkpoint is not None:
            vae = FrameVAE.from_pretrained(checkpoint / "vae")
        else:
            vae = FrameVAE.tiny(seed=0) if size == "tiny" else FrameVAE.sd(seed=0)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def text(self, encoder: Any, transformer: nn.Module, prompt: str, negative: str, dtype: torch.dtype) -> Text:
        return truncated_text(encoder, prompt, negative, dtype)

    def forward(self, transformer, z, t, y, mask, request) -> torch.Tensor:
        return transformer(z, timestep=t, encoder_hidden_states=y, return_dict=False)[0]
