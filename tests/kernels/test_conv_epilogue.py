"""bias_residual (pab/kernels/conv_epilogue.py) against PyTorch's ops in float64, in both layouts.

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
