"""Custom GPU kernels shared by the models (Triton; every one has a plain PyTorch path beside it).

Which of them a model uses is an option of that model, attached from outside like every other cross-cutting
behaviour, not a module-level switch:

    set_kernel_options(model, KernelOptions(temporal_attention="sdpa"))   # for the model's lifetime
    with kernel_options(model, norms=False): ...                          # for an A/B measurement

Each model module that can take a kernel path reads `self.kernels`; a class attribute holds the defaults
(every kernel where it applies), so a model nobody configured behaves as it always did.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

TEMPORAL_ATTENTION_IMPLS = ("auto", "triton", "bmm", "sdpa")
ATTENTION_IMPLS = ("sdpa", "triton")  # spatial_attention, cross_attention


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels a model may use; each only where it applies (CUDA, half precision, no autograd)."""

    temporal_attention: str = "auto"
    """STDiT3's temporal (RoPE) attention core: "auto" ("triton" where the short-sequence kernel applies, else
    "sdpa"), "triton" (pab.kernels.short_attention; errors surface), "bmm" (batched GEMMs) or "sdpa"."""
    short_attention: bool = True
    """Latte's and Open-Sora-Plan's temporal attention through the short-sequence kernel."""
    fused_gelu: bool = True
    """fc1's bias + tanh-GELU in the GEMM epilogue (cuBLASLt) instead of a separate GELU pass."""
    norms: bool = True
    """The fused layer-norm + modulate, gate + residual and q/k RMSNorm kernels (pab.kernels.norms)."""
    spatial_attention: str = "sdpa"
    """STDiT3's, Latte's and Open-Sora-Plan's spatial attention (full sequences, no mask, head dim 72): "sdpa"
    (cuDNN) or "triton" (pab.kernels.flash_attention, which splits 72 = 64 + 8 instead of padding; where it
    `supported`)."""
    cross_attention: str = "sdpa"
    """The cross-attention to the text (tens of keys; STDiT3's with a key mask, Latte's and Open-Sora-Plan's
    without a bias): "sdpa" or "triton" (the same kernel, one key block a query tile, a mask read in place)."""

    def __post_init__(self) -> None:
        if self.temporal_attention not in TEMPORAL_ATTENTION_IMPLS:
            raise ValueError(
                f"temporal_attention={self.temporal_attention!r}; choose one of {', '.join(TEMPORAL_ATTENTION_IMPLS)}"
            )
        for name in ("spatial_attention", "cross_attention"):
            if getattr(self, name) not in ATTENTION_IMPLS:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(ATTENTION_IMPLS)}")


DEFAULT_KERNELS = KernelOptions()


def set_kernel_options(model: torch.nn.Module, options: KernelOptions) -> KernelOptions:
    """Give every submodule of `model` that reads kernel options these; returns the options it had before."""
    before = getattr(model, "kernels", DEFAULT_KERNELS)
    for m in model.modules():
        if isinstance(getattr(type(m), "kernels", None), KernelOptions):
            m.kernels = options
    return before


@contextlib.contextmanager
def kernel_options(model: torch.nn.Module, **changes) -> Iterator[KernelOptions]:
    """Within the block, `model` runs with these options changed (e.g. `norms=False`); restored after."""
    before = getattr(model, "kernels", DEFAULT_KERNELS)
    options = dataclasses.replace(before, **changes)
    set_kernel_options(model, options)
    try:
        yield options
    finally:
        set_kernel_options(model, before)


def row_pieces(width: int) -> tuple[int, int]:
    """A row of `width` channels as two power-of-two tiles (Triton's tiles are powers of two): the largest that fits,
    then the rest rounded up (0: none). 1,152 = 1,024 + 128 and 4,608 = 4,096 + 512 exactly, where one tile of the
    next power of two (2,048, 8,192) leaves 44% of its lanes computing on masked-off values."""
    if width < 1:
        raise ValueError(f"a row needs at least one channel; got {width}")
    first = 1 << (width.bit_length() - 1)
    rest = width - first
    return first, (1 << (rest - 1).bit_length()) if rest else 0


def no_grad_needed(x: torch.Tensor) -> bool:
    """Whether autograd records nothing through `x`. The kernels and fused epilogues here have no backward
    pass, so a training step (`pab.train`) takes the plain PyTorch path, which autograd differentiates."""
    return not (torch.is_grad_enabled() and x.requires_grad)
