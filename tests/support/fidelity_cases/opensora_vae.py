"""Runs the Open-Sora 1.2 VAE reference fixture (`VideoAutoencoderPipeline`) with `OpenSoraVAE`.

Case semantics are those of tests/fixtures/official/vae/README.md, model 1: "posterior mean" cases use
`encode(sample=False)`; `encode_sampled` reproduces the official global-RNG draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pab.models import load_state_dict_strict
from pab.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig


def build(fixture_dir: Path) -> OpenSoraVAE:
    """The fixture's model with its weights, float32, eval mode."""
    config = OpenSoraVAEConfig.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    model = OpenSoraVAE(config).float().eval()
    # Raises CheckpointError naming missing, unexpected and mis-shaped keys.
    load_state_dict_strict(model, load_file(fixture_dir / "weights.safetensors"), source=str(fixture_dir))
    return model


def run(fixture_dir: Path) -> dict[str, torch.Tensor]:
    # Building the model and the sampled case use the global RNG; a check must not change the caller's.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return _run(Path(fixture_dir))


def _run(fixture_dir: Path) -> dict[str, torch.Tensor]:
    model = build(fixture_dir)
    x = load_file(fixture_dir / "inputs.safetensors")
    args = json.loads((fixture_dir / "inputs.json").read_text())
    cases = json.loads((fixture_dir / "meta.json").read_text())["cases"]

    def encode(prefix: str, video: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{prefix}z": model.encode(video), f"{prefix}spatial_latent": model.spatial_vae.encode(video)}

    def decode(prefix: str, latent: torch.Tensor, num_frames: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}video": model.decode(latent, num_frames),
            f"{prefix}temporal_latent": model.decode_temporal(latent, num_frames),
        }

    def encode_sampled() -> dict[str, torch.Tensor]:
        # The official call: torch.manual_seed(seed); model.encode(video), drawing from the global RNG.
        torch.manual_seed(args["sample_seed"])
        return {"encode_z_sampled": model.encode(x["video"], sample=True)}

    runners = {
        "encode": lambda: encode("encode_", x["video"]),
        "encode_sampled": encode_sampled,
        "decode": lambda: decode("decode_", x["latent"], args["decode_num_frames"]),
        "encode_long": lambda: encode("encode_long_", x["video_long"]),
        "decode_long": lambda: decode("decode_long_", x["latent_long"], args["decode_long_num_frames"]),
        "encode_image": lambda: encode("encode_image_", x["video_image"]),
        "decode_image": lambda: decode("decode_image_", x["latent_image"], args["decode_image_num_frames"]),
    }
    unknown = sorted(set(cases) - set(runners))
    if unknown:
        raise KeyError(f"{fixture_dir}: no runner for cases {unknown}; add them to {__name__}.run")

    outputs: dict[str, torch.Tensor] = {}
    for name, case in cases.items():
        produced = runners[name]()
        absent = sorted(set(case["outputs"]) - set(produced))
        if absent:
            raise KeyError(f"case {name!r} did not produce {absent}")
        outputs.update({k: produced[k] for k in case["outputs"]})
    return outputs
