"""Time one transformer forward (a CFG batch of 2) on 1 device and under DSP, with bytes moved per forward.

    python -m bench.dsp --model opensora-v1.2 --frames 15 --height 60 --width 106 --sp 1 2
    python -m bench.dsp --frames 30 --height 90 --width 160 --sp 2 --chunks 2 --profile $OUT/dsp

Weights are random (timing does not depend on them). Each `--sp N` value starts N local processes
(one GPU each with NCCL, or gloo on CPU) and reports rank 0's median forward time. `--profile DIR` also
traces one more forward on rank 0 and writes the trace and a summary of where its GPU time went (compute
kernels by kind, NCCL kernels, how much of NCCL overlapped compute, idle GPU time), and reports the bytes
rank 0 sent per second of NCCL kernel time (`nccl_gb_per_s`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pab.parallel.context import ParallelConfig, init_parallel
from pab.parallel.launch import launch_local
from pab.parallel.plans import parallelize_model

# Kernel name fragments -> kind, first match wins (names as the CUDA profiler reports them).
KINDS = (
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "cudnn", "attn", "_short_attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("norm kernels", ("_ln_modulate", "_gated_residual", "_qk_rmsnorm", "_add_ln")),
    ("copy / cat", ("copy", "cat", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k.lower() in low for k in keys)), "other")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_trace(trace: dict) -> dict:
    """Where the GPU time of one traced forward went (a Chrome trace from torch.profiler), in ms."""
    kernels = [e for e in trace.get("traceEvents", [])
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]  # fmt: skip
    if not kernels:
        return {}
    by_kind: dict[str, dict[str, float]] = {}
    names: dict[str, list[float]] = {}
    nccl, compute = [], []
    for e in kernels:
        kind = kernel_kind(e["name"])
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        (nccl if kind == "nccl" else compute).append(span)
        row = by_kind.setdefault(kind, {"ms": 0.0, "calls": 0})
        row["ms"] += e["dur"] / 1000
        row["calls"] += 1
        n = names.setdefault(e["name"][:90], [0.0, 0])
        n[0] += e["dur"] / 1000
        n[1] += 1
    nccl_u, compute_u = _union(nccl), _union(compute)
    start = min(s for s, _ in nccl + compute)
    end = max(e for _, e in nccl + compute)
    busy = sum(e - s for s, e in _union(nccl + compute))
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "gpu_span_ms": (end - start) / 1000,
        "gpu_idle_ms": (end - start - busy) / 1000,
        "compute_ms": sum(e - s for s, e in compute_u) / 1000,
        "nccl_ms": sum(e - s for s, e in nccl_u) / 1000,
        "nccl_overlapped_ms": _overlap(nccl_u, compute_u) / 1000,
        "by_kind": {k: {"ms": round(v["ms"], 3), "calls": int(v["calls"])} for k, v in sorted(by_kind.items())},
        "top_kernels": [{"name": n, "ms": round(v[0], 3), "calls": int(v[1])} for n, v in top],
    }


def example_inputs(name: str, model: torch.nn.Module, frames: int, height: int, width: int, device, dtype) -> dict:
    """A [cond, uncond] batch of random inputs shaped as the pipeline passes them to `name`."""
    g = torch.Generator().manual_seed(0)
    caption = model.config.caption_channels
    text_len = 300 if name.startswith("opensora-v1.2") else 120
    x = torch.randn(2, 4, frames, height, width, generator=g).to(device, dtype)
    t = torch.full((2,), 500.0, device=device)
    text = torch.randn(2, text_len, caption, generator=g).to(device, dtype)
    if name.startswith("opensora-v1.2"):
        full = lambda v: torch.full((2,), float(v), device=device)  # noqa: E731
        return dict(x=x, timestep=t, y=text[:, None], mask=torch.ones(2, text_len, dtype=torch.long, device=device),
                    fps=full(24), height=full(8 * height), width=full(8 * width))  # fmt: skip
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)


def _worker(rank: int, world: int, name: str, frames: int, height: int, width: int, dtype: str, iters: int,
            chunks: int = 1, profile: str | None = None) -> dict:  # fmt: skip
    import pab.models

    ctx = init_parallel(ParallelConfig(sp=world, overlap_chunks=chunks))
    device = ctx.device
    torch_dtype = getattr(torch, dtype)
    model = pab.models.build(name, device=device, dtype=torch_dtype)
    parallelize_model(model, ctx)
    inputs = example_inputs(name, model, frames, height, width, device, torch_dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for i in range(iters + 2):  # two warm-ups
            if i == 2:
                ctx.stats.reset()
            sync()
            start = time.perf_counter()
            model(**inputs)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - start)
    stats = ctx.stats.as_dict()
    per_forward = {k: v / max(stats["forwards"], 1) for k, v in stats.items() if k != "forwards"}
    result = {"sp": world, "chunks": chunks, "ms": 1000 * statistics.median(times), "per_forward": per_forward}
    if profile:
        result["trace"] = _trace_one_forward(model, inputs, rank, Path(profile) / f"{name}-sp{world}-c{chunks}")
    return result


def _trace_one_forward(model: torch.nn.Module, inputs: dict, rank: int, stem: Path) -> dict:
    """Every rank runs the forward (collectives need all); rank 0 traces it and summarizes the trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(**inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if rank != 0:
        return {}
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.parent / f"{stem.name}.trace.json"  # names like "opensora-v1.2-sp2-c1": no with_suffix
    prof.export_chrome_trace(str(path))
    summary = summarize_trace(json.loads(path.read_text()))
    (stem.parent / f"{stem.name}.summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opensora-v1.2")
    p.add_argument("--frames", type=int, default=15, help="latent frames")
    p.add_argument("--height", type=int, default=60, help="latent height")
    p.add_argument("--width", type=int, default=106, help="latent width")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunks", type=int, default=1, help="ParallelConfig.overlap_chunks")
    p.add_argument("--profile", metavar="DIR", help="also trace one forward on rank 0 into DIR")
    args = p.parse_args(argv)
    for sp in args.sp:
        # one CPU thread per process (launch_local's default): on CPU, N processes with default thread pools
        # oversubscribe the cores and spin-waiting turns milliseconds into seconds
        shape = (args.frames, args.height, args.width)
        result = launch_local(sp, _worker, args.model, *shape, args.dtype, args.iters, args.chunks, args.profile)[0]
        trace = result.pop("trace", None)
        if trace and trace.get("nccl_ms"):
            # what the collectives achieved while NCCL kernels ran (their time includes waiting for peers)
            result["nccl_gb_per_s"] = round(result["per_forward"]["bytes_moved"] / trace["nccl_ms"] / 1e6, 1)
        print(json.dumps({"model": args.model, "latent": list(shape), **result}), flush=True)
        if trace:
            print(_format_summary(trace), flush=True)


def _format_summary(t: dict) -> str:
    head = (f"  GPU span {t['gpu_span_ms']:.1f} ms: compute {t['compute_ms']:.1f}, NCCL {t['nccl_ms']:.1f} "
            f"({t['nccl_overlapped_ms']:.1f} overlapped with compute), idle {t['gpu_idle_ms']:.1f}")
    lines = [head]
    lines += [f"  {k:<14} {v['ms']:9.2f} ms  {v['calls']:5d} kernels" for k, v in t["by_kind"].items()]
    lines += [f"    {k['ms']:9.2f} ms {k['calls']:5d}  {k['name']}" for k in t["top_kernels"][:15]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
