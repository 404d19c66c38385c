"""bench.fp8_fused, the fused fp8 MLP experiment: its two Triton GEMMs compute what pab.precision's MLP does.

On CUDA, or in Triton's CPU interpreter (TRITON_INTERPRET=1, as ./run.sh test sets). The interpreter rounds
float32 -> e4m3 wrongly (tests/kernels/test_fp8.py), so there fc2 gets an input whose scaled values are e4m3
numbers already: the cast is then exact and the product is checked exactly.
"""


import torch
import torch.nn.functional as F

from pab.kernels import fp8
from support.kernels import DEVICE, needs_triton

pytestmark = needs_triton
SMALL = (64, 64, 32, 4, 4, 2)  # tiles small enough for the interpreter, and M, N, K that are not multiples


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    return (*fp8.quantize_weight(w), b)


def test_fc1_epilogue_is_the_scaled_gemm_bias_gelu_and_its_row_amax():
    from bench import fp8_fused

    x = torch.randn(150, 96, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    xq, xs = fp8.quantize_rows_reference(x)
    wq, ws, b = _weights(208, 96, 1)
    h, amax = fp8_fused.fc1_gelu(xq, xs, wq, ws, b, SMALL)
    want = F.gelu(fp8.fp8_matmul(xq, xs, wq, ws, None, torch.float32) + b.float(), approximate="tanh")
    assert h.dtype == torch.bfloat16 and h.shape == (150, 208)
    assert torch.allclose(h.float(), want, rtol=2**-7, atol=1e-3)  # bf16 rounding of the output
    assert torch.equal(amax, h.float().abs().amax(dim=1, keepdim=True))  # of what was stored: exact
    alone, _ = fp8_fused.fc1_gelu(xq, xs, wq, ws, b, SMALL, gelu=False)
    assert torch.allclose(alone.float(), fp8.fp8_matmul(xq, xs, wq, ws, b, torch.float32), rtol=2**-7, atol=1e-3)


def test_fc2_quantises_its_input_per_row_as_quantize_rows_does():
    from bench import fp8_fused

    g = torch.Generator().manual_seed(2)
    M, K = 130, 160
    # rows of e4m3 values times a power of two, each holding +-448 times it: x * 448 / amax is e4m3 exactly
    levels = torch.tensor([0.0, 0.5, 1.0, 1.5, 3.0, 13.0, 96.0, 240.0, 448.0])
    q = levels[torch.randint(len(levels), (M, K), generator=g)] * torch.where(torch.rand(M, K, generator=g) < 0.5,
                                                                              -1.0, 1.0)  # fmt: skip
    q[:, 7] = 448.0
    h = (q * 2.0 ** torch.randint(-6, 3, (M, 1), generator=g)).to(DEVICE, torch.bfloat16)
    amax = h.float().abs().amax(dim=1, keepdim=True)
    wq, ws, b = _weights(72, K, 3)
    out = fp8_fused.fc2_scaled(h, amax, wq, ws, b, SMALL)
    hq, hs = fp8.quantize_rows_reference(h)
    want = fp8.fp8_matmul(hq, hs, wq, ws, b, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (M, 72)
    assert torch.allclose(out.float(), want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))
