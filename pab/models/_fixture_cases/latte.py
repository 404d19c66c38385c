"""Runs the official Latte-1 reference fixture (tests/fixtures/official/latte) through our model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pab.models import load_state_dict_strict
from pab.models._fixture_cases.stdit3 import to_device
from pab.models.latte import LatteConfig, LatteTransformer3DModel


def output_keys(fixture_dir: Path) -> list[str]:
    with safe_open(fixture_dir / "output.safetensors", framework="pt") as f:
        return list(f.keys())


def run(fixture_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Build from config.json, load weights strictly, run every forward call of meta.json in float32 eval."""
    fixture_dir = Path(fixture_dir)
    config = LatteConfig.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    model = LatteTransformer3DModel(config)
    load_state_dict_strict(model, load_file(fixture_dir / "weights.safetensors"), source=str(fixture_dir))
    model = model.to(device=device, dtype=dtype).eval()

    inputs = to_device(load_file(fixture_dir / "inputs.safetensors"), device, dtype)
    options = json.loads((fixture_dir / "inputs.json").read_text())
    calls = json.loads((fixture_dir / "meta.json").read_text())["forward_calls"]
    args = dict(
        hidden_states=inputs["hidden_states"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        enable_temporal_attentions=options.get("enable_temporal_attentions", True),
        return_dict=options.get("return_dict", False),
    )
    # The fixture's forward_calls, as keyword arguments (see meta.json for the exact official calls).
    cases = {
        "output": {},
        "output_masked": {"encoder_attention_mask": inputs.get("encoder_attention_mask_bias")},
    }
    wanted = output_keys(fixture_dir)
    unknown = sorted((set(calls) | set(wanted)) - set(cases))
    if unknown:
        raise ValueError(f"Latte fixture has cases {unknown} that this runner does not know; add them to `cases`")

    outputs = {}
    with torch.no_grad():
        for name in wanted:
            outputs[name] = model(**args, **cases[name])[0]
    return outputs
