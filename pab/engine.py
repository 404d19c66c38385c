"""How a loaded pipeline runs: the engine's switches, set once when it is built (not per request).

One definition for every place that sets them: `Pipeline.from_name(engine=...)`, serving's per-model `engine`
block (cluster/config.py validates this model), `pab bulk`'s and `bench.run`'s flags (`add_arguments`).
A switch is on by default once it is measured to pay on the GPUs we run, and only then (docs/performance.md);
where it cannot run (no CUDA, float32) it changes nothing. Each has a `--flag` and a `--no-flag`.
"""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    """Engine switches of a `Pipeline`, at their measured defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compile: bool = Field(False, description="torch.compile the DiT's attentions (pab.compile); the first video of "
                          "each size waits for the compile")  # fmt: skip
    cuda_graphs: bool = Field(False, description="replay each denoising step as a CUDA graph (pab.cudagraph), a DSP "
                              "group's all-to-alls inside it; meant for groups the host holds back")  # fmt: skip
    vae_kernels: bool = Field(True, description="the VAE's GroupNorm + SiLU as Triton kernels, conv biases folded "
                              "into the norms and residual sums, subpixel upsamplers, convolutions channels-last "
                              "(pab.vae_kernels; CUDA, half precision): Open-Sora's 480p decode 1.65 -> 0.54 s on "
                              "an H100")  # fmt: skip

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """`--flag` / `--no-flag` per switch (`cuda_graphs` -> `--cuda-graphs`), its help the field's description."""
        for name, field in cls.model_fields.items():
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=field.description)  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineOptions":
        """The switches as `add_arguments`' flags set them."""
        return cls(**{name: getattr(args, name) for name in cls.model_fields})

    def changed(self) -> dict[str, bool]:
        """The switches set away from their defaults, as keyword arguments (empty when none is)."""
        return self.model_dump(exclude_defaults=True)
