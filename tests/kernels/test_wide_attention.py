"""wide_attention (pab/kernels/wide_attention.py) against SDPA: row blocks, rows wider than a softmax block, and
an uneven number of keys. Runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn.functional as F

from pab.kernels import wide_attention as wa
from support.kernels import CUDA, DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


@needs_triton
@pytest.mark.parametrize("b, lq, lk, d, dv", [(2, 7, 9, 16, 8), (1, 33, 40, 24, 24), (3, 5, 1, 8, 4)])
def test_matches_sdpa(b, lq, lk, d, dv):
    g = torch.Generator().manual_seed(lq)
    q, k, v = (torch.randn(b, n, e, generator=g).to(DEVICE) for n, e in ((lq, d), (lk, d), (lk, dv)))
    torch.testing.assert_close(wa.wide_attention(q, k, v).double(), reference(q, k, v), rtol=1e-5, atol=1e-5)


@needs_triton
def test_row_blocks_and_multi_pass_rows_give_the_same(monkeypatch):
    """Query rows in blocks of 3 (a small `max_bytes`), a softmax over 11 keys in blocks of 4 (two passes, a
    partly masked last block), large logits, and a scale of our own."""
    monkeypatch.setattr(wa, "MAX_BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, generator=g).to(DEVICE) for n in (7, 11, 11))
    q = q * 8
    out = wa.wide_attention(q, k, v, scale=0.5, max_bytes=2 * 3 * 11 * 4)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale=0.5), rtol=1e-5, atol=1e-5)


@needs_triton
def test_half_precision_on_the_gpu_or_interpreter():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 64, 320, generator=g).to(DEVICE).bfloat16() for _ in range(3))
    out = wa.wide_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 320)
    # P rounded to bf16 before P V, as flash kernels do, then the output: a few bf16 ulps of the float64 result
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=2e-2, atol=2e-2)


def test_what_it_refuses():
    q = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="wide_attention takes"):
        wa.wide_attention(q, torch.zeros(2, 5, 6), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="Lk > 0"):
        wa.wide_attention(q, torch.zeros(2, 0, 8), torch.zeros(2, 0, 3))
    assert not wa.supported(q, q, q)  # CPU
    if CUDA:
        c = q.cuda().bfloat16()
        assert wa.supported(c, c, c) and not wa.supported(c.float(), c.float(), c.float())
