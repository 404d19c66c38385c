"""The fp8 GEMMs of pab.precision at a DiT's real shapes, each part timed alone: a table and a JSON record.

    python -m bench.fp8                      # Open-Sora 1.2 480p 2 s: M = 30 x 1,590 tokens, C = 1,152
    python -m bench.fp8 --tokens 16384 --hidden 1152

Per linear of a block (qkv, proj, fc1, fc2) and for the whole MLP: bf16 (the model's path: fc1 with its GELU
in the cuBLASLt epilogue), the activation's quantisation (pab.kernels.fp8, and the same in PyTorch ops), the
fp8 GEMM alone (torch._scaled_mm, row-wise scales, float32 and fast accumulation) and fp8 end to end
(quantise + GEMM; the MLP: fc1, GELU + quantise, fc2). GPU time from CUDA events, median of --iters.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from bench.records import append_records


def gpu_ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def quant_sweep(M: int, C: int, iters: int) -> dict[str, dict[int, float]]:
    """GPU ms of the quantise kernel per num_warps: rows of C (plain) and of 4C (bias + GELU, fc2's input)."""
    from pab.kernels import fp8, row_pieces

    out: dict[str, dict[int, float]] = {}
    for K, gelu in ((C, "none"), (4 * C, "tanh")):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(K, device="cuda", dtype=torch.bfloat16) if gelu != "none" else None
        block = row_pieces(K)[0]  # what QUANT_WARPS is keyed by
        times = {}
        for warps in (1, 2, 4, 8, 16):
            fp8.QUANT_WARPS[block] = warps
            times[warps] = gpu_ms(lambda: fp8.quantize_rows(x, gelu, bias), iters)
        fp8.QUANT_WARPS.pop(block)
        out[f"K={K} gelu={gelu}"] = times
        print(f"quantise K={K} gelu={gelu}: " + ", ".join(f"{w} warps {t:.4f} ms" for w, t in times.items()))
    return out


def fused_mlp(M: int, C: int, iters: int) -> dict[str, object]:
    """bench.fp8_fused's MLP (GELU in fc1's epilogue, fc2's quantisation in its prologue) per tile config, against
    the MLP pab.precision runs (fc1, GELU + quantise pass, fc2 with torch._scaled_mm) and bf16."""
    from bench import fp8_fused
    from pab.kernels.fp8 import fp8_matmul, quantize_rows, quantize_weight

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(M, C, device=dev, dtype=bf)
    w1, b1 = torch.randn(4 * C, C, device=dev, dtype=bf) / C**0.5, torch.randn(4 * C, device=dev, dtype=bf)
    w2, b2 = torch.randn(C, 4 * C, device=dev, dtype=bf) / (4 * C) ** 0.5, torch.randn(C, device=dev, dtype=bf)
    (w1q, w1s), (w2q, w2s) = quantize_weight(w1), quantize_weight(w2)
    xq, xs = quantize_rows(x)
    ref = F.linear(F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh"), w2.float(), b2.float())

    def err(out: torch.Tensor, against: torch.Tensor = ref) -> float:
        return float((out.float() - against.float()).norm() / against.float().norm())

    def current():
        h = fp8_matmul(xq, xs, w1q, w1s, None, bf, True)
        return fp8_matmul(*quantize_rows(h, gelu="tanh", bias=b1), w2q, w2s, b2, bf, True)

    h0, amax0 = fp8_fused.fc1_gelu(xq, xs, w1q, w1s, b1)
    hq, hs = quantize_rows(h0)
    rec: dict[str, object] = {
        "bf16_ms": gpu_ms(lambda: F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2), iters),
        "current_fp8_ms": gpu_ms(current, iters), "current_fp8_err": err(current()),
        "scaled_mm_fc1_ms": gpu_ms(lambda: fp8_matmul(xq, xs, w1q, w1s, None, bf, True), iters),
        "scaled_mm_fc2_ms": gpu_ms(lambda: fp8_matmul(hq, hs, w2q, w2s, b2, bf, True), iters),
    }  # fmt: skip
    fc1, fc2, gemm = {}, {}, {}
    for cfg in fp8_fused.CONFIGS:
        key = "x".join(map(str, cfg))
        fc1[key] = gpu_ms(lambda: fp8_fused.fc1_gelu(xq, xs, w1q, w1s, b1, cfg), iters)  # noqa: B023
        gemm[key] = gpu_ms(lambda: fp8_fused.fc1_gelu(xq, xs, w1q, w1s, b1, cfg, gelu=False), iters)  # noqa: B023
        fc2[key] = gpu_ms(lambda: fp8_fused.fc2_scaled(h0, amax0, w2q, w2s, b2, cfg), iters)  # noqa: B023
        print(f"config {key}: fc1 GEMM alone {gemm[key]:.4f} ms, + GELU/amax epilogue {fc1[key]:.4f} ms, "
              f"fc2 quantising its input {fc2[key]:.4f} ms")  # fmt: skip
    c1 = tuple(map(int, min(fc1, key=fc1.get).split("x")))
    c2 = tuple(map(int, min(fc2, key=fc2.get).split("x")))

    def fused():
        h, amax = fp8_fused.fc1_gelu(xq, xs, w1q, w1s, b1, c1)
        return fp8_fused.fc2_scaled(h, amax, w2q, w2s, b2, c2)

    rec.update(fc1_gemm_alone_ms=gemm, fc1_gelu_ms=fc1, fc2_scaled_ms=fc2, best_fc1=list(c1), best_fc2=list(c2),
               fused_ms=gpu_ms(fused, iters), fused_err=err(fused()), fused_vs_current=err(fused(), current()))
    print({k: v for k, v in rec.items() if not isinstance(v, dict)})
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=30 * 1590, help="GEMM rows (batch x frames x tokens)")
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also the quantise kernel's num_warps per row width")
    p.add_argument("--fused", action="store_true", help="also bench.fp8_fused's MLP, per tile config")
    p.add_argument("--out", default="bench/results/fp8-h200.json")
    args = p.parse_args(argv)

    from pab.kernels.fp8 import fp8_matmul, quantize_rows, quantize_rows_reference, quantize_weight

    M, C = args.tokens, args.hidden
    dev, bf = "cuda", torch.bfloat16
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, 4 * C), "fc2": (4 * C, C)}
    rows = []
    for name, (K, N) in shapes.items():
        x = torch.randn(M, K, device=dev, dtype=bf)
        w = torch.randn(N, K, device=dev, dtype=bf) / K**0.5
        bias = torch.randn(N, device=dev, dtype=bf)
        wq, ws = quantize_weight(w)
        xq, xs = quantize_rows(x)
        row = {
            "gemm": name, "M": M, "K": K, "N": N,
            "bf16_ms": gpu_ms(lambda: F.linear(x, w, bias), args.iters),
            "quant_kernel_ms": gpu_ms(lambda: quantize_rows(x), args.iters),
            "quant_torch_ms": gpu_ms(lambda: quantize_rows_reference(x), args.iters),
            "fp8_gemm_ms": gpu_ms(lambda: fp8_matmul(xq, xs, wq, ws, bias, bf), args.iters),
            "fp8_gemm_fast_ms": gpu_ms(lambda: fp8_matmul(xq, xs, wq, ws, bias, bf, True), args.iters),
            "fp8_gemm_fast_nobias_ms": gpu_ms(lambda: fp8_matmul(xq, xs, wq, ws, None, bf, True), args.iters),
            "fp8_total_ms": gpu_ms(lambda: fp8_matmul(*quantize_rows(x), wq, ws, bias, bf), args.iters),
        }  # fmt: skip
        ref = F.linear(x.float(), w.float(), bias.float())
        out = fp8_matmul(xq, xs, wq, ws, bias, bf).float()
        row["rel_err"] = float((out - ref).norm() / ref.norm())
        rows.append(row)

    # The MLP as the model runs it in bf16 (GELU in fc1's epilogue) and as pab.precision runs it in fp8.
    x = torch.randn(M, C, device=dev, dtype=bf)
    w1, b1 = torch.randn(4 * C, C, device=dev, dtype=bf) / C**0.5, torch.randn(4 * C, device=dev, dtype=bf)
    w2, b2 = torch.randn(C, 4 * C, device=dev, dtype=bf) / (4 * C) ** 0.5, torch.randn(C, device=dev, dtype=bf)
    (w1q, w1s), (w2q, w2s) = quantize_weight(w1), quantize_weight(w2)

    def mlp_bf16():
        return F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2)

    def mlp_fp8(fast=False):  # as pab.precision.Fp8MlpHook: fc1's bias goes into the GELU's pass
        h = fp8_matmul(*quantize_rows(x), w1q, w1s, None, bf, fast)
        return fp8_matmul(*quantize_rows(h, gelu="tanh", bias=b1), w2q, w2s, b2, bf, fast)

    h = fp8_matmul(*quantize_rows(x), w1q, w1s, None, bf)
    ref = F.linear(F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh"), w2.float(), b2.float())
    rows.append({
        "gemm": "mlp", "M": M, "K": C, "N": C,
        "bf16_ms": gpu_ms(mlp_bf16, args.iters),
        "quant_kernel_ms": gpu_ms(lambda: quantize_rows(h, gelu="tanh", bias=b1), args.iters),
        "quant_torch_ms": gpu_ms(lambda: quantize_rows_reference(h, gelu="tanh", bias=b1), args.iters),
        "fp8_gemm_ms": None, "fp8_gemm_fast_ms": gpu_ms(lambda: mlp_fp8(True), args.iters),
        "fp8_gemm_fast_nobias_ms": None,
        "fp8_total_ms": gpu_ms(mlp_fp8, args.iters),
        "rel_err": float((mlp_fp8().float() - ref).norm() / ref.norm()),
    })  # fmt: skip

    cols = ["gemm", "bf16_ms", "quant_kernel_ms", "quant_torch_ms", "fp8_gemm_ms", "fp8_gemm_fast_ms",
            "fp8_gemm_fast_nobias_ms", "fp8_total_ms", "rel_err"]  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, M = {M}, C = {C}; GPU ms (median of {args.iters})")
    print(" | ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>16.4f}" if isinstance(r[c], float) else f"{r[c]!s:>16}" for c in cols))
    sweep = quant_sweep(M, C, args.iters) if args.sweep else None
    fused = fused_mlp(M, C, args.iters) if args.fused else None
    append_records(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "rows": rows, "quant_warps_ms": sweep,
                              "fused_mlp": fused})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
