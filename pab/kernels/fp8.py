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

import torch

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


def quantize_rows_reference(x: torch.Tensor, gelu: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and float32 scales (M, 1), in PyTorch (any device)."""
    xf = x.float()
    if gelu == "tanh":
        xf = _gelu_tanh(xf)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: Triton, CUDA, a 2-D tensor with unit column stride, 16-bit float."""
    return (
        triton is not None and x.is_cuda and x.ndim == 2 and x.stride(-1) == 1
        and x.dtype in (torch.bfloat16, torch.float16)
    )  # fmt: skip


def quantize_rows(x: torch.Tensor, gelu: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and float32 scales (M, 1): one Triton pass where `supported`, else PyTorch."""
    if gelu not in GELUS:
        raise ValueError(f"gelu={gelu!r}; the fused quantisation applies one of {', '.join(GELUS)}")
    if not supported(x):
        return quantize_rows_reference(x, gelu)
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=E4M3)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(K)
    _quantize_rows_kernel[(M,)](
        x, q, scale, K, x.stride(0), GELU=gelu == "tanh", BLOCK=block, num_warps=4 if block <= 2048 else 8
    )
    return q, scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=keep, other=0.0).to(tl.float32)
        if GELU:
            # 0.5 * (1 + tanh(u)) == sigmoid(2u): the tanh GELU without a tanh instruction.
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = x * tl.sigmoid(2.0 * u)
        amax = tl.max(tl.where(keep, tl.abs(x), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=keep)
        tl.store(s_ptr + row, scale)


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


__all__ = ["E4M3", "E4M3_MAX", "GELUS", "fp8_capable", "fp8_matmul", "quantize_rows", "quantize_rows_reference",
           "quantize_weight", "supported"]  # fmt: skip
