"""The short-sequence (temporal) attention kernel's launch shapes at the three DiTs' frame counts: a table and JSON.

    python -m bench.short                     # Open-Sora 480p (L = 15), Latte-1 (16), Open-Sora-Plan 65 f (17), 20, 30
    python -m bench.short --cases osp --iters 50 --out /tmp/short.json

`pab.kernels.short_attention` picks (heads per program, warps) by L (`CONFIG`); the tile is the power of two holding
L. Open-Sora-Plan's 17 latent frames take a 32-row tile with 15 rows masked off; its temporal attention ran at about
half Latte's bytes a second (session 29 profiles: ~0.30 ms a call against 0.13). This times every launch shape at
each case's real (N, L, 3C) qkv, bf16, no q/k norm or RoPE (Latte's blocks; Open-Sora's norm + RoPE where the case
has them), with GB/s of the bytes the kernel must move and the largest difference from the default launch (relative
to the output's largest value: the dots' rounding differs between warp layouts).
"""

from __future__ import annotations

import argparse
import datetime

import torch

from bench.fp8 import gpu_ms
from bench.records import append_records

# case -> (sequences N = 2 (CFG) x positions, frames L, heads, head dim, q/k norm + RoPE)
CASES: dict[str, tuple[int, int, int, int, bool]] = {
    "opensora-480p": (2 * 1590, 15, 16, 72, True),
    "latte": (2 * 1024, 16, 16, 72, False),
    "osp": (2 * 1024, 17, 16, 72, False),
    "20-frames": (2 * 1024, 20, 16, 72, False),
    "30-frames": (2 * 1024, 30, 16, 72, False),  # 720p's L at Latte's N: where two warps stop winning
    "opensora-720p-4s": (2 * 45 * 80, 30, 16, 72, True),
}
SHAPES = [(hb, nw) for hb in (1, 2, 4) for nw in (2, 4, 8)]


def sweep(case: str, iters: int) -> list[dict]:
    from pab.kernels import short_attention as sa

    N, L, H, D, norm_rope = CASES[case]
    C = H * D
    dev, bf = "cuda", torch.bfloat16
    qkv = torch.randn(N, L, 3 * C, device=dev, dtype=bf)
    wq = wk = cos = sin = None
    if norm_rope:
        wq, wk = torch.ones(D, device=dev, dtype=bf), torch.ones(D, device=dev, dtype=bf)
        ang = torch.arange(L, device=dev, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=dev)
        cos = ang.cos().repeat_interleave(2, -1)
        sin = torch.stack([-ang.sin(), ang.sin()], -1).flatten(-2)
    ref = sa._launch(qkv, wq, wk, cos, sin, H, 1e-6, *sa.launch_config(L, H))[0]
    moved = (qkv.numel() + N * L * C) * qkv.element_size()
    rows = []
    for hb, nw in SHAPES:
        if H % hb:
            continue
        row = {"case": case, "N": N, "L": L, "hb": hb, "warps": nw}
        try:
            out = sa._launch(qkv, wq, wk, cos, sin, H, 1e-6, hb, nw)[0]
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = gpu_ms(lambda hb=hb, nw=nw: sa._launch(qkv, wq, wk, cos, sin, H, 1e-6, hb, nw), iters)
        except Exception as e:  # noqa: BLE001 - a shape that does not compile (registers) is a finding too
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        rows.append({**row, "ms": ms, "gbps": moved / ms / 1e6, "max_err_vs_default": err,
                     "default": (hb, nw) == sa.launch_config(L, H)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.short", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON file the record is appended to (default: none)")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in cases if c not in CASES]:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)}")

    print(f"{torch.cuda.get_device_name()}: GPU ms (median of {args.iters}), GB/s of qkv read + output written")
    rows = []
    for case in cases:
        got = sweep(case, args.iters)
        rows += got
        ok = [r for r in got if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        for r in got:
            mark = " default" if r.get("default") else ""
            mark += " best" if r is best else ""
            body = (f"{r['ms']:7.4f} ms {r['gbps']:6.0f} GB/s, max err vs default {r['max_err_vs_default']:.1e}"
                    if "ms" in r else r["error"])  # fmt: skip
            print(f"{case:>17} L={CASES[case][1]:2d} {r['hb']}x{r['warps']}: {body}{mark}")
    if args.out:
        append_records(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                                  "torch": torch.__version__, "bench": "short", "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
