"""Flash attention at head dims that are no power of two (Open-Sora 1.2 and Latte-1 spatial attention: d = 72).

SDPA's fastest backend on Hopper, cuDNN, runs d = 72 at ~313 TFLOP/s (2.23 ms for 60 sequences x 16 heads x 1,590
tokens on an H200) where d = 128 runs at ~540: it computes a padded head. This kernel (python -m
bench.attention_triton times it against cuDNN):

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
* Two ways to load (`LOADS`): "pointer" (tl.load, pipelined by Triton into cp.async stages); "tma" (tensor
  descriptors made on the device over each head's (L, D) rows: the hardware zero-fills rows >= L and channels
  >= D and clips the stores, so nothing is masked but scores). Measured against each other and against variants
  that are gone (docs/performance.md): pointer loads are the fastest; a warp-specialized TMA key loop (Triton's
  `warp_specialize`) ran at two thirds of their rate at best and gave NaN at some launch shapes on an H100;
  computing the next key block's scores ahead of this block's softmax, and a bf16x2 exponential, were slower.

* Cross-attention (pointer loads): L queries against LK keys, e.g. 23,850 video tokens against tens of text tokens,
  one key block a query tile; an optional (N, LK) bool keep-mask is read in place (any pattern: a block with no
  kept key for a row before one that has some subtracts 0, not -inf, from its scores).

A model takes it through `KernelOptions(spatial_attention="triton", cross_attention="triton")` (`attention`;
`supported` says where it applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pab.kernels import fp8, no_grad_needed

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

# pointer loads (cp.async); TMA descriptors
LOADS = ("pointer", "tma")
# (BLOCK_M, BLOCK_N, num_warps, num_stages, loads): the best of `bench.attention_triton --sweep --loads pointer` on
# one H200 at Open-Sora 480p's spatial attention (2.178 ms, level with cuDNN; docs/performance.md)
CONFIG = (128, 64, 4, 4, "pointer")
OUT_LAYOUTS = ("nhld", "nlhd")


def head_split(head_dim: int) -> tuple[int, int, int]:
    """(D0, D1, D1P): head_dim = D0 + D1 with D0 the largest power of two <= head_dim (>= 16) and D1 a multiple of
    8 (0 when head_dim is a power of two), computed in a D1P = max(16, next power of two >= D1) wide tile.
    72 -> (64, 8, 16), 64 -> (64, 0, 0), 80 -> (64, 16, 16), 96 -> (64, 32, 32)."""
    if head_dim < 16:
        raise ValueError(f"flash_attention needs a head dim >= 16, got {head_dim}")
    d0 = 1 << (head_dim.bit_length() - 1)
    d1 = head_dim - d0
    if d1 % 8:
        raise ValueError(f"flash_attention splits the head dim into a power of two plus a multiple of 8 (72 = 64 + 8, "
                         f"80 = 64 + 16); got {head_dim} = {d0} + {d1}")
    return d0, d1, (max(16, 1 << (d1 - 1).bit_length()) if d1 else 0)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
    config: tuple[int, int, int, int, str] | None = None, out_layout: str = "nhld", scale: float | None = None,
    delayed: fp8.DelayedScale | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale) v for (N, H, L, D) q and (N, H, LK, D) k, v of any strides with a unit last one.

    key_mask: None, or an (N, LK) bool keep-mask of the keys (SDPA's attn_mask[:, None, None, :]); a query whose
    keys are all masked gets NaN, as in SDPA. Cross-attention (LK != L) and a key mask take the pointer loads.
    scale defaults to 1/sqrt(D). Returns (N, H, L, D) contiguous, or (N, L, H, D) with out_layout="nlhd".
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages, loads), default `CONFIG`. BLOCK_M, BLOCK_N: powers of two >= 16
    (query rows per program, keys per step). loads: "pointer" (any strides with a unit last one) or "tma" (tensor
    descriptors; they need 16-byte aligned tensors and strides).
    delayed: the output feeds an fp8 projection (pointer loads): its amax is recorded and, after a request's first
    call, its e4m3 rows are attached to it (`pab.kernels.fp8.DelayedScale`, `delayed_reference` in PyTorch); with
    `delayed.only` they alone are written."""
    block_m, block_n, num_warps, num_stages, loads = config or CONFIG
    if triton is None:
        raise RuntimeError("flash_attention needs the triton package")
    if loads not in LOADS:
        raise ValueError(f"loads must be one of {LOADS}, got {loads!r}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        raise ValueError(f"q, k, v must be (N, H, L, D) and (N, H, LK, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    LK = k.shape[2]
    if key_mask is not None and (key_mask.shape != (q.shape[0], LK) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be an (N, LK) = {(q.shape[0], LK)} bool keep-mask, got "
                         f"{tuple(key_mask.shape)} {key_mask.dtype}")
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
    if LK == 0:
        raise ValueError("flash_attention needs at least one key (LK = 0)")
    if max(n * abs(t.stride(2)) + D for n, t in ((L, q), (LK, k), (LK, v), (L, o))) >= 2**31:  # 32-bit row offsets
        raise ValueError(f"a head's rows must span < 2^31 elements, got L = {L} with strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}")
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    unit = 8 if all(s % 8 == 0 for s in strides) else 1  # see the module docstring
    scale = D**-0.5 if scale is None else scale
    kernel, extra = _flash_pointer_kernel, {}
    if loads != "pointer":
        if LK != L or key_mask is not None:
            raise ValueError(f"loads={loads!r} takes self-attention without a mask; cross-attention (L = {L}, LK = "
                             f"{LK}) and key masks take loads='pointer'")
        if unit != 8 or any(t.data_ptr() % 16 for t in (q, k, v, o)):
            raise ValueError(f"loads={loads!r} needs 16-byte aligned q, k, v and strides of multiples of 8 elements; "
                             f"got strides {q.stride()}, {k.stride()}, {v.stride()}")
        if q.is_cuda:
            triton.set_allocator(_descriptor_scratch)  # descriptors made on the device live in global scratch
        kernel, extra = _flash_tma_kernel, {}
    grid = (triton.cdiv(L, block_m) * N * H,)
    qk_scale, strides = scale * 1.4426950408889634, [s // unit for s in strides]
    if delayed is not None and (loads != "pointer" or out_layout != "nlhd"):
        raise ValueError("an fp8 output (delayed) is the (N, L, H, D) input of a projection: loads='pointer', "
                         "out_layout='nlhd'")
    if loads == "pointer":  # with the keys' count and the key mask (q stands in for none)
        mask = q if key_mask is None else key_mask.view(torch.uint8)
        mask_strides = [0, 0] if key_mask is None else list(key_mask.stride())
        args = [q, k, v, o, mask, L, LK, qk_scale, *strides, *mask_strides]
        extra = {"HAS_MASK": key_mask is not None}
        fp8_args = _delayed_args(delayed, out, o, extra)
        args += fp8_args
    else:
        args = [q, k, v, o, L, qk_scale, *strides]
    kernel[grid](
        *args, H=H, D0=d0, D1=d1, D1P=max(d1p, 16), UNIT=unit, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **extra,
    )  # fmt: skip
    if delayed is not None and delayed.e4m3:
        q8, row_scales = fp8_args[:2]
        fp8.attach(out, q8, row_scales.view(-1, 1), written=not delayed.only)
    return out


def _delayed_args(delayed: fp8.DelayedScale | None, out: torch.Tensor, o: torch.Tensor, flags: dict) -> list:
    """The pointer kernel's fp8-output arguments (Out8, RowScale, Amax, read, write, margin, rows) and flags."""
    if delayed is None:
        return [o, o, o, 0, 0, 1.0, 0]  # stand-ins, never read
    flags.update(RECORD=True, E4M3=delayed.e4m3, OUT=not (delayed.e4m3 and delayed.only))
    if not delayed.e4m3:
        return [o, o, delayed.amax, 0, delayed.write, 1.0, 0]
    rows = out.numel() // (out.shape[-1] * out.shape[-2])  # tokens: rows of the (tokens, H·D) projection input
    q8 = torch.empty_like(out, dtype=fp8.E4M3)  # (N, L, H, D): the kernel writes it through o's (N, H, L, D) strides
    return [q8, torch.empty(rows, device=out.device, dtype=torch.float32), delayed.amax, delayed.read,
            delayed.write, fp8.DELAYED_MARGIN, rows]


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> bool:
    """Whether `flash_attention` should take these (N, H, L, D) q and (N, H, LK, D) k, v by default: CUDA, half
    precision (float32 would round through TF32), a head dim it splits, a unit last stride, a bool (N, LK) key mask
    or none, no autograd, not inside torch.compile (which traces SDPA instead)."""
    if triton is None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.ndim != 4:
        return False
    if k.ndim != 4 or k.shape != v.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:] or k.shape[2] < 1:
        return False
    if not q.dtype == k.dtype == v.dtype or torch.compiler.is_compiling():
        return False
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (q.shape[0], k.shape[2])):
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not no_grad_needed(q):
        return False
    try:
        head_split(q.shape[-1])
    except ValueError:
        return False
    return True


def cross_config(keys: int) -> tuple[int, int, int, int, str]:
    """The launch config for few keys (text tokens): 64 queries a program, key blocks of up to 64. The best of
    `bash bench/gpu_run.sh cross` on one H100 at Open-Sora 480p (2 x 16 heads x 23,850 queries, session 28): 30 keys
    0.147 ms with 64 x 32 (128 x 32, the guess before, 0.168; cuDNN 0.149), 120 keys 0.207 ms with 64 x 64 (0.219;
    cuDNN 0.169, which cannot write the e4m3 rows an fp8 projection reads)."""
    return (64, min(64, max(16, 1 << (keys - 1).bit_length())), 4, 2, "pointer")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa", key_mask: torch.Tensor | None = None,
    delayed: fp8.DelayedScale | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(D)) v of (N, H, L, D) q and (N, H, LK, D) k, v with an optional (N, LK) bool key
    keep-mask, returned (N, L, H, D) (what an output projection reads): `flash_attention` when impl is "triton"
    and it is `supported` here, else SDPA (KernelOptions.spatial_attention, .cross_attention). With `delayed`
    (an fp8 output projection, `pab.kernels.fp8.fp8_output`) `flash_attention` wherever it is supported, since
    only it writes e4m3; elsewhere SDPA and the same arithmetic in PyTorch."""
    if (impl == "triton" or delayed is not None) and supported(q, k, v, key_mask):
        config = CONFIG if k.shape == q.shape and key_mask is None else cross_config(k.shape[2])
        return flash_attention(q, k, v, key_mask=key_mask, config=config, out_layout="nlhd", delayed=delayed)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    return out if delayed is None else fp8.delayed_reference(out, delayed, width=q.shape[1] * q.shape[3])


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


if triton is not None:
    from pab.kernels.fp8 import delayed_scales, record_amax, to_e4m3  # jit functions the kernels call: globals here

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:  # float32 inputs: no tf32 rounding (the interpreter tests)
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _softmax_step(
        q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, key_ok, qk_scale,
        D1: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, SAFE: tl.constexpr = False,
    ):  # fmt: skip
        """One online-softmax step over a block of keys (k0, k1, v0, v1 already loaded; MASKED: some keys of the
        block are out, those where key_ok is False). The tail tiles' channels past D1 are zero in q1 (so k1's do not
        count) and dropped from acc1. SAFE: a block may hold no key a row keeps while the row's maximum is still
        -inf (a key mask), so the maximum subtracted is 0 there instead of -inf (exp2(-inf - -inf) is NaN)."""
        qk = _dot(q0, tl.trans(k0), tl.zeros((q0.shape[0], k0.shape[0]), tl.float32), IEEE)
        if D1 > 0:
            qk = _dot(q1, tl.trans(k1), qk, IEEE)
        if MASKED:
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        # scores in units of log2: s * scale * log2(e); without a key mask every row has a key < L in the first
        # block, so m_new is finite from there on
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        if SAFE:
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q0.dtype)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
        if D1 > 0:
            acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE)
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _pointer_step(
        q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, mask_base, skl, svl, smk, start_n, LK, qk_scale,
        D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr, BLOCK_N: tl.constexpr,
        PARTIAL: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Load keys [start_n, start_n + BLOCK_N) of k and v through pointers (PARTIAL: the block runs past the LK
        keys), then `_softmax_step` (MASKED: PARTIAL, or a key keep-mask at mask_base: HAS_MASK)."""
        keys = start_n + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)[None, :]
        c1 = D0 + tl.arange(0, D1P)[None, :]
        tail_ok = tl.arange(0, D1P)[None, :] < D1
        k_rows = k_base + (keys * skl * UNIT)[:, None]
        v_rows = v_base + (keys * svl * UNIT)[:, None]
        k1 = tl.zeros((BLOCK_N, D1P), k_base.dtype.element_ty)  # unused without a tail
        v1 = tl.zeros((BLOCK_N, D1P), v_base.dtype.element_ty)
        key_ok = keys < LK
        if PARTIAL:
            k0 = tl.load(k_rows + c0, mask=key_ok[:, None], other=0.0)
            v0 = tl.load(v_rows + c0, mask=key_ok[:, None], other=0.0)
            if D1 > 0:
                k1 = tl.load(k_rows + c1, mask=key_ok[:, None] & tail_ok, other=0.0)
                v1 = tl.load(v_rows + c1, mask=key_ok[:, None] & tail_ok, other=0.0)
        else:
            k0 = tl.load(k_rows + c0)
            v0 = tl.load(v_rows + c0)
            if D1 > 0:
                k1 = tl.load(k_rows + c1, mask=tail_ok, other=0.0)
                v1 = tl.load(v_rows + c1, mask=tail_ok, other=0.0)
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_base + keys * smk, mask=key_ok, other=0) != 0)
        return _softmax_step(q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, key_ok, qk_scale, D1, MASKED, IEEE,
                             HAS_MASK)  # fmt: skip

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
        key_ok = start_n + tl.arange(0, BLOCK_N) < L
        return _softmax_step(q0, q1, k0, k1, v0, v1, acc0, acc1, m_i, l_i, key_ok, qk_scale, D1, MASKED, IEEE)

    @triton.jit
    def _program(L, H: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program pid: query block pid % cdiv(L, BLOCK_M) of (sequence, head) pid // cdiv(L, BLOCK_M), so the
        programs that share a head's k and v run together (L2). -> (n, h, first query row)."""
        pid = tl.program_id(0)
        m_blocks = tl.cdiv(L, BLOCK_M)
        nh = pid // m_blocks
        return (nh // H).to(tl.int64), (nh % H).to(tl.int64), (pid - nh * m_blocks) * BLOCK_M

    @triton.jit
    def _flash_pointer_kernel(
        Q, K, V, Out, Mask, L, LK, qk_scale,
        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol, smn, smk,
        Out8, RowScale, Amax, amax_read, amax_write, margin, rows_total,
        H: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
        OUT: tl.constexpr = True, RECORD: tl.constexpr = False, E4M3: tl.constexpr = False,
    ):  # fmt: skip
        """Pointer loads (cp.async when pipelined). L queries against LK keys, a key keep-mask (N, LK) at Mask when
        HAS_MASK. Strides of q, k, v and the output are in units of UNIT elements, the mask's in elements.
        For an fp8 output projection (`pab.kernels.fp8.DelayedScale`): RECORD takes the output's amax into slot
        amax_write of Amax; E4M3 writes the output in e4m3 to Out8 (Out's strides) scaled by slot amax_read, and
        the first rows_total entries of RowScale (one a row, every one the same); OUT writes Out itself."""
        n, h, start_m = _program(L, H, BLOCK_M)
        q_base = Q + (n * sqn + h * sqh) * UNIT
        k_base = K + (n * skn + h * skh) * UNIT
        v_base = V + (n * svn + h * svh) * UNIT
        mask_base = Mask + n * smn

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
        full = (LK // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, full, BLOCK_N):
            acc0, acc1, m_i, l_i = _pointer_step(
                q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, mask_base, skl, svl, smk, start_n, LK, qk_scale,
                D0, D1, D1P, UNIT, BLOCK_N, False, HAS_MASK, HAS_MASK, IEEE,
            )  # fmt: skip
        if full < LK:
            acc0, acc1, m_i, l_i = _pointer_step(
                q0, q1, acc0, acc1, m_i, l_i, k_base, v_base, mask_base, skl, svl, smk, full, LK, qk_scale,
                D0, D1, D1P, UNIT, BLOCK_N, True, True, HAS_MASK, IEEE,
            )  # fmt: skip

        inv = 1.0 / l_i[:, None]
        # rounded to the output's dtype first: the e4m3 rows and amax are those of the values written (or that would
        # be), as `pab.kernels.fp8.delayed_reference` computes them from the output
        o0 = (acc0 * inv).to(Out.dtype.element_ty).to(tl.float32)
        o1 = (acc1 * inv).to(Out.dtype.element_ty).to(tl.float32)
        o_off = (n * son + h * soh) * UNIT + (rows * sol * UNIT)[:, None]
        if OUT:
            tl.store(Out + o_off + c0, o0.to(Out.dtype.element_ty), mask=row_ok)
            if D1 > 0:
                tl.store(Out + o_off + c1, o1.to(Out.dtype.element_ty), mask=row_ok & tail_ok)
        if RECORD:  # padded query rows hold the mean of v: not part of the output
            top = tl.max(tl.max(tl.where(row_ok, tl.abs(o0), 0.0), 1), 0)
            if D1 > 0:
                top = tl.maximum(top, tl.max(tl.max(tl.where(row_ok & tail_ok, tl.abs(o1), 0.0), 1), 0))
            record_amax(Amax, amax_read, amax_write, top, E4M3)
        if E4M3:
            r, row_scale = delayed_scales(Amax, amax_read, margin)
            tl.store(Out8 + o_off + c0, to_e4m3(o0, r), mask=row_ok)
            if D1 > 0:
                tl.store(Out8 + o_off + c1, to_e4m3(o1, r), mask=row_ok & tail_ok)
            scale_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # the grid has more programs than
            tl.store(RowScale + scale_rows, tl.zeros((BLOCK_M,), tl.float32) + row_scale,  # rows / BLOCK_M
                     mask=scale_rows < rows_total)

    @triton.jit
    def _flash_tma_kernel(
        Q, K, V, Out, L, qk_scale,
        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
        H: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1P: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Tensor-memory-accelerator loads and stores through descriptors made on the device, one per (tensor,
        channel part) over the program's (L, D) head: rows >= L and channels >= D read as zeros and are not
        written, so nothing is masked but the scores of keys >= L."""
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
