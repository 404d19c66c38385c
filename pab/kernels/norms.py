"""The memory-bound passes around a DiT block's GEMMs and attentions, one Triton kernel each.

A block of Open-Sora 1.2 or Latte-1 reads and writes its whole hidden state (B, T, S, C) several times
between the GEMMs: layer norm + adaLN modulate before the attention and the MLP, the gated residual after
them, and (Open-Sora) the per-head RMSNorm of q and k. At 480p that state is 110 MB in bf16, so each pass
should take ~70-150 us at the H100's ~3 TB/s. Measured on an H100 (bench/profile.py, session 2), they did
not: torch.compile's fused layer-norm kernels took ~230 us for 220 MB (a looped two-pass reduction over
C = 1,152), its q/k RMSNorm ~230 us (a 72-wide reduction written through a permute), and eager PyTorch
spent 110 ms of a 296 ms forward on these passes (broadcast addcmul at ~1.2 TB/s, F.rms_norm on permuted
views with a copy). Here each pass is one kernel that holds a row of C channels in registers; at 480p they
run at 2.3-3.0 TB/s (0.09-0.15 ms), and the eager forward went from 306 to 245 ms (bench/profile.py):

* `ln_modulate(x, shift, scale)`: LayerNorm(x) * (1 + scale) + shift, optionally written frame-major
  (B, S, T, C) for temporal attention; `add_ln_modulate` adds a residual first and writes the sum too, and
  `gated_ln_modulate` a gated one (a block's last pass and the next block's first, in one);
* `gated_residual(x, gate, a)`: x + gate * a, where `a` may come frame-major;
* `qk_rmsnorm(qkv, q_w, k_w)`: per-head RMSNorm of the q and k thirds of a fused (N, L, 3C) projection,
  written (2, N, L, H, D) so attention reads them as (N, H, L, D) views without a copy.

shift / scale / gate are the adaLN parameters (B, T', 1, C) with T' = 1 (one per sample) or T (per frame).
Everything is computed in float32 and rounded once to the input dtype. Each kernel is a torch custom op,
opaque to torch.compile. Half precision on CUDA only (`supported`): float32 and CPU keep the PyTorch path,
which is what the float32 fidelity tests check.
"""

from __future__ import annotations

import warnings

import torch

from pab.kernels import fp8 as fp8_kern
from pab.kernels import no_grad_needed, row_pieces

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

_BUILD_ERROR: Exception | None = None  # set once when a kernel cannot be built on this machine
# Set once when the gate + residual pass's e4m3 variant cannot be built here: the sum alone is written from then
# on, and the fp8 GEMM that wanted the rows runs as it would without them (pab.precision).
_ROWS_ERROR: Exception | None = None


def supported(x: torch.Tensor) -> bool:
    """Whether the kernels should take `x` by default: CUDA, half precision, contiguous, < 2^31 elements, and
    no failed build in this process."""
    return (
        triton is not None and _BUILD_ERROR is None and x.is_cuda and no_grad_needed(x)
        and x.dtype in (torch.bfloat16, torch.float16) and x.numel() < 2**31 and x.is_contiguous()
    )  # fmt: skip


_CHECKED = False  # the kernels were built and launched once in this process


def available(x: torch.Tensor) -> bool:
    """Whether a model may use the kernels for `x` (one whose KernelOptions.norms is off never asks):
    `supported`, and (outside torch.compile, once per process) a tiny launch of each kernel worked. A failed
    build (e.g. no C compiler for Triton's launcher) warns once and leaves the models on their PyTorch path;
    inside torch.compile it raises."""
    global _CHECKED
    if not supported(x):
        return False
    if _CHECKED or torch.compiler.is_compiling():
        return True
    try:
        t = torch.zeros(1, 1, 1, 16, device=x.device, dtype=x.dtype)
        p = torch.zeros(1, 1, 16, device=x.device, dtype=x.dtype)
        add_ln_modulate(t, t, p, p, 1e-6)
        gated_ln_modulate(t, p, t, p, p, 1e-6, frame_major=True, a_frame_major=True)
        ln_modulate(t, p, p, 1e-6, frame_major=True)
        gated_residual(t, p, t)
        qk_rmsnorm(torch.zeros(1, 1, 48, device=x.device, dtype=x.dtype), 1, p[0, 0], p[0, 0], 1e-6)
        _CHECKED = True
    except (RuntimeError, ImportError, OSError) as e:
        disable(e)
    return _BUILD_ERROR is None


def disable(e: Exception) -> None:
    """Stop using the kernels in this process (warned once): a model's PyTorch path takes over."""
    global _BUILD_ERROR
    if _BUILD_ERROR is None:
        warnings.warn(f"Triton norm kernels unavailable ({type(e).__name__}: {e}); using PyTorch", stacklevel=3)
    _BUILD_ERROR = e


def _mod_strides(p: torch.Tensor, B: int, T: int, C: int, name: str) -> tuple[int, int]:
    """(batch, frame) element strides of an adaLN parameter (B, T' , 1, C) or (B, T', C), T' in {1, T}."""
    if p.shape[0] != B or p.shape[-1] != C or p.stride(-1) != 1 or p.shape[1] not in (1, T):
        raise ValueError(f"{name} must be (B={B}, 1 or T={T}, [1,] C={C}) with unit channel stride; "
                         f"got {tuple(p.shape)} with strides {p.stride()}")
    return p.stride(0), (p.stride(1) if p.shape[1] == T and T > 1 else 0)


def _check_hidden(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 4 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (B, T, S, C) tensor; got {tuple(x.shape)}, "
                         f"strides {x.stride()}")


def ln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, frame_major: bool = False,
    fp8: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """LayerNorm(x) * (1 + scale) + shift for x (B, T, S, C) -> (B, T, S, C), or (B, S, T, C) with `frame_major`.

    The LayerNorm has no affine parameters (the adaLN blocks' norm1 / norm2). With fp8="also" the same pass also
    writes the output's e4m3 rows and scales, attached to it for an fp8 GEMM that reads it next
    (`pab.kernels.fp8.companion`), so that GEMM needs no quantisation pass of its own; with fp8="only" it writes
    those alone and the returned tensor holds no values (for a GEMM that is its only reader: `fp8.fp8_input`).
    """
    if torch.compiler.is_compiling():
        return torch.ops.pab.ln_modulate(x, shift, scale, eps, None, frame_major)[1]
    return _ln_modulate(x, shift, scale, eps, None, frame_major, fp8=fp8)[1]


def add_ln_modulate(
    x: torch.Tensor, residual: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    fp8: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x + residual, `ln_modulate` of it): a residual add and the next norm in one pass (the sum is always
    written; `fp8` is the norm's, as in `ln_modulate`)."""
    if torch.compiler.is_compiling():
        return torch.ops.pab.ln_modulate(x, shift, scale, eps, residual, False)
    return _ln_modulate(x, shift, scale, eps, residual, False, fp8=fp8)


def gated_ln_modulate(
    x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    frame_major: bool = False, fp8: str | None = None, a_frame_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x + gate * a, `ln_modulate` of it) for x (B, T, S, C): `gated_residual` and the norm after it in one pass,
    which reads the sum once instead of writing it and reading it back (a block's residual and the norm after it,
    in the same block or the next). `a` holds (B, T, S, C) values, laid out (B, S, T, C) with `a_frame_major` (a
    temporal attention's or MLP's output); `gate` is an adaLN parameter like `shift`; `frame_major` and `fp8` are
    the norm's."""
    B, T, S, C = x.shape
    a = a.reshape(B, S, T, C) if a_frame_major else a.reshape(x.shape)
    if torch.compiler.is_compiling():
        return torch.ops.pab.ln_modulate(x, shift, scale, eps, a, frame_major, gate, a_frame_major)
    return _ln_modulate(x, shift, scale, eps, a, frame_major, fp8=fp8, gate=gate, res_frame_major=a_frame_major)


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, frame_major: bool = False, fp8: str | None = None
) -> torch.Tensor:
    """x + gate * a for x (B, T, S, C); `a` holds the same values as (B, S, T, C) when `frame_major`.

    With fp8="also" the same pass writes the sum's e4m3 rows and scales too, attached to it as `ln_modulate`
    does, for an fp8 GEMM that reads the residual stream next (Open-Sora's cross-attention q). The
    sum is the residual stream, so it is always written: "only" is refused."""
    if fp8 is not None and fp8 != "also":
        raise ValueError(f"fp8={fp8!r}; the gated residual's sum is always written: None or 'also'")
    if torch.compiler.is_compiling():
        return torch.ops.pab.gated_residual(x, gate, a, frame_major)
    return _gated_residual(x, gate, a, frame_major, fp8=fp8)


def qk_rmsnorm(qkv: torch.Tensor, num_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
               eps: float) -> torch.Tensor:  # fmt: skip
    """Per-head RMSNorm of q and k in a fused (N, L, 3C) projection -> (2, N, L, H, D) (q, then k)."""
    if torch.compiler.is_compiling():
        return torch.ops.pab.qk_rmsnorm(qkv, q_weight, k_weight, num_heads, eps)
    return _qk_rmsnorm(qkv, q_weight, k_weight, num_heads, eps)


# Eager calls go straight to the launchers below: the custom-op dispatch (used under torch.compile, where
# the ops must be opaque) costs tens of microseconds a call on the CPU, and an eager DiT step is close to
# being bound by the CPU's launch rate.

# The row's first tile (`row_pieces`) -> (rows per program, num_warps) of the layer-norm kernel, overriding the
# default below. Fewer warps per row means fewer block-wide reductions to wait on and more rows in flight per SM.
# Measured on an H100 at 47,700 rows of C = 1,152 (python -m bench.rowpass, session 23), 1/2/4/8 warps, ms:
#   plain                     one 2,048 tile 0.126/0.120/0.131/0.158   1,024 + 128 0.116/0.128/0.183/0.194
#   e4m3 rows only            one 2,048 tile 0.145/0.160/0.168/0.220   1,024 + 128 0.134/0.158/0.206/0.245
#   + residual, e4m3 only     one 2,048 tile 0.185/0.192/0.197/0.238   1,024 + 128 0.184/0.198/0.233/0.289
LN_CONFIG: dict[int, tuple[int, int]] = {}


def _ln_config(block_c: int) -> tuple[int, int]:
    return LN_CONFIG.get(block_c, (1, 1 if block_c <= 1024 else 2 if block_c <= 2048 else 4))


def _ln_modulate(
    x, shift, scale, eps, residual, frame_major, config=None, fp8=None, pieces=None, gate=None, res_frame_major=False
):
    """`config`: (rows per program, warps); `pieces`: the row's two tiles (default `row_pieces(C)`); `gate`: the
    residual's, x + gate * residual (it needs a residual); `res_frame_major`: the residual is laid out (B, S, T, C)."""
    if fp8 is not None and fp8 not in fp8_kern.FP8_INPUTS:
        raise ValueError(f"fp8={fp8!r}; choose None or one of {fp8_kern.FP8_INPUTS}")
    _check_hidden(x)
    B, T, S, C = x.shape
    r_b, r_t, r_s = (S * T * C, C, T * C) if res_frame_major else (T * S * C, S * C, C)
    if residual is not None:
        _check_hidden(residual, "residual")
        want = (B, S, T, C) if res_frame_major else x.shape
        if residual.shape != want:
            raise ValueError(f"residual {tuple(residual.shape)} must be {tuple(want)} for x {tuple(x.shape)}")
    if gate is not None and residual is None:
        raise ValueError("a gate scales the residual: pass the residual too")
    sh_b, sh_t = _mod_strides(shift, B, T, C, "shift")
    sc_b, sc_t = _mod_strides(scale, B, T, C, "scale")
    g_b, g_t = _mod_strides(gate, B, T, C, "gate") if gate is not None else (0, 0)
    out = x.new_empty(B, S, T, C) if frame_major else torch.empty_like(x)
    o_b, o_t, o_s = (S * T * C, C, T * C) if frame_major else (T * S * C, S * C, C)
    xo = torch.empty_like(x) if residual is not None else x.new_empty(0)
    first, rest = pieces or row_pieces(C)
    rows, warps = config or _ln_config(first)
    n = B * T * S
    q = torch.empty(out.shape, device=x.device, dtype=fp8_kern.E4M3) if fp8 is not None else out
    q_scale = torch.empty((n, 1), device=x.device, dtype=torch.float32) if fp8 is not None else out
    _ln_modulate_kernel[(triton.cdiv(n, rows),)](
        x, residual if residual is not None else x, xo, out, shift, scale, gate if gate is not None else shift, q,
        q_scale, n, T, S, C, sh_b, sh_t, sc_b, sc_t, g_b, g_t, r_b, r_t, r_s, o_b, o_t, o_s, eps,
        HAS_RES=residual is not None, HAS_GATE=gate is not None, FP8=fp8 is not None, OUT=fp8 != "only", ROWS=rows,
        BLOCK_C=first, REST=rest, num_warps=warps,
    )  # fmt: skip
    if fp8 is not None:
        fp8_kern.attach(out, q, q_scale, written=fp8 != "only")
    # A custom op may not return an input: without a residual the first output is an empty placeholder.
    return xo, out


def _gated_residual(x, gate, a, frame_major, pieces=None, warps=None, fp8=None):
    _check_hidden(x)
    B, T, S, C = x.shape
    g_b, g_t = _mod_strides(gate, B, T, C, "gate")
    a = a.reshape(B, S, T, C) if frame_major else a.reshape(B, T, S, C)
    if not a.is_contiguous():
        a = a.contiguous()
    a_b, a_t, a_s = (S * T * C, C, T * C) if frame_major else (T * S * C, S * C, C)
    out = torch.empty_like(x)
    first, rest = pieces or row_pieces(C)
    # H100, 47,700 rows of 1,152 (bench.rowpass): one 2,048 tile 0.154/0.153/0.154/0.151 ms at 1/2/4/8 warps,
    # 1,024 + 128 0.151/0.155/0.136/0.140
    args = (T, S, C, g_b, g_t, a_b, a_t, a_s)
    config = dict(BLOCK_C=first, REST=rest, num_warps=warps or (4 if first <= 1024 else 8))
    if fp8 and _ROWS_ERROR is None:
        q = torch.empty(x.shape, device=x.device, dtype=fp8_kern.E4M3)
        q_scale = torch.empty((B * T * S, 1), device=x.device, dtype=torch.float32)
        try:
            _launch_gated((B * T * S,), x, a, out, gate, q, q_scale, *args, FP8=True, **config)
            fp8_kern.attach(out, q, q_scale)
            return out
        except (RuntimeError, OSError, triton.errors.TritonError) as e:
            _no_rows(e)
    _launch_gated((B * T * S,), x, a, out, gate, out, out, *args, FP8=False, **config)
    return out


def _launch_gated(grid, *args, **kwargs) -> None:
    _gated_residual_kernel[grid](*args, **kwargs)


def _no_rows(e: Exception) -> None:
    """The e4m3 variant of the gate + residual pass failed to build: warn once, write the sum alone from now on."""
    global _ROWS_ERROR
    warnings.warn(f"the gate + residual kernel cannot write e4m3 rows here ({type(e).__name__}: {e}); the "
                  "cross-attention q runs in bf16", stacklevel=3)  # fmt: skip
    _ROWS_ERROR = e


def _qk_rmsnorm(qkv, q_weight, k_weight, num_heads, eps):
    if qkv.ndim != 3 or qkv.stride(-1) != 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be (N, L, 3 * heads * head_dim) with unit last stride; got "
                         f"{tuple(qkv.shape)}, strides {qkv.stride()}, heads {num_heads}")
    N, L, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q/k norm weights must be ({D},); got {tuple(q_weight.shape)}, {tuple(k_weight.shape)}")
    if qkv.stride(0) != L * qkv.stride(1):
        qkv = qkv.contiguous()
    out = qkv.new_empty(2, N, L, num_heads, D)
    _qk_rmsnorm_kernel[(N * L, 2)](
        qkv, out, q_weight, k_weight, qkv.stride(1), N * L * C, C, eps,
        H=num_heads, D=D, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )  # fmt: skip
    return out


if triton is not None:
    from pab.kernels.fp8 import row_scales, to_e4m3  # jit functions the kernels here call: globals of this module

    @triton.jit
    def _ln_load(
        x_ptr, res_ptr, xo_ptr, gate_ptr, row, res_row, g, cols, m, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr
    ):  # fmt: skip
        """One tile of the rows in float32 (+ the residual's at `res_row`, times its gate, the sum stored and read
        back rounded); 0 off `m`."""
        x = tl.load(x_ptr + row + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + res_row + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_GATE:  # as the gate + residual pass computes it: the same bits from half-precision inputs
                x = x + tl.load(gate_ptr + g + cols, mask=m, other=0.0).to(tl.float32) * r
            else:
                x = x + r
            xr = x.to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + row + cols, xr, mask=m)
            x = xr.to(tl.float32)  # normalise the residual stream as stored, as the unfused code does
        return x

    @triton.jit
    def _ln_out(d, rstd, shift, scale, out_ptr, o, cols, m, OUT: tl.constexpr):
        """One tile of the modulated output, stored (OUT) and returned as stored, in float32 (0 off `m`)."""
        yo = (d * rstd * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty)
        if OUT:
            tl.store(out_ptr + o + cols, yo, mask=m)
        return tl.where(m, yo.to(tl.float32), 0.0)

    @triton.jit
    def _ln_modulate_kernel(
        x_ptr, res_ptr, xo_ptr, out_ptr, shift_ptr, scale_ptr, gate_ptr, q_ptr, qs_ptr,
        n_rows, T, S, C, sh_b, sh_t, sc_b, sc_t, g_b, g_t, r_b, r_t, r_s, o_b, o_t, o_s, eps,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, FP8: tl.constexpr, OUT: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_C: tl.constexpr, REST: tl.constexpr = 0,
    ):  # fmt: skip
        # ROWS rows of the contiguous (B, T, S, C) input; row = (b * T + t) * S + s. Each row in two tiles of
        # channels, BLOCK_C then REST (pab.kernels.row_pieces), so that no lanes idle at C = 1,152.
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        s = row % S
        t = (row // S) % T
        b = row // (S * T)
        sh = b * sh_b + t * sh_t
        sc = b * sc_b + t * sc_t
        g = b * g_b + t * g_t
        res_row = b * r_b + t * r_t + s * r_s  # (ROWS, 1): where the row starts in the residual
        o = b * o_b + t * o_t + s * o_s  # (ROWS, 1): where the row starts in the output, a multiple of C
        cols = tl.arange(0, BLOCK_C)[None, :]
        m = (cols < C) & (row < n_rows)
        # the adaLN parameters first: their loads overlap the row's instead of waiting for the reductions
        shift = tl.load(shift_ptr + sh + cols, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + sc + cols, mask=m, other=0.0).to(tl.float32)
        x = _ln_load(x_ptr, res_ptr, xo_ptr, gate_ptr, row * C, res_row, g, cols, m, HAS_RES, HAS_GATE)
        total = tl.sum(x, axis=1)
        if REST > 0:
            cols2 = BLOCK_C + tl.arange(0, REST)[None, :]
            m2 = (cols2 < C) & (row < n_rows)
            shift2 = tl.load(shift_ptr + sh + cols2, mask=m2, other=0.0).to(tl.float32)
            scale2 = tl.load(scale_ptr + sc + cols2, mask=m2, other=0.0).to(tl.float32)
            x2 = _ln_load(x_ptr, res_ptr, xo_ptr, gate_ptr, row * C, res_row, g, cols2, m2, HAS_RES, HAS_GATE)
            total += tl.sum(x2, axis=1)
        mean = (total / C)[:, None]
        d = tl.where(m, x - mean, 0.0)
        var = tl.sum(d * d, axis=1)
        if REST > 0:
            d2 = tl.where(m2, x2 - mean, 0.0)
            var += tl.sum(d2 * d2, axis=1)
        rstd = (1.0 / tl.sqrt(var / C + eps))[:, None]
        y = _ln_out(d, rstd, shift, scale, out_ptr, o, cols, m, OUT)
        y2 = y  # the second tile's values when REST > 0; unread otherwise
        if REST > 0:
            y2 = _ln_out(d2, rstd, shift2, scale2, out_ptr, o, cols2, m2, OUT)
        if FP8:  # the stored values' e4m3 rows, as pab.kernels.fp8.quantize_rows would make them
            r, q_scale = row_scales(y, y2, REST)  # (ROWS,) each
            tl.store(q_ptr + o + cols, to_e4m3(y, r[:, None]), mask=m)
            if REST > 0:
                tl.store(q_ptr + o + cols2, to_e4m3(y2, r[:, None]), mask=m2)
            tl.store(qs_ptr + o // C, q_scale[:, None], mask=row < n_rows)

    @triton.jit
    def _gated_tile(x_ptr, a_ptr, out_ptr, gate_ptr, row, g, a_row, cols, m):
        """One tile of x + gate * a, stored, and returned as stored in float32 (0 off `m`)."""
        gate = tl.load(gate_ptr + g + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row + cols, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + a_row + cols, mask=m, other=0.0).to(tl.float32)
        y = (x + gate * a).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row + cols, y, mask=m)
        return tl.where(m, y.to(tl.float32), 0.0)

    @triton.jit
    def _gated_residual_kernel(
        x_ptr, a_ptr, out_ptr, gate_ptr, q_ptr, qs_ptr, T, S, C, g_b, g_t, a_b, a_t, a_s, FP8: tl.constexpr,
        BLOCK_C: tl.constexpr, REST: tl.constexpr = 0,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)  # one row in two tiles of channels, BLOCK_C then REST (row_pieces)
        s = row % S
        t = (row // S) % T
        b = row // (S * T)
        g, a_row = b * g_b + t * g_t, b * a_b + t * a_t + s * a_s
        cols = tl.arange(0, BLOCK_C)
        y = _gated_tile(x_ptr, a_ptr, out_ptr, gate_ptr, row * C, g, a_row, cols, cols < C)
        y2 = y  # the second tile's values when REST > 0; unread otherwise
        if REST > 0:
            cols2 = BLOCK_C + tl.arange(0, REST)
            y2 = _gated_tile(x_ptr, a_ptr, out_ptr, gate_ptr, row * C, g, a_row, cols2, cols2 < C)
        if FP8:  # the stored sum's e4m3 row, as pab.kernels.fp8.quantize_rows would make it
            r, q_scale = row_scales(y, y2, REST)
            tl.store(q_ptr + row * C + cols, to_e4m3(y, r), mask=cols < C)
            if REST > 0:
                tl.store(q_ptr + row * C + cols2, to_e4m3(y2, r), mask=cols2 < C)
            tl.store(qs_ptr + row, q_scale)

    @triton.jit
    def _qk_rmsnorm_kernel(
        qkv_ptr, out_ptr, qw_ptr, kw_ptr, row_stride, part_stride, C, eps,
        H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)  # one token
        part = tl.program_id(1)  # 0: q, 1: k
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < H) & (d < D)
        w_ptr = qw_ptr if part == 0 else kw_ptr
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        x = tl.load(qkv_ptr + row * row_stride + part * C + h * D + d, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_H,)
        y = x * rstd[:, None] * w
        tl.store(out_ptr + part * part_stride + row * C + h * D + d, y.to(out_ptr.dtype.element_ty), mask=m)

    @torch.library.custom_op("pab::ln_modulate", mutates_args=())
    def _ln_modulate_op(
        x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None,
        frame_major: bool, gate: torch.Tensor | None = None, res_frame_major: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return _ln_modulate(x, shift, scale, eps, residual, frame_major, gate=gate, res_frame_major=res_frame_major)

    @_ln_modulate_op.register_fake
    def _(x, shift, scale, eps, residual, frame_major, gate=None, res_frame_major=False):
        B, T, S, C = x.shape
        out = x.new_empty(B, S, T, C) if frame_major else torch.empty_like(x)
        return (torch.empty_like(x) if residual is not None else x.new_empty(0)), out

    @torch.library.custom_op("pab::gated_residual", mutates_args=())
    def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, frame_major: bool) -> torch.Tensor:
        return _gated_residual(x, gate, a, frame_major)

    @_gated_residual_op.register_fake
    def _(x, gate, a, frame_major):
        return torch.empty_like(x)

    @torch.library.custom_op("pab::qk_rmsnorm", mutates_args=())
    def _qk_rmsnorm_op(
        qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, eps: float
    ) -> torch.Tensor:
        return _qk_rmsnorm(qkv, q_weight, k_weight, num_heads, eps)

    @_qk_rmsnorm_op.register_fake
    def _(qkv, q_weight, k_weight, num_heads, eps):
        N, L, C3 = qkv.shape
        return qkv.new_empty(2, N, L, num_heads, C3 // 3 // num_heads)
