"""bench.attention_triton, the d = 72 flash-attention experiment: its kernels against SDPA in float64.

On CUDA, or in Triton's CPU interpreter (TRITON_INTERPRET=1, as ./run.sh test sets). The interpreter's bf16 dot is
broken (tests/kernels/test_short_attention.py), so float32 (IEEE dots) and float16 are checked. Sizes are small
(the interpreter runs each program in numpy): L not a multiple of the blocks, shorter than one key block, and an
exact multiple, so the unmasked loop, the masked last block and the padded query rows all run, through pointer
loads and through tensor descriptors (whose zero fill past L and D the interpreter models too).
"""

import pytest
import torch
import torch.nn.functional as F

from bench import attention_triton as at
from support.kernels import DEVICE, needs_triton

N, H = 2, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(length: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(N, H, length, d, generator=g).to(DEVICE, dtype) for _ in range(3))


def _reference(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def _check(out, ref, atol=2e-5):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- everywhere


def test_head_split():
    assert at.head_split(72) == (64, 8, 16)
    assert at.head_split(64) == (64, 0, 0)
    assert at.head_split(80) == (64, 16, 16)
    assert at.head_split(96) == (64, 32, 32)
    assert at.head_split(128) == (128, 0, 0)
    for bad in (70, 68, 12):
        with pytest.raises(ValueError, match="head dim"):
            at.head_split(bad)


def test_configs_and_best_config():
    assert at.DEFAULT_CONFIG in at.CONFIGS
    assert len(set(at.CONFIGS)) == len(at.CONFIGS)
    pointer = [c[:4] for c in at.CONFIGS if c[4] == "pointer"]
    assert len(pointer) == 36  # the whole grid
    for bm, bn, warps, stages, loads in at.CONFIGS:
        assert bm in (64, 128) and bn in (32, 64, 128) and warps in (4, 8) and stages in (2, 3, 4)
        assert loads in at.LOADS and (loads != "tma-ws" or warps == 4)
    rows = [
        {"impl": "sdpa-cudnn", "ms": 1.0},
        {"impl": "triton", "block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3, "loads": "pointer",
         "ms": 2.0, "ok": True},
        {"impl": "triton", "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "loads": "tma",
         "ms": 1.5, "ok": True},
        {"impl": "triton", "block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4, "loads": "pointer",
         "error": "OutOfResources"},
        {"impl": "triton", "block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2, "loads": "pointer",
         "ms": 0.5, "ok": False},
    ]  # fmt: skip
    assert at.best_config(rows) == (64, 64, 4, 2, "tma")
    assert at.best_config(rows[:1] + rows[3:]) is None


# ---------------------------------------------------------------------------------------------- the kernel


@needs_triton
@pytest.mark.parametrize(
    "length,block_m,block_n,loads",
    [(17, 64, 32, "pointer"), (70, 32, 64, "pointer"), (130, 64, 32, "pointer"), (17, 32, 64, "tma"),
     (70, 64, 32, "tma"), (70, 64, 32, "tma-ws"), (130, 32, 64, "tma-ws")],
)  # fmt: skip
def test_matches_sdpa(length, block_m, block_n, loads):
    q, k, v = _qkv(length, 72, seed=length)
    _check(at.flash72(q, k, v, block_m=block_m, block_n=block_n, loads=loads), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("loads", at.LOADS)
def test_length_a_multiple_of_the_blocks(loads):
    q, k, v = _qkv(64, 72)  # no masked key block, no padded query rows
    _check(at.flash72(q, k, v, block_m=32, block_n=32, loads=loads), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("loads", ["pointer", "tma"])
@pytest.mark.parametrize("d", [64, 80])
def test_other_head_dims(d, loads):
    q, k, v = _qkv(40, d)  # 64: no tail; 80 = 64 + 16: a full 16-wide tail
    _check(at.flash72(q, k, v, block_m=32, block_n=32, loads=loads), _reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("out_layout,loads", [("nhld", "pointer"), ("nlhd", "pointer"), ("nlhd", "tma"),
                                              ("nlhd", "tma-ws")])  # fmt: skip
def test_views_of_packed_qkv(out_layout, loads):
    g = torch.Generator().manual_seed(1)
    length = 70
    qkv = torch.randn(N, length, 3, H, 72, generator=g).to(DEVICE)  # the qkv projection's output, viewed
    q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    out = at.flash72(q, k, v, block_m=64, block_n=32, loads=loads, out_layout=out_layout)
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
    _check(at.flash72(q, k, v, block_m=32, block_n=16), _reference(q, k, v))
    with pytest.raises(ValueError, match="16-byte"):  # TMA descriptors need 16-byte strides
        at.flash72(q, k, v, block_m=32, block_n=16, loads="tma")


@needs_triton
def test_float16_and_scale():
    q, k, v = _qkv(70, 72, torch.float16, seed=3)
    out = at.flash72(q, k, v, block_m=64, block_n=32, scale=0.2)
    assert out.dtype == torch.float16
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.2)
    _check(out, ref, atol=3e-3)  # p and the output rounded to fp16 (~5e-4 relative)


@pytest.mark.skipif(at.triton is None, reason="needs triton")
def test_rejects_what_it_cannot_run():
    q, k, v = (torch.randn(1, 1, 8, 70) for _ in range(3))
    with pytest.raises(ValueError, match="head dim"):
        at.flash72(q, k, v)
    q, k, v = (torch.randn(1, 1, 8, 72) for _ in range(3))
    with pytest.raises(ValueError, match="unit stride"):
        at.flash72(q, k, torch.randn(1, 1, 72, 8).transpose(2, 3))
    with pytest.raises(ValueError, match="powers of two"):
        at.flash72(q, k, v, block_m=48)
    with pytest.raises(ValueError, match="loads"):
        at.flash72(q, k, v, loads="tensor-core")
    with pytest.raises(ValueError, match="out_layout"):
        at.flash72(q, k, v, out_layout="nlh")
    with pytest.raises(ValueError, match="one shape"):
        at.flash72(q, k[:, :, :4], v)
