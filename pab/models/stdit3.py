"""Open-Sora 1.2 STDiT3, all of it in this single file, as a plain single-device nn.Module.

State-dict names, shapes and order are the official ones (hpcaitech/Open-Sora v1.2.0,
`opensora/models/stdit/stdit3.py` + `opensora/models/layers/blocks.py`), so the released
`hpcai-tech/OpenSora-STDiT-v3` checkpoint loads strictly. Numerics match the official float32 forward
(tests/fixtures/official/stdit3). Attention uses `F.scaled_dot_product_attention`; the text mask of the
cross-attention is an SDPA key mask instead of xformers' packed block-diagonal mask (same math).

Seams for PAB and DSP (docs/design.md): spatial attention sees (B·T, S, C), temporal attention sees
(B·S, T, C) and computes its RoPE from that T; see `STDiT3.broadcast_targets`.

Performance (bf16 on CUDA; the float32 CPU path is the fixture path and keeps its exact op order):
* the hidden state is kept contiguous (B, T, S, C); norm + modulate and gate + residual are one
  elementwise pass each (`torch.addcmul`), and the temporal block writes its (B·S, T, C) input in that pass;
* RoPE tables are cached per (T, device, dtype); q/k RMSNorm is `F.rms_norm` (one fused kernel on CUDA);
* the text is cut to its last kept token and an all-kept mask becomes None, so cross-attention runs
  flash attention on ~tens of keys instead of a masked kernel on 300;
* the MLP's bias + tanh-GELU run in the fc1 GEMM epilogue on CUDA (`MLP_FUSED_GELU`);
* the temporal attention core (3180 sequences of 15 tokens at 480p) runs as selected by
  `TEMPORAL_ATTENTION` (see `temporal_attention_impl`): on CUDA by default one Triton kernel that reads
  qkv, applies RMSNorm + RoPE, attends and writes the (N, T, C) input of `proj`;
* `STDiT3Block.compile_regions` names the elementwise steps between the PAB targets that
  `pab.compile.apply_compile` may compile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # only for the CUDA temporal-attention kernel; everything else runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None


# How the temporal attention core is computed (the module is still called once per block, on (B·S, T, C)):
#   "auto"   - "triton" on CUDA when Triton imports and T <= 32, else "sdpa"
#   "triton" - one fused kernel per forward: RMSNorm + RoPE + softmax(qk^T)v, many (sequence, head) pairs per SM
#   "bmm"    - baddbmm / fp32 softmax / bmm: cuBLAS batched GEMMs instead of one flash CTA per tiny sequence
#   "sdpa"   - F.scaled_dot_product_attention (flash: one CTA of 128 query rows per 15-token sequence)
#   "triton_heads" - opt-in variant of "triton" (not yet measured on a GPU; see `_temporal_attention_heads_kernel`):
#              one warp per (sequence, head), several heads of one sequence per program, no 72 -> 128 padding,
#              no register spills; "auto" never picks it until a GPU run shows it faster
# bench/profile.py times them all at the real shapes.
TEMPORAL_ATTENTION = os.environ.get("PAB_TEMPORAL_ATTENTION", "auto")  # the env var picks one for a run
TEMPORAL_ATTENTION_IMPLS = ("auto", "triton", "triton_heads", "bmm", "sdpa")
# Fold fc1's bias + tanh-GELU into the GEMM epilogue on CUDA (torch._addmm_activation -> cuBLASLt GELU_BIAS).
MLP_FUSED_GELU = True


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

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if MLP_FUSED_GELU and x.is_cuda:
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
        N, L, C = x.shape
        qkv = self.qkv(x)  # (N, L, 3C)
        impl = temporal_attention_impl(qkv) if self.rope is not None else "sdpa"
        if impl in ("triton", "triton_heads"):
            out = _temporal_attention_triton(self, qkv, impl)  # norm + RoPE + attention in one kernel, (N, L, C)
            if out is not None:
                return self.proj(out)
            impl = "bmm"  # the kernel could not be built here (warned once)
        q, k, v = qkv.view(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each (N, heads, L, head_dim)
        if self.rope is not None:  # after the norm, as the released model was trained
            q, k = self.rope(q), self.rope(k)
        if impl == "bmm":
            return self.proj(_bmm_attention(q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim); flash returns it (N, L, heads, hd)
        return self.proj(x.transpose(1, 2).reshape(N, L, C))


def temporal_attention_impl(x: torch.Tensor) -> str:
    """The implementation `TEMPORAL_ATTENTION` selects for the temporal (RoPE) attention on (N, L, 3C) `x`."""
    impl = TEMPORAL_ATTENTION
    if impl not in TEMPORAL_ATTENTION_IMPLS:
        raise ValueError(f"TEMPORAL_ATTENTION={impl!r}; choose one of {TEMPORAL_ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    # (the kernel indexes with 32-bit offsets: 480p qkv has 1.6e8 elements, 720p 4 s about 7e8)
    fits = x.shape[1] <= _TRITON_MAX_L and x.numel() < 2**31
    # Half precision only: its dots run on tensor cores (TF32 for float32 inputs would miss the 1e-5
    # fidelity of float32 runs, measured on an H100).
    half = x.dtype in (torch.bfloat16, torch.float16)
    if x.is_cuda and triton is not None and _TRITON_ERROR is None and fits and half:
        return "triton"
    return "sdpa"


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


# ------------------------------------------------------------------ fused temporal attention (Triton, CUDA)

_TRITON_MAX_L = 32  # one (BLOCK_L x BLOCK_D) tile per sequence; longer sequences suit flash attention anyway
_TRITON_ERROR: Exception | None = None  # set when "auto" found that the kernel cannot be built here

if triton is not None:

    @triton.jit
    def _temporal_attention_kernel(
        qkv_ptr, out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
        L, H, C, stride_qkv_n, stride_qkv_l, stride_out_n, stride_out_l, scale, eps,
        D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program per (sequence n, head h): q, k, v rows of qkv (N, L, 3, H, D) -> out (N, L, H, D).

        RoPE needs each channel's pair partner (d ^ 1): it is loaded a second time (from cache) rather than
        shuffled in registers. Norm and RoPE run in float32; q, k, p are rounded to the input dtype for
        the tensor-core dots, which accumulate in float32 (as flash attention does).
        """
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        rows = tl.arange(0, BLOCK_L)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < L
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        partner = cols ^ 1
        base = qkv_ptr + n * stride_qkv_n + rows[:, None] * stride_qkv_l + h * D
        tab = rows[:, None] * D + cols[None, :]
        cos = tl.load(cos_ptr + tab, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + tab, mask=mask, other=0.0)

        q = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q_p = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        k = tl.load(base + C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        k_p = tl.load(base + C + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:  # RMSNorm over the head dim; the partner shares the row's rms, not the weight
            q_r = 1.0 / tl.sqrt(tl.sum(q * q, axis=1) / D + eps)
            k_r = 1.0 / tl.sqrt(tl.sum(k * k, axis=1) / D + eps)
            qw = tl.load(qw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            qw_p = tl.load(qw_ptr + partner, mask=col_ok, other=0.0).to(tl.float32)
            kw = tl.load(kw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            kw_p = tl.load(kw_ptr + partner, mask=col_ok, other=0.0).to(tl.float32)
            q, q_p = q * q_r[:, None] * qw[None, :], q_p * q_r[:, None] * qw_p[None, :]
            k, k_p = k * k_r[:, None] * kw[None, :], k_p * k_r[:, None] * kw_p[None, :]
        dt = qkv_ptr.dtype.element_ty
        q = (q * cos + q_p * sin).to(dt)
        k = (k * cos + k_p * sin).to(dt)
        v = tl.load(base + 2 * C + cols[None, :], mask=mask, other=0.0)

        if IEEE:  # float32 models: no tf32 rounding
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(row_ok[None, :], s * scale, float("-inf"))  # padded key columns get no weight
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        if IEEE:
            o = tl.dot(p.to(dt), v, input_precision="ieee")
        else:
            o = tl.dot(p.to(dt), v)
        out = out_ptr + n * stride_out_n + rows[:, None] * stride_out_l + h * D + cols[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op("pab::stdit3_temporal_attention", mutates_args=())
    def _temporal_attention_op(
        qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float,
    ) -> torch.Tensor:  # fmt: skip
        """(N, L, 3C) qkv -> (N, L, C) attention output; an opaque op to torch.compile (no graph break)."""
        N, L, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        out = qkv.new_empty(N, L, C)
        has_norm = q_weight is not None
        _temporal_attention_kernel[(N * num_heads,)](
            qkv, out, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin,
            L, num_heads, C, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), D**-0.5, eps,
            D=D, BLOCK_L=max(16, triton.next_power_of_2(L)), BLOCK_D=max(16, triton.next_power_of_2(D)),
            HAS_NORM=has_norm, IEEE=qkv.dtype == torch.float32, num_warps=4,
        )  # fmt: skip
        return out

    @_temporal_attention_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, num_heads, eps):
        N, L, C3 = qkv.shape
        return qkv.new_empty(N, L, C3 // 3)


def _temporal_attention_triton(attn: SelfAttention, qkv: torch.Tensor, impl: str = "triton") -> torch.Tensor | None:
    """Run a fused kernel ("triton" or "triton_heads"); under "auto", None (and one warning) if it cannot be
    built on this machine."""
    global _TRITON_ERROR
    if triton is None:
        raise RuntimeError(f"TEMPORAL_ATTENTION={impl!r} needs the triton package")
    if qkv.shape[1] > _TRITON_MAX_L or qkv.numel() >= 2**31:
        raise ValueError(f"the Triton temporal attention takes at most {_TRITON_MAX_L} frames and 2^31 qkv elements, "
                         f"got {tuple(qkv.shape)}")
    has_norm = isinstance(attn.q_norm, RMSNorm)
    cos, sin = attn.rope.tables(qkv.shape[1], qkv.device, torch.float32)
    args = (qkv, attn.q_norm.weight if has_norm else None, attn.k_norm.weight if has_norm else None, cos, sin,
            attn.num_heads, attn.q_norm.eps if has_norm else 0.0)  # fmt: skip
    if impl == "triton_heads":  # opt-in only ("auto" never gets here with it): errors surface
        return _temporal_attention_heads_op(*args, *triton_heads_config(qkv.shape[1], attn.num_heads))
    if TEMPORAL_ATTENTION != "auto" or torch.compiler.is_compiling():
        return _temporal_attention_op(*args)
    try:
        return _temporal_attention_op(*args)
    except Exception as e:  # e.g. no C compiler for Triton's launcher: keep the model usable
        _TRITON_ERROR = e
        warnings.warn(f"Triton temporal attention unavailable ({type(e).__name__}: {e}); using 'bmm'", stacklevel=2)
        return None


# ------------------------------------------------- fused temporal attention, "triton_heads" variant (Triton)
#
# Same math and rounding points as `_temporal_attention_kernel`. Written without a GPU, so every number
# below is static: both kernels compiled for sm_90 by Triton 3.5.1 (the GPU machine has 3.6.0) and read back
# with `cuobjdump --dump-resource-usage` / `-sass` (bf16, H = 16, D = 72, with the q/k norm).
#
# What holds the "triton" kernel back: one program of 4 warps per (sequence, head) on 16 x 128 tiles (L
# padded to 16, D = 72 to 128). At L = 15 it takes 255 registers and still spills ~550 bytes per thread, so
# 2 programs (8 warps) fit on an SM; ~10 us of serial load -> norm -> dot -> softmax -> dot -> store per
# program x 50,880 programs / (132 SMs x 2) is about the measured 2.1 ms. At L = 30 ptxas gives it 32
# registers and a 4,720-byte stack: 3,200 of its 4,100 SASS instructions are local-memory spills (~16 KB per
# thread per program, ~240 GB per call at 720p), which fits 720p's forward running ~2x slower than its
# FLOPs. And its 4 warps repeat one another: a 16-row tile is a single mma row block, so all 4 compute the
# same dots and softmax.
#
# Choices, each against the alternatives weighed:
# * A warp per (sequence, head), not 4. A program takes HB heads of one sequence as the batch dim of 3D
#   tl.dot (Triton gives each batch entry its own warps); with num_warps = HB no warp repeats another. The
#   HB heads of a token are adjacent in qkv (HB x 144 bytes), so loads coalesce across heads too, and the
#   cos/sin/weight loads are shared by the program's heads.
#   - One program per sequence looping over its 16 heads: each iteration would serialise load -> compute ->
#     store (Triton's pipeliner prefetches loads that feed dots through shared memory; ours go through the
#     norm in registers first), and 3,180 programs at 480p is ~1.5 waves: a poor tail. The batch dim has the
#     same contiguity and reuse with all of the program's heads in flight at once.
#   - One program per block of sequences for one head, packed into 64/128-row tiles: needs a block-diagonal
#     mask and does 4-8x the mma, exp and reduction work of the useful 15 x 15 blocks.
# * D = 72 as 64 + 8, not 128. The 8-channel tail is zero-interleaved to 16 for the score dot (tl.dot needs
#   K >= 16; q and k get the same zeros) and used as is (N = 8) for p @ v: dots over 80 channels, and float32
#   tiles of 72 channels instead of 128. q.k as elementwise products and sums instead of tl.dot: a head's
#   (L, L, D) products are 18k values at L = 15 (74k at L = 30), far more than a warp's registers, and a
#   loop over channel chunks would reload q and k.
# * RoPE without loading each channel twice (the "triton" kernel loads every q and k channel again for its
#   pair partner, as another 16 x 128 float32 tile): the 64 channels are reshaped to (32, 2) and split into
#   even and odd halves in registers (a thread holds both of a pair). Rotated q.k = even-half dot + odd-half
#   dot, so the halves are never rejoined: e' = e cos - o sin, o' = o cos + e sin, the same products and sums
#   as torch's x * cos + swap(x) * sin.
#   cos and sin are read at each pair's even / odd entry of the (L, D) tables RotaryEmbedding caches.
# * Fewer live float32 tiles: q and k as halves, one cos and one sin half-table, v kept in the input dtype.
#   Softmax: exp2 with the scale folded in, one reciprocal per row.
#
# Static result ("instr/head": SASS instructions issued per (sequence, head), straight-line code; "heads/SM":
# heads resident per SM, limited by registers, or shared memory for "triton" at L = 30):
#   kernel          L   heads/prog  warps  registers  spills/thread       instr/head  heads/SM
#   "triton"        15      1         4       255     ~550 B                 ~8,900        2
#   "triton"        30      1         4        32     4.7 KB stack, ~16 KB  ~16,400        8
#   "triton_heads"  15      4         4       130     none                   ~1,320       12
#   "triton_heads"  30      2         4       168     none                   ~3,420        6
# At L = 30 one warp per head would need > 255 registers (its q and k alone are 144 float32 per thread), so
# 2 heads get 4 warps: the norm and RoPE split over all 4, the dots and softmax are repeated by a head's 2
# warps. Other (heads, warps) pairs compiled: 1 head / 2 warps (2D dot, 217 registers, 4 heads/SM, ~3,230),
# 1 / 4 (128, 4 heads/SM, ~4,220); at L = 15, 2 / 2 (158, 12 heads/SM, ~1,380), 1 / 1 (200, 10, ~1,490),
# 2 / 4 (79, 12, ~1,860). bench/profile.py times a few of them; `TRITON_HEADS_CONFIG` holds the choice.
#
# Predicted time per call on an H100 (bf16 qkv (N, L, 3C), before anyone measured it):
#   480p, N = 3,180, L = 15: 440 MB moved = 0.15 ms at ~3 TB/s; 50,880 heads x ~1,320 instructions = 0.07 ms
#   of issue (132 SMs x 4 schedulers x 1.75 GHz); 12 heads per SM keep up to ~80 KB of loads in flight
#   (~23 KB covers DRAM latency at 3 TB/s). Predicted ~0.25 ms (0.2-0.35), from 2.1 ms.
#   720p, N = 7,200, L = 30: 2.0 GB moved = 0.66 ms; 115,200 heads x ~3,420 = 0.43 ms of issue; 6 heads per SM
#   (~80 KB in flight). Predicted ~0.9 ms (0.8-1.1). The "triton" kernel there is spill-bound: ~30-80 ms by
#   its ~240 GB of local-memory traffic; 720p's forward (3.7 s, about twice its FLOPs' share) has ~1.8 s
#   unexplained, ~65 ms for each of its 28 calls.

# BLOCK_L -> (heads per program, num_warps); BLOCK_L = max(16, next power of two >= L).
TRITON_HEADS_CONFIG: dict[int, tuple[int, int]] = {16: (4, 4), 32: (2, 4)}


def _heads_split(head_dim: int) -> tuple[int, int]:
    """head_dim = D0 + D1 for the "triton_heads" kernel: D0 = 0 or a power of two >= 32 (pair halves of >= 16
    for the dots), D1 = 0, 8 or a power of two >= 16 (the tail). 72 = 64 + 8, 16 = 0 + 16, 128 = 128 + 0."""
    d0 = 1 << (head_dim.bit_length() - 1) if head_dim >= 32 else 0
    d1 = head_dim - d0
    if not (d1 == 0 or d1 == 8 or (d1 >= 16 and d1 & (d1 - 1) == 0)):
        raise ValueError(f"TEMPORAL_ATTENTION='triton_heads' needs head_dim = 8, 16, 32, ... or a power of two "
                         f">= 32 plus 8 or a power of two >= 16 (e.g. 72 = 64 + 8); got {head_dim}")
    return d0, d1


def triton_heads_config(L: int, num_heads: int) -> tuple[int, int]:
    """(heads per program, num_warps) for `_temporal_attention_heads_op` at sequence length L."""
    block_l = max(16, 1 << (L - 1).bit_length())
    hb, warps = TRITON_HEADS_CONFIG.get(block_l, (1, 4))
    while num_heads % hb:  # a program's heads must not run past the last head
        hb //= 2
    return hb, warps


if triton is not None:

    @triton.jit
    def _pair_halves(x):
        """(even, odd) channels of the last dim of a 3D tile: (x0, x2, ...), (x1, x3, ...), in registers."""
        A: tl.constexpr = x.shape[0]
        B: tl.constexpr = x.shape[1]
        K: tl.constexpr = x.shape[2]
        return tl.split(tl.reshape(x, (A, B, K // 2, 2)))

    @triton.jit
    def _zero_interleave(x):
        """[A, B, K] -> [A, B, 2K] with a zero after each element (pads a dot's K; both operands get it)."""
        A: tl.constexpr = x.shape[0]
        B: tl.constexpr = x.shape[1]
        K: tl.constexpr = x.shape[2]
        return tl.reshape(tl.join(x, tl.zeros_like(x)), (A, B, 2 * K))

    @triton.jit
    def _batched_dot(a, b, acc, IEEE: tl.constexpr):
        """a @ b + acc over [B, M, K] x [B, K, N]. Triton gives 3D dots one warp per batch entry; with B = 1
        it is a 2D dot, so that several warps split the M rows of one head instead of repeating them."""
        B: tl.constexpr = a.shape[0]
        M: tl.constexpr = a.shape[1]
        K: tl.constexpr = a.shape[2]
        N: tl.constexpr = b.shape[2]
        if B == 1:
            a2 = tl.reshape(a, (M, K))
            b2 = tl.reshape(b, (K, N))
            c2 = tl.reshape(acc, (M, N))
            if IEEE:  # float32 models: no tf32 rounding
                c2 = tl.dot(a2, b2, c2, input_precision="ieee")
            else:
                c2 = tl.dot(a2, b2, c2)
            return tl.reshape(c2, (1, M, N))
        else:
            if IEEE:
                return tl.dot(a, b, acc, input_precision="ieee")
            else:
                return tl.dot(a, b, acc)

    @triton.jit
    def _temporal_attention_heads_kernel(
        qkv_ptr, out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
        L, stride_qkv_n, stride_qkv_l, stride_out_n, stride_out_l, scale, eps,
        H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BLOCK_L: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, HAS_NORM: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program per (sequence n, HB consecutive heads): qkv (N, L, 3, H, D) -> out (N, L, H, D).

        Tiles are [HB, BLOCK_L, channels]. Channels [0, D0) go as even/odd pair halves, [D0, D) (D1 of them)
        as one interleaved tile. RMSNorm and RoPE in float32; q, k, p rounded to the input dtype for the
        dots, which accumulate in float32; padded keys get -inf, padded rows are not stored.
        """
        pid = tl.program_id(0)
        n = pid // (H // HB)
        h0 = (pid % (H // HB)) * HB
        C: tl.constexpr = H * D
        LOG2E: tl.constexpr = 1.4426950408889634
        dt = qkv_ptr.dtype.element_ty
        hh = tl.arange(0, HB)[:, None, None]
        rows = tl.arange(0, BLOCK_L)
        ll = rows[None, :, None]
        row_ok = ll < L
        src = qkv_ptr + n * stride_qkv_n + ll * stride_qkv_l + (h0 + hh) * D
        dst = out_ptr + n * stride_out_n + ll * stride_out_l + (h0 + hh) * D

        # loads first (all independent): q, k as float32 pair halves, v in its dtype, half-tables of cos/sin
        if D0 > 0:
            d0 = tl.arange(0, D0)[None, None, :]
            j0 = tl.arange(0, D0 // 2)[None, None, :]
            qe, qo = _pair_halves(tl.load(src + d0, mask=row_ok, other=0.0).to(tl.float32))
            ke, ko = _pair_halves(tl.load(src + C + d0, mask=row_ok, other=0.0).to(tl.float32))
            v0 = tl.load(src + 2 * C + d0, mask=row_ok, other=0.0)
            c0 = tl.load(cos_ptr + ll * D + 2 * j0, mask=row_ok, other=0.0)  # cos, repeated over the pair
            s0 = tl.load(sin_ptr + ll * D + 2 * j0 + 1, mask=row_ok, other=0.0)  # sin is (-s, +s) per pair
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)[None, None, :]
            j1 = D0 // 2 + tl.arange(0, D1 // 2)[None, None, :]
            q1e, q1o = _pair_halves(tl.load(src + d1, mask=row_ok, other=0.0).to(tl.float32))
            k1e, k1o = _pair_halves(tl.load(src + C + d1, mask=row_ok, other=0.0).to(tl.float32))
            v1 = tl.load(src + 2 * C + d1, mask=row_ok, other=0.0)
            c1 = tl.load(cos_ptr + ll * D + 2 * j1, mask=row_ok, other=0.0)
            s1 = tl.load(sin_ptr + ll * D + 2 * j1 + 1, mask=row_ok, other=0.0)

        if HAS_NORM:  # RMSNorm over the head dim: one rms per (head, row), then the weight per channel
            q_ss = tl.zeros((HB, BLOCK_L), tl.float32)
            k_ss = tl.zeros((HB, BLOCK_L), tl.float32)
            if D0 > 0:
                q_ss += tl.sum(qe * qe + qo * qo, axis=2)
                k_ss += tl.sum(ke * ke + ko * ko, axis=2)
            if D1 > 0:
                q_ss += tl.sum(q1e * q1e + q1o * q1o, axis=2)
                k_ss += tl.sum(k1e * k1e + k1o * k1o, axis=2)
            q_r = (1.0 / tl.sqrt(q_ss / D + eps))[:, :, None]
            k_r = (1.0 / tl.sqrt(k_ss / D + eps))[:, :, None]
            if D0 > 0:
                we, wo = _pair_halves(tl.load(qw_ptr + d0).to(tl.float32))
                qe, qo = qe * q_r * we, qo * q_r * wo
                we, wo = _pair_halves(tl.load(kw_ptr + d0).to(tl.float32))
                ke, ko = ke * k_r * we, ko * k_r * wo
            if D1 > 0:
                we, wo = _pair_halves(tl.load(qw_ptr + d1).to(tl.float32))
                q1e, q1o = q1e * q_r * we, q1o * q_r * wo
                we, wo = _pair_halves(tl.load(kw_ptr + d1).to(tl.float32))
                k1e, k1o = k1e * k_r * we, k1o * k_r * wo

        # scores: RoPE'd q.k = even-half dot + odd-half dot (+ the tail's dot)
        s = tl.zeros((HB, BLOCK_L, BLOCK_L), tl.float32)
        if D0 > 0:
            qr = (qe * c0 - qo * s0).to(dt)
            kr = (ke * c0 - ko * s0).to(dt)
            s = _batched_dot(qr, tl.permute(kr, (0, 2, 1)), s, IEEE)
            qr = (qo * c0 + qe * s0).to(dt)
            kr = (ko * c0 + ke * s0).to(dt)
            s = _batched_dot(qr, tl.permute(kr, (0, 2, 1)), s, IEEE)
        if D1 > 0:
            q1 = tl.reshape(tl.join(q1e * c1 - q1o * s1, q1o * c1 + q1e * s1), (HB, BLOCK_L, D1)).to(dt)
            k1 = tl.reshape(tl.join(k1e * c1 - k1o * s1, k1o * c1 + k1e * s1), (HB, BLOCK_L, D1)).to(dt)
            if D1 < 16:  # tl.dot needs K >= 16
                q1 = _zero_interleave(q1)
                k1 = _zero_interleave(k1)
            s = _batched_dot(q1, tl.permute(k1, (0, 2, 1)), s, IEEE)

        # softmax over keys in float32 (exp2 with the scale folded in), p rounded to the input dtype
        s = tl.where(rows[None, None, :] < L, s, float("-inf"))  # padded keys get no weight
        p = tl.exp2((s - tl.max(s, axis=2)[:, :, None]) * (scale * LOG2E))
        p = (p * (1.0 / tl.sum(p, axis=2))[:, :, None]).to(dt)

        if D0 > 0:
            o0 = _batched_dot(p, v0, tl.zeros((HB, BLOCK_L, D0), tl.float32), IEEE)
            tl.store(dst + d0, o0.to(out_ptr.dtype.element_ty), mask=row_ok)
        if D1 > 0:
            o1 = _batched_dot(p, v1, tl.zeros((HB, BLOCK_L, D1), tl.float32), IEEE)
            tl.store(dst + d1, o1.to(out_ptr.dtype.element_ty), mask=row_ok)

    @torch.library.custom_op("pab::stdit3_temporal_attention_heads", mutates_args=())
    def _temporal_attention_heads_op(
        qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float, heads_per_program: int, num_warps: int,
    ) -> torch.Tensor:  # fmt: skip
        """(N, L, 3C) qkv -> (N, L, C), like `_temporal_attention_op`; (heads_per_program, num_warps) from
        `triton_heads_config` unless a benchmark sweeps them."""
        N, L, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        d0, d1 = _heads_split(D)
        if num_heads % heads_per_program or heads_per_program & (heads_per_program - 1):
            raise ValueError(f"heads_per_program={heads_per_program} must be a power of two dividing {num_heads}")
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        if L > _TRITON_MAX_L or (N - 1) * qkv.stride(0) + (L - 1) * qkv.stride(1) + C3 >= 2**31:  # 32-bit offsets
            raise ValueError(f"the Triton temporal attention takes at most {_TRITON_MAX_L} frames and 2^31 qkv "
                             f"elements, got {tuple(qkv.shape)} with strides {qkv.stride()}")
        out = qkv.new_empty(N, L, C)
        has_norm = q_weight is not None
        _temporal_attention_heads_kernel[(N * (num_heads // heads_per_program),)](
            qkv, out, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin,
            L, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), D**-0.5, eps,
            H=num_heads, D=D, HB=heads_per_program, BLOCK_L=max(16, triton.next_power_of_2(L)), D0=d0, D1=d1,
            HAS_NORM=has_norm, IEEE=qkv.dtype == torch.float32, num_warps=num_warps,
        )  # fmt: skip
        return out

    @_temporal_attention_heads_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, num_heads, eps, heads_per_program, num_warps):
        N, L, C3 = qkv.shape
        return qkv.new_empty(N, L, C3 // 3)


class CrossAttention(nn.Module):
    """Video tokens attend to their own sample's text tokens; `mask` (B, L) keeps tokens, no norm, no gate."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) video tokens; y: (B, L, C) projected text; mask: (B, L) bool keep-mask or None."""
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        kv = self.kv_linear(y).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, L, hd)
        # The official model packs the kept tokens and uses a block-diagonal mask; a key mask is the same softmax.
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


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
    compile_regions = ("attn_in", "attn_out", "mlp_in", "mlp_out")

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

    def forward(self, x, y, mask, t_mod, t0_mod=None, x_mask=None):
        """x: (B, T, S, C); y: (B, L, C); mask: (B, L) bool | None; t_mod/t0_mod: (B, 6C); x_mask: (B, T) bool."""
        B, T, S, C = x.shape
        # (B, 6, T|1, 1, C): shift/scale/gate of the attention, then of the MLP, broadcasting over S
        mod = modulation(self.scale_shift_table, _split6(t_mod), _split6(t0_mod), x_mask)
        # self-attention; the attention module sees sequence-major tokens (the PAB/DSP seam)
        x = self.attn_out(x, self.attn(self.attn_in(x, mod)), mod)
        # cross-attention (no norm, no gate) and the MLP, on (B, T·S, C)
        x, x_m = self.mlp_in(x, self.cross_attn(x.view(B, T * S, C), y, mask), mod)
        return self.mlp_out(x, self.mlp(x_m), mod)

    def attn_in(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """norm1 + modulate -> (B·T, S, C) spatial or (B·S, T, C) temporal attention input."""
        B, T, S, C = x.shape
        x_n = self.norm1(x)
        if not self.temporal:
            return torch.addcmul(mod[:, 0], x_n, 1 + mod[:, 1]).view(B * T, S, C)
        if torch.compiler.is_compiling():  # the compiler fuses the transpose into the same kernel itself
            return (x_n * (1 + mod[:, 1]) + mod[:, 0]).transpose(1, 2).reshape(B * S, T, C)
        # Write straight into the (B, S, T, C) layout: one pass instead of modulate + transpose copy.
        out = x.new_empty(B, S, T, C)
        torch.addcmul(mod[:, 0], x_n, 1 + mod[:, 1], out=out.transpose(1, 2))
        return out.view(B * S, T, C)

    def attn_out(self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x + gate * attention output, read back from its sequence-major layout in the same pass."""
        B, T, S, C = x.shape
        a = a.view(B, S, T, C).transpose(1, 2) if self.temporal else a.view(B, T, S, C)
        return torch.addcmul(x, mod[:, 2], a)

    def mlp_in(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention residual, then norm2 + modulate: (x, MLP input (B, T·S, C))."""
        B, T, S, C = x.shape
        x = x + c.view(B, T, S, C)
        return x, torch.addcmul(mod[:, 3], self.norm2(x), 1 + mod[:, 4]).view(B, T * S, C)

    def mlp_out(self, x: torch.Tensor, m: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
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

    def broadcast_targets(self) -> dict[str, list[nn.Module]]:
        """Modules whose outputs PAB may reuse, by kind: "spatial", "temporal", "cross", "mlp"."""
        blocks = [b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair]  # forward order
        return {
            "spatial": [b.attn for b in self.spatial_blocks],
            "temporal": [b.attn for b in self.temporal_blocks],
            "cross": [b.cross_attn for b in blocks],
            "mlp": [b.mlp for b in blocks],
        }

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        """
        x: (B, in_channels, T, H, W) latents; timestep: (B,) in [0, 1000]; y: (B, 1, L, caption_channels);
        mask: (B, L) text keep-mask; x_mask: (B, T) bool, False = conditioning frame (modulated with t=0);
        fps: (B,) or scalar; height, width: pixel size (only element [0] is used).
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

        # === blocks: s0, t0, s1, t1, ... ===
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, mask, t_mod, t0_mod, x_mask)
            x = temporal_block(x, y, mask, t_mod, t0_mod, x_mask)

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
