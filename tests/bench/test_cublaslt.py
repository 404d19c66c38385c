"""bench.cublaslt, the cuBLASLt fp8-epilogue experiment: its checks on the CPU, and on a GPU (marked gpu) that the
tensor-scaled GEMM with bias + GELU + e4m3 output computes what PyTorch does with the same e4m3 operands."""

import pytest
import torch
import torch.nn.functional as F

from bench import cublaslt
from pab.kernels import fp8

E4M3 = torch.float8_e4m3fn


def _operands(M=96, N=64, K=32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, torch.bfloat16)
    b = (torch.randn(N, generator=g) * 0.1).to(device, torch.bfloat16)
    return x, w, b


def test_what_it_refuses_is_said_before_cublaslt_is_asked():
    x, w, b = _operands()
    xq, xs = fp8.quantize_rows_reference(x)
    wq, ws = fp8.quantize_weight(w)
    with pytest.raises(ValueError, match="xq must be contiguous e4m3"):
        cublaslt.lt_matmul(x, xs, wq, ws)
    with pytest.raises(ValueError, match="needs d_scale"):
        cublaslt.lt_matmul(xq, xs, wq, ws, out_dtype=E4M3)
    with pytest.raises(ValueError, match="shapes do not agree"):
        cublaslt.lt_matmul(xq, xs[:10], wq, ws)
    with pytest.raises(ValueError, match="bias must be bf16"):
        cublaslt.lt_matmul(xq, xs, wq, ws, bias=b.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="Hopper")
def test_tensor_scaled_gelu_epilogue_writes_e4m3_and_its_amax():
    x, w, b = _operands(300, 256, 128, "cuda")
    amax_x, amax_w = x.float().abs().amax(), w.float().abs().amax()
    xq, xs = fp8.quantize_delayed(x, amax_x / fp8.DELAYED_MARGIN)
    wq, ws = fp8.quantize_delayed(w, amax_w / fp8.DELAYED_MARGIN)
    xs, ws = xs[:1].reshape(()).contiguous(), ws[:1].reshape(()).contiguous()
    want = F.gelu((xq.float() * xs) @ (wq.float() * ws).t() + b.float(), approximate="tanh")
    d_scale = (fp8.E4M3_MAX / (2 * want.abs().amax())).reshape(()).contiguous()
    amax = torch.zeros((), device="cuda")
    out = cublaslt.lt_matmul(xq, xs, wq, ws, bias=b, gelu=True, out_dtype=E4M3, d_scale=d_scale, amax=amax)
    assert out.dtype == E4M3 and out.shape == (300, 256)
    assert torch.allclose(amax, want.abs().amax(), rtol=1e-2)  # of the values before the scale
    assert float((out.float() / d_scale - want).norm() / want.norm()) < 0.05  # e4m3 rounding (~3%)
    bf16 = cublaslt.lt_matmul(xq, xs, wq, ws, bias=b)
    assert torch.allclose(bf16.float(), (xq.float() * xs) @ (wq.float() * ws).t() + b.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="Hopper")
def test_row_scaled_gemm_adds_a_residual_into_out():
    h, w, b = _operands(300, 256, 128, "cuda")
    hq, hs = fp8.quantize_rows_reference(h)
    wq, ws = fp8.quantize_weight(w)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    got = cublaslt.lt_matmul(hq, hs, wq, ws, bias=b, residual=x, out=out)
    want = x.float() + fp8.fp8_matmul(hq, hs, wq, ws, None, torch.float32) + b.float()  # no bias to float32 in torch
    assert got.data_ptr() == out.data_ptr()
    assert torch.allclose(out.float(), want, rtol=2**-7, atol=2e-2)


def test_the_variants_table_records_what_the_heuristic_takes_and_refuses(monkeypatch, tmp_path):
    """main() on a stand-in cuBLASLt that has bf16 outputs only: every combination is asked and recorded, and the
    timed parts that need an e4m3 output are skipped."""
    import json

    asked = []

    class FakeLt:
        def plan(self, key, device):
            asked.append(key)
            if key[4] != torch.bfloat16:
                raise cublaslt.CublasLtError("cuBLASLt has no fp8 kernel for ... (status 7, 0 algorithms)")

    monkeypatch.setattr(cublaslt, "_lt", FakeLt)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    out = tmp_path / "r.json"
    assert cublaslt.main(["--out", str(out)]) == 0
    record = json.loads(out.read_text())[-1]
    variants = record["variants"]
    assert len(asked) == len(variants) == 2 * 3 * 4 + 3 * 2  # scalings x epilogues x outputs, + C types x D modes
    assert variants["rows gelu_bias torch.bfloat16 d_scale=False amax=False"] == "yes"
    assert variants["tensor gelu_bias torch.float8_e4m3fn d_scale=True amax=True"] == "status 7, 0 algorithms"
    assert record["tensorwise"] is None and record["gated"] is None
