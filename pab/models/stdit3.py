"""Open-Sora 1.2 STDiT3, all of it in this single file, as a plain single-device nn.Module.

State-dict names, shapes and order are the official ones (hpcaitech/Open-Sora v1.2.0,
`opensora/models/stdit/stdit3.py` + `opensora/models/layers/blocks.py`), so the released
`hpcai-tech/OpenSora-STDiT-v3` checkpoint loads strictly. Numerics match the official float32 forward
(tests/fixtures/official/stdit3). Attention uses `F.scaled_dot_product_attention`; the text mask of the
cross-attention is an SDPA key mask instead of xformers' packed block-diagonal mask (same math).

Seams for PAB and DSP (docs/design.md): spatial attention sees (B·T, S, C), temporal attention sees
(B·S, T, C) and computes its RoPE from that T; see `STDiT3.broadcast_targets`.

Performance (bf16 on CUDA; the float32 CPU path is the fixture path and keeps its exact op order):
* the hidden state is kept contiguous (B, T, S, C); norm + modulate, residual + norm + modulate and
  gate + residual are one pass each (`pab.kernels.norms` in half precision on CUDA, `torch.addcmul`
  elsewhere), and the temporal block writes its (B·S, T, C) input in that pass;
* RoPE tables are cached per (T, device, dtype); the spatial q/k RMSNorm is one kernel over qkv on CUDA
  (`norms.qk_rmsnorm`, `F.rms_norm` elsewhere);
* the text is cut to its last kept token and an all-kept mask becomes None, so cross-attention runs
  flash attention on ~tens of keys instead of a masked kernel on 300;
* the MLP's bias + tanh-GELU run in the fc1 GEMM epilogue on CUDA (`KernelOptions.fused_gelu`);
* the temporal attention core (3180 sequences of 15 tokens at 480p) runs as selected by
  `KernelOptions.temporal_attention` (see `temporal_attention_impl`): on CUDA by default one Triton kernel
  (`pab.kernels.short_attention`) that reads qkv, applies RMSNorm + RoPE, attends and writes the (N, T, C)
  input of `proj`;
* which kernels run is the model's `KernelOptions` (`pab.kernels.set_kernel_options`), defaults: all;
* `STDiT3Block.compile_regions` names the elementwise steps between the PAB targets that
  `pab.compile.apply_compile` may compile.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pab.kernels import flash_attention as flash
from pab.kernels import short_attention as short_attn
from pab.hooks.registry import output_reused
from pab.kernels.fp8 import DelayedScale, fp8_input, fp8_output
from pab.kernels.fp8 import delayed_reference as fp8_reference
from pab.kernels import DEFAULT_KERNELS, TEMPORAL_ATTENTION_IMPLS, KernelOptions, no_grad_needed, norms
from pab.models.handoff import Handoff

# How the temporal attention core is computed (KernelOptions.temporal_attention; the module is still called
# once per block, on (B·S, T, C)):
#   "auto"   - "triton" on CUDA in half precision when the kernel applies (T <= 32), else "sdpa"
#   "triton" - pab.kernels.short_attention: one kernel reads qkv, applies RMSNorm + RoPE and attends
#   "bmm"    - baddbmm / fp32 softmax / bmm: cuBLAS batched GEMMs instead of one flash CTA per tiny sequence
#   "sdpa"   - F.scaled_dot_product_attention (flash: one CTA of 128 query rows per 15-token sequence)
# bench/profile.py times them all at the real shapes.


#################################################################################
#                                    Config                                     #
#################################################################################


@dataclass
class STDiT3Config:
    """Field names and defaults of the official `STDiT3Config` (a transformers PretrainedConfig there)."""

    input_size: tuple = (None, None, None)  # placeholder: sizes are dynamic
    input_sq_size: int = 512  # pixel resolution the spatial pos-embed scale is relative to
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    hidden_size: int = 1152
    depth: int = 28  # spatial blocks; as many temporal blocks, interleaved
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # training-time caption dropout; unused at inference
    pred_sigma: bool = True  # out channels = 2 * in_channels
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300  # rows of the learned null caption `y_embedder.y_embedding`
    qk_norm: bool = True
    # Kernel and distributed switches: they do not change the math, so they are accepted and ignored.
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    # Training-only `requires_grad` flags, applied as the official model does.
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False

    # Keys of the official config.json that are bookkeeping, not architecture.
    _BOOKKEEPING = frozenset({"model_type", "architectures", "torch_dtype", "transformers_version", "auto_map"})

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim (hidden_size // num_heads) must be even: RoPE rotates channel pairs")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2D sin/cos pos-embed")
        if self.drop_path != 0.0:
            raise ValueError(
                f"drop_path={self.drop_path}: stochastic depth is a training feature this inference model does not "
                "implement; set drop_path=0.0 (the released config uses 0.0)"
            )
        if self.skip_y_embedder:
            raise ValueError(
                "skip_y_embedder=True (pre-projected text + y_lens as mask) is not supported; "
                "pass T5 features and a keep-mask with skip_y_embedder=False"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STDiT3Config:
        """Build from the official config.json dict; bookkeeping keys are ignored, unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls._BOOKKEEPING and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"unknown STDiT3 config keys {unknown}; known fields are {sorted(names)}. "
                "If these are bookkeeping keys, drop them before calling from_dict."
            )
        return cls(**{k: v for k, v in d.items() if k in names})


SIZES: dict[str, dict[str, Any]] = {
    # hpcai-tech/OpenSora-STDiT-v3 config.json (STDiT3-XL/2).
    "full": dict(
        input_size=(None, None, None), input_sq_size=512, in_channels=4, patch_size=(1, 2, 2),
        hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True,
        drop_path=0.0, caption_channels=4096, model_max_length=300, qk_norm=True,
        enable_flash_attn=False, enable_layernorm_kernel=False, enable_sequence_parallelism=False,
        only_train_temporal=False, freeze_y_embedder=True, skip_y_embedder=False,
    ),  # fmt: skip
}
# Same architecture, small enough for CPU tests; caption_channels is our tiny T5's width.
SIZES["tiny"] = {**SIZES["full"], "depth": 2, "hidden_size": 64, "num_heads": 4, "caption_channels": 64,
                 "model_max_length": 64}  # fmt: skip
# Trained here on synthetic clips (`python -m pab.train`, weights in pab/weights/): 4+4 blocks of width 192,
# 64x64 px (16x16 latents), the small T5's width, its 32 text tokens; the caption projection trains too.
SIZES["small"] = {**SIZES["full"], "depth": 4, "hidden_size": 192, "num_heads": 3, "caption_channels": 128,
                  "model_max_length": 32, "input_sq_size": 64, "freeze_y_embedder": False}  # fmt: skip


#################################################################################
#                         Embedding and Positional Layers                       #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) features of a scalar per sample -> Linear -> SiLU -> Linear (DiT); also embeds fps."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim) float32 [cos, sin] features, the official float32 values, correctly rounded.

        At t ~ 1000 the output is very sensitive to these: one ulp of the highest frequencies moves the
        fixture's output by up to 5e-5. Platform float32 exp/cos/sin differ by an ulp here and there, so
        we evaluate them in float64 on the official float32 arguments and round once: the same float32
        numbers on every machine and device.
        """
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(exponent.double()).float()  # (half,)
        args = (t[:, None].float() * freqs[None]).double()  # float32 product, as the official code
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.sinusoidal(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)  # (B, C)


class Mlp(nn.Module):
    """timm-style Mlp (fc1, tanh-GELU, fc2) so the checkpoint's `fc1`/`fc2` names match."""

    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def gelu_linears(self) -> tuple[nn.Linear, str, nn.Linear]:
        """(fc1, its GELU's approximation, fc2): what a transform replacing the MLP's math needs (pab.precision)."""
        return self.fc1, self.act.approximate, self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.fused_gelu and x.is_cuda and no_grad_needed(x):
            # cuBLASLt applies bias + tanh-GELU in fc1's epilogue: the 4C-wide hidden is written once instead
            # of written, read and written again by a separate GELU kernel (2 x 440 MB per MLP at 480p).
            # CUDA only: the CPU kernel of this op uses the exact (erf) GELU.
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; holds the learned null caption used as the CFG negative."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # Persistent buffer in the official checkpoint; the eval forward never reads it.
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify; zero-pads T, H, W up to a multiple of the patch size, like the official code."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        x = self.proj(x)  # (B, C, T_p, H_p, W_p)
        # Contiguous (B, N, C): a transposed view here would make every later elementwise op keep the
        # channel-major layout, and every norm and reshape copy it back, in every block.
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, N, C), tokens in (t, h, w) order


def spatial_pos_embed(
    dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device
) -> torch.Tensor:
    """2D sin/cos table (1, h*w, dim): channels [0, dim/2) encode the column, [dim/2, dim) the row."""
    # Same op order as the official PositionEmbedding2D so the float32 table is identical.
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))  # (dim/4,)
    rows = torch.arange(h, device=device) / scale * (base_size / h)
    cols = torch.arange(w, device=device) / scale * (base_size / w)
    col_pos = cols[None, :].expand(h, w).reshape(-1)  # (h*w,), w fastest
    row_pos = rows[:, None].expand(h, w).reshape(-1)

    def sincos(p: torch.Tensor) -> torch.Tensor:
        out = p[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # (h*w, dim/2)

    return torch.cat([sincos(col_pos), sincos(row_pos)], dim=-1)[None]  # (1, h*w, dim)


class RotaryEmbedding(nn.Module):
    """Interleaved-pair RoPE over the sequence axis (rotary_embedding_torch 0.5.3 semantics, theta 10000)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        # A frozen Parameter, not a buffer: that is how the official checkpoint stores `rope.freqs`.
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)  # (dim/2,)
        self._tables: dict[tuple, tuple] = {}  # derived from freqs, not state (see `tables`)

    def tables(self, L: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape (L, D) such that rope(x) = x * cos + swap_pairs(x) * sin.

        cos is repeated over each pair, sin is (-s, +s) per pair. Cached per (L, device, dtype), so every
        block of a forward reuses one table instead of recomputing it (a handful of tiny kernels per block).
        An entry holds the `freqs` storage it was made from (so that address cannot be reused by another
        tensor) and its version: casting the model or loading a checkpoint invalidates it.
        """
        f = self.freqs
        key = (L, torch.device(device), dtype)
        compiling = torch.compiler.is_compiling()
        if not compiling and key in self._tables:
            src, version, cos, sin = self._tables[key]
            if src.data_ptr() == f.data_ptr() and src.dtype == f.dtype and version == f._version:
                return cos, sin
        pos = torch.arange(L, device=device, dtype=dtype)
        angles = pos[:, None] * f.to(device=device, dtype=dtype)[None]  # (L, D/2)
        cos = angles.cos().repeat_interleave(2, dim=-1)
        sin = angles.sin()
        sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        if not compiling:
            if len(self._tables) >= 8:  # a few (T, device, dtype) at a time; never grows without bound
                self._tables.clear()
            self._tables[key] = (f.detach(), f._version, cos, sin)
        return cos, sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., L, D) -> same, pair (x[2i], x[2i+1]) at position p rotated by p * freqs[i]."""
        # At least float32 even for bf16 models: bf16 angles of positions in the hundreds are off by ~1 rad.
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.tables(x.shape[-2], x.device, dtype)
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
        # Same products and sum as x*cos + (-x1, x0, ...)*sin (so float32 is bit-identical), computed in
        # `dtype`; for bf16 the rounding back happens in the same kernel (out=) instead of another pass.
        if x.dtype == dtype:
            return torch.addcmul(x * cos, swapped, sin)
        if not no_grad_needed(x):  # training: autograd cannot record an out= op
            return torch.addcmul(x * cos, swapped, sin).to(x.dtype)
        return torch.addcmul(x * cos, swapped, sin, out=torch.empty_like(x, memory_format=torch.contiguous_format))


#################################################################################
#                                   Attention                                   #
#################################################################################


class RMSNorm(nn.Module):
    """LlamaRMSNorm over head_dim (eps 1e-6), normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA (float32 inside, one rounding) instead of ~6 float32 passes; in float32
        # it is the same x * rsqrt(mean(x^2) + eps) * weight as the official LlamaRMSNorm.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention over dim 1 of (N, L, C); q/k RMSNorm, then RoPE if given (temporal)."""

    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # Share the model-level `rope` without registering it here, so the checkpoint holds `rope.freqs`
        # once (the official blocks hold a bound method of it for the same reason).
        object.__setattr__(self, "rope", rope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) -> (N, L, C); or frame blocks (N, nb, lb, C) -> (N, nb, lb, C), see `accepts_frame_blocks`."""
        d = fp8_output(self.proj)  # asked once a call: it counts the request's calls (pab.precision)
        if x.ndim == 4:
            return self._attend_blocks(self.qkv(x.transpose(0, 1)), d).transpose(0, 1)
        return self._attend(self.qkv(x), d)

    # Sequence parallelism (pab.parallel.dsp) may pass the temporal attention its sequences in frame blocks:
    # x (N, nb, lb, C) with token t = b·lb + i of sequence n at x[n, b, i], a transposed view of the
    # (nb, N, lb, C) buffer in which the frames of its rows arrived from nb ranks. The GEMMs are token-wise and
    # the short-sequence kernel reads and writes that layout, so neither the received frames nor the reply
    # (which goes back to the ranks in the same blocks) need a reordering copy.
    accepts_frame_blocks = True

    def _impl(self, qkv: torch.Tensor) -> str:
        """The attention core for this qkv: the selected temporal one with RoPE, SDPA for spatial attention."""
        if self.rope is None:
            return "sdpa"
        return temporal_attention_impl(qkv, self.num_heads, self.kernels.temporal_attention)

    def attention_output_linears(self) -> list[nn.Linear]:
        """The attention's output reaches `proj` alone, and the kernels can write it in e4m3 (pab.precision)."""
        return [self.proj]

    def _attend_blocks(self, qkv: torch.Tensor, d: DelayedScale | None = None) -> torch.Tensor:
        """(nb, N, lb, 3C) frame blocks -> (nb, N, lb, C). d: how the attention writes its output for an fp8
        `proj` (pab.kernels.fp8.fp8_output)."""
        if self._impl(qkv) == "triton":
            out = self._fused(qkv, d)
            if out is not None:
                return self.proj(out)
        nb, N, lb, C3 = qkv.shape  # any other path: reorder into (N, L, 3C) sequences first
        out = self._attend(qkv.transpose(0, 1).reshape(N, nb * lb, C3), d)
        return out.view(N, nb, lb, C3 // 3).transpose(0, 1)

    def _attend(self, qkv: torch.Tensor, d: DelayedScale | None = None) -> torch.Tensor:
        """(N, L, 3C) -> (N, L, C): attention over dim 1 and the output projection."""
        N, L, C3 = qkv.shape
        C = C3 // 3
        impl = self._impl(qkv)
        if impl == "triton":
            out = self._fused(qkv, d)  # norm + RoPE + attention in one kernel, (N, L, C)
            if out is not None:
                return self.proj(out)
            impl = "bmm"  # the kernel could not be built here (warned once)
        qk_kernel = self.kernels.norms and isinstance(self.q_norm, RMSNorm) and norms.available(qkv)
        if impl == "sdpa" and self.rope is None and qk_kernel:
            # One pass normalises q and k into (2, N, L, heads, hd); attention reads them, and v inside qkv,
            # as (N, heads, L, hd) views: no permute copies.
            qk = norms.qk_rmsnorm(qkv, self.num_heads, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            v = qkv.view(N, L, 3, self.num_heads, self.head_dim)[:, :, 2].transpose(1, 2)
            x = flash.attention(qk[0].transpose(1, 2), qk[1].transpose(1, 2), v, self.kernels.spatial_attention,
                                delayed=d)  # fmt: skip
            return self.proj(x.reshape(N, L, C))
        q, k, v = qkv.view(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each (N, heads, L, head_dim)
        if self.rope is not None:  # after the norm, as the released model was trained
            q, k = self.rope(q), self.rope(k)
        if impl == "bmm":
            return self.proj(_written(_bmm_attention(q, k, v), d))
        if self.rope is None:  # spatial
            return self.proj(flash.attention(q, k, v, self.kernels.spatial_attention, delayed=d).reshape(N, L, C))
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim); flash returns it (N, L, heads, hd)
        return self.proj(_written(x.transpose(1, 2).reshape(N, L, C), d))

    def _fused(self, qkv: torch.Tensor, d: DelayedScale | None = None) -> torch.Tensor | None:
        """The short-sequence kernel on (N, L, 3C) qkv or its frame blocks; None under "auto" when it cannot be
        built here."""
        has_norm = isinstance(self.q_norm, RMSNorm)
        kwargs = dict(
            q_weight=self.q_norm.weight if has_norm else None, k_weight=self.k_norm.weight if has_norm else None,
            eps=self.q_norm.eps if has_norm else 0.0,
            rope=self.rope.tables(short_attn.seq_len(qkv), qkv.device, torch.float32), delayed=d,
        )  # fmt: skip
        if self.kernels.temporal_attention == "auto":
            return short_attn.try_short_attention(qkv, self.num_heads, **kwargs)
        return short_attn.short_attention(qkv, self.num_heads, **kwargs)  # asked for by name: errors surface


def _written(out: torch.Tensor, d: DelayedScale | None) -> torch.Tensor:
    """An attention output (N, L, C) computed by PyTorch, with the e4m3 rows `d` asks for (the kernels' arithmetic)."""
    return out if d is None else fp8_reference(out, d)


def temporal_attention_impl(x: torch.Tensor, num_heads: int, impl: str = "auto") -> str:
    """What `impl` (KernelOptions.temporal_attention) means for the temporal (RoPE) attention on (N, L, 3C) `x`."""
    if impl not in TEMPORAL_ATTENTION_IMPLS:
        raise ValueError(f"temporal_attention={impl!r}; choose one of {TEMPORAL_ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    # Half precision only (see short_attn.supported): TF32 dots would miss the 1e-5 fidelity of float32 runs.
    return "triton" if short_attn.supported(x, num_heads) else "sdpa"


def _bmm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for many short sequences as batched GEMMs: (N, H, L, D) x3 -> (N, L, H·D).

    Flash attention gives each (sequence, head) its own CTA of 128 query rows, ~12% used at L=15; cuBLAS
    batched GEMMs pack many small matrices per CTA. Scores are rounded to the input dtype and the softmax
    runs in float32, like the official model's non-flash path (the scale is applied inside the GEMM).
    """
    N, H, L, D = q.shape
    qf, kf, vf = (t.reshape(N * H, L, D) for t in (q, k, v))  # v is a strided view of qkv: one copy
    scores = torch.baddbmm(qf.new_empty(()), qf, kf.transpose(1, 2), beta=0.0, alpha=D**-0.5)  # (N·H, L, L)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.bmm(probs, vf)  # (N·H, L, D)
    return out.view(N, H, L, D).transpose(1, 2).reshape(N, L, H * D)


class CrossAttention(nn.Module):
    """Video tokens attend to their own sample's text tokens; `mask` (B, L) keeps tokens, no norm, no gate."""

    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def quantized_input_linears(self) -> list[nn.Linear]:
        """q's input is the residual stream, which the block's gate + residual kernel can write in e4m3 too."""
        return [self.q_linear]

    def attention_output_linears(self) -> list[nn.Linear]:
        """The attention's output reaches `proj` alone, and the kernels can write it in e4m3 (pab.precision)."""
        return [self.proj]

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) video tokens; y: (B, L, C) projected text; mask: (B, L) bool keep-mask or None."""
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        kv = self.kv_linear(y).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, L, hd)
        # The official model packs the kept tokens and uses a block-diagonal mask; a key mask is the same softmax.
        x = flash.attention(q, k, v, self.kernels.cross_attention, key_mask=mask,
                            delayed=fp8_output(self.proj))  # (B, N, heads, hd)
        return self.proj(x.reshape(B, N, C))


#################################################################################
#                                 Core STDiT3                                   #
#################################################################################


def modulation(table: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None, x_mask: torch.Tensor | None):
    """adaLN-single parameters (B, K, 1, 1, C), or (B, K, T, 1, C) where x_mask picks t or t0 per frame.

    table: (K, C) learned per-block offsets; t, t0: (B, K, C); x_mask: (B, T) bool.
    """
    mod = (table[None] + t)[:, :, None, None]  # (B, K, 1, 1, C)
    if x_mask is None:
        return mod
    mod0 = (table[None] + t0)[:, :, None, None]
    # Selecting the parameters per frame is elementwise-identical to the official "modulate twice, select".
    return torch.where(x_mask[:, None, :, None, None], mod, mod0)  # (B, K, T, 1, C)


def _split6(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(t.shape[0], 6, -1)  # (B, 6C) -> (B, 6, C)


class STDiT3Block(nn.Module):
    """One spatial or temporal block: adaLN-modulated self-attention, plain cross-attention, modulated MLP."""

    # The elementwise steps between the PAB targets: pure functions of their arguments (no state, no
    # hooks), which pab.compile.apply_compile may replace per instance with compiled versions.
    compile_regions = ("attn_in", "attn_in_after", "attn_out", "mlp_in", "mlp_out")
    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(self, config: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        C = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(C, config.num_heads, config.qk_norm, rope=rope if temporal else None)
        self.cross_attn = CrossAttention(C, config.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(C, int(C * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def forward(self, x, y, mask, t_mod, t0_mod=None, x_mask=None, handoff: Handoff | None = None):
        """x: (B, T, S, C); y: (B, L, C); mask: (B, L) bool | None; t_mod/t0_mod: (B, 6C); x_mask: (B, T) bool;
        handoff: the model's, to take this block's attention input from the block before and give the next its own
        (pab.models.handoff)."""
        B, T, S, C = x.shape
        given = handoff.take(self, x) if handoff is not None else None
        # (B, 6, T|1, 1, C): shift/scale/gate of the attention, then of the MLP, broadcasting over S
        t6, t06 = _split6(t_mod), _split6(t0_mod)
        mod = modulation(self.scale_shift_table, t6, t06, x_mask) if given is None else given.mod
        # self-attention; the attention module sees sequence-major tokens (the PAB/DSP seam). A broadcast
        # attention does not read its input, so its norm is not computed.
        a_in = None if output_reused(self.attn) else given.attn_input if given is not None else self.attn_in(x, mod)
        x = self.attn_out(x, self.attn(a_in), mod,
                          fp8=None if output_reused(self.cross_attn) else fp8_input(self.cross_attn.q_linear))
        # cross-attention (no norm, no gate) and the MLP, on (B, T·S, C); a broadcast MLP's norm is skipped too
        c = self.cross_attn(x.view(B, T * S, C), y, mask)
        if output_reused(self.mlp):
            x, m = x + c.view(x.shape), self.mlp(None)
        else:
            x, x_m = self.mlp_in(x, c, mod)
            m = self.mlp(x_m)
        after = handoff.after(self) if handoff is not None else None
        if after is None or output_reused(after.attn):
            return self.mlp_out(x, m, mod)
        # The MLP's gated residual and the next block's norm in one pass; the next block takes its input from it.
        after_mod = modulation(after.scale_shift_table, t6, t06, x_mask)
        x, after_in = after.attn_in_after(x, mod[:, 5], m, after_mod)
        handoff.put(after, x, after_in, after_mod)
        return x

    def modulated_input(self, x, y, mask, t_mod, t0_mod=None, x_mask=None, handoff=None) -> torch.Tensor:
        """norm1(x) shifted and scaled by this block's timestep modulation, (B, T, S, C): what changes between
        steps as both the latents and the timestep do (step reuse's indicator). Same arguments as forward."""
        mod = modulation(self.scale_shift_table, _split6(t_mod), _split6(t0_mod), x_mask)
        return torch.addcmul(mod[:, 0], self.norm1(x), 1 + mod[:, 1])

    # Each region has a one-kernel path (pab.kernels.norms: CUDA, half precision) and a PyTorch path.

    def _norms(self, x: torch.Tensor) -> bool:
        return self.kernels.norms and norms.available(x)

    def attn_in(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """norm1 + modulate -> (B·T, S, C) spatial or (B·S, T, C) temporal attention input."""
        B, T, S, C = x.shape
        if self._norms(x):  # written frame-major for temporal attention in the same pass (and in e4m3 if asked)
            out = norms.ln_modulate(x, mod[:, 0], mod[:, 1], self.norm1.eps, frame_major=self.temporal,
                                    fp8=fp8_input(self.attn.qkv, self.attn))  # fmt: skip
            return out.view(B * S, T, C) if self.temporal else out.view(B * T, S, C)
        x_n = self.norm1(x)
        if not self.temporal:
            return torch.addcmul(mod[:, 0], x_n, 1 + mod[:, 1]).view(B * T, S, C)
        if torch.compiler.is_compiling() or not no_grad_needed(x_n):
            # The compiler fuses the transpose into the same kernel itself; autograd cannot record an out= op.
            return (x_n * (1 + mod[:, 1]) + mod[:, 0]).transpose(1, 2).reshape(B * S, T, C)
        # Write straight into the (B, S, T, C) layout: one pass instead of modulate + transpose copy.
        out = x.new_empty(B, S, T, C)
        torch.addcmul(mod[:, 0], x_n, 1 + mod[:, 1], out=out.transpose(1, 2))
        return out.view(B * S, T, C)

    def attn_in_after(
        self, x: torch.Tensor, gate: torch.Tensor, m: torch.Tensor, mod: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block before this one's MLP residual, x + gate * m, then this block's `attn_in` of that sum: (sum,
        attention input), in one pass on the kernel path."""
        B, T, S, C = x.shape
        if self._norms(x):
            x, out = norms.gated_ln_modulate(x, gate, m, mod[:, 0], mod[:, 1], self.norm1.eps,
                                             frame_major=self.temporal, fp8=fp8_input(self.attn.qkv, self.attn))
            return x, out.view(B * S, T, C) if self.temporal else out.view(B * T, S, C)
        x = torch.addcmul(x, gate, m.view(x.shape))
        return x, self.attn_in(x, mod)

    def attn_out(self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor, fp8: str | None = None) -> torch.Tensor:
        """x + gate * attention output, read back from its sequence-major layout in the same pass; with `fp8` (the
        cross-attention's q runs in fp8 next) the sum's e4m3 rows too."""
        B, T, S, C = x.shape
        if self._norms(x):
            return norms.gated_residual(x, mod[:, 2], a, frame_major=self.temporal, fp8="also" if fp8 else None)
        a = a.view(B, S, T, C).transpose(1, 2) if self.temporal else a.view(B, T, S, C)
        return torch.addcmul(x, mod[:, 2], a)

    def mlp_in(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention residual, then norm2 + modulate: (x, MLP input (B, T·S, C))."""
        B, T, S, C = x.shape
        if self._norms(x):
            x, out = norms.add_ln_modulate(x, c.view(B, T, S, C), mod[:, 3], mod[:, 4], self.norm2.eps,
                                           fp8=fp8_input(self.mlp))  # fmt: skip
            return x, out.view(B, T * S, C)
        x = x + c.view(B, T, S, C)
        return x, torch.addcmul(mod[:, 3], self.norm2(x), 1 + mod[:, 4]).view(B, T * S, C)

    def mlp_out(self, x: torch.Tensor, m: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        if self._norms(x):
            return norms.gated_residual(x, mod[:, 5], m)
        return torch.addcmul(x, mod[:, 5], m.view(x.shape))


class FinalLayer(nn.Module):
    """PixArt T2I final layer: LayerNorm, shift/scale from t (t0 on x_mask=False frames), Linear to patches."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, t0=None, x_mask=None):
        """x: (B, T, S, C); t, t0: (B, C) -> (B, T, S, num_patch * out_channels)."""
        # One (B, C) vector offsets both rows of the table (unlike the blocks' 6C split).
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, :, None, None].unbind(1)  # (B, 1, 1, C)
        x = self.norm_final(x) * (1 + scale) + shift
        if x_mask is not None:
            # The official layer normalises the *already modulated* x again for the t0 frames; the released
            # model was trained that way, so we keep it.
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None])[:, :, None, None].unbind(1)
            x = torch.where(x_mask[:, :, None, None], x, self.norm_final(x) * (1 + scale0) + shift0)
        return self.linear(x)


class STDiT3(nn.Module):
    """Open-Sora 1.2 spatial-temporal DiT: interleaved spatial/temporal blocks, adaLN-single, T5 cross-attention."""

    kernels: KernelOptions = DEFAULT_KERNELS  # what pab.kernels.set_kernel_options last gave its modules

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.patch_size = config.patch_size

        # Registration order = official state-dict order (checked against the manifest in tests).
        self.rope = RotaryEmbedding(C // config.num_heads)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C, config.model_max_length)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(config, temporal=False) for _ in range(config.depth)])
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(config, temporal=True, rope=self.rope) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(C, math.prod(config.patch_size), self.out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # spatial tables by size; derived, not state
        self.initialize_weights()

        if config.only_train_temporal:
            self.requires_grad_(False)
            self.temporal_blocks.requires_grad_(True)
        if config.freeze_y_embedder:
            self.y_embedder.requires_grad_(False)

    def initialize_weights(self):
        """The official init (used only without a checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # fps starts as a no-op addition to the timestep embedding
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[0].bias)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        # Temporal blocks start as identity (Open-Sora trained them on top of a spatial-only model).
        # Note: a freshly built model therefore has inert temporal blocks; load weights for real tests.
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def block_order(self) -> list[STDiT3Block]:
        """The blocks in forward order: s0, t0, s1, t1, ..."""
        return [b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair]

    def broadcast_targets(self) -> dict[str, list[nn.Module]]:
        """Modules whose outputs PAB may reuse, by kind: "spatial", "temporal", "cross", "mlp"."""
        blocks = self.block_order()
        return {
            "spatial": [b.attn for b in self.spatial_blocks],
            "temporal": [b.attn for b in self.temporal_blocks],
            "cross": [b.cross_attn for b in blocks],
            "mlp": [b.mlp for b in blocks],
        }

    def step_cache_targets(self) -> dict[str, Any]:
        """The block stack in forward order (all keep x as (B, T, S, C)) and the module that reads its output."""
        return {"blocks": self.block_order(), "head": self.final_layer}

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        """
        x: (B, in_channels, T, H, W) latents; timestep: (B,) in [0, 1000]; y: (B, 1, L, caption_channels);
        mask: (B, L) text keep-mask; x_mask: (B, T) bool, False = conditioning frame (modulated with t=0);
        fps: (B,) or scalar; height, width: pixel size, only element [0] used and read on the host (pass
            numbers or CPU tensors: reading a GPU tensor is a host sync).
        Returns (B, out_channels, T, H, W) float32.
        """
        if fps is None or height is None or width is None:
            raise ValueError("STDiT3 needs fps, height and width (pixels); the Open-Sora pipeline passes fps=24")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        dtype = self.x_embedder.proj.weight.dtype
        B, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)  # patch grid, padded up
        S = H * W
        # Cast inputs to the weight dtype first (timestep too, as the official model does: bf16 rounds it).
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # === timestep (+ fps) conditioning ===
        fps = torch.as_tensor(fps, device=x.device).reshape(-1)
        fps = fps.repeat(B // fps.shape[0]) if fps.shape[0] != B else fps
        fps_emb = self.fps_embedder(fps)  # (B, C)
        t = self.t_embedder(timestep.reshape(-1).expand(B)) + fps_emb  # (B, C)
        t_mod = self.t_block(t)  # (B, 6C), shared by all blocks
        t0 = t0_mod = None
        if x_mask is not None:
            if tuple(x_mask.shape) != (B, T):
                raise ValueError(f"x_mask must be (B, T_patches) = {(B, T)}, got {tuple(x_mask.shape)}")
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep.reshape(-1).expand(B))) + fps_emb
            t0_mod = self.t_block(t0)

        # === text ===
        y, mask = self.encode_text(y, mask, B)  # (B, L, C), (B, L) bool | None

        # === patches + spatial position table (no temporal table: time gets RoPE) ===
        resolution_sq = (_first(height) * _first(width)) ** 0.5
        pos = self.spatial_pos(H, W, resolution_sq / self.config.input_sq_size, x.device, dtype)  # (1, S, C)
        x = self.x_embedder(x).view(B, T, S, -1) + pos[:, None]  # (B, T, S, C), contiguous

        # === blocks: s0, t0, s1, t1, ...; each ends with the next one's first norm (pab.models.handoff) ===
        blocks = self.block_order()
        handoff = Handoff(blocks)
        for block in blocks:
            x = block(x, y, mask, t_mod, t0_mod, x_mask, handoff=handoff)

        x = self.final_layer(x, t, t0, x_mask)  # (B, T, S, pt·ph·pw·out)
        return self.unpatchify(x, (T, H, W), (Tx, Hx, Wx)).float()

    def spatial_pos(self, H: int, W: int, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (1, H·W, C) spatial sin/cos table, cached per size: computed once, not once per forward."""
        key = (H, W, scale, torch.device(device), dtype)
        if key not in self._pos_cache:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            pos = spatial_pos_embed(self.config.hidden_size, H, W, scale, round((H * W) ** 0.5), device)
            self._pos_cache[key] = pos.to(dtype)
        return self._pos_cache[key]

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None, B: int):
        """(B, 1, L, caption_channels) T5 features -> (B, L', C) and a (B, L') bool keep-mask or None.

        Text columns after the last token any sample keeps are dropped (masked keys add nothing to the
        softmax), and a mask that then keeps everything becomes None, so the cross-attention runs flash
        attention over the real prompt length (e.g. 32 of T5's 300) instead of a masked kernel over all 300.
        """
        if y.ndim != 4 or y.shape[0] != B or y.shape[1] != 1:
            raise ValueError(f"y must be (B={B}, 1, L, {self.config.caption_channels}), got {tuple(y.shape)}")
        if mask is None:
            return self.y_embedder(y).squeeze(1), None  # (B, L, C)
        L = y.shape[2]
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != B:  # the official model tiles a mask given for one CFG half
            mask = mask.repeat(B // mask.shape[0], 1)
        if mask.shape != (B, L):
            raise ValueError(f"mask must be (B, L) = {(B, L)}, got {tuple(mask.shape)}")
        mask = mask.to(device=y.device) != 0
        # One host sync for three facts: every row keeps a token; keep = 1 + last kept column of any row;
        # every row keeps all of the first `keep` columns (then no mask is needed at all).
        keep = (mask.any(dim=0) * torch.arange(1, L + 1, device=mask.device)).max()
        rows_ok, keep, dense = torch.stack([mask.any(dim=1).all(), keep, (mask.sum(dim=1) == keep).all()]).tolist()
        if not rows_ok:
            raise ValueError("every sample's text mask must keep at least one token (T5 always emits EOS)")
        y = self.y_embedder(y[:, :, :keep]).squeeze(1)  # (B, keep, C)
        return y, None if dense else mask[:, :keep]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        """(B, T, S, pt·ph·pw·out) patch tokens -> (B, out, T, H, W), cropping the patch padding."""
        (T, H, W), (Tx, Hx, Wx) = grid, size
        pt, ph, pw = self.patch_size
        B = x.shape[0]
        x = x.reshape(B, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H * ph, W * pw)
        return x[:, :, :Tx, :Hx, :Wx]


def _first(v) -> float:
    """Element [0] of a tensor/sequence, or the number itself, as a float (height/width arguments)."""
    if isinstance(v, torch.Tensor):
        return float(v.reshape(-1)[0].item())
    if isinstance(v, (list, tuple)):
        return float(v[0])
    return float(v)


def build_stdit3(size: str = "full", **overrides) -> STDiT3:
    """STDiT3 from the size registry, e.g. `build_stdit3("tiny")` or `build_stdit3("full", qk_norm=False)`."""
    if size not in SIZES:
        raise ValueError(f"unknown STDiT3 size {size!r}; choose one of {sorted(SIZES)}")
    return STDiT3(STDiT3Config(**{**SIZES[size], **overrides}))
