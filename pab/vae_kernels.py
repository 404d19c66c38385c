"""The GroupNorm kernels (pab.kernels.group_norm) attached to a VAE from outside, and removable.

Every `nn.GroupNorm` in the model gets a hook that runs the kernel where it applies (`group_norm.available`:
CUDA, half precision, no autograd) and the module's own forward elsewhere. Where a block's code sends a norm's
output only into a SiLU, the norm writes SiLU(norm(x)) in the same pass and that SiLU passes the tensor on.
Which norms those are was read from each block's forward (`_fused_pairs`); a norm of any other class is
only normalised. The SiLU's hook passes on exactly the tensor its norm just wrote and applies SiLU to anything
else, so a block that also calls the activation elsewhere (ResnetBlock2D on a time embedding) is unchanged.

With `channels_last=True` the 2D and 3D convolution weights are made channels-last as well, so convolutions
run, and hand on, NHWC activations, and the norms read that layout in place (PyTorch's GroupNorm would copy
them back to NCHW first). Removing restores the weights' layout.

    handle = apply_vae_kernels(vae, channels_last=True)
    ... vae.decode(...) ...
    handle.remove()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from pab.hooks.registry import ModelHook, register_hook, remove_hooks_named
from pab.kernels import group_norm as gn

HOOK = "group_norm_kernel"


def _fused_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(norm, activation) attribute pairs of `module` whose norm output goes only into that activation, as its
    class's forward is written (diffusers 0.42 and pab.models.opensora_vae)."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D

    from pab.models.opensora_vae import ResBlock, TemporalDecoder, TemporalEncoder

    if isinstance(module, ResnetBlock2D):
        # norm2's output is modulated by the time embedding before the activation under "scale_shift".
        norms = ("norm1",) if module.time_embedding_norm == "scale_shift" else ("norm1", "norm2")
        return [(n, "nonlinearity") for n in norms]
    if isinstance(module, (Decoder, Encoder)):
        return [("conv_norm_out", "conv_act")]
    if isinstance(module, ResBlock):
        return [("norm1", "act"), ("norm2", "act")]
    if isinstance(module, (TemporalDecoder, TemporalEncoder)):
        return [("norm1", "act")]
    return []


@dataclass
class _Handoff:
    """The tensor a norm wrote with SiLU applied, until its activation takes it."""

    pending: torch.Tensor | None = None


class GroupNormHook(ModelHook):
    """An `nn.GroupNorm` through the kernel where it applies; with `handoff`, SiLU(norm(x)) in one pass."""

    name = HOOK

    def __init__(self, handoff: _Handoff | None, use_kernel: Callable[[torch.Tensor, int], bool]) -> None:
        self.handoff = handoff
        self.use_kernel = use_kernel

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not self.use_kernel(x, module.num_groups):
            return forward(x)
        fuse = self.handoff is not None
        y = gn.group_norm(x, module.num_groups, module.weight, module.bias, module.eps, silu=fuse)
        if fuse:
            self.handoff.pending = y
        return y


class FusedSiLUHook(ModelHook):
    """A SiLU whose norm may already have applied it: passes that norm's tensor on, applies SiLU otherwise."""

    name = HOOK

    def __init__(self, handoff: _Handoff) -> None:
        self.handoff = handoff

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        if x is self.handoff.pending:
            self.handoff.pending = None
            return x
        return forward(x)


@dataclass
class VAEKernelsHandle:
    """What `apply_vae_kernels` attached; `remove()` restores the model."""

    model: nn.Module
    norms: int = 0  # GroupNorms hooked
    fused: int = 0  # of which write SiLU(norm) in one pass
    channels_last: list[nn.Parameter] = field(default_factory=list)  # conv weights it made channels-last

    def remove(self) -> None:
        remove_vae_kernels(self.model)
        for p in self.channels_last:
            p.data = p.data.contiguous()
        self.channels_last.clear()


def apply_vae_kernels(
    model: nn.Module, channels_last: bool = False, use_kernel: Callable[[torch.Tensor, int], bool] = gn.available
) -> VAEKernelsHandle:  # fmt: skip
    """Hook every GroupNorm of `model` (a VAE, or any module) onto the kernels, fusing the SiLUs that
    `_fused_pairs` allows; with `channels_last`, its convolutions' weights too (see the module doc).
    `use_kernel(x, num_groups)` says whether a norm's input takes the kernel (default: CUDA, half precision, no
    autograd)."""
    handle = VAEKernelsHandle(model)
    handoffs: dict[int, _Handoff] = {}  # id(activation) -> its handoff, shared by the norms that feed it
    fused: dict[int, _Handoff] = {}  # id(norm) -> the handoff of the activation it feeds
    for module in model.modules():
        for norm_name, act_name in _fused_pairs(module):
            norm, act = getattr(module, norm_name, None), getattr(module, act_name, None)
            if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
                if id(act) not in handoffs:
                    handoffs[id(act)] = _Handoff()
                    register_hook(act, FusedSiLUHook(handoffs[id(act)]))
                fused[id(norm)] = handoffs[id(act)]
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            register_hook(module, GroupNormHook(fused.get(id(module)), use_kernel))
            handle.norms += 1
            handle.fused += id(module) in fused
    if channels_last:
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        for module in model.modules():
            p = module.weight if isinstance(module, (nn.Conv2d, nn.Conv3d)) else None
            if p is not None and p.is_contiguous():  # `remove` restores exactly these
                p.data = p.data.contiguous(memory_format=formats[p.dim()])
                handle.channels_last.append(p)
    return handle


def remove_vae_kernels(model: nn.Module) -> int:
    """Remove the hooks `apply_vae_kernels` attached; returns how many there were."""
    return remove_hooks_named(model, HOOK)
