"""The DSP forward benchmark's trace summary: kinds, NCCL overlap and idle time from known intervals."""

import pytest

from bench.dsp import kernel_kind, summarize_trace


def _k(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_kernel_kinds():
    assert kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert kernel_kind("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_kind("_ln_modulate_kernel") == "norm kernels"
    assert kernel_kind("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>") == "copy / cat"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "other"


def test_summary_overlap_and_idle():
    trace = {"traceEvents": [
        _k("nvjet_gemm", 0, 100),            # compute [0, 100)
        _k("ncclDevKernel_AllToAll", 50, 100),  # NCCL [50, 150): 50 overlapped
        _k("CatArrayBatchedCopy", 200, 50),  # compute [200, 250); idle [150, 200)
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999},  # not a kernel
    ]}
    s = summarize_trace(trace)
    assert s["gpu_span_ms"] == pytest.approx(0.25)
    assert s["compute_ms"] == pytest.approx(0.15)
    assert s["nccl_ms"] == pytest.approx(0.1)
    assert s["nccl_overlapped_ms"] == pytest.approx(0.05)
    assert s["gpu_idle_ms"] == pytest.approx(0.05)
    assert s["by_kind"]["gemm"] == {"ms": 0.1, "calls": 1}
    assert s["by_kind"]["copy / cat"]["calls"] == 1
    assert summarize_trace({"traceEvents": []}) == {}
