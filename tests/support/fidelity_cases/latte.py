"""Runs the official Latte-1 reference fixture (tests/fixtures/official/latte) through our model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pab.models import load_state_dict_strict
from support.fidelity_cases import to_device
from pab.models.latte import LatteConfig, LatteTransformer3DModel


def output_keys(fixture_dir: Path) -> list[str]:
    with safe_open(fixture_dir / "output.safetensors", framework="pt") as f:
        return list(f.keys())


def run_latte_layout(
    fixture_dir: Path, config_cls: Any, model_cls: Any, device: str, dtype: torch.dtype,
    calls: Callable[[dict, dict], tuple[dict, dict[str, dict]]],
) -> dict[str, torch.Tensor]:
    """Build a Latte-layout model from config.json, load its weights strictly, and run every case.

    `calls(inputs, options)` gives the model-specific keyword arguments shared by all cases and, per
    output key, the keyword arguments of that case (see meta.json for the exact official calls).
    """
    fixture_dir = Path(fixture_dir)
    model = model_cls(config_cls.from_dict(json.loads((fixture_dir / "config.json").read_text())))
    load_state_dict_strict(model, load_file(fixture_dir / "weights.safetensors"), source=str(fixture_dir))
    model = model.to(device=device, dtype=dtype).eval()

    inputs = to_device(load_file(fixture_dir / "inputs.safetensors"), device, dtype)
    options = json.loads((fixture_dir / "inputs.json").read_text())
    extra, cases = calls(inputs, options)
    args = dict(
        hidden_states=inputs["hidden_states"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        enable_temporal_attentions=options.get("enable_temporal_attentions", True),
        return_dict=options.get("return_dict", False),
        **extra,
    )
    wanted = output_keys(fixture_dir)
    recorded = json.loads((fixture_dir / "meta.json").read_text())["forward_calls"]
    unknown = sorted((set(recorded) | set(wanted)) - set(cases))
    if unknown:
        raise ValueError(f"{fixture_dir} has cases {unknown} that this runner does not know; add them to its calls")
    with torch.no_grad():
        return {name: model(**args, **cases[name])[0] for name in wanted}


def run(fixture_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Latte-1: `output` as the LattePipeline calls it (no mask), `output_masked` with the additive bias."""

    def calls(inputs: dict, options: dict) -> tuple[dict, dict[str, dict]]:
        return {}, {
            "output": {},
            "output_masked": {"encoder_attention_mask": inputs.get("encoder_attention_mask_bias")},
        }

    return run_latte_layout(fixture_dir, LatteConfig, LatteTransformer3DModel, device, dtype, calls)
