"""The one-row-a-program kernels at a DiT's real shapes, a row in one tile or in two: a table and a JSON record.

    python -m bench.rowpass                       # Open-Sora 1.2 480p 2 s: 30 x 1,590 tokens, C = 1,152
    python -m bench.rowpass --tokens 32768        # Latte-1 512 x 512 x 16

Triton's tiles are powers of two, so a 1,152-wide row in one tile of 2,048 (4,608 in 8,192) leaves 44% of the
lanes working on masked-off values; `pab.kernels.row_pieces` splits it into 1,024 + 128 (4,096 + 512) instead.
Each pass, both layouts, per num_warps: the quantise kernel (1,152 plain; 4,608 with bias + tanh GELU, fc2's
input), the layer norm + modulate (plain, fp8 "only", and with the residual add or the gated residual and fp8
"only", as the blocks call it) and the gate + residual. GPU ms from CUDA events (median of --iters) and the effective bandwidth of the bytes each pass
must move.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from bench.fp8 import gpu_ms
from bench.records import append_records

WARPS = (1, 2, 4, 8)


def _layouts(width: int) -> dict[str, tuple[int, int]]:
    from pab.kernels import row_pieces

    return {"one tile": (1 << (width - 1).bit_length(), 0), "two tiles": row_pieces(width)}


def passes(M: int, C: int) -> list[tuple[str, int, int, object]]:
    """(name, row width, bytes moved, fn(layout, warps)) of each pass at M rows of C."""
    from pab.kernels import fp8, norms

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(M, C, device=dev, dtype=bf)
    h = torch.randn(M, 4 * C, device=dev, dtype=bf)
    b1 = torch.randn(4 * C, device=dev, dtype=bf)
    x4 = x.view(2, M // 2, 1, C) if M % 2 == 0 else x.view(1, M, 1, C)
    res = torch.randn_like(x4)
    table = torch.randn(x4.shape[0], 2, 1, 1, C, device=dev, dtype=bf)
    shift, scale = table[:, 0], table[:, 1]

    def quant(t, gelu, bias):
        def run(layout, warps):
            fp8.QUANT_WARPS[layout[0]] = warps
            try:
                return fp8.quantize_rows(t, gelu, bias, pieces=layout)
            finally:
                fp8.QUANT_WARPS.pop(layout[0])
        return run

    def ln(residual, mode, gate=None):
        def run(layout, warps):
            return norms._ln_modulate(x4, shift, scale, 1e-6, residual, False, config=(1, warps), fp8=mode,
                                      pieces=layout, gate=gate)  # fmt: skip
        return run

    def gated(mode):
        def run(layout, warps):
            return norms._gated_residual(x4, shift, res, False, pieces=layout, warps=warps, fp8=mode)
        return run

    n = M * C
    return [
        ("quantise", C, 2 * n + n, quant(x, "none", None)),
        ("bias + GELU + quantise", 4 * C, 4 * (2 * n + n), quant(h, "tanh", b1)),
        ("norm + modulate", C, 2 * n + 2 * n, ln(None, None)),
        ("norm + modulate, e4m3 only", C, 2 * n + n, ln(None, "only")),
        ("residual + norm + modulate, e4m3 only", C, 2 * 2 * n + 2 * n + n, ln(res, "only")),
        # a block's MLP residual and the next block's norm (pab.models.handoff)
        ("gate + residual + norm + modulate, e4m3 only", C, 2 * 2 * n + 2 * n + n, ln(res, "only", gate=shift)),
        ("gate + residual", C, 3 * 2 * n, gated(None)),
        ("gate + residual, e4m3 also", C, 3 * 2 * n + n, gated("also")),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rowpass", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=30 * 1590, help="rows (batch x frames x tokens)")
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON file the record is appended to (default: none)")
    args = p.parse_args(argv)

    rows = []
    print(f"{torch.cuda.get_device_name()}, M = {args.tokens}, C = {args.hidden}; GPU ms (median of {args.iters}) "
          f"and GB/s of the bytes each pass must move")  # fmt: skip
    print(f"{'pass':>40} | {'layout':>20} | " + " | ".join(f"{w} warps" for w in WARPS) + " | best GB/s")
    for name, width, nbytes, run in passes(args.tokens, args.hidden):
        for label, layout in _layouts(width).items():
            ms = {w: gpu_ms(lambda w=w: run(layout, w), args.iters) for w in WARPS}
            best = min(ms.values())
            rows.append({"pass": name, "width": width, "layout": label, "tiles": list(layout), "ms_by_warps": ms,
                         "best_ms": best, "gbps": nbytes / best / 1e6})  # fmt: skip
            print(f"{name:>40} | {label + ' ' + str(layout):>20} | " + " | ".join(f"{t:7.4f}" for t in ms.values())
                  + f" | {nbytes / best / 1e6:7.0f}")  # fmt: skip
    if args.out:
        append_records(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                                  "torch": torch.__version__, "tokens": args.tokens, "hidden": args.hidden,
                                  "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
