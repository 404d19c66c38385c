"""The GroupNorm (+ SiLU) kernels (pab/kernels/group_norm.py) against F.group_norm in float64, in both layouts.

Runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1, as ./run.sh test sets it).
"""

import pytest
import torch
import torch.nn.functional as F

from pab.kernels import group_norm as gn
from support.kernels import CUDA, DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(x, groups, weight, bias, eps, silu):
    y = F.group_norm(x.double(), groups, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), eps)  # fmt: skip
    return F.silu(y) if silu else y


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    if name == "transposed":  # (N, C, L) read from (N, L, C): the VAE attention's norm input
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


@needs_triton
@pytest.mark.parametrize("shape, groups, fmt", [
    ((2, 8, 5, 7), 4, "contiguous"), ((2, 8, 5, 7), 4, "channels_last"), ((1, 12, 3, 4, 5), 3, "contiguous"),
    ((2, 12, 3, 4, 5), 4, "channels_last"), ((3, 6, 33), 2, "transposed"), ((1, 40, 9, 1), 8, "channels_last"),
    ((2, 8, 5, 7), 8, "channels_last"),  # a group per channel
])  # fmt: skip
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_group_norm_in_the_input_layout(shape, groups, fmt, silu, affine):
    x = layout(torch.randn(shape, device=DEVICE) * 3 + 1, fmt)
    w = torch.randn(shape[1], device=DEVICE) if affine else None
    b = torch.randn(shape[1], device=DEVICE) if affine else None
    y = gn.group_norm(x, groups, w, b, 1e-5, silu=silu)
    assert y.stride() == x.stride() and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), reference(x, groups, w, b, 1e-5, silu), rtol=1e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_an_input_bias_is_normalised_as_if_added_first(monkeypatch, fmt):
    """input_bias: a convolution's bias left to the norm. Several chunks, so the finalize merges shifted means."""
    monkeypatch.setattr(gn, "STATS_TILE", 32)
    monkeypatch.setattr(gn, "STATS_PROGRAMS", 20)
    x = layout(torch.randn(2, 8, 9, 7, device=DEVICE), fmt)
    w, b, ib = (torch.randn(8, device=DEVICE) for _ in range(3))
    ib = ib * 5  # far from zero, and different within each group
    y = gn.group_norm(x, 2, w, b, 1e-6, silu=True, input_bias=ib)
    expected = reference(x + ib[:, None, None], 2, w, b, 1e-6, True)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="input_bias must be a contiguous"):
        gn.group_norm(x, 2, w, b, 1e-6, input_bias=ib[:4])


@needs_triton
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_many_chunks_and_tiles_merge_exactly(monkeypatch, fmt):
    """Small tiles and many statistics programs: several tiles per chunk, a short last tile and chunk, and
    more chunks than the finalize kernel merges at once."""
    monkeypatch.setattr(gn, "TILE", 32)  # 8 channels -> 4 pixels a tile
    monkeypatch.setattr(gn, "STATS_TILE", 32)
    monkeypatch.setattr(gn, "STATS_PROGRAMS", 60)
    monkeypatch.setattr(gn, "FINALIZE_CHUNKS", 4)
    x = layout(torch.randn(2, 8, 13, 11, device=DEVICE) * 2 - 3, fmt)  # 143 pixels: not a multiple of 4
    w, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    y = gn.group_norm(x, 2, w, b, 1e-6, silu=True)
    torch.testing.assert_close(y.double(), reference(x, 2, w, b, 1e-6, True), rtol=1e-5, atol=2e-5)


@needs_triton
def test_a_large_mean_does_not_cancel_the_variance(monkeypatch):
    """E[x^2] - E[x]^2 in float32 loses a variance of 1e-4 under a mean of 1e3 entirely; merged (mean, M2)
    keeps it."""
    monkeypatch.setattr(gn, "STATS_TILE", 64)
    x = torch.randn(1, 4, 32, 32, device=DEVICE, dtype=torch.float64) * 1e-2 + 1e3
    y = gn.group_norm(x.float(), 1, None, None, 0.0)
    ref = reference(x, 1, None, None, 0.0, False)  # from the float64 values: what float32 input can give
    assert (y.double() - ref).abs().max() < 0.05


@needs_triton
def test_half_precision_rounds_once():
    x = torch.randn(2, 16, 6, 10, device=DEVICE).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, device=DEVICE).bfloat16(), torch.randn(16, device=DEVICE).bfloat16()
    y = gn.group_norm(x, 4, w, b, 1e-6, silu=True)
    ref = reference(x, 4, w, b, 1e-6, True)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    # float32 inside, one bf16 rounding out: within a bf16 ulp of each value (the interpreter truncates)
    assert ((y.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all()


@needs_triton
def test_what_it_refuses():
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        gn.group_norm(torch.zeros(1, 8, 4, device=DEVICE), 3, None, None, 1e-6)
    sliced = torch.zeros(1, 4, 6, 6, device=DEVICE)[:, :, :, :3]
    assert gn.flat_strides(sliced) is None
    with pytest.raises(ValueError, match="at most 1024 channels"):
        gn.group_norm(torch.zeros(1, 2048, 2, device=DEVICE), 32, None, None, 1e-6)
    with pytest.raises(ValueError, match="flattenable spatial dims"):
        gn.group_norm(sliced, 2, None, None, 1e-6)
    with pytest.raises(ValueError, match=r"weight must be a contiguous \(4,\) tensor"):
        gn.group_norm(torch.zeros(1, 4, 3, device=DEVICE), 2, torch.ones(2, device=DEVICE), None, 1e-6)


@needs_triton
def test_an_empty_batch_is_an_empty_output():
    y = gn.group_norm(torch.zeros(0, 8, 3, 3, device=DEVICE), 2, None, None, 1e-6, silu=True)
    assert y.shape == (0, 8, 3, 3)


def test_flat_strides_of_each_layout():
    x = torch.empty(2, 3, 4, 5)
    assert gn.flat_strides(x) == (60, 1, 20)
    assert gn.flat_strides(x.contiguous(memory_format=torch.channels_last)) == (60, 3, 1)
    assert gn.flat_strides(torch.empty(2, 3, 4, 1)) == (12, 1, 4)  # a size-1 dim has any stride
    assert gn.flat_strides(torch.empty(2, 3)) is None


def test_supported_only_on_cuda_half():
    assert not gn.supported(torch.empty(2, 8, 4, 4, dtype=torch.bfloat16), 2)  # CPU
    assert gn.fits(512, 32) and gn.fits(512, 512) and not gn.fits(2048, 32) and not gn.fits(8, 3)
    if CUDA:
        assert gn.supported(torch.empty(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16), 2)
        assert not gn.supported(torch.empty(2, 8, 4, 4, device="cuda"), 2)  # float32: PyTorch's kernel
        assert not gn.supported(torch.empty(2, 8, 4, 8, device="cuda", dtype=torch.bfloat16)[..., :4], 2)
