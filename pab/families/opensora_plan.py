"""Open-Sora-Plan v1.1: LatteT2V, its CausalVAE (tiled at full size), PNDM; text cut to the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pab.families.base import Family, Text, truncated_text
from pab.parallel.dsp import DSPPlan
from pab.models.vae import VideoVAE


class OpenSoraPlan11(Family):
    name = "opensora-plan-v1.1"
    paper_pab = dict(ranges=(2, 4, 6), window=(100, 850), mlp=(3, (400, 745), tuple(range(7))))
    published_teacache = (2.05943668e05, -1.48759286e04, 3.06085986e02, 1.31418080e00, 2.39658469e-03)

    def load_vae(self, size: str, folder: Path | None, device: torch.device, dtype: torch.dtype) -> VideoVAE:
        vae = super().load_vae(size, folder, device, dtype)
        if size == "full":
            vae.enable_tiling()  # the official sampling scripts always decode with --enable_tiling
        return vae

    def text(self, encoder: Any, transformer: nn.Module, prompt: str, negative: str, dtype: torch.dtype) -> Text:
        return truncated_text(encoder, prompt, negative, dtype)

    def forward(self, transformer, z, t, y, mask, request) -> torch.Tensor:
        return transformer(
            z, timestep=t, encoder_hidden_states=y, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=mask, return_dict=False,
        )[0]  # fmt: skip

    def dsp_plan(self, transformer: nn.Module) -> DSPPlan:
        # LatteT2V.forward(hidden_states, timestep, encoder_hidden_states, added_cond_kwargs=None,
        # encoder_attention_mask=None, use_image_num=0, enable_temporal_attentions=True, return_dict=False)
        # -> (out,). Latte's layout; its text mask is per sample only (nothing per frame).
        return DSPPlan(
            video_input="hidden_states", frame_dim=2, output_index=0, output_frame_dim=2,
            position_modules=("temp_pos_embed",), temporal_flag="enable_temporal_attentions",
            required={"use_image_num": (0, "image frames appended after the video would be split as video frames")},
        )  # fmt: skip
