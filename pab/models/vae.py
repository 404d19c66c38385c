"""The one interface every video VAE offers the pipeline."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


class VideoVAE(nn.Module):
    """Maps videos (B, 3, F, H, W) in [-1, 1] to the DiT's latent space (B, C, T, H/f, W/f) and back.

    `encode` returns latents already scaled/normalised the way the DiT was trained on them, and
    `decode` undoes that scaling, so the pipeline never needs to know a VAE's constants.
    """

    latent_channels: int = 4
    spatial_factor: int = 8

    def latent_frames(self, num_frames: int) -> int:
        """Latent frame count for `num_frames` video frames; ValueError naming valid counts if impossible."""
        raise NotImplementedError

    def num_frames(self, latent_frames: int) -> int:
        """Video frame count that `latent_frames` latents decode to."""
        raise NotImplementedError

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        raise NotImplementedError

    def decode_chunks(self, latents: torch.Tensor, num_frames: int) -> Iterator[torch.Tensor]:
        """`decode` in pieces along the frames (B, 3, f_i, H, W), each as soon as it is ready, so a caller can
        encode the first frames while the GPU decodes the rest. One piece unless a VAE decodes in parts anyway;
        concatenated on dim 2 they are exactly `decode`'s output."""
        yield self.decode(latents, num_frames)
