"""The GroupNorm kernels (pab.kernels.group_norm) attached to a VAE from outside, and removable.

Every `nn.GroupNorm` in the model gets a hook that runs the kernel where it applies (`group_norm.available`:
CUDA, half precision, no autograd) and the module's own forward elsewhere. Where a block's code sends a norm's
output only into a SiLU, the norm writes SiLU(norm(x)) in the same pass and that SiLU passes the tensor on.
Which norms those are was read from each block's forward (`_fused_pairs`); a norm of any other class is
only normalised. The SiLU's hook passes on exactly the tensor its norm just wrote and applies SiLU to anything
else, so a block that also calls the activation elsewhere (ResnetBlock2D on a time embedding) is unchanged.

A convolution whose output goes into a norm only through additions (ResnetBlock2D's conv1 -> norm2, with the
time embedding added between them in "default" mode) leaves its bias to that norm (`_bias_pairs`): PyTorch
adds a convolution's bias in an elementwise pass of its own after cuDNN's kernel, and the norm kernel adds it on
the fly (`group_norm(..., input_bias=)`). The norm's hook adds the handed-over bias whatever path it takes, so
the sum is the same wherever the kernel does not apply.

At the end of such a block (no time embedding, no up- or downsampling), conv2 and the 1x1 shortcut conv leave
their biases to the residual sum, which adds them and divides by the block's output scale in one pass
(`ResnetBlockHook`, `pab.kernels.conv_epilogue`) where diffusers' forward runs a bias pass per conv, an add and
a division. The hook runs the block's own modules in its forward's order (so the norm, SiLU and conv1 hooks
apply), and diffusers' forward wherever its case is not this one.

A nearest 2x upsampling followed by a 3x3 convolution (diffusers' Upsample2D, three in the SDXL decoder, the
last writing 256 channels at full resolution) runs as a 2x2 convolution on the low-resolution input with four
output channels per channel, one for each output pixel's position in its 2x2 block, whose four phases are
interleaved into the output as the bias is added, in one kernel (`SubpixelUpsampleHook`,
`conv_epilogue.subpixel_interleave`). On a nearest-upsampled input a 3x3 tap pattern covers only 2x2 distinct
input pixels, so that is 16 multiply-adds per input pixel and channel pair against 36, without the 4x-size
interpolated tensor or the separate bias pass. It is the same sum of products in another order, with the taps
that land on one input pixel summed (in float32) into one weight.

The mid-block attention (one head of 512 channels, wider than any flash kernel takes) runs its core through
`pab.kernels.wide_attention` (two GEMMs around a softmax kernel) instead of PyTorch's memory-efficient kernel
(`WideAttentionHook`).

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
import torch.nn.functional as F

from pab.hooks.registry import ModelHook, register_hook, remove_hooks_named
from pab.kernels import conv_epilogue as ep
from pab.kernels import group_norm as gn
from pab.kernels import wide_attention as wa

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


def _bias_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) attribute pairs of `module` whose conv output reaches the norm only through additions, so its
    bias may be added by the norm instead (diffusers 0.42's ResnetBlock2D; our temporal ResBlocks have no
    conv biases)."""
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(module, ResnetBlock2D):  # every time_embedding_norm: at most `+ temb` ("default") between them
        return [("conv1", "norm2")]
    return []


@dataclass
class _Handoff:
    """The tensor a norm wrote with SiLU applied, until its activation takes it."""

    pending: torch.Tensor | None = None


@dataclass
class _BiasHandoff:
    """A convolution's bias that its norm has to add, from the conv's call to the norm's."""

    bias: torch.Tensor | None = None


class GroupNormHook(ModelHook):
    """An `nn.GroupNorm` through the kernel where it applies; with `handoff`, SiLU(norm(x)) in one pass."""

    name = HOOK

    def __init__(
        self, handoff: _Handoff | None, use_kernel: Callable[[torch.Tensor, int], bool],
        bias_in: _BiasHandoff | None = None,
    ) -> None:  # fmt: skip
        self.handoff = handoff
        self.use_kernel = use_kernel
        self.bias_in = bias_in

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        input_bias = None
        if self.bias_in is not None:
            input_bias, self.bias_in.bias = self.bias_in.bias, None
        if torch.compiler.is_compiling() or not self.use_kernel(x, module.num_groups):
            return forward(x if input_bias is None else x + _per_channel(input_bias, x))
        fuse = self.handoff is not None
        y = gn.group_norm(x, module.num_groups, module.weight, module.bias, module.eps, silu=fuse,
                          input_bias=input_bias)  # fmt: skip
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


class ConvBiasHook(ModelHook):
    """A convolution that runs without its bias and hands it to the norm its output goes into (`_bias_pairs`),
    where that norm will take the kernel; elsewhere the plain convolution, so CPU decodes stay bit for bit."""

    name = HOOK

    def __init__(self, handoff: _BiasHandoff, num_groups: int, use_kernel: Callable[[torch.Tensor, int], bool]):
        self.handoff = handoff
        self.num_groups = num_groups
        self.use_kernel = use_kernel

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        if module.bias is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return forward(x)
        # What the norm will be asked about: the conv output's batch, channels, device and dtype.
        probe = x.new_empty((x.shape[0], module.out_channels) + (1,) * (x.ndim - 2))
        if not self.use_kernel(probe, self.num_groups):
            return forward(x)
        self.handoff.bias = module.bias
        return module._conv_forward(x, module.weight, None)


class ResnetBlockHook(ModelHook):
    """diffusers' ResnetBlock2D without a time embedding or resampling, its last convs' biases added in the
    residual sum (see the module doc); the block's own forward in every other case."""

    name = HOOK

    def __init__(self, use_kernel: Callable[[torch.Tensor, int], bool]) -> None:
        self.use_kernel = use_kernel

    def new_forward(
        self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor, temb: torch.Tensor | None = None,
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        if (temb is not None or args or kwargs or module.training or torch.is_grad_enabled()
                or torch.compiler.is_compiling() or not self.use_kernel(x, module.norm1.num_groups)):
            return forward(x, temb, *args, **kwargs)  # fmt: skip
        # ResnetBlock2D.forward (diffusers 0.42) with temb None, upsample and downsample None.
        h = module.conv1(module.nonlinearity(module.norm1(x)))
        h = module.dropout(module.nonlinearity(module.norm2(h)))
        conv2, short = module.conv2, module.conv_shortcut
        h = conv2._conv_forward(h, conv2.weight, None)
        residual, biases = x, (conv2.bias,)
        if short is not None:
            residual, biases = short._conv_forward(x, short.weight, None), (conv2.bias, short.bias)
        if not ep.takes(h, residual):  # layouts the kernel does not read (e.g. mixed): the same sum in PyTorch
            for b in biases:
                h = h if b is None else h + _per_channel(b, h)
            return (residual + h) / module.output_scale_factor
        return ep.bias_residual(h, residual, biases, 1.0 / module.output_scale_factor)


def _per_channel(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) bias shaped to broadcast over x (N, C, *spatial), in x's dtype."""
    return b.view(-1, *(1,) * (x.ndim - 2)).to(x.dtype)


def _plain_resnet(module: nn.Module) -> bool:
    """Whether `module` is a ResnetBlock2D that `ResnetBlockHook` reproduces: no time embedding (as in a VAE),
    plain convs (a 1x1 shortcut or none), no up- or downsampling."""
    from diffusers.models.resnet import ResnetBlock2D

    short = module.conv_shortcut if isinstance(module, ResnetBlock2D) else None
    return (
        type(module) is ResnetBlock2D and module.upsample is None and module.downsample is None
        and module.time_emb_proj is None and module.time_embedding_norm != "scale_shift"
        and type(module.conv1) is nn.Conv2d and type(module.conv2) is nn.Conv2d
        and (short is None or (type(short) is nn.Conv2d and short.kernel_size == (1, 1)))
    )  # fmt: skip


# Rows of the 3x3 kernel that land on each of the two low-resolution rows a 2x2 kernel reads, by the output row's
# parity (columns alike): even output rows 2i see input rows i-1 (tap 0) and i (taps 1, 2); odd rows 2i+1 see
# rows i (taps 0, 1) and i+1 (tap 2).
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (4 C_out, C_in, 2, 2) weight of a 2x2 convolution (padding 1) that gives, per phase (a, b) of output
    channel block 2a + b, the (C_out, C_in, 3, 3) convolution (padding 1) of the nearest-2x-upsampled input."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))  # half precision: summed in float32
    phases = []
    for rows in _PHASE_TAPS:
        for cols in _PHASE_TAPS:
            phases.append(torch.stack([
                torch.stack([w[:, :, list(r)][..., list(c)].sum(dim=(2, 3)) for c in cols], dim=-1) for r in rows
            ], dim=-2))  # fmt: skip
    return torch.cat(phases).to(weight.dtype)


class SubpixelUpsampleHook(ModelHook):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution) as one 2x2 convolution on the low-resolution
    input and one interleaving pass that adds the bias (see the module doc); its own forward elsewhere."""

    name = HOOK

    def __init__(self, use_kernel: Callable[[torch.Tensor, int], bool]) -> None:
        self.use_kernel = use_kernel
        self._weight: tuple[tuple, torch.Tensor] | None = None  # (the conv weight's identity, subpixel_weight)

    def new_forward(
        self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor, output_size: Any = None, *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        if (output_size is not None or args or kwargs or x.ndim != 4 or torch.compiler.is_compiling()
                or not self.use_kernel(x, 1) or (torch.is_grad_enabled() and module.conv.weight.requires_grad)):
            return forward(x, output_size, *args, **kwargs)  # fmt: skip
        conv = module.conv
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format  # fmt: skip
        key = (conv.weight.data_ptr(), conv.weight._version, conv.weight.dtype, conv.weight.device, fmt)
        if self._weight is None or self._weight[0] != key:
            self._weight = key, subpixel_weight(conv.weight).contiguous(memory_format=fmt)
        n, _, h, w = x.shape
        co = conv.out_channels
        y = F.conv2d(x, self._weight[1], None, padding=1)  # (N, 4 C_out, H + 1, W + 1)
        out = torch.empty((n, co, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=fmt)
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32) and ep.triton is not None:
            ep.subpixel_interleave(y, conv.bias, out)
            return out
        bias = conv.bias.view(1, co, 1, 1) if conv.bias is not None else None  # float64: PyTorch's strided adds
        for a in (0, 1):
            for b in (0, 1):
                phase = y[:, (2 * a + b) * co:(2 * a + b + 1) * co, a:a + h, b:b + w]  # output pixels (2i+a, 2j+b)
                dest = out[:, :, a::2, b::2]
                if bias is None:
                    dest.copy_(phase)
                else:
                    torch.add(phase, bias, out=dest)
        return out


def _subpixel_upsampler(module: nn.Module) -> bool:
    """Whether `module` is a diffusers Upsample2D that `SubpixelUpsampleHook` reproduces: nearest 2x, then a
    3x3, stride-1, padding-1 convolution, no norm."""
    from diffusers.models.upsampling import Upsample2D

    conv = getattr(module, "conv", None)
    return (
        type(module) is Upsample2D and module.norm is None and not module.use_conv_transpose and module.interpolate
        and module.use_conv and module.name == "conv" and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros"
    )  # fmt: skip


class WideAttentionHook(ModelHook):
    """diffusers' Attention as its default processor runs it on a VAE's feature map (self-attention, no mask), its
    core through `pab.kernels.wide_attention` where the heads are at least `from_head_dim` wide; its own forward
    in every other case."""

    name = HOOK

    def __init__(self, use_kernel: Callable[[torch.Tensor, int], bool], from_head_dim: int) -> None:
        self.use_kernel = use_kernel
        self.from_head_dim = from_head_dim

    def new_forward(
        self, module: nn.Module, forward: Callable[..., Any], hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        # UNetMidBlock2D passes temb=None; only a spatial norm (none here, `_vae_attention`) would read it.
        x = hidden_states
        heads = module.heads
        if (encoder_hidden_states is not None or attention_mask is not None or kwargs or x.ndim != 4
                or module.training or torch.compiler.is_compiling() or not self.use_kernel(x, 1)
                or (torch.is_grad_enabled() and module.to_q.weight.requires_grad)
                or module.inner_dim // heads < self.from_head_dim):  # fmt: skip
            return forward(x, encoder_hidden_states, attention_mask, temb=temb, **kwargs)
        # AttnProcessor2_0.__call__ (diffusers 0.42) for this case.
        b, c, h, w = x.shape
        seq = x.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C): a view of an NHWC map
        if module.group_norm is not None:
            seq = module.group_norm(seq.transpose(1, 2)).transpose(1, 2)
        q, k, v = module.to_q(seq), module.to_k(seq), module.to_v(seq)  # (B, HW, heads * d)
        if heads > 1:
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(0, 1) for t in (q, k, v))
        o = wa.wide_attention(q, k, v)  # (B heads, HW, d)
        if heads > 1:
            o = o.unflatten(0, (b, heads)).transpose(1, 2).flatten(2)
        o = module.to_out[1](module.to_out[0](o))
        o = o.transpose(-1, -2).reshape(b, c, h, w)
        if module.residual_connection:
            o = o + x
        return o / module.rescale_output_factor


def _vae_attention(module: nn.Module) -> bool:
    """Whether `module` is a diffusers Attention that `WideAttentionHook` reproduces: default processor, no
    spatial norm, no q/k norms, self-attention only."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    return (
        type(module) is Attention and type(module.processor) is AttnProcessor2_0 and module.spatial_norm is None
        and module.norm_q is None and module.norm_k is None and not module.is_cross_attention
        and len(module.to_out) == 2 and module.inner_dim == module.inner_kv_dim
    )  # fmt: skip


@dataclass
class VAEKernelsHandle:
    """What `apply_vae_kernels` attached; `remove()` restores the model."""

    model: nn.Module
    norms: int = 0  # GroupNorms hooked
    fused: int = 0  # of which write SiLU(norm) in one pass
    biases: int = 0  # convolutions whose bias their norm adds
    upsamplers: int = 0  # nearest-2x + 3x3 convolutions run as subpixel convolutions
    resnets: int = 0  # ResnetBlock2Ds whose last biases go into the residual sum
    attentions: int = 0  # Attentions whose core runs as wide_attention
    channels_last: list[nn.Parameter] = field(default_factory=list)  # conv weights it made channels-last

    def remove(self) -> None:
        remove_vae_kernels(self.model)
        for p in self.channels_last:
            p.data = p.data.contiguous()
        self.channels_last.clear()


def apply_vae_kernels(
    model: nn.Module, channels_last: bool = False, use_kernel: Callable[[torch.Tensor, int], bool] = gn.available,
    conv_bias: bool = True, subpixel: bool = True, wide_attention_from: int | None = 257,
) -> VAEKernelsHandle:  # fmt: skip
    """Hook every GroupNorm of `model` (a VAE, or any module) onto the kernels, fusing the SiLUs that
    `_fused_pairs` allows and, with `conv_bias`, the convolution biases that `_bias_pairs` allows and those of
    the resnets' last convs (`ResnetBlockHook`); with `subpixel`, its nearest-2x upsamplers run as subpixel
    convolutions; attentions with heads of at least `wide_attention_from` channels (default: wider than flash
    kernels take; None: none) run as `WideAttentionHook`; with `channels_last`, its convolutions' weights are made
    channels-last too (see the module doc). Each applies where `use_kernel` says the norms'
    kernels do (for an upsampler or attention: `use_kernel(x, 1)`), so a CPU or float32 decode is unchanged.
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
    bias_in: dict[int, _BiasHandoff] = {}  # id(norm) -> the bias handoff from the conv that feeds it
    for module in model.modules() if conv_bias else ():
        for conv_name, norm_name in _bias_pairs(module):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if type(conv) is nn.Conv2d and type(norm) is nn.GroupNorm and conv.bias is not None:
                bias_in[id(norm)] = _BiasHandoff()
                register_hook(conv, ConvBiasHook(bias_in[id(norm)], norm.num_groups, use_kernel))
                handle.biases += 1
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            register_hook(module, GroupNormHook(fused.get(id(module)), use_kernel, bias_in.get(id(module))))
            handle.norms += 1
            handle.fused += id(module) in fused
    for module in model.modules() if conv_bias else ():
        if _plain_resnet(module):
            register_hook(module, ResnetBlockHook(use_kernel))
            handle.resnets += 1
    for module in model.modules() if subpixel else ():
        if _subpixel_upsampler(module):
            register_hook(module, SubpixelUpsampleHook(use_kernel))
            handle.upsamplers += 1
    for module in model.modules() if wide_attention_from is not None else ():
        if _vae_attention(module):
            register_hook(module, WideAttentionHook(use_kernel, wide_attention_from))
            handle.attentions += 1
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
