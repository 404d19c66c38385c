"""Runs the official Open-Sora-Plan v1.1.0 reference fixture (tests/fixtures/official/osp110) through our model."""

from __future__ import annotations

from pathlib import Path

import torch

from support.fidelity_cases.latte import run_latte_layout
from pab.models.opensora_plan import LatteT2V, LatteT2VConfig


def run(fixture_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Open-Sora-Plan v1.1: `output` with the (B, L) keep-mask, `output_no_mask` as its pipeline calls it."""

    def calls(inputs: dict, options: dict) -> tuple[dict, dict[str, dict]]:
        extra = dict(added_cond_kwargs=options.get("added_cond_kwargs"), use_image_num=options.get("use_image_num", 0))
        masked = {"encoder_attention_mask": inputs.get("encoder_attention_mask")}
        return extra, {"output": masked, "output_no_mask": {}}

    return run_latte_layout(fixture_dir, LatteT2VConfig, LatteT2V, device, dtype, calls)
