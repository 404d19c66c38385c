"""The norm / modulate / gated-residual kernels (pab/kernels/norms.py) against plain PyTorch.

Runs where Triton can: on CUDA, or on the CPU through Triton's interpreter, e.g.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels    # what ./run.sh test does

Without Triton, or without CUDA and TRITON_INTERPRET, the kernel tests skip; `supported` is tested everywhere.
"""


import pytest
import torch
import torch.nn.functional as F

from pab.kernels import KernelOptions, kernel_options, norms, set_kernel_options
from support.kernels import CUDA, DEVICE, needs_triton

# (B, T, S, C): a C that is not a power of two (masked tail), T = 1, per-frame parameters
SHAPES = [(2, 3, 5, 96), (1, 1, 7, 64), (2, 4, 3, 40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(B, T, C, per_frame, k=3, dtype=torch.float32):
    """k adaLN parameters as views of one (B, 6, T', 1, C) table, the layout the blocks pass."""
    table = torch.randn(B, 6, T if per_frame else 1, 1, C, device=DEVICE, dtype=dtype)
    return [table[:, i] for i in range(k)]


def ref_ln_modulate(x, shift, scale, eps):
    x64 = x.double()
    y = F.layer_norm(x64, (x.shape[-1],), eps=eps) * (1 + scale.double()) + shift.double()
    return y


def test_supported_only_on_cuda_half():
    assert not norms.supported(torch.empty(2, 3, 4, 8))
    assert not norms.supported(torch.empty(2, 3, 4, 8, dtype=torch.bfloat16))  # CPU
    if CUDA:
        assert norms.supported(torch.empty(2, 3, 4, 8, device="cuda", dtype=torch.bfloat16))
        assert not norms.supported(torch.empty(2, 3, 4, 8, device="cuda"))  # float32: the PyTorch path


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("frame_major", [False, True])
def test_ln_modulate(shape, per_frame, frame_major):
    B, T, S, C = shape
    torch.manual_seed(0)
    x = 3 * torch.randn(shape, device=DEVICE) + 1
    shift, scale = params(B, T, C, per_frame, 2)
    out = norms.ln_modulate(x, shift, scale, 1e-6, frame_major=frame_major)
    ref = ref_ln_modulate(x, shift, scale, 1e-6)
    if frame_major:
        assert out.shape == (B, S, T, C)
        ref = ref.transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
def test_add_ln_modulate(shape, per_frame):
    B, T, S, C = shape
    torch.manual_seed(1)
    x, res = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    shift, scale = params(B, T, C, per_frame, 2)
    x_new, out = norms.add_ln_modulate(x, res, shift, scale, 1e-6)
    torch.testing.assert_close(x_new, x + res, atol=0, rtol=0)
    torch.testing.assert_close(out.double(), ref_ln_modulate(x + res, shift, scale, 1e-6), atol=1e-5, rtol=1e-5)
    assert x_new.data_ptr() not in (x.data_ptr(), res.data_ptr())  # inputs untouched


@needs_triton
@pytest.mark.parametrize("config", [(2, 4), (4, 2), (1, 1)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("pieces", [None, (128, 0)])
def test_ln_launch_shapes(config, residual, pieces):
    """Several rows per program, including a last program that runs past the final row (3*5*7 = 105 rows); each
    row in two tiles (96 = 64 + 32, the default) or in one masked tile of 128."""
    B, T, S, C = 3, 5, 7, 96
    torch.manual_seed(6)
    x, res = torch.randn(B, T, S, C, device=DEVICE), torch.randn(B, T, S, C, device=DEVICE)
    shift, scale = params(B, T, C, True, 2)
    xo, out = norms._ln_modulate(x, shift, scale, 1e-6, res if residual else None, True, config=config,
                                 pieces=pieces)  # fmt: skip
    x_in = x + res if residual else x
    ref = ref_ln_modulate(x_in, shift, scale, 1e-6).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if residual:
        torch.testing.assert_close(xo, x_in, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("config", [(2, 4), (1, 1)])
@pytest.mark.parametrize("frame_major", [False, True])
@pytest.mark.parametrize("one_tile", [False, True])
def test_ln_modulate_writes_the_e4m3_rows_of_its_output(config, frame_major, one_tile):
    """fp8="also": the output's rows in e4m3 with their scales, attached to it, as quantize_rows would make them
    (3*5*7 = 105 rows, the last program running past the end; frame-major rows in the output's order), from a
    row in two tiles (64 + 32) or in one masked tile of 128."""
    from pab.kernels import fp8

    B, T, S, C = 3, 5, 7, 96
    torch.manual_seed(7)
    x = torch.randn(B, T, S, C, device=DEVICE, dtype=torch.bfloat16)
    shift, scale = params(B, T, C, True, 2, dtype=torch.bfloat16)
    pieces = (128, 0) if one_tile else None
    _, out = norms._ln_modulate(x, shift, scale, 1e-6, None, frame_major, config=config, fp8="also", pieces=pieces)
    plain = norms._ln_modulate(x, shift, scale, 1e-6, None, frame_major, config=config, pieces=pieces)[1]
    assert torch.equal(out, plain)  # the bf16 output is unchanged
    rows = fp8.companion(out.view(-1, C))
    assert rows is not None
    fp8.check_written(out.view(-1, C))  # its values are there for any other reader
    q, s = rows
    rq, rs = fp8.quantize_rows_reference(out.view(-1, C))
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    if CUDA:  # the interpreter's e4m3 cast is wrong (tests/kernels/test_fp8.py): values on a GPU only
        # Triton's 448 / amax is not IEEE-rounded like torch's, so a rare value rounds to the next e4m3 one; the
        # linears' own quantisation (the same Triton arithmetic) matches it bit for bit (tests/gpu/test_fp8_pipeline.py)
        assert (q.float() == rq.float()).float().mean() > 0.999
        torch.testing.assert_close(q.float() * s, rq.float() * rs, rtol=2**-3, atol=0)


@needs_triton
@pytest.mark.parametrize("frame_major", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_ln_modulate_can_write_the_e4m3_rows_alone(frame_major, residual):
    """fp8="only": the same rows and scales as "also" (and the same residual sum), and the output is marked as
    never written, so a reader that would read its values raises instead of reading garbage."""
    from pab.kernels import fp8

    if residual and frame_major:
        pytest.skip("the residual form writes the standard layout only")
    B, T, S, C = 2, 3, 5, 80
    torch.manual_seed(11)
    x = torch.randn(B, T, S, C, device=DEVICE, dtype=torch.bfloat16)
    res = torch.randn_like(x) if residual else None
    shift, scale = params(B, T, C, False, 2, dtype=torch.bfloat16)
    xo_also, also = norms._ln_modulate(x, shift, scale, 1e-6, res, frame_major, fp8="also")
    xo_only, only = norms._ln_modulate(x, shift, scale, 1e-6, res, frame_major, fp8="only")
    assert only.shape == also.shape
    (qa, sa), (qo, so) = fp8.companion(also.view(-1, C)), fp8.companion(only.view(-1, C))
    assert torch.equal(qo.view(torch.uint8), qa.view(torch.uint8)) and torch.equal(so, sa)
    if residual:
        assert torch.equal(xo_only, xo_also)
        fp8.check_written(xo_only)
    with pytest.raises(RuntimeError, match="e4m3 rows only"):
        fp8.check_written(only.view(-1, C))
    with pytest.raises(ValueError, match="fp8="):
        norms._ln_modulate(x, shift, scale, 1e-6, None, frame_major, fp8=True)


@needs_triton
def test_add_ln_modulate_normalises_the_rounded_sum():
    """In half precision the norm sees x + res as stored (rounded), like the unfused x = x + c; norm(x)."""
    torch.manual_seed(2)
    shape = (1, 2, 3, 64)
    x, res = torch.randn(shape, device=DEVICE).half(), torch.randn(shape, device=DEVICE).half()
    shift, scale = params(1, 2, 64, True, 2, dtype=torch.float16)
    x_new, out = norms.add_ln_modulate(x, res, shift, scale, 1e-6)
    assert torch.equal(x_new, x + res)
    ref = ref_ln_modulate(x + res, shift, scale, 1e-6)
    torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=2e-3)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("frame_major", [False, True])
@pytest.mark.parametrize("a_frame_major", [False, True])
def test_gated_ln_modulate(shape, per_frame, frame_major, a_frame_major):
    """x + gate * a and the norm of that sum in one pass (per-sample or per-frame parameters, `a` and the output in
    either layout): in float32 against the float64 references; in bf16, what the models run, the same bits as the
    gate + residual kernel and `ln_modulate` of its sum. (bf16 products are exact in float32, so x + gate * a rounds
    the same whether or not the compiler makes it an FMA; in float32 one H100 run differed by an ulp at C = 96.)"""
    B, T, S, C = shape
    torch.manual_seed(4)
    x, a = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    gate, shift, scale = params(B, T, C, per_frame, 3)

    def fused(x, a, gate, shift, scale):
        a_in = a.transpose(1, 2).contiguous().view(B * S, T, C) if a_frame_major else a.view(B, T * S, C)
        x_new, out = norms.gated_ln_modulate(x, gate, a_in, shift, scale, 1e-6, frame_major=frame_major,
                                             a_frame_major=a_frame_major)  # fmt: skip
        return a_in, x_new, out

    _, x_new, out = fused(x, a, gate, shift, scale)
    torch.testing.assert_close(x_new, torch.addcmul(x, gate, a), atol=1e-6, rtol=1e-6)
    ref = ref_ln_modulate(x_new, shift, scale, 1e-6)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2) if frame_major else ref, atol=1e-5, rtol=1e-5)
    assert out.shape == ((B, S, T, C) if frame_major else shape)

    x, a, gate, shift, scale = (t.to(torch.bfloat16) for t in (x, a, gate, shift, scale))
    a_in, x_new, out = fused(x, a, gate, shift, scale)
    assert torch.equal(x_new, norms.gated_residual(x, gate, a_in, frame_major=a_frame_major))
    assert torch.equal(out, norms.ln_modulate(x_new, shift, scale, 1e-6, frame_major=frame_major))


@needs_triton
@pytest.mark.parametrize("frame_major", [False, True])
def test_gated_ln_modulate_writes_the_e4m3_rows_alone_as_the_norm_would(frame_major):
    """fp8="only" (the next attention's qkv its only reader): the rows and scales `ln_modulate` writes for the same
    sum, in bf16, and the sum itself written in full."""
    from pab.kernels import fp8

    B, T, S, C = 2, 3, 5, 96
    torch.manual_seed(12)
    x, a = (torch.randn(B, T, S, C, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = params(B, T, C, True, 3, dtype=torch.bfloat16)
    x_new, only = norms.gated_ln_modulate(x, gate, a, shift, scale, 1e-6, frame_major=frame_major, fp8="only")
    assert torch.equal(x_new, norms.gated_residual(x, gate, a))
    fp8.check_written(x_new)
    alone = norms.ln_modulate(x_new, shift, scale, 1e-6, frame_major=frame_major, fp8="only")
    (q, s), (rq, rs) = fp8.companion(only.view(-1, C)), fp8.companion(alone.view(-1, C))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    with pytest.raises(RuntimeError, match="e4m3 rows only"):
        fp8.check_written(only.view(-1, C))
    with pytest.raises(ValueError, match="gate scales the residual"):
        norms._ln_modulate(x, shift, scale, 1e-6, None, False, gate=gate)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("frame_major", [False, True])
@pytest.mark.parametrize("one_tile", [False, True])
def test_gated_residual(shape, per_frame, frame_major, one_tile):
    """Rows in two tiles (96 = 64 + 32, 40 = 32 + 8; the default) or in one masked tile."""
    B, T, S, C = shape
    torch.manual_seed(3)
    x = torch.randn(shape, device=DEVICE)
    (gate,) = params(B, T, C, per_frame, 1)
    a = torch.randn(shape, device=DEVICE)
    a_in = a.transpose(1, 2).contiguous().view(B * S, T, C) if frame_major else a.view(B, T * S, C)
    if one_tile:
        out = norms._gated_residual(x, gate, a_in, frame_major, pieces=(1 << (C - 1).bit_length(), 0))
    else:
        out = norms.gated_residual(x, gate, a_in, frame_major=frame_major)
    torch.testing.assert_close(out, torch.addcmul(x, gate, a), atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("frame_major", [False, True])
@pytest.mark.parametrize("one_tile", [False, True])
def test_gated_residual_writes_the_e4m3_rows_of_its_sum(frame_major, one_tile):
    """fp8="also": the sum (the residual stream, always written, unchanged) and its rows in e4m3 with their
    scales, attached to it, as quantize_rows would make them; "only" is refused."""
    from pab.kernels import fp8

    B, T, S, C = 2, 3, 5, 96
    torch.manual_seed(8)
    x = torch.randn(B, T, S, C, device=DEVICE, dtype=torch.bfloat16)
    (gate,) = params(B, T, C, True, 1, dtype=torch.bfloat16)
    a = torch.randn(B, S, T, C, device=DEVICE, dtype=torch.bfloat16) if frame_major else torch.randn_like(x)
    pieces = (1 << (C - 1).bit_length(), 0) if one_tile else None
    out = norms._gated_residual(x, gate, a, frame_major, pieces=pieces, fp8="also")
    assert torch.equal(out, norms._gated_residual(x, gate, a, frame_major, pieces=pieces))
    assert fp8.companion(norms._gated_residual(x, gate, a, frame_major).view(-1, C)) is None  # asked for none
    q, s = fp8.companion(out.view(-1, C))
    fp8.check_written(out.view(-1, C))
    rq, rs = fp8.quantize_rows_reference(out.view(-1, C))
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    if CUDA:  # values on a GPU only, as for the layer norm's rows above
        assert (q.float() == rq.float()).float().mean() > 0.999
        torch.testing.assert_close(q.float() * s, rq.float() * rs, rtol=2**-3, atol=0)
    with pytest.raises(ValueError, match="always written"):
        norms.gated_residual(x, gate, a.view(B, T * S, C), frame_major, fp8="only")


@needs_triton
def test_gated_residual_writes_the_sum_alone_once_its_e4m3_variant_fails_to_build(monkeypatch):
    """A GPU where the e4m3 variant cannot be built (no e4m3 cast, a compiler error): the sum is still right, no rows
    are attached (the fp8 GEMM then runs as it would without them), one warning, and no second try."""
    import triton

    from pab.kernels import fp8

    B, T, S, C = 1, 2, 3, 32
    x = torch.randn(B, T, S, C, device=DEVICE)
    (gate,) = params(B, T, C, False, 1)
    a = torch.randn_like(x)
    real, calls = norms._launch_gated, []

    def launch(grid, *args, FP8, **kwargs):
        calls.append(FP8)
        if FP8:
            raise triton.errors.TritonError("no e4m3 conversion on this GPU")
        return real(grid, *args, FP8=FP8, **kwargs)

    monkeypatch.setattr(norms, "_launch_gated", launch)
    monkeypatch.setattr(norms, "_ROWS_ERROR", None)
    with pytest.warns(UserWarning, match="cannot write e4m3 rows"):
        out = norms.gated_residual(x, gate, a, fp8="also")
    torch.testing.assert_close(out, torch.addcmul(x, gate, a), atol=1e-6, rtol=1e-6)
    assert fp8.companion(out.view(-1, C)) is None
    again = norms.gated_residual(x, gate, a, fp8="also")
    assert torch.equal(again, out) and calls == [True, False, False]


@needs_triton
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (3, 24), (2, 72)])
@pytest.mark.parametrize("N,L", [(2, 5), (1, 9)])
def test_qk_rmsnorm(N, L, heads, head_dim):
    torch.manual_seed(4)
    C = heads * head_dim
    qkv = torch.randn(N, L, 3 * C, device=DEVICE)
    qw, kw = 1 + 0.3 * torch.randn(head_dim, device=DEVICE), 1 + 0.3 * torch.randn(head_dim, device=DEVICE)
    out = norms.qk_rmsnorm(qkv, heads, qw, kw, 1e-6)
    assert out.shape == (2, N, L, heads, head_dim)
    q, k, _ = qkv.view(N, L, 3, heads, head_dim).unbind(2)
    torch.testing.assert_close(out[0], F.rms_norm(q, (head_dim,), qw, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], F.rms_norm(k, (head_dim,), kw, 1e-6), atol=1e-5, rtol=1e-5)


@needs_triton
def test_qk_rmsnorm_strided_rows():
    """qkv as a row slice of a larger buffer (rows not packed by sequence) is made contiguous first."""
    torch.manual_seed(5)
    big = torch.randn(4, 6, 3 * 32, device=DEVICE)
    qkv = big[:, 1:5]  # (4, 4, 96), stride(0) != L * stride(1)
    w = torch.ones(16, device=DEVICE)
    out = norms.qk_rmsnorm(qkv, 2, w, w, 1e-6)
    q = qkv.reshape(4, 4, 3, 2, 16)[:, :, 0]
    torch.testing.assert_close(out[0], F.rms_norm(q, (16,), w, 1e-6), atol=1e-5, rtol=1e-5)


@needs_triton
def test_bad_shapes_are_refused():
    x = torch.randn(2, 3, 4, 8, device=DEVICE)
    good = torch.randn(2, 1, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shift must be"):
        norms.ln_modulate(x, torch.randn(2, 2, 1, 8, device=DEVICE), good, 1e-6)  # T' neither 1 nor T
    with pytest.raises(ValueError, match="contiguous"):
        norms.ln_modulate(x.transpose(1, 2), good, good, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        norms.add_ln_modulate(x, torch.randn(2, 3, 4, 8, device=DEVICE)[:, :2], good, good, 1e-6)
    with pytest.raises(ValueError, match="norm weights"):
        norms.qk_rmsnorm(torch.randn(1, 2, 48, device=DEVICE), 2, torch.ones(4, device=DEVICE),
                         torch.ones(8, device=DEVICE), 1e-6)  # fmt: skip


@needs_triton
def test_ops_trace_under_torch_compile():
    """The ops are opaque to Dynamo: a compiled function calling them gives the eager result, no graph break."""
    x = torch.randn(1, 2, 3, 32, device=DEVICE)
    shift, scale = params(1, 2, 32, True, 2)

    def f(x, shift, scale):
        return norms.ln_modulate(x, shift, scale, 1e-6) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, shift, scale), f(x, shift, scale))

    def g(x, shift, scale):  # the gated form goes through the same op, with its gate
        return norms.gated_ln_modulate(x, scale, x * 2, shift, scale, 1e-6, frame_major=True)

    for got, want in zip(torch.compile(g, fullgraph=True, backend="eager")(x, shift, scale), g(x, shift, scale)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------- CUDA: whole models


def _models():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import test_latte
    import test_stdit3

    def stdit3_case():
        kw = test_stdit3.tiny_inputs(T=5)
        return test_stdit3.tiny_model(), kw, lambda out: out

    def latte_case():
        return test_latte.tiny_model(), test_latte.tiny_inputs(), lambda out: out[0]

    return {"stdit3": stdit3_case, "latte": latte_case}


@pytest.mark.gpu
@pytest.mark.skipif(norms.triton is None or not CUDA, reason="compares the models' two paths on CUDA")
@pytest.mark.parametrize("name", ["stdit3", "latte"])
def test_models_in_bf16_are_as_close_to_float32_with_the_kernels(name):
    """Each tiny model in bf16, kernels on and off, against its float32 forward: the kernels (float32 inside,
    one rounding) are no further from float32 than the PyTorch path (bf16 rounding after each op)."""
    model, kw, first = _models()[name]()
    model = model.cuda()
    kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
    with torch.no_grad():
        ref = first(model(**kw)).double()
        model16 = model.to(torch.bfloat16)
        kw16 = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        fused = first(model16(**kw16)).double()
        with kernel_options(model16, norms=False):
            plain = first(model16(**kw16)).double()

    def rel(a):
        return ((a - ref).norm() / ref.norm()).item()

    assert norms._CHECKED  # the kernels really ran
    assert rel(fused) < 2e-2 and rel(fused) < 1.2 * rel(plain) + 2e-3, (rel(fused), rel(plain))


@pytest.mark.gpu
@pytest.mark.skipif(norms.triton is None or not CUDA, reason="compares the models' two paths on CUDA")
@pytest.mark.parametrize("impl", ["sdpa", "bmm", "triton"])
def test_stdit3_kernels_keep_every_temporal_implementation(impl):
    """The q/k-norm shortcut is for spatial attention only: temporal attention keeps its RoPE on every path."""
    model, kw, _ = _models()["stdit3"]()
    model = model.cuda().to(torch.bfloat16)
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in kw.items()}
    set_kernel_options(model, KernelOptions(temporal_attention=impl))
    with torch.no_grad():
        fused = model(**kw).double()
        with kernel_options(model, norms=False):
            plain = model(**kw).double()
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2
