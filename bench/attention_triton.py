"""An experiment (issue #20): pab.kernels.flash_attention against cuDNN at Open-Sora 1.2's spatial attention, d = 72.

    python -m bench.attention_triton --sweep --layout packed --out bench/results/attention-triton.json
    python -m bench.attention_triton --sweep --layout packed --seqs 2 --tokens 23850 --keys 120   # cross-attention

SDPA's fastest backend, cuDNN, takes 2.23 ms for 60 sequences x 16 heads x 1,590 tokens at d = 72 on an H200, 313
TFLOP/s counted at d = 72 (flash 221, efficient 94; bench/results/attention-h200.json). How the kernel splits the
head dim and loads its tiles: pab/kernels/flash_attention.py.

`--sweep` times every launch config in `CONFIGS` and SDPA's cuDNN backend on the same inputs; a config that does
not compile or fit in shared memory gets an error in its row. Rows print as they are measured; the record (GPU,
versions, date, shape, rows) is appended to --out (bench/records.py) and `best_config` picks the fastest row within
error tolerance (the kernel's `CONFIG` is set from it). The error column is max |out - SDPA's math backend in
float32|.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import torch

from pab.kernels.flash_attention import CONFIG as DEFAULT_CONFIG
from pab.kernels.flash_attention import LOADS, cross_config, flash_attention, triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages, loads) that --sweep times: the pointer kernel over the whole grid
# (offline for sm_90 with Triton 3.9 all compile, within 184 KB of shared memory; 128 x 64 and 128 x 128 with 4
# warps spill registers), the TMA one at the shapes that compile without spills
CONFIGS: list[tuple[int, int, int, int, str]] = [
    (bm, bn, warps, stages, "pointer")
    for bm in (64, 128) for bn in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)
] + [
    (bm, bn, warps, stages, "tma")
    for bm, bn, warps in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8)) for stages in (2, 3)
]  # fmt: skip


def best_config(rows: list[dict[str, Any]]) -> tuple[int, int, int, int, str] | None:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, loads) of the fastest Triton row that ran and passed its error check
    (rows as the benchmark writes them), or None."""
    ran = [r for r in rows if r.get("impl") == "triton" and "ms" in r and r.get("ok", True)]
    if not ran:
        return None
    best = min(ran, key=lambda r: r["ms"])
    return best["block_m"], best["block_n"], best["num_warps"], best["num_stages"], best["loads"]


# ------------------------------------------------------------------------------------------------ benchmark


def make_inputs(n: int, h: int, length: int, d: int, layout: str, dtype=torch.bfloat16, device="cuda",
                keys: int | None = None):  # fmt: skip
    """q, k, v (N, H, L, D): separate contiguous tensors ("nhld") or views of one (N, L, 3, H, D) qkv ("packed").
    With `keys` (cross-attention), k and v hold that many keys: (N, H, keys, D), and "packed" is what the models
    feed it: q a view of an (N, L, H, D) projection, k and v views of one (N, keys, 2, H, D)."""
    g = torch.Generator(device).manual_seed(0)
    if keys is not None:
        if layout == "nhld":
            return tuple(torch.randn(n, h, rows, d, device=device, dtype=dtype, generator=g)
                         for rows in (length, keys, keys))  # fmt: skip
        q = torch.randn(n, length, h, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
        kv = torch.randn(n, keys, 2, h, d, device=device, dtype=dtype, generator=g)
        return (q, *(t.transpose(1, 2) for t in kv.unbind(2)))
    if layout == "nhld":
        return tuple(torch.randn(n, h, length, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    qkv = torch.randn(n, length, 3, h, d, device=device, dtype=dtype, generator=g)
    return tuple(t.permute(0, 2, 1, 3) for t in qkv.unbind(2))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """SDPA's math backend in float32, `chunk` sequences at a time (it materialises the L x L scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(0, q.shape[0], chunk):
            s = slice(i, i + chunk)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q[s].float(), k[s].float(), v[s].float()))
    return torch.cat(outs)


def _row(name: str, fn, ref: torch.Tensor, flop: int, iters: int, transpose: bool = False, **extra) -> dict:
    """Run `fn` once (compiles; an error ends up in the row), then time it; max |err| against `ref`."""
    from bench.attention import time_ms

    row: dict[str, Any] = {"impl": name, **extra}
    try:
        out = fn()
        torch.cuda.synchronize()
        out = out.transpose(1, 2) if transpose else out
        row["max_err"] = float((out.float() - ref).abs().max())
        row["ms"] = round(time_ms(fn, iters), 4)
        row["tflops_at_d"] = round(flop / row["ms"] / 1e9, 1)
    except Exception as e:  # a config that does not compile or fit is a row, not a crash
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        msg = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))  # a compile error's message is its last line
        row["error"] = f"{type(e).__name__}: {msg}"[:300]
    return row


def _print_row(r: dict[str, Any]) -> None:
    config = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} {r['loads']}" if "loads" in r else "-"
    cells = [r["impl"], config] + [r.get(c, "-") for c in ("ms", "tflops_at_d", "max_err", "ok")]
    print(" | ".join(f"{c!s:>21}" if i < 2 else f"{c!s:>10.8}" for i, c in enumerate(cells)), r.get("error", ""),
          flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.records import append_records

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="time every config in CONFIGS (else DEFAULT_CONFIG)")
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS), help="sweep only these kernels")
    p.add_argument("--tiles", nargs="+", metavar="MxN", help="sweep only these BLOCK_M x BLOCK_N tiles (e.g. 128x64)")
    p.add_argument("--warps", nargs="+", type=int, help="sweep only these num_warps")
    p.add_argument("--config", nargs=5, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES", "LOADS"),
                   help="time this config instead of DEFAULT_CONFIG")  # fmt: skip
    p.add_argument("--seqs", type=int, default=60)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1590)
    p.add_argument("--dim", type=int, default=72)
    p.add_argument("--keys", type=int, help="cross-attention: this many keys (text tokens) against --tokens queries; "
                   "pointer loads only, the default config `cross_config(keys)` (e.g. --seqs 2 --tokens 23850 --keys "
                   "120 for Open-Sora 480p)")  # fmt: skip
    p.add_argument("--layout", choices=("nhld", "packed"), default="nhld",
                   help="q, k, v contiguous (N, H, L, D) with an (N, H, L, D) output, or views of one (N, L, 3, H, "
                        "D) qkv with an (N, L, H, D) output")  # fmt: skip
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="bench/results/attention-triton.json")
    args = p.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        p.error("needs CUDA and triton")
    if args.keys is not None and args.keys < 1:
        p.error("--keys must be >= 1")
    swept_loads = ["pointer"] if args.keys is not None else args.loads  # TMA loads take self-attention only
    if args.sweep:
        configs = [c for c in CONFIGS if c[4] in swept_loads]
        if args.tiles:
            configs = [c for c in configs if f"{c[0]}x{c[1]}" in args.tiles]
        if args.warps:
            configs = [c for c in configs if c[2] in args.warps]
    elif args.config:
        configs = [(*map(int, args.config[:4]), args.config[4])]
    else:
        configs = [DEFAULT_CONFIG if args.keys is None else cross_config(args.keys)]
    n, h, length, d = args.seqs, args.heads, args.tokens, args.dim
    keys = length if args.keys is None else args.keys
    q, k, v = make_inputs(n, h, length, d, args.layout, keys=args.keys)
    ref = reference(q, k, v)
    flop = 4 * n * h * length * keys * d
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q, k, v)

    print(" | ".join(f"{c:>21}" if i < 2 else f"{c:>10}" for i, c in
                     enumerate(("impl", "config", "ms", "TFLOP/s@d", "max_err", "ok"))), "error")  # fmt: skip
    rows = [_row("sdpa-cudnn", lambda: cudnn(q, k, v), ref, flop, args.iters)]
    if args.layout == "packed":  # SDPA on contiguous copies (the copies not timed), as the model feeds it today
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        rows.append(_row("sdpa-cudnn-contiguous", lambda: cudnn(qc, kc, vc), ref, flop, args.iters))
    for r in rows:
        _print_row(r)
    out_layout = "nlhd" if args.layout == "packed" else "nhld"
    sdpa_errs = [r["max_err"] for r in rows if "max_err" in r]
    tol = 2 * max(sdpa_errs) + 1e-3 if sdpa_errs else 4e-3  # a wrong kernel is off by O(0.1)
    for bm, bn, warps, stages, loads in configs:
        fn = lambda: flash_attention(q, k, v, config=(bm, bn, warps, stages, loads), out_layout=out_layout)  # noqa: E731
        row = _row("triton", fn, ref, flop, args.iters, transpose=out_layout == "nlhd", block_m=bm, block_n=bn,
                   num_warps=warps, num_stages=stages, loads=loads)  # fmt: skip
        if "max_err" in row:
            row["ok"] = row["max_err"] <= tol
        rows.append(row)
        _print_row(row)
        if "illegal" in row.get("error", "") or "CUDA error" in row.get("error", ""):
            print("the CUDA context is lost after that error: the sweep stops here", flush=True)
            break
    best = best_config(rows)
    print(f"best (BLOCK_M, BLOCK_N, num_warps, num_stages, loads): {best}")
    for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:8]:
        _print_row(r)
    record = {"bench": "attention_triton", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(), "shape": [n, h, length, d],
              "keys": keys, "layout": args.layout, "out_layout": out_layout, "dtype": "bfloat16", "flop_at_d": flop,
              "best": list(best) if best else None, "rows": rows}  # fmt: skip
    append_records(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
