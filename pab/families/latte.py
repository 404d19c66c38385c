"""Latte-1: LatteTransformer3DModel, Stable Diffusion's per-frame AutoencoderKL, DDIM; text cut to the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pab.families.base import Family, Text, truncated_text
from pab.parallel.dsp import DSPPlan
from pab.models.vae import VideoVAE
from pab.precision import Fp8Config


class Latte1(Family):
    name = "latte-1"
    paper_pab = dict(ranges=(2, 3, 6), window=(100, 800), mlp=(3, (350, 730), tuple(range(5))))
    published_teacache = (-2.46434137e03, 3.08044764e02, 8.07447667e01, -4.11385132e00, 1.11001402e-01)
    # q, k, v in fp8 too (one GEMM): latte-1-small keeps 31.7 dB against its float32 video (64 held-out prompts,
    # off; 34.5 with them in bf16), and it takes the full-size DiT from 5.66 to 5.18 s on an H100. Open-Sora-Plan,
    # on the same blocks, sits at the 30 dB bar with them (30.1 dB) and keeps them in bf16 (docs/quality.md).
    # The cross-attention's q stays bf16: in fp8 it cost latte-1-small 1.2-2.1 dB (to 30.0-30.3 dB, session 24).
    fp8 = Fp8Config(linear_groups=True, produced_inputs=False)

    def load_vae(self, size: str, folder: Path | None, device: torch.device, dtype: torch.dtype) -> VideoVAE:
        from pab.models.frame_vae import FrameVAE

        if folder is not None:
            vae = FrameVAE.from_pretrained(folder)
        else:
            vae = FrameVAE.random(size, seed=0)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def text(self, encoder: Any, transformer: nn.Module, prompt: str, negative: str, dtype: torch.dtype) -> Text:
        return truncated_text(encoder, prompt, negative, dtype)

    def forward(self, transformer, z, t, y, mask, request) -> torch.Tensor:
        return transformer(z, timestep=t, encoder_hidden_states=y, encoder_attention_mask=mask, return_dict=False)[0]

    def dsp_plan(self, transformer: nn.Module) -> DSPPlan:
        # LatteTransformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
        # enable_temporal_attentions=True, return_dict=False) -> (out,). The frame table `temp_pos_embed` is added
        # before the first temporal block; each rank adds its own rows (and "no table for a one-frame clip" is
        # decided on the full clip). The text mask may be an additive bias with one row per (sample, frame),
        # b·F + f, which is split like the frames.
        return DSPPlan(
            video_input="hidden_states", frame_dim=2, flat_frame_inputs={"encoder_attention_mask": 0},
            output_index=0, output_frame_dim=2, position_modules=("temp_pos_embed",),
            temporal_flag="enable_temporal_attentions",
        )  # fmt: skip
