"""An experiment (issue #20): the fp8 MLP as two Triton GEMMs, GELU in fc1's epilogue and fc2's quantisation
in its prologue. Measured slower than pab.precision's MLP on an H200, so it is not in the library.

pab.precision runs fc1 (`torch._scaled_mm`) -> one pass adding fc1's bias, applying the GELU and quantising
fc2's input (0.33 ms at Open-Sora 480p) -> fc2 (`torch._scaled_mm`). The idea was to drop that pass:

* `fc1_gelu`: fc1 as an fp8 GEMM (TMA loads) whose epilogue scales, adds the bias, applies the GELU, writes
  the hidden activation in bf16 and folds each tile's row maxima into one float32 amax per row (atomic max);
* `fc2_scaled`: fc2 as an fp8 GEMM that quantises its bf16 input as it loads it (x 448 / amax, cast to e4m3
  in registers), the scales and bias in its epilogue.

The e4m3 values are those `quantize_rows(h, gelu="tanh", bias=b1)` makes (same scale per row), so the error is
pab.precision's. `python -m bench.fp8 --fused` times them per tile config (docs/performance.md has the table):
Triton 3.6's fp8 GEMM alone runs ~25% under cuBLAS at these shapes, more than the pass it saves.
"""

from __future__ import annotations

import torch

from pab.kernels.fp8 import _interpreting

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from pab.kernels.fp8 import gelu_tanh
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = TensorDescriptor = gelu_tanh = None

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the best of bench.fp8's sweep on an H200
FC1_CONFIG = (128, 128, 64, 8, 4, 4)
FC2_CONFIG = (128, 256, 128, 8, 8, 3)
CONFIGS = [(128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (128, 128, 64, 8, 4, 4), (128, 256, 128, 8, 8, 3)]


def fc1_gelu(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    config: tuple[int, ...] = FC1_CONFIG, gelu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GELU_tanh((xq * xs) @ (wq * ws^T)^T + bias) -> (M, N) bf16 and its float32 row amax (M, 1).
    `gelu=False`: the scaled GEMM alone (what the epilogue costs), amax left at 0."""
    M, K = xq.shape
    N = wq.shape[0]
    h = torch.empty((M, N), device=xq.device, dtype=torch.bfloat16)
    amax = torch.zeros((M, 1), device=xq.device, dtype=torch.float32)
    bm, bn, bk, gm, warps, stages = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fc1_gelu_tma_kernel[grid](
        TensorDescriptor.from_tensor(xq, [bm, bk]), TensorDescriptor.from_tensor(wq, [bn, bk]), xs, ws,
        bias if bias is not None else ws, h, amax, M, N, K, HAS_BIAS=bias is not None,
        FAST_TANH=not _interpreting(), GELU=gelu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return h, amax


def fc2_scaled(
    h: torch.Tensor, amax: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    config: tuple[int, ...] = FC2_CONFIG,
) -> torch.Tensor:  # fmt: skip
    """(e4m3(h * 448 / amax) * amax / 448) @ (wq * ws^T)^T + bias -> (M, N) bf16."""
    M, K = h.shape
    N = wq.shape[0]
    out = torch.empty((M, N), device=h.device, dtype=torch.bfloat16)
    bm, bn, bk, gm, warps, stages = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fc2_scaled_tma_kernel[grid](
        TensorDescriptor.from_tensor(h, [bm, bk]), TensorDescriptor.from_tensor(wq, [bn, bk]), amax, ws,
        bias if bias is not None else ws, out, M, N, K, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Programs walk GROUP_M row tiles per column tile, so the weight tiles they share stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        return pid_m, pid_n

    @triton.jit
    def _fc1_gelu_tma_kernel(
        a_desc, w_desc, as_ptr, ws_ptr, b_ptr, h_ptr, amax_ptr, M, N, K,
        HAS_BIAS: tl.constexpr, FAST_TANH: tl.constexpr, GELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k])
            w = w_desc.load([pid_n * BLOCK_N, k])
            acc = tl.dot(a, w.T, acc)
        x = acc * tl.load(as_ptr + rows, mask=rows < M, other=0.0)[:, None]
        x = x * tl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        keep = (rows[:, None] < M) & (cols[None, :] < N)
        if GELU:
            g = gelu_tanh(x, FAST_TANH).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], g, mask=keep)
            row_max = tl.max(tl.where(keep, tl.abs(g.to(tl.float32)), 0.0), axis=1)
            tl.atomic_max(amax_ptr + rows, row_max, mask=rows < M)
        else:  # the GEMM alone (what the epilogue costs)
            tl.store(h_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], x.to(h_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _fc2_scaled_tma_kernel(
        h_desc, w_desc, amax_ptr, ws_ptr, b_ptr, o_ptr, M, N, K,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        amax = tl.maximum(tl.load(amax_ptr + rows, mask=rows < M, other=1.0), 1e-12)
        inv = (448.0 / amax)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K):
            h = h_desc.load([pid_m * BLOCK_M, k]).to(tl.float32)
            a = tl.minimum(tl.maximum(h * inv, -448.0), 448.0).to(tl.float8e4nv)
            w = w_desc.load([pid_n * BLOCK_N, k])
            acc = tl.dot(a, w.T, acc)
        x = acc * (amax / 448.0)[:, None] * tl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        keep = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(o_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], x.to(o_ptr.dtype.element_ty), mask=keep)

