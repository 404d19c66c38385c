"""Spatial attention at Open-Sora 1.2's head dim 72: each SDPA backend, at d = 72 and zero-padded to 80/96/128.

    python -m bench.attention --out bench/results/attention.json      # about 20 s on one H200

Open-Sora 1.2 480p: 30 frames x 2 CFG samples = 60 sequences of 1,590 tokens, 16 heads of 72. Padding q and k
with zeros leaves q·k unchanged and padded v columns come out zero (dropped), so a padded call at the scale
of d = 72 is the same attention; TFLOP/s are counted at d = 72 (4·N·H·L²·72), what the model needs. Prints a
table and writes JSON; the error column is the max |out - SDPA's math backend in float32|.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, to: int) -> torch.Tensor:
    """Attention of (N, H, L, d) inputs computed at head dim `to` >= d, scaled as at d."""
    d = q.shape[-1]
    if to == d:
        return F.scaled_dot_product_attention(q, k, v)
    pad = (0, to - d)
    return F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale=1 / math.sqrt(d))[..., :d]


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=60)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1590)
    p.add_argument("--dim", type=int, default=72)
    p.add_argument("--out", default="bench/results/attention.json")
    args = p.parse_args(argv)
    n, h, length, d = args.seqs, args.heads, args.tokens, args.dim
    q, k, v = (torch.randn(n, h, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flop = 4 * n * h * length * length * d
    rows = []
    for name, backend in BACKENDS.items():
        for to in sorted({d, 80, 96, 128}):
            row = {"backend": name, "head_dim": to}
            try:
                with sdpa_kernel(backend):
                    out = padded_sdpa(q, k, v, to)
                    row["ms"] = round(time_ms(lambda: padded_sdpa(q, k, v, to)), 4)
                row["tflops_at_d"] = round(flop / row["ms"] / 1e9, 1)
                row["max_err"] = float((out.float() - ref).abs().max())
            except RuntimeError as e:
                row["error"] = str(e).splitlines()[0][:160]
            rows.append(row)
            print(" | ".join(f"{row.get(c, '-')!s:>12}" for c in ("backend", "head_dim", "ms", "tflops_at_d", "max_err")))
    record = {"shape": [n, h, length, d], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
