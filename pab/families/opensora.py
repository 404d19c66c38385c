"""Open-Sora 1.2: STDiT3, its video VAE, rectified flow; the learned null caption is the CFG negative."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pab.families.base import Family, Text, trim_text


class OpenSora12(Family):
    name = "opensora-v1.2"

    def text(self, encoder: Any, transformer: nn.Module, prompt: str, negative: str, dtype: torch.dtype) -> Text:
        if negative:
            return super().text(encoder, transformer, prompt, negative, dtype)
        # The unconditional branch is the model's learned null caption, not an encoded "".
        emb, mask = encoder.encode([prompt])
        null = transformer.y_embedder.y_embedding[None].to(emb.dtype)  # (1, L, D)
        y = torch.cat([emb, null[:, : emb.shape[1]]], 0)
        return trim_text(y.to(dtype), mask.repeat(2, 1))

    def forward(self, transformer, z, t, y, mask, request) -> torch.Tensor:
        n = z.shape[0]
        return transformer(
            z, t, y[:, None], mask=mask, fps=torch.full((n,), float(request.fps), device=z.device),
            height=float(request.height),  # numbers, not GPU tensors: the model reads them on the host (no sync)
            width=float(request.width),
        )  # fmt: skip
