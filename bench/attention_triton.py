"""An experiment (issue #20): a Triton flash-attention forward for Open-Sora 1.2's spatial attention at head dim 72.

    python -m bench.attention_triton --sweep --layout packed --out bench/results/attention-triton.json

SDPA's fastest backend, cuDNN, takes 2.23 ms for 60 sequences x 16 heads x 1,590 tokens at d = 72 on an H200, 313
TFLOP/s counted at d = 72 (flash 221, efficient 94; bench/results/attention-h200.json). The kernel here:

* head_dim D = D0 + D1 with D0 a power of two (72 = 64 + 8; `head_split`): tl.arange takes powers of two, and a
  128-wide tile would spend 44% of the tensor-core work on zeros. Scores are dot(q0, k0^T) + dot(q1, k1^T), the
  8-channel tail loaded into 16-wide tiles (tl.dot needs every dim >= 16) whose upper 8 channels are zero; the
  output is two accumulators, (BLOCK_M, 64) and (BLOCK_M, 16), of which the 8 tail columns are stored. The work
  done is that of d = 80 (11% over 72), not 128.
* Online softmax over BLOCK_N-key blocks (flash attention 2): float32 scores and accumulators, exp2 with
  scale * log2(e) folded into one multiply-add, p rounded to the input dtype for the p @ v dot. The key blocks
  inside L run unmasked; the last, partial one (1,590 is no multiple of 32) gives keys >= L a score of -inf.
* q, k, v are (N, H, L, D) with any strides but a unit last one, so views of the fused qkv projection's output
  (N, L, 3, H, D) are read in place; with out_layout="nlhd" the output is (N, L, H, D), what the output
  projection reads. Strides that are multiples of 8 are passed divided by 8 and multiplied back in the kernel
  by a constexpr, so Triton knows rows are 16-byte aligned (it infers divisibility by 16 from an integer
  argument, and 72 = 9 x 8 is not) and uses 16-byte vector and cp.async loads.
* Three ways to load (`LOADS`): "pointer" (tl.load, pipelined by Triton into cp.async stages); "tma" (tensor
  descriptors made on the device over each head's (L, D) rows: the hardware zero-fills rows >= L and channels
  >= D and clips the stores, so nothing is masked but scores); "tma-ws", "tma" with the key loop
  warp-specialized (a producer warp group issuing the loads, two consumer groups of 64 query rows). Triton's
  Hopper warp specializer only takes num_warps = 4 and a kernel with no if/else, so this one runs every key
  block masked in one loop.

`--sweep` times every launch config in `CONFIGS` and SDPA's cuDNN backend on the same inputs; a config that does
not compile or fit in shared memory gets an error in its row. Rows print as they are measured; the record (GPU,
versions, date, shape, rows) is appended to --out (bench/records.py) and `best_config` picks the fastest row within
error tolerance. The error column is max |out - SDPA's math backend in float32|.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

# pointer loads; TMA descriptors; TMA with a warp-specialized key loop (Triton's Hopper warp specializer takes only
# num_warps = 4, of which it makes a producer and two consumer warp groups: 12 warps)
LOADS = ("pointer", "tma", "tma-ws")
# (BLOCK_M, BLOCK_N, num_warps, num_stages, loads) that --sweep times: the pointer kernel over the whole grid
# (offline for sm_90 with Triton 3.9 all compile, within 184 KB of shared memory; 128 x 64 and 128 x 128 with 4
# warps spill registers), the TMA ones at the shapes that compile without spills
CONFIGS: list[tuple[int, int, int, int, str]] = [
    (bm, bn, warps, stages, "pointer")
    for bm in (64, 128) for bn in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)
] + [
    (bm, bn, warps, stages, "tma")
    for bm, bn, warps in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8)) for stages in (2, 3)
] + [
    (bm, bn, 4, stages, "tma-ws") for bm, bn in ((64, 64), (64, 128), (128, 64), (128, 128)) for stages in (2, 3)
]  # fmt: skip
DEFAULT_CONFIG = (128, 64, 8, 3, "pointer")  # a guess (no spills on sm_90), until a sweep runs
OUT_LAYOUTS = ("nhld", "nlhd")


def head_split(head_dim: int) -> tuple[int, int, int]:
    """(D0, D1, D1P): head_dim = D0 + D1 with D0 the largest power of two <= head_dim (>= 16) and D1 a multiple of
    8 (0 when head_dim is a power of two), computed in a D1P = max(16, next power of two >= D1) wide tile.
    72 -> (64, 8, 16), 64 -> (64, 0, 0), 80 -> (64, 16, 16), 96 -> (64, 32, 32)."""
    if head_dim < 16:
        raise ValueError(f"flash72 needs a head dim >= 16, got {head_dim}")
    d0 = 1 << (head_dim.bit_length() - 1)
    d1 = head_dim - d0
    if d1 % 8:
        raise ValueError(f"flash72 splits the head dim into a power of two plus a multiple of 8 (72 = 64 + 8, "
                         f"80 = 64 + 16); got {head_dim} = {d0} + {d1}")
    return d0, d1, (max(16, 1 << (d1 - 1).bit_length()) if d1 else 0)


def flash72(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = DEFAULT_CONFIG[0],
    block_n: int = DEFAULT_CONFIG[1], num_warps: int = DEFAULT_CONFIG[2], num_stages: int = DEFAULT_CONFIG[3],
    loads: str = DEFAULT_CONFIG[4], out_layout: str = "nhld", scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale) v for (N, H, L, D) q, k, v of any strides with a unit last one; no mask.

    scale defaults to 1/sqrt(D). Returns (N, H, L, D) contiguous, or (N, L, H, D) with out_layout="nlhd".
    block_m, block_n: powers of two >= 16 (query rows per program, keys per step). loads: "pointer" (any strides
    with a unit last one), "tma" or "tma-ws" (tensor descriptors, the latter with a warp-specialized loop; they
    need 16-byte aligned tensors and strides)."""
    if triton is None:
        raise RuntimeError("flash72 needs the triton package")
    if loads not in LOADS:
        raise ValueError(f"loads must be one of {LOADS}, got {loads!r}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (N, H, L, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q, k, v must share one of bfloat16, float16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    for b in (block_m, block_n):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_m and block_n must be powers of two >= 16, got {block_m}, {block_n}")
    N, H, L, D = q.shape
    d0, d1, d1p = head_split(D)
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"q, k, v need a unit stride along the head dim, got {q.stride()}, {k.stride()}, "
                         f"{v.stride()}")
    if out_layout == "nhld":
        out = q.new_empty(N, H, L, D)
        o = out
    else:
        out = q.new_empty(N, L, H, D)
        o = out.permute(0, 2, 1, 3)  # (N, H, L, D) view of it
    if out.numel() == 0:
        return out
    if max(L * abs(t.stride(2)) + D for t in (q, k, v, o)) >= 2**31:  # row offsets are 32-bit in the kernel
        raise ValueError(f"a head's rows must span < 2^31 elements, got L = {L} with strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}")
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    unit = 8 if all(s % 8 == 0 for s in strides) else 1  # see the module docstring
    scale = D**-0.5 if scale is None else scale
    kernel, extra = _flash72_kernel, {}
    if loads != "pointer":
        if unit != 8 or any(t.data_ptr() % 16 for t in (q, k, v, o)):
            raise ValueError(f"loads={loads!r} needs 16-byte aligned q, k, v and strides of multiples of 8 elements; "
                             f"got strides {q.stride()}, {k.stride()}, {v.stride()}")
        if q.is_cuda:
            triton.set_allocator(_descriptor_scratch)  # descriptors made on the device live in global scratch
        kernel, extra = _flash72_tma_kernel, {"WS": loads == "tma-ws"}
    grid = (triton.cdiv(L, block_m) * N * H,)
    kernel[grid](
        q, k, v, o, L, scale * 1.4426950408889634, *(s // unit for s in strides),
        H=H, D0=d0, D1=d1, D1P=max(d1p, 16), UNIT=unit, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **extra,
    )  # fmt: skip
    return out


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def best_config(rows: list[dict[str, Any]]) -> tuple[int, int, int, int, str] | None:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, loads) of the fastest Triton row that ran and passed its error check
    (rows as the benchmark writes them), or None."""
    ran = [r for r in rows if r.get("impl") == "triton" and "ms" in r and r.get("ok", True)]
    if not ran:
        return None
    best = min(ran, key=lambda r: r["ms"])
    return best["block_m"], best["block_n"], best["num_warps"], best["num_stages"], best["loads"]


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:  # float32 inputs: no tf32 rounding (the interpreter tests)
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _softmax_step(
        q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, keys, L, qk_scale,
        D1: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One online-softmax step over a block of keys (k0, k1, v0, v1 already loaded; MASKED: keys >= L in it).
        The tail tiles' channels past D1 are zero in q1 (so k1's do not count) and dropped from acc1."""
        qk = _dot(q0, tl.trans(k0), tl.zeros((q0.shape[0], k0.shape[0]), tl.float32), IEEE)
        if D1 > 0:
            qk = _dot(q1, tl.trans(k1), qk, IEEE)
        if MASKED:
            qk = tl.where((keys < L)[None, :], qk, float("-inf"))
        # scores in units of log2: s * scale * log2(e); every row has a key < L, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q0.dtype)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
        if D1 > 0:
            acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE)
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _pointer_step(
        q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, skl, svl, start_n, L, qk_scale,
        D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr, BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Load keys [start_n, start_n + BLOCK_N) of k and v through pointers, then `_softmax_step`."""
        keys = start_n + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)[None, :]
        c1 = D0 + tl.arange(0, D1P)[None, :]
        tail_ok = tl.arange(0, D1P)[None, :] < D1
        k_rows = k_base + (keys * skl * UNIT)[:, None]
        v_rows = v_base + (keys * svl * UNIT)[:, None]
        k1 = tl.zeros((BLOCK_N, D1P), k_base.dtype.element_ty)  # unused without a tail
        v1 = tl.zeros((BLOCK_N, D1P), v_base.dtype.element_ty)
        if MASKED:
            key_ok = (keys < L)[:, None]
            k0 = tl.load(k_rows + c0, mask=key_ok, other=0.0)
            v0 = tl.load(v_rows + c0, mask=key_ok, other=0.0)
            if D1 > 0:
                k1 = tl.load(k_rows + c1, mask=key_ok & tail_ok, other=0.0)
                v1 = tl.load(v_rows + c1, mask=key_ok & tail_ok, other=0.0)
        else:
            k0 = tl.load(k_rows + c0)
            v0 = tl.load(v_rows + c0)
            if D1 > 0:
                k1 = tl.load(k_rows + c1, mask=tail_ok, other=0.0)
                v1 = tl.load(v_rows + c1, mask=tail_ok, other=0.0)
        return _softmax_step(q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, keys, L, qk_scale, D1, MASKED, IEEE)

    @triton.jit
    def _tma_step(
        q0, q1, acc0, acc1, m_i, l_i, k0d, k1d, v0d, v1d, start_n, L, qk_scale,
        D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """Load keys [start_n, start_n + BLOCK_N) of k and v through descriptors (zeros past L and D), then
        `_softmax_step`."""
        k0 = k0d.load([start_n, 0])
        v0 = v0d.load([start_n, 0])
        k1 = tl.zeros((BLOCK_N, D1P), k0.dtype)  # unused without a tail
        v1 = tl.zeros((BLOCK_N, D1P), v0.dtype)
        if D1 > 0:
            k1 = k1d.load([start_n, D0])
            v1 = v1d.load([start_n, D0])
        keys = start_n + tl.arange(0, BLOCK_N)
        return _softmax_step(q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, keys, L, qk_scale, D1, MASKED, IEEE)

    @triton.jit
    def _program(L, H: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program pid: query block pid % cdiv(L, BLOCK_M) of (sequence, head) pid // cdiv(L, BLOCK_M), so the
        programs that share a head's k and v run together (L2). -> (n, h, first query row)."""
        pid = tl.program_id(0)
        m_blocks = tl.cdiv(L, BLOCK_M)
        nh = pid // m_blocks
        return (nh // H).to(tl.int64), (nh % H).to(tl.int64), (pid - nh * m_blocks) * BLOCK_M

    @triton.jit
    def _flash72_kernel(
        Q, K, V, Out, L, qk_scale,
        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
        H: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Pointer loads (cp.async when pipelined). Strides are in units of UNIT elements."""
        n, h, start_m = _program(L, H, BLOCK_M)
        q_base = Q + (n * sqn + h * sqh) * UNIT
        k_base = K + (n * skn + h * skh) * UNIT
        v_base = V + (n * svn + h * svh) * UNIT
        o_base = Out + (n * son + h * soh) * UNIT

        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = (rows < L)[:, None]
        c0 = tl.arange(0, D0)[None, :]
        c1 = D0 + tl.arange(0, D1P)[None, :]
        tail_ok = tl.arange(0, D1P)[None, :] < D1
        q_rows = q_base + (rows * sql * UNIT)[:, None]
        q0 = tl.load(q_rows + c0, mask=row_ok, other=0.0)  # rows >= L: zeros, computed, never stored
        q1 = tl.zeros((BLOCK_M, D1P), Q.dtype.element_ty)
        if D1 > 0:
            q1 = tl.load(q_rows + c1, mask=row_ok & tail_ok, other=0.0)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1P), tl.float32)  # unused (and dropped by the compiler) without a tail
        full = (L // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, full, BLOCK_N):
            acc0, acc1, m_i, l_i = _pointer_step(
                q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, skl, svl, start_n, L, qk_scale,
                D0, D1, D1P, UNIT, BLOCK_N, False, IEEE,
            )  # fmt: skip
        if full < L:
            acc0, acc1, m_i, l_i = _pointer_step(
                q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, skl, svl, full, L, qk_scale,
                D0, D1, D1P, UNIT, BLOCK_N, True, IEEE,
            )  # fmt: skip

        inv = 1.0 / l_i[:, None]
        o_rows = o_base + (rows * sol * UNIT)[:, None]
        tl.store(o_rows + c0, (acc0 * inv).to(Out.dtype.element_ty), mask=row_ok)
        if D1 > 0:
            tl.store(o_rows + c1, (acc1 * inv).to(Out.dtype.element_ty), mask=row_ok & tail_ok)

    @triton.jit
    def _flash72_tma_kernel(
        Q, K, V, Out, L, qk_scale,
        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
        H: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, WS: tl.constexpr,
    ):  # fmt: skip
        """Tensor-memory-accelerator loads and stores through descriptors made on the device, one per (tensor,
        channel part) over the program's (L, D) head: rows >= L and channels >= D read as zeros and are not
        written, so nothing is masked but the scores of keys >= L. WS: warp-specialize the key loop."""
        n, h, start_m = _program(L, H, BLOCK_M)
        D: tl.constexpr = D0 + D1
        q_base = Q + (n * sqn + h * sqh) * UNIT
        k_base = K + (n * skn + h * skh) * UNIT
        v_base = V + (n * svn + h * svh) * UNIT
        o_base = Out + (n * son + h * soh) * UNIT
        q0 = tl.make_tensor_descriptor(q_base, [L, D], [sql * UNIT, 1], [BLOCK_M, D0]).load([start_m, 0])
        k0d = tl.make_tensor_descriptor(k_base, [L, D], [skl * UNIT, 1], [BLOCK_N, D0])
        v0d = tl.make_tensor_descriptor(v_base, [L, D], [svl * UNIT, 1], [BLOCK_N, D0])
        o0d = tl.make_tensor_descriptor(o_base, [L, D], [sol * UNIT, 1], [BLOCK_M, D0])
        q1 = tl.zeros((BLOCK_M, D1P), Q.dtype.element_ty)
        k1d, v1d, o1d = k0d, v0d, o0d  # stand-ins, never read without a tail
        if D1 > 0:  # channels D0 .. D0 + D1P, those >= D zero
            q1 = tl.make_tensor_descriptor(q_base, [L, D], [sql * UNIT, 1], [BLOCK_M, D1P]).load([start_m, D0])
            k1d = tl.make_tensor_descriptor(k_base, [L, D], [skl * UNIT, 1], [BLOCK_N, D1P])
            v1d = tl.make_tensor_descriptor(v_base, [L, D], [svl * UNIT, 1], [BLOCK_N, D1P])
            o1d = tl.make_tensor_descriptor(o_base, [L, D], [sol * UNIT, 1], [BLOCK_M, D1P])

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1P), tl.float32)
        if WS:  # one loop with every block masked: Triton's Hopper warp specializer skips kernels with an scf.if
            for start_n in tl.range(0, L, BLOCK_N, warp_specialize=True):  # that has an else (the tail step's)
                acc0, acc1, m_i, l_i = _tma_step(
                    q0, q1, acc0, acc1, m_i, l_i, k0d, k1d, v0d, v1d, start_n, L, qk_scale, D0, D1, D1P, BLOCK_N,
                    True, IEEE,
                )  # fmt: skip
        else:
            full = (L // BLOCK_N) * BLOCK_N
            for start_n in tl.range(0, full, BLOCK_N):
                acc0, acc1, m_i, l_i = _tma_step(
                    q0, q1, acc0, acc1, m_i, l_i, k0d, k1d, v0d, v1d, start_n, L, qk_scale, D0, D1, D1P, BLOCK_N,
                    False, IEEE,
                )  # fmt: skip
            if full < L:
                acc0, acc1, m_i, l_i = _tma_step(
                    q0, q1, acc0, acc1, m_i, l_i, k0d, k1d, v0d, v1d, full, L, qk_scale, D0, D1, D1P, BLOCK_N,
                    True, IEEE,
                )  # fmt: skip

        inv = 1.0 / l_i[:, None]
        o0d.store([start_m, 0], (acc0 * inv).to(Out.dtype.element_ty))
        if D1 > 0:
            o1d.store([start_m, D0], (acc1 * inv).to(Out.dtype.element_ty))


# ------------------------------------------------------------------------------------------------ benchmark


def make_inputs(n: int, h: int, length: int, d: int, layout: str, dtype=torch.bfloat16, device="cuda"):
    """q, k, v (N, H, L, D): separate contiguous tensors ("nhld") or views of one (N, L, 3, H, D) qkv ("packed")."""
    g = torch.Generator(device).manual_seed(0)
    if layout == "nhld":
        return tuple(torch.randn(n, h, length, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    qkv = torch.randn(n, length, 3, h, d, device=device, dtype=dtype, generator=g)
    return tuple(t.permute(0, 2, 1, 3) for t in qkv.unbind(2))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """SDPA's math backend in float32, `chunk` sequences at a time (it materialises the L x L scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(0, q.shape[0], chunk):
            s = slice(i, i + chunk)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q[s].float(), k[s].float(), v[s].float()))
    return torch.cat(outs)


def _row(name: str, fn, ref: torch.Tensor, flop: int, iters: int, transpose: bool = False, **extra) -> dict:
    """Run `fn` once (compiles; an error ends up in the row), then time it; max |err| against `ref`."""
    from bench.attention import time_ms

    row: dict[str, Any] = {"impl": name, **extra}
    try:
        out = fn()
        torch.cuda.synchronize()
        out = out.transpose(1, 2) if transpose else out
        row["max_err"] = float((out.float() - ref).abs().max())
        row["ms"] = round(time_ms(fn, iters), 4)
        row["tflops_at_d"] = round(flop / row["ms"] / 1e9, 1)
    except Exception as e:  # a config that does not compile or fit is a row, not a crash
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        msg = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))  # a compile error's message is its last line
        row["error"] = f"{type(e).__name__}: {msg}"[:300]
    return row


def _print_row(r: dict[str, Any]) -> None:
    config = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} {r['loads']}" if "loads" in r else "-"
    cells = [r["impl"], config] + [r.get(c, "-") for c in ("ms", "tflops_at_d", "max_err", "ok")]
    print(" | ".join(f"{c!s:>21}" if i < 2 else f"{c!s:>10.8}" for i, c in enumerate(cells)), r.get("error", ""),
          flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.records import append_records

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="time every config in CONFIGS (else DEFAULT_CONFIG)")
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS), help="sweep only these kernels")
    p.add_argument("--config", nargs=5, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES", "LOADS"),
                   help="time this config instead of DEFAULT_CONFIG")  # fmt: skip
    p.add_argument("--seqs", type=int, default=60)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1590)
    p.add_argument("--dim", type=int, default=72)
    p.add_argument("--layout", choices=("nhld", "packed"), default="nhld",
                   help="q, k, v contiguous (N, H, L, D) with an (N, H, L, D) output, or views of one (N, L, 3, H, "
                        "D) qkv with an (N, L, H, D) output")  # fmt: skip
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="bench/results/attention-triton.json")
    args = p.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        p.error("needs CUDA and triton")
    if args.sweep:
        configs = [c for c in CONFIGS if c[4] in args.loads]
    elif args.config:
        configs = [(*map(int, args.config[:4]), args.config[4])]
    else:
        configs = [DEFAULT_CONFIG]
    n, h, length, d = args.seqs, args.heads, args.tokens, args.dim
    q, k, v = make_inputs(n, h, length, d, args.layout)
    ref = reference(q, k, v)
    flop = 4 * n * h * length * length * d
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q, k, v)

    print(" | ".join(f"{c:>21}" if i < 2 else f"{c:>10}" for i, c in
                     enumerate(("impl", "config", "ms", "TFLOP/s@d", "max_err", "ok"))), "error")  # fmt: skip
    rows = [_row("sdpa-cudnn", lambda: cudnn(q, k, v), ref, flop, args.iters)]
    if args.layout == "packed":  # SDPA on contiguous copies (the copies not timed), as the model feeds it today
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        rows.append(_row("sdpa-cudnn-contiguous", lambda: cudnn(qc, kc, vc), ref, flop, args.iters))
    for r in rows:
        _print_row(r)
    out_layout = "nlhd" if args.layout == "packed" else "nhld"
    sdpa_errs = [r["max_err"] for r in rows if "max_err" in r]
    tol = 2 * max(sdpa_errs) + 1e-3 if sdpa_errs else 4e-3  # a wrong kernel is off by O(0.1)
    for bm, bn, warps, stages, loads in configs:
        fn = lambda: flash72(q, k, v, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,  # noqa: E731
                             loads=loads, out_layout=out_layout)  # fmt: skip
        row = _row("triton", fn, ref, flop, args.iters, transpose=out_layout == "nlhd", block_m=bm, block_n=bn,
                   num_warps=warps, num_stages=stages, loads=loads)  # fmt: skip
        if "max_err" in row:
            row["ok"] = row["max_err"] <= tol
        rows.append(row)
        _print_row(row)
        if "illegal" in row.get("error", "") or "CUDA error" in row.get("error", ""):
            print("the CUDA context is lost after that error: the sweep stops here", flush=True)
            break
    best = best_config(rows)
    print(f"best (BLOCK_M, BLOCK_N, num_warps, num_stages, loads): {best}")
    for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:8]:
        _print_row(r)
    record = {"bench": "attention_triton", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(), "shape": [n, h, length, d],
              "layout": args.layout, "out_layout": out_layout, "dtype": "bfloat16", "flop_at_d": flop,
              "best": list(best) if best else None, "rows": rows}  # fmt: skip
    append_records(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
