"""Run an official reference fixture directory with our models.

A fixture directory (see tests/fixtures/official/README.md) holds `config.json`, `weights.safetensors`,
`inputs.safetensors`, `inputs.json`, `output.safetensors` and `meta.json`. `run_fixture(path)` builds
our model from the config, loads the weights strictly, runs every recorded call and returns one
tensor per key of `output.safetensors`, so any directory in that format can be checked against it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

# config.json class name -> module under support.fidelity_cases with a `run(dir)` function.
_RUNNERS = {
    "STDiT3": "stdit3",
    "LatteTransformer3DModel": "latte",
    "LatteT2V": "opensora_plan",
    "VideoAutoencoderPipeline": "opensora_vae",
    "CausalVAEModel": "opensora_plan_vae",
}


def fixture_class(path: str | Path) -> str:
    """The official class name a fixture directory was made with."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("_class_name") or config.get("model_type") or (config.get("architectures") or [None])[0]
    if name not in _RUNNERS:
        raise ValueError(f"{path}: unknown fixture class {name!r}; known: {sorted(_RUNNERS)}")
    return name


def run_fixture(path: str | Path, **options) -> dict[str, torch.Tensor]:
    """Compute every output of the fixture at `path` with our implementation (float32, eval, CPU).

    The transformer runners also take `device=` and `dtype=` (e.g. to measure bf16 error on a GPU).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a fixture directory (no config.json)")
    runner = importlib.import_module(f"support.fidelity_cases.{_RUNNERS[fixture_class(path)]}")
    with torch.no_grad():
        return runner.run(path, **options)
