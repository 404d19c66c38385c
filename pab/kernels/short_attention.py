"""Attention over many short sequences (L <= 32) in one Triton kernel.

Video DiTs' temporal attention attends over the frames at one position: 3,180 x 2 sequences of 15 tokens
per call for Open-Sora 1.2 at 480p, 2,048 of 16 for Latte-1. Flash attention gives each (sequence, head) a
CTA of 64-128 query rows (~12% used), and batched GEMMs pay for three passes over memory; measured on an
H100 (bench/profile.py, bf16, Open-Sora 480p) SDPA's core takes 1.0-1.2 ms a call at ~3 TFLOP/s. This kernel
reads the fused qkv projection (N, L, 3C) once, optionally applies a per-head RMSNorm to q and k and RoPE,
attends, and writes the (N, L, C) input of the output projection: 0.27 ms at 480p (1.6 TB/s) and 1.2 ms at
720p 4 s (L = 30), where the first fused kernel we wrote (one 4-warp program per head on 16 x 128 tiles,
spilling registers) took 2.25 ms and 82 ms.

Layout of the work, and why:
* A program takes HB heads of one sequence as the batch dim of 3D `tl.dot`s (Triton gives each batch entry
  its own warps), so with num_warps = HB no warp repeats another; the HB heads of a token are adjacent in
  qkv, so loads coalesce across heads and the cos/sin/weight loads are shared.
* head_dim D = D0 + D1 (72 = 64 + 8) instead of padding to a power of two (128): the 8-channel tail is
  zero-interleaved to 16 for the score dot (tl.dot needs K >= 16) and used as is for p @ v.
* RoPE pairs (2i, 2i+1) are split into even and odd halves in registers; rotated q.k = even-half dot +
  odd-half dot, so the halves are never rejoined and no channel is loaded twice.
* Norm and RoPE in float32; q, k and p are rounded to the input dtype for the tensor-core dots, which
  accumulate in float32 (as flash attention does). Softmax uses exp2 with the scale folded in.
Launch shape by L (`CONFIG`): measured (heads per program, warps) at 480p / 720p: 2x4 0.270 / 1.205 ms,
4x4 0.347 / -, 2x2 0.299 / 1.353, 1x1 0.368 / -, 1x2 - / 1.601, 1x4 - / 1.621. A second run on another H100
gave 2x4 0.326 / 1.196 and 2x2 0.281 / 1.319 ms: at 480p the two are within run-to-run spread.
Tried for 16 < L <= 20 (session 30), slower: a 16-row tile and the few tokens past it as a tail whose products ran
as broadcast sums on the CUDA cores took 0.389 ms at Open-Sora-Plan's 17 frames against 0.232 for the 32-row tile
(best launch shape of each, one H100, bench/results/short-h100.json): the padding rows cost less than the tail.
"""

from __future__ import annotations

import warnings

import torch

from pab.kernels import no_grad_needed
from pab.kernels.fp8 import DELAYED_MARGIN, E4M3, DelayedScale, attach

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

MAX_LEN = 32  # one (BLOCK_L x head_dim) tile per head; longer sequences suit flash attention
# Longest L -> (heads per program, num_warps) for it and the lengths down to the previous key; the tile is
# BLOCK_L = max(16, next power of two >= L). Measured (above; `bench.short`): in a 32-row tile that is mostly padding
# (Open-Sora-Plan's 17 frames, 20) two warps beat four, 0.232 / 0.230 ms against 0.289 / 0.276 (one H100, N = 2,048);
# at 30 frames four do (1.18 against 1.27 ms at N = 7,200). Where between 20 and 30 that turns is not measured.
CONFIG: dict[int, tuple[int, int]] = {16: (2, 4), 24: (2, 2), 32: (2, 4)}
_BUILD_ERROR: Exception | None = None  # set once when the kernel cannot be built on this machine


def head_split(head_dim: int) -> tuple[int, int]:
    """head_dim = D0 + D1: D0 = 0 or a power of two >= 32 (pair halves of >= 16 for the dots), D1 = 0, 8 or a
    power of two >= 16 (the tail). 72 = 64 + 8, 16 = 0 + 16, 128 = 128 + 0."""
    d0 = 1 << (head_dim.bit_length() - 1) if head_dim >= 32 else 0
    d1 = head_dim - d0
    if not (d1 == 0 or d1 == 8 or (d1 >= 16 and d1 & (d1 - 1) == 0)):
        raise ValueError(f"the short-sequence attention kernel needs head_dim = 8, 16, 32, ... or a power of two "
                         f">= 32 plus 8 or a power of two >= 16 (e.g. 72 = 64 + 8); got {head_dim}")
    return d0, d1


def launch_config(L: int, num_heads: int) -> tuple[int, int]:
    """(heads per program, num_warps) at sequence length L."""
    hb, warps = next((cfg for longest, cfg in sorted(CONFIG.items()) if L <= longest), (2, 4))
    while num_heads % hb:  # a program's heads must not run past the last head
        hb //= 2
    return hb, warps


def supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether `short_attention` should take (N, L, 3C) `qkv` by default: CUDA, half precision (float32 would
    round through TF32 and miss float32 fidelity), L <= MAX_LEN, 32-bit offsets, a head_dim it splits, and a
    kernel that built here."""
    if triton is None or _BUILD_ERROR is not None or not qkv.is_cuda or not no_grad_needed(qkv):
        return False
    if qkv.dtype not in (torch.bfloat16, torch.float16) or qkv.ndim not in (3, 4) or seq_len(qkv) > MAX_LEN:
        return False
    if qkv.numel() >= 2**31:
        return False
    try:
        head_split(qkv.shape[2] // 3 // num_heads)
    except ValueError:
        return False
    return True


def seq_len(qkv: torch.Tensor) -> int:
    """Tokens per sequence: L of (N, L, 3C), nb·lb of frame blocks (nb, N, lb, 3C)."""
    return qkv.shape[1] if qkv.ndim == 3 else qkv.shape[0] * qkv.shape[2]


def short_attention(
    qkv: torch.Tensor,
    num_heads: int,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    delayed: DelayedScale | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per (sequence, head) of qkv (N, L, 3, H, D) flattened to (N, L, 3C) -> (N, L, C).

    qkv may also come in frame blocks, (nb, N, lb, 3C) -> (nb, N, lb, C): token t = b·lb + i of sequence n is
    qkv[b, n, i]. That is the layout in which sequence parallelism receives the frames of its rows from nb
    ranks (`pab.parallel.comm`), so attention reads it, and writes the reply, with no reordering copy.

    q_weight, k_weight: per-head RMSNorm weights (D,) applied to q and k first (both or neither), with `eps`.
    rope: (cos, sin) float32 tables (L, D) with rope(x) = x * cos + (x1, x0, x3, x2, ...) * sin for interleaved
    pairs: cos repeated over each pair, sin (-s, +s) per pair (stdit3's `RotaryEmbedding.tables`).
    delayed: the output feeds an fp8 projection: its amax is recorded and, after a request's first call, its e4m3
    rows are attached to it (`pab.kernels.fp8.DelayedScale`); with `delayed.only` they alone are written. Not
    under torch.compile (the op it traces takes no fp8 output).
    """
    if triton is None:
        raise RuntimeError("short_attention needs the triton package (pip install triton; it ships with CUDA torch)")
    cos, sin = rope if rope is not None else (None, None)
    if delayed is not None:
        if torch.compiler.is_compiling():
            raise RuntimeError("short_attention's fp8 output (delayed) does not run under torch.compile")
        out, q8, row_scales = _launch(qkv, q_weight, k_weight, cos, sin, num_heads, eps,
                                      *launch_config(seq_len(qkv), num_heads),
                                      delayed=(delayed.amax, delayed.read, delayed.write, delayed.only))  # fmt: skip
        if q8 is not None:
            attach(out, q8, row_scales.view(-1, 1), written=not delayed.only)
        return out
    return torch.ops.pab.short_attention(qkv, q_weight, k_weight, cos, sin, num_heads, eps,
                                         *launch_config(seq_len(qkv), num_heads))  # fmt: skip


def try_short_attention(qkv: torch.Tensor, num_heads: int, **kwargs) -> torch.Tensor | None:
    """`short_attention`, or None (and one warning) when the kernel cannot be built on this machine (e.g. no C
    compiler for Triton's launcher), so a model's default path stays usable; inside torch.compile it raises."""
    global _BUILD_ERROR
    if torch.compiler.is_compiling():
        return short_attention(qkv, num_heads, **kwargs)
    try:
        return short_attention(qkv, num_heads, **kwargs)
    except (RuntimeError, ImportError, OSError) as e:
        _BUILD_ERROR = e
        warnings.warn(f"Triton short-sequence attention unavailable ({type(e).__name__}: {e}); using PyTorch",
                      stacklevel=2)
        return None


if triton is not None:
    from pab.kernels.fp8 import delayed_scales, record_amax, to_e4m3  # jit functions the kernel calls: globals here

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
    def _rotate(e, o, c, s, HAS_ROPE: tl.constexpr):
        """RoPE on pair halves: e' = e cos - o sin, o' = o cos + e sin (identity without RoPE)."""
        if HAS_ROPE:
            return e * c - o * s, o * c + e * s
        else:
            return e, o

    @triton.jit
    def _write_part(
        o, out_ptrs, out8_ptrs, row_ok, r, top, OUT: tl.constexpr, RECORD: tl.constexpr, E4M3: tl.constexpr
    ):  # fmt: skip
        """Store one channel part of the output (float32 `o`) as it is (OUT) and in e4m3 times `r` (E4M3); returns
        `top` raised to the part's largest |value| (RECORD)."""
        if OUT:
            tl.store(out_ptrs, o.to(out_ptrs.dtype.element_ty), mask=row_ok)
        if RECORD:
            top = tl.maximum(top, tl.max(tl.max(tl.max(tl.where(row_ok, tl.abs(o), 0.0), 2), 1), 0))
        if E4M3:
            tl.store(out8_ptrs, to_e4m3(o, r), mask=row_ok)
        return top

    @triton.jit
    def _short_attention_kernel(
        qkv_ptr, out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
        L, LB, stride_qkv_b, stride_qkv_n, stride_qkv_l, stride_out_b, stride_out_n, stride_out_l, scale, eps,
        out8_ptr, row_scale_ptr, amax_ptr, amax_read, amax_write, margin,
        H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, BLOCK_L: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, IEEE: tl.constexpr,
        OUT: tl.constexpr = True, RECORD: tl.constexpr = False, E4M3: tl.constexpr = False,
    ):  # fmt: skip
        """One program per (sequence n, HB consecutive heads): qkv (N, L, 3, H, D) -> out (N, L, H, D).

        Token l of sequence n sits in block l // LB at row l % LB (frame blocks; LB = L for one block).
        For an fp8 output projection (`pab.kernels.fp8.DelayedScale`): RECORD takes the output's amax into slot
        amax_write of amax_ptr; E4M3 writes it in e4m3 to out8_ptr (out's strides, which are multiples of C)
        scaled by slot amax_read, and its rows' scales (all the same) to row_scale_ptr; OUT writes out itself.

        Tiles are [HB, BLOCK_L, channels]. Channels [0, D0) go as even/odd pair halves, [D0, D) (D1 of them)
        as one interleaved tile. Padded keys get -inf, padded rows are not stored.
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
        blk = ll // LB
        li = ll - blk * LB
        src = qkv_ptr + blk * stride_qkv_b + n * stride_qkv_n + li * stride_qkv_l + (h0 + hh) * D
        dst_off = blk * stride_out_b + n * stride_out_n + li * stride_out_l + (h0 + hh) * D
        dst = out_ptr + dst_off

        # loads first (all independent): q, k as float32 pair halves, v in its dtype, half-tables of cos/sin
        if D0 > 0:
            d0 = tl.arange(0, D0)[None, None, :]
            j0 = tl.arange(0, D0 // 2)[None, None, :]
            qe, qo = _pair_halves(tl.load(src + d0, mask=row_ok, other=0.0).to(tl.float32))
            ke, ko = _pair_halves(tl.load(src + C + d0, mask=row_ok, other=0.0).to(tl.float32))
            v0 = tl.load(src + 2 * C + d0, mask=row_ok, other=0.0)
            c0 = 0.0  # unused without RoPE
            s0 = 0.0
            if HAS_ROPE:
                c0 = tl.load(cos_ptr + ll * D + 2 * j0, mask=row_ok, other=0.0)  # cos, repeated over the pair
                s0 = tl.load(sin_ptr + ll * D + 2 * j0 + 1, mask=row_ok, other=0.0)  # sin is (-s, +s) per pair
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)[None, None, :]
            j1 = D0 // 2 + tl.arange(0, D1 // 2)[None, None, :]
            q1e, q1o = _pair_halves(tl.load(src + d1, mask=row_ok, other=0.0).to(tl.float32))
            k1e, k1o = _pair_halves(tl.load(src + C + d1, mask=row_ok, other=0.0).to(tl.float32))
            v1 = tl.load(src + 2 * C + d1, mask=row_ok, other=0.0)
            c1 = 0.0
            s1 = 0.0
            if HAS_ROPE:
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

        # scores: (rotated) q.k = even-half dot + odd-half dot (+ the tail's dot)
        s = tl.zeros((HB, BLOCK_L, BLOCK_L), tl.float32)
        if D0 > 0:
            qre, qro = _rotate(qe, qo, c0, s0, HAS_ROPE)
            kre, kro = _rotate(ke, ko, c0, s0, HAS_ROPE)
            s = _batched_dot(qre.to(dt), tl.permute(kre.to(dt), (0, 2, 1)), s, IEEE)
            s = _batched_dot(qro.to(dt), tl.permute(kro.to(dt), (0, 2, 1)), s, IEEE)
        if D1 > 0:
            qre, qro = _rotate(q1e, q1o, c1, s1, HAS_ROPE)
            kre, kro = _rotate(k1e, k1o, c1, s1, HAS_ROPE)
            q1 = tl.reshape(tl.join(qre, qro), (HB, BLOCK_L, D1)).to(dt)
            k1 = tl.reshape(tl.join(kre, kro), (HB, BLOCK_L, D1)).to(dt)
            if D1 < 16:  # tl.dot needs K >= 16
                q1 = _zero_interleave(q1)
                k1 = _zero_interleave(k1)
            s = _batched_dot(q1, tl.permute(k1, (0, 2, 1)), s, IEEE)

        # softmax over keys in float32 (exp2 with the scale folded in), p rounded to the input dtype
        s = tl.where(rows[None, None, :] < L, s, float("-inf"))  # padded keys get no weight
        p = tl.exp2((s - tl.max(s, axis=2)[:, :, None]) * (scale * LOG2E))
        p = (p * (1.0 / tl.sum(p, axis=2))[:, :, None]).to(dt)

        top = 0.0  # the largest |output| (RECORD)
        r = 1.0  # e4m3's multiplier (E4M3)
        if E4M3:
            r, row_scale = delayed_scales(amax_ptr, amax_read, margin)
        # each part rounded to the output's dtype first: the e4m3 rows and amax are those of the values written
        if D0 > 0:
            o0 = _batched_dot(p, v0, tl.zeros((HB, BLOCK_L, D0), tl.float32), IEEE).to(dt).to(tl.float32)
            top = _write_part(o0, dst + d0, out8_ptr + dst_off + d0, row_ok, r, top, OUT, RECORD, E4M3)
        if D1 > 0:
            o1 = _batched_dot(p, v1, tl.zeros((HB, BLOCK_L, D1), tl.float32), IEEE).to(dt).to(tl.float32)
            top = _write_part(o1, dst + d1, out8_ptr + dst_off + d1, row_ok, r, top, OUT, RECORD, E4M3)
        if RECORD:
            record_amax(amax_ptr, amax_read, amax_write, top, E4M3)
        if E4M3:
            if h0 == 0:  # one program of the sequence writes its rows' scales
                row = (blk * stride_out_b + n * stride_out_n + li * stride_out_l) // C
                tl.store(row_scale_ptr + row, tl.zeros((1, BLOCK_L, 1), tl.float32) + row_scale, mask=row_ok)

    def _launch(
        qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
        cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, eps: float,
        heads_per_program: int, num_warps: int, delayed: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """(out, its e4m3 rows, their (M,) scales) of (N, L, 3C) qkv or frame blocks (nb, N, lb, 3C); the rows
        when `delayed` = (amax, read, write, only) asks for them (`pab.kernels.fp8.DelayedScale`), else None."""
        if qkv.ndim not in (3, 4):
            raise ValueError(f"qkv must be (N, L, 3C) or frame blocks (nb, N, lb, 3C), got {tuple(qkv.shape)}")
        blocks = qkv if qkv.ndim == 4 else qkv.unsqueeze(0)  # (nb, N, lb, 3C); one block of L
        nb, N, LB, C3 = blocks.shape
        L = nb * LB
        C = C3 // 3
        D = C // num_heads
        d0, d1 = head_split(D)
        if num_heads % heads_per_program or heads_per_program & (heads_per_program - 1):
            raise ValueError(f"heads_per_program={heads_per_program} must be a power of two dividing {num_heads}")
        if (q_weight is None) != (k_weight is None) or (cos is None) != (sin is None):
            raise ValueError("pass both q_weight and k_weight (or neither), and both cos and sin (or neither)")
        blocks = blocks if blocks.stride(-1) == 1 else blocks.contiguous()
        sb, sn, sl, _ = blocks.stride()
        if L > MAX_LEN or (nb - 1) * sb + (N - 1) * sn + (LB - 1) * sl + C3 >= 2**31:  # 32-bit offsets
            raise ValueError(f"the short-sequence attention takes at most {MAX_LEN} tokens and 2^31 qkv elements, "
                             f"got {tuple(qkv.shape)} with strides {qkv.stride()}")
        result = qkv.new_empty(*qkv.shape[:-1], C)  # what the caller gets: (nb, N, lb, C) or (N, L, C)
        out = result if qkv.ndim == 4 else result.unsqueeze(0)
        amax, read, write, only = delayed if delayed is not None else (out, -1, 0, False)
        e4m3 = delayed is not None and read >= 0
        q8 = torch.empty_like(result, dtype=E4M3) if e4m3 else None  # laid out as `result`, so as `out`
        row_scales = out.new_empty(nb * N * LB, dtype=torch.float32) if e4m3 else None
        if out.numel() == 0:  # no sequences (a DSP rank's empty chunk): nothing to launch
            return result, q8, row_scales
        has_norm, has_rope = q_weight is not None, cos is not None
        dummy = out  # never read: the HAS_NORM / HAS_ROPE branches that would read it are compiled out
        _short_attention_kernel[(N * (num_heads // heads_per_program),)](
            blocks, out, q_weight if has_norm else dummy, k_weight if has_norm else dummy,
            cos if has_rope else dummy, sin if has_rope else dummy,
            L, LB, sb, sn, sl, *out.stride()[:3], D**-0.5, eps,
            out if q8 is None else q8, out if q8 is None else row_scales, amax, max(read, 0), write, DELAYED_MARGIN,
            H=num_heads, D=D, HB=heads_per_program, BLOCK_L=max(16, triton.next_power_of_2(L)), D0=d0, D1=d1,
            HAS_NORM=has_norm, HAS_ROPE=has_rope, IEEE=qkv.dtype == torch.float32, num_warps=num_warps,
            OUT=not (e4m3 and only), RECORD=delayed is not None, E4M3=e4m3,
        )  # fmt: skip
        return result, q8, row_scales

    @torch.library.custom_op("pab::short_attention", mutates_args=())
    def _short_attention_op(
        qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
        cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, eps: float,
        heads_per_program: int, num_warps: int,
    ) -> torch.Tensor:  # fmt: skip
        """(N, L, 3C) qkv -> (N, L, C), or frame blocks (nb, N, lb, 3C) -> (nb, N, lb, C); an opaque op to
        torch.compile (no graph break)."""
        return _launch(qkv, q_weight, k_weight, cos, sin, num_heads, eps, heads_per_program, num_warps)[0]

    @_short_attention_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, num_heads, eps, heads_per_program, num_warps):
        return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)
