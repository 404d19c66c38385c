"""The attention kernels' fp8 outputs (pab.kernels.fp8.DelayedScale): what flash_attention and short_attention
write for an fp8 output projection is what `delayed_reference` makes of their own output, on CUDA or in Triton's
interpreter (float32 there: its bf16 dot is broken)."""

import pytest
import torch

from pab.kernels import flash_attention as fa
from pab.kernels import fp8 as kern
from pab.kernels import short_attention as short_attn
from support.kernels import DEVICE, needs_triton

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), needs_triton]
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _flash(d: kern.DelayedScale | None, length: int = 40, keys: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, length, 72, generator=g).to(DEVICE, DTYPE)
    k, v = (torch.randn(2, 3, keys or length, 72, generator=g).to(DEVICE, DTYPE) * 2 for _ in range(2))
    out = fa.flash_attention(q, k, v, config=(32, 32, 4, 2, "pointer"), out_layout="nlhd", delayed=d)
    return out.flatten(2)  # (N, L, C): what the output projection reads


def _short(d: kern.DelayedScale | None, seed: int = 0, blocks: bool = False, length: int = 15):
    """length 17 or 18: a 32-row tile mostly padding, two warps a program (short_attention.CONFIG)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(6, length, 3 * 4 * 72, generator=g) * 2).to(DEVICE, DTYPE)
    if blocks:  # frame blocks (nb, N, lb, 3C) as sequence parallelism hands them over
        qkv = qkv.view(6, 3, length // 3, -1).transpose(0, 1)
    return short_attn.short_attention(qkv, 4, delayed=d)


def _same_e4m3(q: torch.Tensor, want: torch.Tensor) -> None:
    """The kernel's e4m3 values are PyTorch's. Triton's interpreter rounds a value that carries into the next
    binade down to this binade's first (31.03 -> 16, not 32; tests/kernels/test_fp8.py) and truncates subnormals,
    so there a value may be half of PyTorch's or one subnormal step (2^-9) off; a GPU rounds as PyTorch does."""
    got, want = q.float(), want.float()
    if DEVICE == "cpu":
        assert ((got == want) | (2 * got == want) | ((got - want).abs() <= 2**-9)).all()
        assert (got == want).float().mean().item() > 0.9
    else:
        assert (got == want).float().mean().item() > 0.999  # the same float32 value, the same rounding


def _rows(out: torch.Tensor):
    rows = kern.companion(out.reshape(-1, out.shape[-1]))
    assert rows is not None, "no e4m3 rows attached"
    return rows


@pytest.mark.parametrize("attend", [_flash, _short, lambda d, seed=0: _short(d, seed, blocks=True),
                                    lambda d, seed=0: _short(d, seed, length=17),
                                    lambda d, seed=0: _short(d, seed, blocks=True, length=18)],
                         ids=["flash", "short", "short-blocks", "short-17", "short-blocks-18"])  # fmt: skip
def test_first_call_records_then_later_calls_write_e4m3_rows(attend):
    plain = attend(None)
    amax = torch.zeros(2, device=DEVICE)
    first = attend(kern.DelayedScale(amax, read=-1, write=0))
    torch.testing.assert_close(first, plain, rtol=0, atol=0)  # the same output, only its amax recorded
    assert kern.companion(first.reshape(-1, first.shape[-1])) is None
    assert amax[0].item() == first.float().abs().max().item() and amax[1].item() == 0

    # the next call (another input, smaller): scaled by the first call's amax, and the history carried on
    second = attend(kern.DelayedScale(amax, read=0, write=1), seed=1)
    q, scale = _rows(second)
    ref_amax = torch.zeros(2, device=DEVICE)
    ref_amax[0] = amax[0]
    kern.delayed_reference(second.clone(), kern.DelayedScale(ref_amax, read=0, write=1))
    want_q, want_scale = kern.quantize_delayed(second.reshape(-1, second.shape[-1]), amax[0])
    assert q.dtype == kern.E4M3 and q.shape == want_q.shape
    assert torch.equal(scale, want_scale)
    _same_e4m3(q, want_q)
    assert amax[1].item() == pytest.approx(ref_amax[1].item(), rel=1e-6)
    assert amax[1].item() >= amax[0].item()  # a running maximum over the request's calls


@pytest.mark.parametrize("attend", [_flash, _short], ids=["flash", "short"])
def test_rows_alone(attend):
    """With `only` the output's own values are not written; a reader that needs them is told so."""
    amax = torch.zeros(2, device=DEVICE)
    attend(kern.DelayedScale(amax, read=-1, write=0))
    out = attend(kern.DelayedScale(amax, read=0, write=1, only=True))
    q, scale = _rows(out)
    also = attend(kern.DelayedScale(amax.clone(), read=0, write=1))
    assert torch.equal(q.float(), _rows(also)[0].float())
    with pytest.raises(RuntimeError, match="e4m3 rows only"):
        kern.check_written(out)


def test_saturates_past_the_margin():
    """An output larger than the margin allows is clamped to e4m3's largest value, never inf or NaN."""
    amax = torch.tensor([1e-3, 0.0], device=DEVICE)  # a history far below this call's values
    out = _flash(kern.DelayedScale(amax, read=0, write=1))
    q, _ = _rows(out)
    assert torch.isfinite(q.float()).all() and q.float().abs().max().item() == kern.E4M3_MAX
    assert amax[1].item() == pytest.approx(out.float().abs().max().item(), rel=1e-6)


def test_cross_attention_with_a_mask_records_only_real_rows():
    """Padded query rows (the last tile past L) are computed but are no output: they take no part in the amax."""
    amax = torch.zeros(2, device=DEVICE)
    out = _flash(kern.DelayedScale(amax, read=-1, write=0), length=33, keys=7)
    assert amax[0].item() == out.float().abs().max().item()


def test_flash_refuses_layouts_a_projection_cannot_read():
    amax = torch.zeros(2, device=DEVICE)
    q = torch.randn(1, 2, 16, 72, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="nlhd"):
        fa.flash_attention(q, q, q, delayed=kern.DelayedScale(amax, -1, 0))
