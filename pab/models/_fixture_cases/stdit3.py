"""Runs the official STDiT3 reference fixture (tests/fixtures/official/stdit3) through our STDiT3."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from pab.models.stdit3 import STDiT3, STDiT3Config


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every key with matching names and shapes, or raise naming what is missing/unexpected/mismatched."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"checkpoint does not match {type(model).__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}. Check that the config matches the checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)


def build_from_fixture(fixture_dir: Path) -> STDiT3:
    """STDiT3 built from the fixture's config.json with its weights loaded strictly, eval, float32."""
    fixture_dir = Path(fixture_dir)
    config = STDiT3Config.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    model = STDiT3(config)
    load_strict(model, load_file(str(fixture_dir / "weights.safetensors")))
    return model.float().eval()


def run(fixture_dir: Path) -> dict[str, torch.Tensor]:
    """Every case of meta.json forward_calls -> {output key: tensor}, one per key of output.safetensors."""
    fixture_dir = Path(fixture_dir)
    model = build_from_fixture(fixture_dir)
    inputs = load_file(str(fixture_dir / "inputs.safetensors"))
    kwargs = json.loads((fixture_dir / "inputs.json").read_text())
    meta = json.loads((fixture_dir / "meta.json").read_text())
    args = dict(
        x=inputs["x"], timestep=inputs["timestep"], y=inputs["y"], mask=inputs["mask"],
        fps=inputs["fps"], height=inputs["height"], width=inputs["width"], **kwargs,
    )  # fmt: skip
    # The two calls meta.json describes: with the per-frame x_mask, and x_mask=None.
    cases = {"output": {**args, "x_mask": inputs["x_mask"]}, "output_no_x_mask": args}
    unknown = sorted(set(meta["forward_calls"]) - set(cases))
    if unknown:
        raise KeyError(f"fixture {fixture_dir} has forward calls {unknown} this runner does not know; add them here")
    with torch.no_grad():
        return {key: model(**cases[key]) for key in meta["forward_calls"]}
