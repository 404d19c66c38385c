"""Runs the official STDiT3 reference fixture (tests/fixtures/official/stdit3) through our STDiT3."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pab.models import load_state_dict_strict
from support.fidelity_cases import to_device
from pab.models.stdit3 import STDiT3, STDiT3Config


def build_from_fixture(fixture_dir: Path) -> STDiT3:
    """STDiT3 built from the fixture's config.json with its weights loaded strictly, eval, float32."""
    fixture_dir = Path(fixture_dir)
    config = STDiT3Config.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    model = STDiT3(config)
    load_state_dict_strict(model, load_file(str(fixture_dir / "weights.safetensors")), source=str(fixture_dir))
    return model.float().eval()


def run(fixture_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every case of meta.json forward_calls -> {output key: tensor}, one per key of output.safetensors."""
    fixture_dir = Path(fixture_dir)
    model = build_from_fixture(fixture_dir).to(device=device, dtype=dtype)
    inputs = to_device(load_file(str(fixture_dir / "inputs.safetensors")), device, dtype)
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
