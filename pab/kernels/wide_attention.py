"""Attention over heads too wide for a flash kernel (the VAE mid-block's one head of 512 channels): two GEMMs
around a softmax kernel.

SDPA has no flash or cuDNN kernel above head dim 256, so the SDXL decoder's mid-block attention (one head of 512
over every pixel of a latent frame: 6,360 at 480p) takes PyTorch's memory-efficient kernel, about 110 TFLOP/s on
an H100: 39 ms of Open-Sora's 0.54 s decode (`bench.vae --profile`). At this width the scores are cheap next to
the GEMMs, so they can go through memory: cuBLAS writes Q K^T in float32, one Triton pass scales each row and
writes its softmax in the input's precision (the probabilities flash kernels round before P V as well), and a
second GEMM takes P V: 14 ms on that H100 (7 of GEMMs, 7 of softmax). Query rows go in blocks, so the float32
scores stay under `max_bytes`.

`wide_attention(q, k, v)` is `F.scaled_dot_product_attention(q, k, v)` for (B, L, D) inputs without a mask.
"""

from __future__ import annotations

import math

import torch

from pab.kernels import no_grad_needed

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

MAX_BYTES = 512 << 20  # float32 scores held at once (query rows per block follow from it)
MAX_BLOCK = 8192  # key columns a softmax program holds per pass


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `wide_attention` should run these on a GPU: CUDA, half precision, no autograd, (B, L, D) shapes
    that match."""
    return (
        triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype
        == q.dtype and all(no_grad_needed(t) for t in (q, k, v)) and _shapes_match(q, k, v)
    )  # fmt: skip


def _shapes_match(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.ndim == k.ndim == v.ndim == 3 and q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2]
        and k.shape[1] == v.shape[1] and k.shape[1] > 0
    )  # fmt: skip


def wide_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, max_bytes: int = MAX_BYTES
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale) v for q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv); scale defaults to 1/sqrt(D). The
    scores are float32 (float64 for float64 inputs), their softmax float32, the probabilities rounded to the
    inputs' precision.
    ValueError for shapes that do not match."""
    if not _shapes_match(q, k, v):
        raise ValueError(
            f"wide_attention takes q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv) with Lk > 0; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if triton is None:
        raise ImportError("wide_attention needs Triton")
    b, lq, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = q.new_empty((b, lq, v.shape[2]))
    half = q.dtype in (torch.float16, torch.bfloat16)
    score_dtype = torch.float32 if half else torch.promote_types(q.dtype, torch.float32)
    rows = max(1, min(lq, max_bytes // (b * lk * score_dtype.itemsize)))
    kt = k.transpose(1, 2)
    block = min(MAX_BLOCK, triton.next_power_of_2(lk))
    for r0 in range(0, lq, rows):
        qi = q[:, r0:r0 + rows]
        if half and q.is_cuda:
            s = torch.bmm(qi, kt, out_dtype=torch.float32)  # cuBLAS accumulates and writes float32
        else:  # CPU (Triton's interpreter in the tests), float32 inputs: the same sums
            s = torch.bmm(qi.to(score_dtype), kt.to(score_dtype))
        n = s.shape[0] * s.shape[1]
        p = torch.empty(s.shape, device=s.device, dtype=q.dtype)
        _softmax_kernel[(n,)](s, p, lk, scale * 1.4426950408889634, BLOCK=block, num_warps=8 if block >= 4096 else 4)
        torch.bmm(p, v, out=out[:, r0:r0 + rows])
    return out


if triton is not None:

    @triton.jit
    def _softmax_kernel(s_ptr, p_ptr, L, scale_log2e, BLOCK: tl.constexpr):
        """One row of contiguous scores: p = softmax(s * scale), through exp2 with log2(e) folded into the scale;
        two passes over the row (running max and sum, then the write) where it is wider than BLOCK."""
        row = tl.program_id(0).to(tl.int64)
        src = s_ptr + row * L
        dst = p_ptr + row * L
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, L, BLOCK):
            x = tl.load(src + c0 + cols, mask=c0 + cols < L, other=float("-inf")).to(tl.float32) * scale_log2e
            m_new = tl.maximum(m, x)
            ms = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen only padding: sums stay 0
            acc = acc * tl.exp2(m - ms) + tl.exp2(x - ms)
            m = m_new
        mx = tl.max(m, axis=0)  # finite: every row has a key
        total = tl.sum(acc * tl.exp2(m - mx), axis=0)
        inv = 1.0 / total
        for c0 in range(0, L, BLOCK):
            mask = c0 + cols < L
            x = tl.load(src + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale_log2e
            tl.store(dst + c0 + cols, (tl.exp2(x - mx) * inv).to(dst.dtype.element_ty), mask=mask)
