"""pab.kernels.flash_attention, flash attention at head dims like 72: against SDPA in float64.

On CUDA, or in Triton's CPU interpreter (TRITON_INTERPRET=1, as ./run.sh test sets). The interpreter's bf16 dot is
broken (tests/kernels/test_short_attention.py), so float32 (IEEE dots) and float16 are checked. Sizes are small
(the interpreter runs each program in numpy): L not a multiple of the blocks, shorter than one key block, and an
exact multiple, so the unmasked loop, the masked last block and the padded query rows all run, through pointer
loads and through tensor descriptors (whose zero fill past L and D the interpreter models too).
"""

import pytest
import torch
import torch.nn.functional as F

from pab.kernels import flash_attention as fa
from support.kernels import CUDA, DEVICE, needs_triton

N, H = 2, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(block_m: int, block_n: int, loads: str = "pointer"):
    """A launch config; warps and stages change nothing in the interpreter."""
    return (block_m, block_n, 4, 2, loads)


def _qkv(length: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(N, H, length, d, generator=g).to(DEVICE, dtype) for _ in range(3))


def _reference(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def _check(out, ref, atol=2e-5):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-4)


def test_head_split():
    assert fa.head_split(72) == (64, 8, 16)
    assert fa.head_split(64) == (64, 0, 0)
    assert fa.head_split(80) == (64, 16, 16)
    assert fa.head_split(96) == (64, 32, 32)
    assert fa.head_split(128) == (128, 0, 0)
    for bad in (70, 68, 12):
        with pytest.raises(ValueError, match="head dim"):
            fa.head_split(bad)


@needs_triton
@pytest.mark.parametrize(
    "length,block_m,block_n,loads",
    [(17, 64, 32, "pointer"), (70, 32, 64, "pointer"), (130, 64, 32, "pointer"), (17, 32, 64, "tma"),
     (70, 64, 32, "tma"), (130, 32, 64, "tma")],
)  # fmt: skip
def test_matches_sdpa(length, block_m, block_n, loads):
    q, k, v = _qkv(length, 72, seed=length)
    _check(fa.flash_attention(q, k, v, config=_config(block_m, block_n, loads)), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("loads", fa.LOADS)
def test_length_a_multiple_of_the_blocks(loads):
    q, k, v = _qkv(64, 72)  # no masked key block, no padded query rows
    _check(fa.flash_attention(q, k, v, config=_config(32, 32, loads)), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("loads", ["pointer", "tma"])
@pytest.mark.parametrize("d", [64, 80])
def test_other_head_dims(d, loads):
    q, k, v = _qkv(40, d)  # 64: no tail; 80 = 64 + 16: a full 16-wide tail
    _check(fa.flash_attention(q, k, v, config=_config(32, 32, loads)), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("out_layout,loads", [("nhld", "pointer"), ("nlhd", "pointer"), ("nlhd", "tma")])
def test_views_of_packed_qkv(out_layout, loads):
    g = torch.Generator().manual_seed(1)
    length = 70
    qkv = torch.randn(N, length, 3, H, 72, generator=g).to(DEVICE)  # the qkv projection's output, viewed
    q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    out = fa.flash_attention(q, k, v, config=_config(64, 32, loads), out_layout=out_layout)
    assert out.is_contiguous()
    if out_layout == "nlhd":
        assert out.shape == (N, length, H, 72)
        out = out.transpose(1, 2)
    _check(out, _reference(q, k, v))


@needs_triton
def test_strides_not_multiples_of_8():
    g = torch.Generator().manual_seed(2)
    # rows of 76 elements, heads cut out of them: strides (H*L*76, L*76, 76, 1), read with unit 1
    q, k, v = (torch.randn(N, H, 33, 76, generator=g).to(DEVICE)[..., :72] for _ in range(3))
    _check(fa.flash_attention(q, k, v, config=_config(32, 16)), _reference(q, k, v))
    with pytest.raises(ValueError, match="16-byte"):  # TMA descriptors need 16-byte strides
        fa.flash_attention(q, k, v, config=_config(32, 16, "tma"))


@needs_triton
def test_float16_and_scale():
    q, k, v = _qkv(70, 72, torch.float16, seed=3)
    out = fa.flash_attention(q, k, v, config=_config(64, 32), scale=0.2)
    assert out.dtype == torch.float16
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.2)
    _check(out, ref, atol=3e-3)  # p and the output rounded to fp16 (~5e-4 relative)


@needs_triton
@pytest.mark.parametrize("queries,keys,block_n", [(70, 5, 16), (33, 40, 16), (17, 70, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_with_a_key_mask(queries, keys, block_n, masked):
    """L queries against LK keys (text tokens) with an (N, LK) keep-mask read in place, as SDPA's attn_mask: kept
    keys anywhere (not only a prefix), so some key blocks hold none a row keeps before one that does."""
    g = torch.Generator().manual_seed(queries + keys)
    q = torch.randn(N, H, queries, 72, generator=g).to(DEVICE)
    k, v = (torch.randn(N, H, keys, 72, generator=g).to(DEVICE) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(N, keys, generator=g) < 0.5
        mask[:, -1] = True  # every row keeps a key: SDPA gives NaN otherwise, as the kernel does
        mask[0, : min(keys - 1, 2 * block_n)] = False  # whole key blocks masked before the first kept key
        mask = mask.to(DEVICE)
    out = fa.flash_attention(q, k, v, key_mask=mask, config=_config(32, block_n), out_layout="nlhd")
    attn_mask = None if mask is None else mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn_mask)
    _check(out.transpose(1, 2), ref)
    via = fa.attention(q, k, v, "triton", key_mask=mask)  # on the CPU: SDPA, as `supported` says
    _check(via.transpose(1, 2), ref)


@pytest.mark.skipif(fa.triton is None, reason="needs triton")
def test_rejects_what_it_cannot_run():
    q, k, v = (torch.randn(1, 1, 8, 70) for _ in range(3))
    with pytest.raises(ValueError, match="head dim"):
        fa.flash_attention(q, k, v)
    q, k, v = (torch.randn(1, 1, 8, 72) for _ in range(3))
    with pytest.raises(ValueError, match="unit stride"):
        fa.flash_attention(q, k, torch.randn(1, 1, 72, 8).transpose(2, 3))
    with pytest.raises(ValueError, match="powers of two"):
        fa.flash_attention(q, k, v, config=_config(48, 32))
    with pytest.raises(ValueError, match="loads"):
        fa.flash_attention(q, k, v, config=_config(32, 32, "tensor-core"))
    with pytest.raises(ValueError, match="out_layout"):
        fa.flash_attention(q, k, v, out_layout="nlh")
    with pytest.raises(ValueError, match="one shape"):
        fa.flash_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="one shape"):
        fa.flash_attention(q, k[:, :, :, :64], v[:, :, :, :64])
    with pytest.raises(ValueError, match="keep-mask"):
        fa.flash_attention(q, k, v, key_mask=torch.ones(1, 8))  # not bool
    with pytest.raises(ValueError, match="pointer"):
        fa.flash_attention(q, k[:, :, :4], v[:, :, :4], config=_config(32, 32, "tma"))


def test_supported_only_where_it_should_take_the_call():
    """The default path takes CUDA half-precision q, k, v with a head dim it splits; everything else is SDPA's."""
    q = torch.randn(1, 2, 8, 72)
    assert not fa.supported(q, q, q)  # CPU (or float32 anywhere)
    if CUDA and fa.triton is not None:
        h = q.to("cuda", torch.bfloat16)
        assert fa.supported(h, h, h)
        assert not fa.supported(h.float(), h.float(), h.float())
        odd = torch.randn(1, 2, 8, 70, device="cuda", dtype=torch.bfloat16)
        assert not fa.supported(odd, odd, odd)
        g = h.clone().requires_grad_()
        assert not fa.supported(g, g, g)  # no backward pass
        kv = torch.randn(1, 2, 5, 72, device="cuda", dtype=torch.bfloat16)
        keep = torch.ones(1, 5, dtype=torch.bool, device="cuda")
        assert fa.supported(h, kv, kv, keep) and not fa.supported(h, kv, kv, keep.float())
