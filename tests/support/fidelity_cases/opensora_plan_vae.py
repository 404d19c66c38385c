"""Cases of the official Open-Sora-Plan v1.1.0 CausalVAE fixture (`../shared/fidelity/vae/osp_causalvae_v1_1`).

Each case of `meta.json["cases"]` is the official call translated to our API:
`model.encode(x)` -> `encode_moments` (the posterior's `.parameters`; `.mode()` is its first half),
`model.decode(z)` -> `decode_latents`, the official wrapper -> `CausalVAE.encode(sample=True)` / `decode`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pab.models.opensora_plan_vae import CausalVAE, CausalVAEConfig, TilingConfig


def _encode(model: CausalVAE, video: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    moments = model.encode_moments(video)  # (B, 8, t, h, w): mean, then unclamped logvar
    return {f"{prefix}_mean": moments[:, : model.latent_channels], f"{prefix}_moments": moments}


def _tiled(model: CausalVAE, sizes: dict, fn):
    """Run `fn` with the tile sizes of inputs.json set, as the fixture sets the five attributes."""
    model.enable_tiling(TilingConfig(**sizes))
    try:
        return fn()
    finally:
        model.disable_tiling()


def run(fixture_dir: Path, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every output of the fixture, computed in `dtype` (float64 reproduces the official fp64 rerun)."""
    fixture_dir = Path(fixture_dir)
    config = CausalVAEConfig.from_dict(json.loads((fixture_dir / "config.json").read_text()))
    model = CausalVAE(config).eval()
    model.load_checkpoint(load_file(fixture_dir / "weights.safetensors"))
    model.to(dtype)
    x = {k: v.to(dtype) for k, v in load_file(fixture_dir / "inputs.safetensors").items()}
    args = json.loads((fixture_dir / "inputs.json").read_text())
    cases = json.loads((fixture_dir / "meta.json").read_text())["cases"]

    def wrapper_sampled() -> dict[str, torch.Tensor]:
        # Official: torch.manual_seed(seed); w.encode(video_image) draws randn(mean.shape) from the
        # global CPU generator after a forward pass that consumes no random numbers (eval, dropout 0).
        # A fresh CPU generator with the same seed yields the same stream.
        generator = torch.Generator("cpu").manual_seed(args["sample_seed"])
        z = model.encode(x["video_image"], sample=True, generator=generator)
        video = model.decode(x["latent_image"], num_frames=model.num_frames(x["latent_image"].shape[2]))
        return {
            "wrapper_encode_image_sampled": z,
            "wrapper_decode_image_video_btchw": video.transpose(1, 2).contiguous(),  # b c t h w -> b t c h w
        }

    runners = {
        "encode": lambda: _encode(model, x["video"], "encode"),
        "decode": lambda: {"decode_video": model.decode_latents(x["latent"])},
        "encode_image": lambda: _encode(model, x["video_image"], "encode_image"),
        "decode_image": lambda: {"decode_image_video": model.decode_latents(x["latent_image"])},
        "wrapper_sampled": wrapper_sampled,
        "encode_untiled_long": lambda: _encode(model, x["video_tiled"], "encode_untiled_long"),
        "encode_tiled": lambda: _tiled(
            model, args["tiling_release"], lambda: _encode(model, x["video_tiled"], "encode_tiled")
        ),
        "decode_tiled": lambda: _tiled(
            model, args["tiling_release"], lambda: {"decode_tiled_video": model.decode_latents(x["latent_tiled"])}
        ),
        "encode_tiled_small": lambda: _tiled(
            model, args["tiling_small"], lambda: _encode(model, x["video_tiled_small"], "encode_tiled_small")
        ),
        "decode_tiled_small": lambda: _tiled(
            model,
            args["tiling_small"],
            lambda: {"decode_tiled_small_video": model.decode_latents(x["latent_tiled_small"])},
        ),
    }
    unknown = sorted(set(cases) - set(runners))
    if unknown:
        raise ValueError(f"{fixture_dir}: cases {unknown} have no runner here; known: {sorted(runners)}")

    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, case in cases.items():
            produced = runners[name]()
            if sorted(produced) != sorted(case["outputs"]):
                raise AssertionError(f"case {name}: produced {sorted(produced)}, meta.json lists {case['outputs']}")
            outputs.update(produced)
    return outputs
