"""Row-wise fp8 quantisation (pab/kernels/fp8.py): the Triton kernel against PyTorch, and the fp8 GEMM.

The kernel runs on CUDA or in Triton's CPU interpreter (TRITON_INTERPRET=1, what ./run.sh test sets; there
only its scales are checked, see below); the GEMM through torch._scaled_mm needs an fp8 GPU (marked gpu), its float32 emulation runs everywhere.
"""


import pytest
import torch
import torch.nn.functional as F

from pab.kernels import fp8, row_pieces
from support.kernels import CUDA, DEVICE, needs_triton

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an fp8 GPU"
)


def _launch(x: torch.Tensor, gelu: str, bias: torch.Tensor | None = None, one_tile: bool = False):
    """The kernel itself, also where `supported` would send a CPU tensor to PyTorch (the interpreter): each row in
    the two tiles of `row_pieces`, or in one masked tile of the next power of two."""
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=fp8.E4M3)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    block, rest = (fp8.triton.next_power_of_2(K), 0) if one_tile else row_pieces(K)
    fp8._quantize_rows_kernel[(M,)](x, x if bias is None else bias, q, s, K, x.stride(0), HAS_BIAS=bias is not None,
                                    GELU=gelu == "tanh", FAST_TANH=CUDA, BLOCK=block, REST=rest)  # fmt: skip
    return q, s


@pytest.mark.parametrize("width, pieces", [(1152, (1024, 128)), (4608, (4096, 512)), (1024, (1024, 0)),
                                           (72, (64, 8)), (1000, (512, 512)), (1, (1, 0))])  # fmt: skip
def test_a_row_splits_into_two_power_of_two_tiles(width, pieces):
    assert row_pieces(width) == pieces
    assert pieces[0] <= width <= sum(pieces)


def test_a_row_needs_a_channel():
    with pytest.raises(ValueError, match="at least one channel"):
        row_pieces(0)


def test_reference_quantisation_bounds():
    x = torch.randn(64, 80) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    x[5] = 0  # an all-zero row keeps a finite scale
    q, s = fp8.quantize_rows_reference(x)
    assert q.dtype == fp8.E4M3 and s.shape == (64, 1) and torch.isfinite(s).all()
    assert torch.equal(q[5].float(), torch.zeros(80))
    back = q.float() * s
    # the row's largest entry lands on 448; e4m3 keeps 3 mantissa bits (relative error <= 2^-4), with a floor
    # of its smallest subnormal step (2^-9 of the scale) near zero
    assert torch.allclose(back.abs().amax(1), x.abs().amax(1), rtol=2**-4)
    assert ((back - x).abs() <= x.abs() * 2**-4 + s * 2**-9).all()


def test_weight_scales_are_per_output_channel():
    w = torch.randn(48, 32)
    w[7] *= 1000
    q, s = fp8.quantize_weight(w)
    assert s.shape == (1, 48)
    assert torch.allclose((q.float() * s.t()), w, rtol=2**-4, atol=float(s.max()) * 2**-9)
    assert s[0, 7] > 100 * s[0, 6]  # one loud channel does not flatten the others


def test_emulated_matmul_is_the_product_of_the_e4m3_operands():
    torch.manual_seed(0)
    x, w, b = torch.randn(33, 64), torch.randn(48, 64), torch.randn(48)
    xq, xs = fp8.quantize_rows_reference(x)
    wq, ws = fp8.quantize_weight(w)
    out = fp8.fp8_matmul(xq, xs, wq, ws, b, torch.float32)
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double().t()).t() + b.double()
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5)
    ref = F.linear(x, w, b)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.08  # fp8's own error: small, not zero


@needs_triton
@pytest.mark.parametrize("gelu", ["none", "tanh"])
@pytest.mark.parametrize("K", [48, 80, 1152])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("one_tile", [False, True])
def test_kernel_matches_reference(gelu, K, with_bias, one_tile):
    torch.manual_seed(K)
    x = (torch.randn(9, K, device=DEVICE) * 3).to(torch.bfloat16)
    bias = torch.randn(K, device=DEVICE, dtype=torch.bfloat16) if with_bias else None
    x[2] = 0 if bias is None else -bias  # a row that is zero where the kernel takes its amax
    x[4, -1] = 50  # the row's largest entry in its last channel: the second tile's (48 = 32 + 16, 80 = 64 + 16)
    q, s = _launch(x, gelu, bias, one_tile)
    rq, rs = fp8.quantize_rows_reference(x, gelu, bias)
    assert torch.allclose(s, rs, rtol=1e-5)  # amax (after the GELU) and the scale
    if not CUDA:
        # Triton 3.9's interpreter converts float32 -> e4m3 wrongly (125.5 -> 64, ties away from even), so only
        # a GPU checks the e4m3 values (round to nearest even in hardware, as torch's cast).
        return
    # the same float32 value rounds to the same e4m3 one; the GELU's sigmoid form may move a value by a rounding
    same = (q.float() == rq.float()).float().mean()
    assert same > (0.999 if gelu == "none" else 0.97)
    assert torch.allclose(q.float() * s, rq.float() * rs, rtol=2**-3, atol=float(rs.max()) * 2**-8)


def test_a_companion_is_found_through_full_views_while_unchanged():
    out = torch.randn(2, 3, 4, 16)
    q, s = fp8.quantize_rows_reference(out.view(-1, 16))
    fp8.attach(out, q.view(out.shape), s)
    x = out.view(6, 4, 16).reshape(-1, 16)  # the reader's (M, K) view of a view
    found = fp8.companion(x)
    assert found is not None and torch.equal(found[0].float(), q.float()) and found[1] is s
    assert fp8.companion(out[:1].reshape(-1, 16)) is None  # part of it: other rows
    assert fp8.companion(out.transpose(1, 2).reshape(-1, 16)) is None  # a copy in another order
    assert fp8.companion(torch.randn(24, 16)) is None
    out.mul_(2)  # changed in place after the rows were written
    assert fp8.companion(x) is None


def test_fp8_input_asks_the_reader_and_the_hooks_on_the_way():
    import torch.nn as nn

    from pab.hooks.registry import ModelHook, register_hook, remove_hook

    class Reader(nn.Module):
        def __init__(self, answer):
            super().__init__()
            self.fp8_input_mode = lambda: answer

    assert fp8.fp8_input(Reader("also")) == "also" and fp8.fp8_input(Reader("only")) == "only"
    assert fp8.fp8_input(Reader(None)) is None and fp8.fp8_input(object()) is None
    reader, carrier = Reader("only"), nn.Identity()

    class Passes(ModelHook):
        name, reads_input = "passes", False

    class Sends(ModelHook):  # e.g. sequence parallelism's all-to-all of the input
        name = "sends"

    register_hook(carrier, Passes())
    assert fp8.fp8_input(reader, carrier) == "only"
    register_hook(carrier, Sends())
    assert fp8.fp8_input(reader, carrier) == "also"  # someone else reads the values: write them
    remove_hook(carrier, "sends")
    register_hook(reader, Sends())
    assert fp8.fp8_input(reader, carrier) == "also"


def test_a_tensor_written_as_rows_only_refuses_other_readers():
    out = torch.empty(4, 16)
    q, s = fp8.quantize_rows_reference(torch.randn(4, 16))
    fp8.attach(out, q, s, written=False)
    assert fp8.companion(out) is not None  # the fp8 reader takes the rows
    with pytest.raises(RuntimeError, match="e4m3 rows only"):
        fp8.check_written(out.view(2, 2, 16))
    fp8.check_written(torch.randn(4, 16))  # plain tensors and written companions pass
    fp8.attach(out, q, s)
    fp8.check_written(out)


def test_quantize_rows_checks_its_gelu_and_bias():
    with pytest.raises(ValueError, match="gelu"):
        fp8.quantize_rows(torch.zeros(2, 16), gelu="erf")
    with pytest.raises(ValueError, match="bias must be"):
        fp8.quantize_rows(torch.zeros(2, 16), bias=torch.zeros(8))


def test_cpu_is_fp8_capable_as_emulation():
    assert fp8.fp8_capable(torch.device("cpu")) == (True, "")


@pytest.mark.gpu
@needs_fp8_gpu
def test_scaled_mm_matches_emulation_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(1000, 1152, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3456, 1152, device="cuda", dtype=torch.bfloat16) / 34
    b = torch.randn(3456, device="cuda", dtype=torch.bfloat16)
    xq, xs = fp8.quantize_rows(x)  # the kernel on CUDA
    wq, ws = fp8.quantize_weight(w)
    out = fp8.fp8_matmul(xq, xs, wq, ws, b, torch.bfloat16)
    emu = fp8.fp8_matmul(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), b.cpu(), torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (1000, 3456)
    assert float((out.float().cpu() - emu).norm() / emu.norm()) < 5e-3  # bf16 output rounding
    fast = fp8.fp8_matmul(xq, xs, wq, ws, b, torch.bfloat16, fast_accum=True)
    assert float((fast.float().cpu() - emu).norm() / emu.norm()) < 2e-2
