"""The short-sequence attention kernel (pab/kernels/short_attention.py) against SDPA: with STDiT3's q/k norm
and RoPE (as its temporal attention runs it) and plain (as Latte's does).

Runs where Triton can: on CUDA, or on the CPU through Triton's interpreter, e.g.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels    # what ./run.sh test does

(the interpreter's bf16 dot is broken, so there float32 and float16 are checked). Without Triton, or without
CUDA and TRITON_INTERPRET, the kernel tests skip; the launch-configuration helpers are tested everywhere.
"""

import sys
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from pab.kernels import KernelOptions, kernel_options, set_kernel_options
from pab.kernels import short_attention as short_attn
from pab.models import stdit3
from support.kernels import CUDA, DEVICE, needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_stdit3 import tiny_inputs, tiny_model  # noqa: E402

needs_cuda = pytest.mark.skipif(short_attn.triton is None or not CUDA, reason="compares compiled kernels on CUDA")

# float16: the kernel rounds q, k (after norm + RoPE), p and the output to fp16, fp16 sdpa rounds after the norm,
# after RoPE, inside flash and at the output; on these outputs (up to ~2 in magnitude) both land <= ~1.2e-3
# (max abs, ~5e-4 relative) from the float32 sdpa result. Tolerance: 4e-3 absolute, and at most twice fp16
# sdpa's own max error + 5e-4.
FP16_ATOL = 4e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def attention(heads: int, head_dim: int, qk_norm: bool, seed: int = 0) -> stdit3.SelfAttention:
    """A temporal SelfAttention without its output projection (so the kernel's output is compared directly),
    with norm weights away from 1 (a mix-up of even/odd channels would show)."""
    torch.manual_seed(seed)
    attn = stdit3.SelfAttention(heads * head_dim, heads, qk_norm, rope=stdit3.RotaryEmbedding(head_dim))
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    attn.proj = torch.nn.Identity()
    return attn.to(DEVICE)


def run(attn: stdit3.SelfAttention, x: torch.Tensor, impl: str) -> torch.Tensor:
    set_kernel_options(attn, KernelOptions(temporal_attention=impl))
    with torch.no_grad():
        return attn(x)


def reference32(attn: stdit3.SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The sdpa path in float32 on the same (possibly fp16-rounded) weights and input."""
    attn32 = attention(attn.num_heads, attn.head_dim, isinstance(attn.q_norm, stdit3.RMSNorm))
    attn32.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    return run(attn32, x.float(), "sdpa")


# ---------------------------------------------------------------------------------------------- everywhere


def test_head_dim_split_and_config():
    assert short_attn.head_split(72) == (64, 8)
    assert short_attn.head_split(16) == (0, 16)
    assert short_attn.head_split(64) == (64, 0)
    assert short_attn.head_split(48) == (32, 16)
    assert short_attn.head_split(8) == (0, 8)
    for bad in (24, 36, 68, 4):
        with pytest.raises(ValueError, match="head_dim"):
            short_attn.head_split(bad)
    assert short_attn.launch_config(15, 16) == short_attn.CONFIG[16]
    assert short_attn.launch_config(17, 16) == short_attn.launch_config(24, 16) == short_attn.CONFIG[24]
    assert short_attn.launch_config(25, 16) == short_attn.launch_config(32, 16) == short_attn.CONFIG[32]
    hb, _ = short_attn.launch_config(15, 3)  # never more heads per program than divide the model's
    assert 3 % hb == 0


def test_auto_takes_the_kernel_only_where_it_applies():
    """CPU tensors, float32 (TF32 dots would miss float32 fidelity), long sequences and odd head dims: sdpa."""
    for dtype in (torch.float32, torch.bfloat16):
        assert stdit3.temporal_attention_impl(torch.empty(2, 15, 3 * 1152, dtype=dtype), 16) == "sdpa"
    if CUDA:
        assert stdit3.temporal_attention_impl(torch.empty(2, 15, 3 * 1152, device="cuda", dtype=torch.bfloat16), 16) == "triton"
        assert stdit3.temporal_attention_impl(torch.empty(2, 15, 3 * 1152, device="cuda"), 16) == "sdpa"
        assert stdit3.temporal_attention_impl(torch.empty(2, 33, 3 * 1152, device="cuda", dtype=torch.bfloat16), 16) == "sdpa"
        assert stdit3.temporal_attention_impl(torch.empty(2, 15, 3 * 72, device="cuda", dtype=torch.bfloat16), 2) == "sdpa"


@pytest.mark.parametrize("impl", ["sdpa", "bmm"])
@pytest.mark.parametrize("nb,lb", [(1, 5), (2, 4), (3, 5)])
def test_frame_blocks_match_sequences(impl, nb, lb):
    """(N, nb, lb, C) frame blocks, as DSP hands them over (a transposed view of (nb, N, lb, C)), give the
    (N, L, C) result in the same layout, on every path."""
    attn = attention(4, 16, True)
    N, L, C = 3, nb * lb, 64
    x = torch.randn(N, L, C, device=DEVICE)
    blocks = x.view(N, nb, lb, C).transpose(0, 1).contiguous().transpose(0, 1)  # (N, nb, lb, C), strided
    ref = run(attn, x, impl)
    out = run(attn, blocks, impl)
    assert out.shape == (N, nb, lb, C)
    torch.testing.assert_close(out.reshape(N, L, C), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- interpreter / CUDA


@needs_triton
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("L", [1, 5, 15, 17, 18, 20, 30, 32])
@pytest.mark.parametrize("N", [1, 4])
def test_matches_sdpa_float32(N, L, qk_norm):
    attn = attention(16, 72, qk_norm)  # Open-Sora 1.2: 16 heads of 72
    x = torch.randn(N, L, 16 * 72, device=DEVICE)
    out = run(attn, x, "triton")
    torch.testing.assert_close(out, run(attn, x, "sdpa"), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("L", [1, 5, 15, 17, 19, 30, 32])
@pytest.mark.parametrize("N", [1, 3])
def test_matches_sdpa_float16(N, L, qk_norm):
    attn = attention(16, 72, qk_norm).half()
    x = torch.randn(N, L, 16 * 72, device=DEVICE).half()
    ref = reference32(attn, x)
    out = run(attn, x, "triton").float()
    sdpa_err = (run(attn, x, "sdpa").float() - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= FP16_ATOL, (err, sdpa_err)
    assert err <= 2 * sdpa_err + 5e-4, (err, sdpa_err)


@needs_triton
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (2, 48), (2, 64), (2, 8), (3, 72)])
@pytest.mark.parametrize("L", [5, 17, 30])
def test_other_head_dims(heads, head_dim, L):
    """The split 72 = 64 + 8 is one case: only a tail (16, 8), a tail of 16 (48), no tail (64), odd head count."""
    attn = attention(heads, head_dim, True)
    x = torch.randn(3, L, heads * head_dim, device=DEVICE)
    torch.testing.assert_close(run(attn, x, "triton"), run(attn, x, "sdpa"), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("L", [15, 17, 30])
@pytest.mark.parametrize("heads_per_program,num_warps", [(1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 4), (16, 4)])
def test_launch_configurations(L, heads_per_program, num_warps):
    """Every (heads per program, warps) gives the same result: 2D dots for one head, 3D for several."""
    attn = attention(16, 72, True)
    x = torch.randn(2, L, 16 * 72, device=DEVICE)
    with torch.no_grad():
        qkv = attn.qkv(x)
        cos, sin = attn.rope.tables(L, qkv.device, torch.float32)
        try:
            out = torch.ops.pab.short_attention(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, 16,
                                                attn.q_norm.eps, heads_per_program, num_warps)  # fmt: skip
        except Exception as e:  # Triton's OutOfResources, raised at launch on a real GPU only
            if type(e).__name__ != "OutOfResources" or (heads_per_program, num_warps) == short_attn.launch_config(L, 16):
                raise
            # e.g. 16 float32 heads of a 32-row tile need 336 KiB of shared memory; an H200 has 227 KiB.
            # launch_config never picks such a configuration (test_picked_configurations_fit).
            pytest.skip(f"({heads_per_program} heads, {num_warps} warps) at L={L} in float32 does not fit this GPU: {e}")
    torch.testing.assert_close(out, run(attn, x, "sdpa"), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [16, 3])
def test_picked_configurations_fit(heads, dtype):
    """What launch_config picks launches at every length the kernel takes (on a GPU: fits its shared memory)."""
    attn = attention(heads, 72, True)
    for L in (1, 7, 16, 17, 30, short_attn.MAX_LEN):
        x = torch.randn(2, L, heads * 72, device=DEVICE)
        with torch.no_grad():
            qkv = attn.qkv(x).to(dtype)
            cos, sin = attn.rope.tables(L, qkv.device, torch.float32)
            out = torch.ops.pab.short_attention(qkv, attn.q_norm.weight.to(dtype), attn.k_norm.weight.to(dtype), cos,
                                                sin, heads, attn.q_norm.eps, *short_attn.launch_config(L, heads))
        tol = 1e-5 if dtype == torch.float32 else FP16_ATOL
        torch.testing.assert_close(out.float(), run(attn, x, "sdpa"), atol=tol, rtol=tol, msg=lambda m: f"L={L}: {m}")


@needs_triton
def test_strided_qkv():
    """qkv rows further apart than 3C (a view into a wider buffer) are read through the strides."""
    attn = attention(16, 72, True)
    L, C = 15, 16 * 72
    wide = torch.randn(3, L, 3 * C + 40, device=DEVICE)
    qkv = wide[..., : 3 * C]
    cos, sin = attn.rope.tables(L, qkv.device, torch.float32)
    args = (attn.q_norm.weight, attn.k_norm.weight, cos, sin, 16, attn.q_norm.eps, 4, 4)
    with torch.no_grad():
        out = torch.ops.pab.short_attention(qkv, *args)
        ref = torch.ops.pab.short_attention(qkv.contiguous(), *args)
    assert torch.equal(out, ref)


@needs_triton
@pytest.mark.parametrize("nb,lb", [(2, 8), (3, 5), (4, 1), (2, 9), (3, 6)])
def test_frame_blocks_kernel(nb, lb):
    """The kernel on frame blocks (nb, N, lb, 3C) reads token b·lb + i at [b, n, i] and writes the same layout:
    bit for bit the kernel on the reordered (N, L, 3C) sequences (RoPE positions are the global ones)."""
    attn = attention(4, 72, True)
    N, L, C = 3, nb * lb, 4 * 72
    qkv = torch.randn(N, L, 3 * C, device=DEVICE)
    blocks = qkv.view(N, nb, lb, 3 * C).transpose(0, 1).contiguous()
    cos, sin = attn.rope.tables(L, qkv.device, torch.float32)
    args = (attn.q_norm.weight, attn.k_norm.weight, cos, sin, 4, attn.q_norm.eps, 2, 4)
    with torch.no_grad():
        ref = torch.ops.pab.short_attention(qkv, *args)
        out = torch.ops.pab.short_attention(blocks, *args)
        # the module path: qkv GEMM on the blocks as they lie, the kernel, the projection, same layout back
        set_kernel_options(attn, KernelOptions(temporal_attention="triton"))
        x = torch.randn(N, L, C, device=DEVICE)
        mod_ref = attn(x)
        mod_out = attn(x.view(N, nb, lb, C).transpose(0, 1).contiguous().transpose(0, 1))
    assert out.shape == (nb, N, lb, C)
    assert torch.equal(out.transpose(0, 1).reshape(N, L, C), ref)
    assert mod_out.transpose(0, 1).is_contiguous()  # the layout DSP sends back without a copy
    torch.testing.assert_close(mod_out.reshape(N, L, C), mod_ref, atol=1e-6, rtol=1e-6)


@needs_triton
def test_frame_blocks_latte_attention(monkeypatch):
    """Latte's self-attention (no norm, no RoPE) on frame blocks through the kernel: the same result as on the
    reordered sequences, and the answer in the layout DSP sends back as it lies."""
    from pab.models import latte

    # `supported` takes the kernel by default only for CUDA half precision; here it runs in float32 (IEEE dots)
    monkeypatch.setattr(short_attn, "supported", lambda qkv, heads: True)
    torch.manual_seed(0)
    attn = latte.Attention(4 * 72, heads=4, dim_head=72, bias=True).to(DEVICE).eval()
    N, nb, lb, C = 3, 2, 8, 4 * 72
    x = torch.randn(N, nb * lb, C, device=DEVICE)
    with torch.no_grad():
        ref = attn(x)
        out = attn(x.view(N, nb, lb, C).transpose(0, 1).contiguous().transpose(0, 1))
    assert out.transpose(0, 1).is_contiguous()
    torch.testing.assert_close(out.reshape(N, nb * lb, C), ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_no_sequences():
    """A DSP rank can get no rows of a chunk: the op returns an empty result without a launch."""
    attn = attention(4, 72, True)
    cos, sin = attn.rope.tables(8, DEVICE, torch.float32)
    args = (attn.q_norm.weight, attn.k_norm.weight, cos, sin, 4, attn.q_norm.eps, 2, 4)
    assert torch.ops.pab.short_attention(torch.empty(0, 8, 3 * 288, device=DEVICE), *args).shape == (0, 8, 288)
    assert torch.ops.pab.short_attention(torch.empty(2, 0, 4, 3 * 288, device=DEVICE), *args).shape == (2, 0, 4, 288)


@needs_triton
def test_tiny_model_forward():
    """The whole tiny STDiT3 (4 heads of 16) with the variant selected through its KernelOptions."""
    model = tiny_model().to(DEVICE)
    kw = {k: v.to(DEVICE) for k, v in tiny_inputs(T=5).items()}
    with torch.no_grad():
        with kernel_options(model, temporal_attention="sdpa"):
            ref = model(**kw)
        with kernel_options(model, temporal_attention="triton"):
            out = model(**kw)
        assert model.kernels.temporal_attention == "auto"  # restored after the block
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_head_dim_is_refused():
    if short_attn.triton is None:
        pytest.skip("needs triton")
    attn = attention(2, 36, True)  # 36 = 32 + 4: a 4-wide tail is not handled
    with pytest.raises(ValueError, match="head_dim"):
        run(attn, torch.randn(1, 5, 72, device=DEVICE), "triton")


# ---------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [15, 30])
def test_half_precision_on_cuda(dtype, L):
    """Open-Sora's shapes in half precision: the kernel is as close to float32 as SDPA in that dtype is, for
    every launch configuration bench/profile.py times."""
    attn = attention(16, 72, True).to(dtype)
    x = torch.randn(257, L, 16 * 72, device="cuda", dtype=dtype)
    ref = reference32(attn, x)
    out = run(attn, x, "triton").float()
    sdpa = run(attn, x, "sdpa").float()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(out, ref) < 1e-2 and rel(out, ref) < 1.5 * rel(sdpa, ref) + 1e-3, (rel(out, ref), rel(sdpa, ref))
    for hb, nw in [(4, 4), (2, 4), (2, 2), (1, 1), (1, 2), (1, 4)]:
        with torch.no_grad():
            qkv = attn.qkv(x)
            cos, sin = attn.rope.tables(L, qkv.device, torch.float32)
            alt = torch.ops.pab.short_attention(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, 16,
                                                attn.q_norm.eps, hb, nw).float()  # fmt: skip
        assert rel(alt, out) < 1e-3, (hb, nw, rel(alt, out))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("L", [15, 30])
def test_float32_on_cuda(L):
    attn = attention(16, 72, True)
    x = torch.randn(64, L, 16 * 72, device="cuda")
    out, ref = run(attn, x, "triton"), run(attn, x, "sdpa")
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------- plain (Latte)


def plain_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v through SDPA in float32: (N, L, 3C) -> (N, L, C)."""
    N, L, C3 = qkv.shape
    q, k, v = qkv.float().view(N, L, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, C3 // 3)


@needs_triton
@pytest.mark.parametrize("L", [1, 7, 16, 30])
@pytest.mark.parametrize("heads,head_dim", [(16, 72), (4, 16), (2, 64)])
def test_plain_attention_float32(L, heads, head_dim):
    """No norm, no RoPE (Latte's temporal attention): the kernel is SDPA."""
    qkv = torch.randn(3, L, 3 * heads * head_dim, device=DEVICE)
    with torch.no_grad():
        out = short_attn.short_attention(qkv, heads)
    torch.testing.assert_close(out, plain_reference(qkv, heads), atol=1e-5, rtol=1e-5)


@needs_triton
def test_plain_attention_float16():
    qkv = torch.randn(5, 16, 3 * 16 * 72, device=DEVICE).half()
    ref = plain_reference(qkv, 16)
    err = (short_attn.short_attention(qkv, 16).float() - ref).abs().max().item()
    assert err <= FP16_ATOL, err


def test_half_arguments_are_refused():
    if short_attn.triton is None:
        pytest.skip("needs triton")
    qkv = torch.randn(1, 4, 3 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="both"):
        torch.ops.pab.short_attention(qkv, torch.ones(16, device=DEVICE), None, None, None, 2, 1e-6, 1, 1)
