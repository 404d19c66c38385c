"""Row-wise fp8 (e4m3) quantisation of an activation in one pass, optionally with the GELU before it.

An fp8 GEMM (`torch._scaled_mm` with row-wise scales) needs its input as e4m3 plus one float32 scale per row
(token). Done with PyTorch ops that is an amax pass, a divide and a cast, each reading or writing the whole
activation: at 480p that cost 0.4-1.6 ms a GEMM on an H200, more than fp8 saves. Here one program holds a
row of K channels in registers, takes its amax and writes e4m3 and the scale: one read of the bf16 row, one
write of half its bytes. With `gelu` the same pass applies fc1's GELU first, so an fp8 MLP reads fc1's
output once and writes fc2's input once, where the bf16 MLP wrote the GELU in fc1's epilogue.

Everything is computed in float32; scale = amax / 448 (e4m3's largest finite value), so the row's largest
entry maps to 448 and x ~= q * scale. `quantize_rows_reference` is the same arithmetic in PyTorch: the CPU
path, and what the kernel is tested against.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from pab.hooks.registry import passes_input_on
from pab.kernels import row_pieces

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GELUS = ("none", "tanh")  # what `gelu` may ask for: the models' MLPs use the tanh GELU
_TINY = 1e-12  # an all-zero row keeps a finite scale (its e4m3 values are zeros either way)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def quantize_rows_reference(
    x: torch.Tensor, gelu: str = "none", bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) [+ bias (K,)] [-> GELU] -> e4m3 (M, K) and float32 scales (M, 1), in PyTorch (any device)."""
    xf = x.float() if bias is None else x.float() + bias.float()
    if gelu == "tanh":
        xf = _gelu_tanh(xf)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    return _to_e4m3(xf, amax), amax / E4M3_MAX


def _to_e4m3(xf: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """float32 values over `top` (their rows' amax, or one for all) mapped to 448, clamped, rounded to e4m3. As
    x * (448 / top), not x / scale: the kernels multiply (a division per element costs them ~10 instructions)."""
    return (xf * (E4M3_MAX / top)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: Triton, CUDA, a 2-D tensor with unit column stride, 16-bit float."""
    return (
        triton is not None and x.is_cuda and x.ndim == 2 and x.stride(-1) == 1
        and x.dtype in (torch.bfloat16, torch.float16)
    )  # fmt: skip


# The row's first tile (`row_pieces`) -> num_warps of the kernel (one row per program), overriding `_warps`'
# default. Measured on an H100 at 47,700 rows (python -m bench.rowpass, session 23), 1/2/4/8 warps, ms:
#   1,152 wide                     one 2,048 tile 0.088/0.088/0.090/0.104   1,024 + 128 0.086/0.087/0.094/0.127
#   4,608 wide, bias + GELU        one 8,192 tile 0.573/0.355/0.335/0.341   4,096 + 512 0.281/0.263/0.253/0.267
# The one-tile GELU pass left 44% of its lanes computing a tanh on masked-off values: two tiles take it from 0.335
# to 0.253 ms (1.97 -> 2.61 TB/s of the bytes it must move).
QUANT_WARPS: dict[int, int] = {}


def _warps(block: int) -> int:
    return QUANT_WARPS.get(block, 1 if block <= 2048 else 4)


def quantize_rows(
    x: torch.Tensor, gelu: str = "none", bias: torch.Tensor | None = None, pieces: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) [+ bias (K,)] [-> GELU] -> e4m3 (M, K) and float32 scales (M, 1): one Triton pass where
    `supported`, else PyTorch. The bias is fc1's when the GEMM before ran without it (one pass fewer).
    `pieces`: the row's two tiles (default `row_pieces(K)`; (next power of two, 0) is one masked tile)."""
    if gelu not in GELUS:
        raise ValueError(f"gelu={gelu!r}; the fused quantisation applies one of {', '.join(GELUS)}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be ({x.shape[-1]},) for rows of {x.shape[-1]}; got {tuple(bias.shape)}")
    if not supported(x):
        return quantize_rows_reference(x, gelu, bias)
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=E4M3)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    first, rest = pieces or row_pieces(K)
    _quantize_rows_kernel[(M,)](
        x, bias if bias is not None else x, q, scale, K, x.stride(0), HAS_BIAS=bias is not None,
        GELU=gelu == "tanh", FAST_TANH=not _interpreting(), BLOCK=first, REST=rest, num_warps=_warps(first),
    )  # fmt: skip
    return q, scale


if triton is not None:

    @triton.jit
    def gelu_tanh(x, FAST_TANH: tl.constexpr):
        """The tanh GELU of float32 `x`, as the models' MLPs compute it."""
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        if FAST_TANH:
            # One MUFU instruction (relative error ~2^-11, far under e4m3's 2^-4); the sigmoid form below,
            # with its exp and precise division, made the quantise pass compute-bound (0.48 against 0.26 ms).
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32,
                                          is_pure=True, pack=1)  # fmt: skip
            g = 0.5 * x * (1.0 + t)
        else:  # Triton's interpreter runs no PTX: 0.5 * (1 + tanh(u)) == sigmoid(2u)
            g = x * tl.sigmoid(2.0 * u)
        return g

    @triton.jit
    def to_e4m3(x, r):
        """float32 `x` times `r` (448 / its row's amax), clamped to e4m3's finite range and rounded to e4m3."""
        return tl.minimum(tl.maximum(x * r, -448.0), 448.0).to(tl.float8e4nv)

    @triton.jit
    def row_scales(y, y2, REST: tl.constexpr):
        """(448 / amax, amax / 448) over the last axis of a row (or a block of rows) held in two float32 tiles,
        `y` then `y2` (read only when REST > 0): the multiplier `to_e4m3` takes and the scale stored beside the
        rows, as `quantize_rows_reference` computes them. Every kernel that writes e4m3 rows takes them here."""
        amax = tl.max(tl.abs(y), axis=-1)
        if REST > 0:
            amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=-1))
        amax = tl.maximum(amax, 1e-12)  # _TINY
        return 448.0 / amax, amax / 448.0

    @triton.jit
    def delayed_scales(amax_ptr, read, margin):
        """(448 / top, top / 448) with top = margin x slot `read` of a `DelayedScale`'s amax: the multiplier
        `to_e4m3` takes and the scale stored for every row (`quantize_delayed`)."""
        top = tl.maximum(tl.load(amax_ptr + read) * margin, 1e-12)  # _TINY
        return 448.0 / top, top / 448.0

    @triton.jit
    def record_amax(amax_ptr, read, write, block_amax, E4M3: tl.constexpr):
        """Slot `write` of a `DelayedScale`'s amax takes max(it, this block's largest |value|, slot `read` when a
        scale was read): one atomic a program."""
        if E4M3:
            block_amax = tl.maximum(block_amax, tl.load(amax_ptr + read))
        tl.atomic_max(amax_ptr + write, block_amax)

    @triton.jit
    def _activation(x_ptr, b_ptr, cols, keep, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FAST_TANH: tl.constexpr):
        """float32 values of one tile of a row (+ bias, GELU); 0 where not `keep`."""
        x = tl.load(x_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        if GELU:
            x = gelu_tanh(x, FAST_TANH)
        return tl.where(keep, x, 0.0)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, b_ptr, q_ptr, s_ptr, K, stride_x,
        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK: tl.constexpr,
        REST: tl.constexpr = 0,
    ):  # fmt: skip
        # one row in two tiles, BLOCK channels then REST (pab.kernels.row_pieces): no lanes idle at 1,152 or 4,608
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < K
        x = _activation(x_ptr + row * stride_x, b_ptr, cols, keep, HAS_BIAS, GELU, FAST_TANH)
        x2 = x  # the second tile's values when REST > 0; unread otherwise
        if REST > 0:
            cols2 = BLOCK + tl.arange(0, REST)
            keep2 = cols2 < K
            x2 = _activation(x_ptr + row * stride_x, b_ptr, cols2, keep2, HAS_BIAS, GELU, FAST_TANH)
        r, scale = row_scales(x, x2, REST)
        tl.store(q_ptr + row * K + cols, to_e4m3(x, r), mask=keep)
        if REST > 0:
            tl.store(q_ptr + row * K + cols2, to_e4m3(x2, r), mask=keep2)
        tl.store(s_ptr + row, scale)


# A producer that already wrote a tensor's e4m3 rows (the norm kernels, `ln_modulate(..., fp8="also")`) attaches
# them to it; the fp8 GEMM that reads the tensor next takes them instead of quantising it again. They are found
# through any contiguous full view of it (`_base`), and only while it is unchanged (its version counter). With
# fp8="only" the producer wrote the rows alone: the tensor is allocated, shaped and marked, but holds no values.
_COMPANION = "_pab_fp8_rows"
FP8_INPUTS = ("also", "only")  # what a producer writes beside (or instead of) its output: `fp8_input`


def attach(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, written: bool = True) -> None:
    """Record `q` (e4m3, laid out as `out`) and `scale` (one per row of `out`'s memory) as `out`'s rows;
    `written=False`: `out` itself was never written (only these rows hold its values)."""
    setattr(out, _COMPANION, (q, scale, out._version, written))


def _attached(x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """(the tensor `x` views, what `attach` recorded on it or None)."""
    base = x if x._base is None else x._base
    return base, getattr(base, _COMPANION, None)


def companion(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(M, K) e4m3 rows and (M, 1) scales of the 2-D `x`, if its producer attached them; else None."""
    base, rows = _attached(x)
    if rows is None:
        return None
    q, scale, version, _ = rows
    if (base._version != version or x.ndim != 2 or not x.is_contiguous() or x.data_ptr() != base.data_ptr()
            or x.numel() != base.numel() or x.shape[0] != scale.shape[0]):  # fmt: skip
        return None
    return q.view(x.shape), scale


def check_written(x: torch.Tensor) -> None:
    """Raise if `x` is (a view of) a tensor whose producer wrote only its e4m3 rows: its values were never written,
    so a reader that cannot take the rows (a copy, another layout, a bf16 fallback) would read garbage."""
    rows = _attached(x)[1]
    if rows is not None and not rows[3]:
        raise RuntimeError(
            f"a {tuple(x.shape)} tensor was written as e4m3 rows only (fp8_input 'only') and is read another way; "
            "a reader or hook that needs its values must set `reads_input` (pab.hooks.registry) or the producer "
            "must be asked with the module that reads it (pab.kernels.fp8.fp8_input). Work around it with "
            "Fp8Config(e4m3_only_inputs=False), and report it."
        )


def fp8_input(consumer: object, *carriers: object) -> str | None:
    """What the producer of `consumer`'s input (a norm kernel) writes this forward: None (the input alone), "also"
    (the input and its e4m3 rows) or "only" (the rows alone). A transform that runs `consumer` in fp8
    (pab.precision) gives it an `fp8_input_mode()` answering "also" or "only"; "only" stands where no hook on
    `consumer` or on the `carriers` (the modules the input passes through to reach it, e.g. the attention around a
    qkv linear) reads the input itself. The model vouches that their own forwards hand it only to `consumer`."""
    ask = getattr(consumer, "fp8_input_mode", None)
    mode = ask() if ask is not None else None
    if mode == "only" and not passes_input_on(*(m for m in (consumer, *carriers) if isinstance(m, torch.nn.Module))):
        return "also"
    return mode


# An attention's output feeds a square output projection. Row-wise scales would need every head of a token, which
# the attention kernels split over programs, so those outputs take one scale per tensor instead, delayed: the
# largest |value| of the same attention at this request's earlier steps (x `DELAYED_MARGIN`), which every program
# knows before it writes. e4m3 is a float format: a scale a few times too large costs no precision until values
# fall 2^15 below the largest (the subnormals), so one scale for all rows loses next to nothing against row-wise
# ones. The first call of a request has no history: it writes its output as it is and records its largest value.
DELAYED_MARGIN = 2.0  # headroom for an output that grows between calls; larger values saturate at 448


@dataclass(frozen=True)
class DelayedScale:
    """How one attention call writes its output for an fp8 output projection.

    amax: (2,) float32 on the output's device, owned by the projection's fp8 hook. A call reads slot `read` (the
    largest |output| at the request's earlier steps; -1 on its first step: nothing to read, write the output in
    its own dtype) and writes slot `write` = max(what it read, its own largest |output|), so the next call reads
    that slot while this one's readers never see a slot being written. only: write the e4m3 rows alone."""

    amax: torch.Tensor
    read: int
    write: int
    only: bool = False

    @property
    def e4m3(self) -> bool:
        return self.read >= 0


def delayed_reference(out: torch.Tensor, d: DelayedScale, width: int | None = None) -> torch.Tensor:
    """What the kernels do with an attention output `out` given `d`, in PyTorch (the path where no kernel runs, and
    the kernels' reference): record its amax in slot d.write and, after the first call, attach its e4m3 rows of
    `width` channels (default: its last dim) with one scale from slot d.read (`attach`). Returns `out`, made
    contiguous if it was not (the projection's reader finds the rows through contiguous views only)."""
    out = out.contiguous()
    width = width or out.shape[-1]
    amax = out.detach().float().abs().amax()
    if d.e4m3:
        amax = torch.maximum(amax, d.amax[d.read])
    d.amax[d.write] = amax
    if d.e4m3:
        q, scale = quantize_delayed(out.reshape(-1, width), d.amax[d.read])
        root = out if out._base is None or out._base.numel() != out.numel() else out._base
        attach(root, q.view(root.shape), scale)
    return out


def fp8_output(consumer: object) -> DelayedScale | None:
    """How an attention writes its output for `consumer`, its output projection, this call: None (in its own dtype
    alone), or with e4m3 rows (`DelayedScale`), which a transform running `consumer` in fp8 (pab.precision) asks
    for through `consumer.fp8_delayed_scale()`. The rows alone (`only`) where no hook on `consumer` reads its
    input; the model vouches that its forward hands the attention's output to `consumer` alone."""
    ask = getattr(consumer, "fp8_delayed_scale", None)
    d = ask() if ask is not None else None
    if d is not None and d.only and not passes_input_on(consumer):
        return dataclasses.replace(d, only=False)
    return d


def quantize_delayed(x: torch.Tensor, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and (M, 1) float32 scales, all rows scaled by one `hist` (a 0-d tensor) x margin."""
    top = (hist.float() * DELAYED_MARGIN).clamp_min(_TINY)
    return _to_e4m3(x.float(), top), (top / E4M3_MAX).expand(x.shape[0], 1).contiguous()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight (N, K) -> e4m3 (N, K) and float32 scales (1, N): one scale per output channel, as
    `torch._scaled_mm` takes them for its second operand (transposed)."""
    q, scale = quantize_rows_reference(w.detach())
    return q.contiguous(), scale.reshape(1, -1).contiguous()


def fp8_matmul(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype, fast_accum: bool = False,
) -> torch.Tensor:  # fmt: skip
    """(xq * xs) @ (wq * ws^T)^T + bias -> (M, N) in `out_dtype`, accumulated in float32.

    `torch._scaled_mm` on a GPU with fp8 tensor cores; elsewhere the same product in float32 (the operands are
    the same e4m3 values, so only the summation order differs): what the CPU tests and the small models'
    quality measurement run.
    """
    if xq.is_cuda:
        out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=out_dtype,
                               use_fast_accum=fast_accum)  # fmt: skip
        return out
    out = ((xq.float() * xs) @ wq.float().t()) * ws
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_capable(device: torch.device) -> tuple[bool, str]:
    """Whether fp8 GEMMs can run on `device` (CPU: emulated in float32), and if not why."""
    if device.type != "cuda":
        return True, ""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"fp8 GEMMs need fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                       f"{name} is {major}.{minor}. Ask for precision bf16.")  # fmt: skip
    return True, ""


__all__ = ["DELAYED_MARGIN", "E4M3", "E4M3_MAX", "FP8_INPUTS", "GELUS", "DelayedScale", "attach", "check_written",
           "companion", "delayed_reference", "fp8_capable", "fp8_input", "fp8_matmul", "fp8_output",
           "quantize_delayed", "quantize_rows", "quantize_rows_reference", "quantize_weight", "supported"]  # fmt: skip
