"""bias_residual and subpixel_interleave (pab/kernels/conv_epilogue.py) against PyTorch's ops in float64, in both
layouts.

Runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1, as ./run.sh test sets it).
"""

import pytest
import torch

from pab.kernels import conv_epilogue as ep
from support.kernels import DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@needs_triton
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("nbias", [0, 1, 2])
def test_adds_the_biases_and_the_residual_then_scales(fmt, nbias):
    x, r = (torch.randn(2, 12, 5, 7, device=DEVICE).contiguous(memory_format=fmt) for _ in range(2))
    biases = tuple(torch.randn(12, device=DEVICE) for _ in range(nbias))
    y = ep.bias_residual(x, r, biases, scale=0.5)
    expected = (r.double() + x.double() + sum(b.double()[:, None, None] for b in biases)) * 0.5
    assert y.stride() == x.stride() and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


@needs_triton
def test_half_precision_rounds_once():
    x, r = (torch.randn(1, 8, 33, device=DEVICE).half() for _ in range(2))
    b = torch.randn(8, device=DEVICE).half()
    y = ep.bias_residual(x, r, (b, None))
    assert torch.equal(y, (r.float() + x.float() + b.float()[:, None]).half())


def test_what_it_refuses():
    x = torch.randn(2, 8, 4, 4)
    assert not ep.takes(x, x.contiguous(memory_format=torch.channels_last))  # layouts differ
    assert not ep.takes(x, x.half()) and not ep.takes(x, x[:1])
    with pytest.raises(ValueError, match="one shape, dtype and layout"):
        ep.bias_residual(x, x[:1])
    with pytest.raises(ValueError, match=r"contiguous \(8,\)"):
        ep.bias_residual(x, x, (torch.zeros(4),))


def interleaved(y: torch.Tensor, bias: torch.Tensor | None, h: int, w: int) -> torch.Tensor:
    """What subpixel_interleave computes, by strided copies in float64."""
    c = y.shape[1] // 4
    out = torch.empty(y.shape[0], c, 2 * h, 2 * w, dtype=torch.float64, device=y.device)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = y[:, (2 * a + b) * c:(2 * a + b + 1) * c, a:a + h, b:b + w].double()
    return out if bias is None else out + bias.double().view(1, c, 1, 1)


@needs_triton
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_the_interleave_puts_each_phase_in_its_place(fmt, bias):
    y = torch.randn(2, 4 * 6, 6, 8, device=DEVICE).contiguous(memory_format=fmt)  # (H + 1, W + 1) = (6, 8)
    b = torch.randn(6, device=DEVICE) if bias else None
    out = torch.empty(2, 6, 10, 14, device=DEVICE).contiguous(memory_format=fmt)
    ep.subpixel_interleave(y, b, out)
    torch.testing.assert_close(out.double(), interleaved(y, b, 5, 7), rtol=1e-6, atol=1e-6)


@needs_triton
def test_the_interleave_rounds_half_precision_once():
    y = torch.randn(1, 16, 6, 8, device=DEVICE).bfloat16()
    b = torch.randn(4, device=DEVICE).bfloat16()
    out = torch.empty(1, 4, 10, 14, device=DEVICE, dtype=torch.bfloat16)
    ep.subpixel_interleave(y, b, out)
    ref = interleaved(y, b, 5, 7)
    # float32 inside, one bf16 rounding out: within a bf16 ulp of each sum (the interpreter truncates)
    assert out.dtype == torch.bfloat16 and ((out.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all()


@needs_triton
def test_the_interleave_reads_a_larger_or_strided_input():
    """The 2x2 convolution's output is (H + 1, W + 1); a wider view, or one sliced out of a larger tensor, reads
    the same pixels."""
    base = torch.randn(1, 16, 7, 9, device=DEVICE)
    y = base[:, :, :6, :8]  # a non-contiguous view
    out = torch.empty(1, 4, 10, 14, device=DEVICE)
    ep.subpixel_interleave(y, None, out)
    torch.testing.assert_close(out.double(), interleaved(y, None, 5, 7), rtol=1e-6, atol=1e-6)


def test_what_the_interleave_refuses():
    out = torch.empty(1, 4, 10, 14)
    with pytest.raises(ValueError, match=r"y \(N, 4C, H \+ 1, W \+ 1\)"):
        ep.subpixel_interleave(torch.empty(1, 12, 6, 8), None, out)  # 3C channels
    with pytest.raises(ValueError, match=r"y \(N, 4C, H \+ 1, W \+ 1\)"):
        ep.subpixel_interleave(torch.empty(1, 16, 5, 8), None, out)  # one row short
    with pytest.raises(ValueError, match=r"y \(N, 4C, H \+ 1, W \+ 1\)"):
        ep.subpixel_interleave(torch.empty(1, 16, 6, 8).half(), None, out)
    with pytest.raises(ValueError, match=r"contiguous \(4,\)"):
        ep.subpixel_interleave(torch.empty(1, 16, 6, 8), torch.zeros(3), out)
