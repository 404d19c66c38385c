"""One-command profile of the STDiT3 hot path on one GPU (Open-Sora 1.2, 480p, 51 frames, CFG batch 2).

    python -m bench.profile --out $OUT/profile.json          # about 3-4 minutes on one H100
    python -m bench.profile --device cpu --size tiny --out /tmp/profile.json   # smoke test of this script

Random weights, bf16, the real shapes: latent (2, 4, 15, 60, 106) = 23,850 tokens per sample, T5 text of
300 tokens of which the first 32 are kept (as the pipeline feeds it). Times are medians of CUDA-event
timed calls after warm-up. It measures, each part on its own so one failure does not stop the rest:

1. one eager forward, with each temporal-attention implementation and without the fused MLP GELU
   (+ the forward of an older stdit3.py given with --baseline FILE, same weights: before/after on one card);
2. FLOPs of one forward (torch's FlopCounterMode) -> MFU against 989.4 TFLOP/s dense bf16;
3. the top kernels by CUDA time of one eager forward (torch.profiler; top 25 printed);
4. components at the real shapes: temporal attention (module and core: Triton / bmm / SDPA backends,
   eager and compiled, with the error against a float32 reference; at 480p and at 720p 4 s, L = 30, the
   module and the Triton kernel alone over a few launch configurations), spatial SDPA per backend,
   cross-attention (300 masked keys vs 32 unmasked), MLP (GELU in the GEMM epilogue or not);
5. one forward with pab.compile.apply_compile (first call = compile time), and its top kernels;
6. 30 denoising steps (rflow) eager and compiled, PAB off and "paper": the DiT time the issue targets
   (<= 8 s off, <= 6 s paper);
7. one Latte-1 forward at 512x512x16, eager and (--latte-compile) compiled, with profiler tables.

Prints a summary table last and writes everything to --out (JSON) and the profiler tables beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pab.kernels import kernel_options

PEAK_TFLOPS = 989.4  # H100 SXM dense bf16
FORWARD_TFLOP_480P = 109.5  # ../shared/reference/models.md section 4, L = 32 (for the record)
TARGETS_S = {"off": 8.0, "paper": 6.0}  # DiT time for 30 steps on one H100 (the issue)

# Written before any of this ran on a GPU (the issue asks for predictions first), for the full 480p
# bf16 case on one H100. Derivation: GEMMs at ~600-650 TFLOP/s, memory-bound passes at ~3 TB/s over the
# 110 MB (B, T·S, C) bf16 hidden state, flash attention at ~300 TFLOP/s, 28 block pairs.
PREDICTED = {
    "baseline eager (older stdit3.py)": "670 ms",  # a colleague's measurement of the pre-change model
    # second session: the short-sequence kernel (pab.kernels.short_attention) replaced the first Triton kernel
    # in "auto"; measured before under its working name: 300.1 ms eager, 0.270 ms (480p) / 1.205 ms (720p).
    # third session: pab.kernels.norms (one kernel per norm/modulate/residual pass, and the spatial q/k RMSNorm).
    # Eager had ~106 ms of these passes (addcmul 41.8, rms_norm 37.7, layer_norm 13.4, add 5.8, copies ~7);
    # the kernels at ~2.9 TB/s over the 110 MB hidden state take ~31 ms: -75 ms. Compiled had 53 ms: -22 ms.
    "eager (defaults)": "222 ms",  # measured 296.0 ms before the norm kernels
    "eager norm kernels off": "296 ms",
    "eager temporal=bmm": "300 ms",  # +1.15 ms per temporal block (no fused norm/rope, v/out copies)
    "eager temporal=sdpa": "320 ms",  # +1.8 ms per temporal block (flash: one 128-row CTA per 15 tokens)
    "eager fused_gelu=False": "287 ms",  # +0.3 ms per MLP: the 440 MB hidden written+read once more
    "compiled forward (apply_compile)": "228 ms",  # measured 251.9 ms before the norm kernels
    "temporal attn module eager triton": "1.0 ms",  # measured before it was the default
    "temporal kernel 2x4 480p": "0.27 ms",  # measured before it was the default
    "temporal attn module eager triton 720p": "4.5 ms",  # measured before it was the default
    "temporal attn module eager sdpa 720p": "17.9 ms",
    "temporal kernel 2x4 720p": "1.2 ms",  # measured before it was the default
    "temporal attn module eager bmm": "2.2 ms",
    "temporal attn module eager sdpa": "2.85 ms",  # norm 0.3 + RoPE 0.65 + flash 1.1 + GEMMs 0.8
    "temporal attn module compiled sdpa": "2.15 ms",
    "temporal attn module compiled bmm": "1.4 ms",
    "temporal core sdpa default": "1.1 ms",  # measured before (environment.md section 8)
    "temporal core sdpa FLASH_ATTENTION": "1.1 ms",
    "temporal core sdpa EFFICIENT_ATTENTION": "1.0 ms",
    "temporal core sdpa CUDNN_ATTENTION": "1.0 ms",
    "temporal core sdpa MATH": "1.5 ms",
    "temporal core bmm": "0.35 ms",
    "spatial sdpa default": "1.17 ms",  # measured before: 298 TFLOP/s
    "spatial sdpa FLASH_ATTENTION": "1.17 ms",
    "spatial sdpa EFFICIENT_ATTENTION": "1.6 ms",
    "spatial sdpa CUDNN_ATTENTION": "0.85 ms",  # cuDNN's Hopper kernels, if torch offers them for hd=72
    "spatial sdpa strided views": "1.17 ms",  # cuDNN takes strides; no copy expected
    "spatial sdpa head_dim 64": "0.75 ms",
    "spatial sdpa head_dim 80": "1.2 ms",
    "spatial sdpa head_dim 96": "1.2 ms",
    "spatial sdpa head_dim 128": "1.25 ms",
    # 110 MB per pass over the hidden state at ~2.9 TB/s
    "norm kernel ln_modulate": "0.08 ms",
    "norm kernel ln_modulate frame-major": "0.09 ms",
    "norm kernel add_ln_modulate": "0.16 ms",
    "norm kernel gated_residual": "0.12 ms",
    "norm kernel gated_residual frame-major": "0.13 ms",
    "norm kernel qk_rmsnorm": "0.16 ms",  # q and k: 2 x (110 MB read + 110 MB written)
    # measured in the forward's profile (third session, 1 row x 8 warps): gated_residual 111 us, qk_rmsnorm
    # 147 us (both ~3 TB/s), ln_modulate 180 us average over plain and residual (~2 TB/s): the reductions.
    "cross-attn module, 300 keys masked": "0.9 ms",
    "cross-attn module, 32 keys no mask": "0.5 ms",
    "MLP fused GELU=True": "1.6 ms",
    "MLP fused GELU=False": "1.9 ms",
    "30 steps eager, PAB off": "6.8 s",
    "30 steps eager, PAB paper": "5.6 s",  # 3.29 -> 2.62 PFLOP executed (models.md), + cache bookkeeping
    "30 steps compiled, PAB off": "6.9 s",  # measured 7.53 s (bench.run) before the norm kernels
    "30 steps compiled, PAB paper": "5.5 s",  # measured 6.00 s (bench.run) before the norm kernels
    # Latte-1 measured at 207 ms eager and compiled (GEMMs 88, attention 36, elementwise/norm/GELU/copies ~80).
    # After fused GELU (-9), fused qkv (-2), one-pass modulate/residual (-25), no transposes (-7) and the
    # short-sequence kernel for its temporal attention (28 x ~0.3 ms saved, -8):
    # Measured 159.7 / 148.6 ms; with the norm kernels (third session) the eager passes lose ~15 ms.
    "latte-1 forward eager (512x512x16, L=16)": "145 ms",
    "latte-1 forward compiled": "142 ms",
}


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in ms: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Report:
    """Collects results; a failing section records its error and the run goes on."""

    def __init__(self, predictions: dict[str, str]) -> None:
        self.predictions = predictions  # PREDICTED for the full-size GPU case, else empty
        self.data: dict[str, Any] = {}
        self.summary: list[tuple[str, str, str]] = []  # (what, value, note)

    @contextlib.contextmanager
    def section(self, name: str):
        t0 = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        try:
            yield
        except Exception as e:  # noqa: BLE001 - report and keep going
            traceback.print_exc()
            self.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            self.summary.append((name, "FAILED", f"{type(e).__name__}: {str(e)[:80]}"))
        finally:
            print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    def add(self, what: str, value: str, note: str = "") -> None:
        pred = self.predictions.get(what, "")
        print(f"{what:<52} {value:>14} {pred:>9}  {note}", flush=True)
        self.summary.append((what, value, note))


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        return contextlib.nullcontext()
    return sdpa_kernel(getattr(SDPBackend, name))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- inputs


def stdit3_inputs(args, device, dtype, T, H, W, L, kept):
    g = torch.Generator(device="cpu").manual_seed(0)
    C = args.caption_channels
    mask = torch.zeros(2, L, dtype=torch.long)
    mask[:, :kept] = 1
    return dict(
        x=torch.randn(2, 4, T, H, W, generator=g).to(device, dtype),
        timestep=torch.tensor([500.0, 500.0], device=device),
        y=torch.randn(2, 1, L, C, generator=g).to(device, dtype),
        mask=mask.to(device),
        fps=torch.full((2,), 24.0, device=device),
        height=torch.full((2,), float(args.height), device=device),
        width=torch.full((2,), float(args.width), device=device),
    )


def rflow_sampler(steps: int, **geometry):
    """Open-Sora's rectified-flow sampler (pab.samplers.rflow needs only torch).

    `pab.samplers/__init__` imports diffusers for DDIM/PNDM; where diffusers is missing, load the rflow
    submodule under a bare package object instead of failing the loops.
    """
    try:
        from pab.samplers import build_sampler
    except ImportError:
        import types

        import pab

        pkg = types.ModuleType("pab.samplers")
        pkg.__path__ = [str(Path(pab.__file__).parent / "samplers")]
        sys.modules["pab.samplers"] = pkg
        from pab.samplers.rflow import RFlowSampler

        return RFlowSampler(steps, **geometry)
    return build_sampler("rflow", steps, **geometry)


def profile_table(fn, device, path: Path, rows: int) -> tuple[str, list[dict]]:
    """torch.profiler over one call: the table sorted by self device time, and the top kernels as dicts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    avg = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = avg.table(sort_by=key, row_limit=rows, max_name_column_width=90)
    except Exception:  # older naming
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = avg.table(sort_by=key, row_limit=rows, max_name_column_width=90)
    path.write_text(table)
    top = sorted(avg, key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
    kernels = [dict(name=e.key[:200], calls=e.count, self_us=round(getattr(e, key, 0), 1)) for e in top]
    return table, kernels


# ---------------------------------------------------------------------------------------------- sections


def run(args) -> Report:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Report(PREDICTED if args.size == "full" and device.type == "cuda" else {})
    import pab.models.stdit3 as stdit3
    from pab.compile import apply_compile, remove_compile
    from pab.models import build, randomize_weights

    from pab.kernels import short_attention as short_attn

    triton_version = getattr(short_attn.triton, "__version__", None) if short_attn.triton is not None else None
    rep.data["env"] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
        triton=triton_version, python=sys.version.split()[0], size=args.size, dtype=args.dtype,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )  # fmt: skip
    print(json.dumps(rep.data["env"]))
    torch.backends.cuda.matmul.allow_tf32 = False

    # Latent grid: 480x854, 51 frames -> (15, 60, 106) for the full model; small for the CPU smoke test.
    T, H, W = (15, args.height // 8, args.width // 8 // 2 * 2) if args.size == "full" else (3, 8, 12)
    L, kept = (300, 32) if args.size == "full" else (16, 6)
    name = "opensora-v1.2" if args.size == "full" else "opensora-v1.2-tiny"
    model = build(name, device=device, seed=0)
    randomize_weights(model, seed=0)
    model = model.to(dtype)
    cfg = model.config
    args.caption_channels = cfg.caption_channels
    C, heads = cfg.hidden_size, cfg.num_heads
    hd = C // heads
    S = (H // 2) * (W // 2)
    inputs = stdit3_inputs(args, device, dtype, T, H, W, L, kept)
    rep.data["shapes"] = dict(latent=[2, 4, T, H, W], tokens_per_sample=T * S, text=L, kept=kept)
    fwd = torch.no_grad()(lambda m=model: m(**inputs))
    w, n = args.warmup, args.iters
    flop = FORWARD_TFLOP_480P * 1e12 if args.size == "full" else None

    def mfu(ms: float) -> str:
        return f"MFU {flop / (ms * 1e-3) / (PEAK_TFLOPS * 1e12):.1%}" if flop else ""

    with rep.section("flops"):
        from torch.utils.flop_counter import FlopCounterMode

        from bench.run import register_fused_gelu_flops

        register_fused_gelu_flops()  # else the MLP's first GEMM (~28 of 110 TFLOP at 480p) goes uncounted

        with kernel_options(model, temporal_attention="sdpa"), FlopCounterMode(display=False) as fc, torch.no_grad():
            model(**inputs)  # sdpa, so the counter sees the temporal attention too
        flop = float(fc.get_total_flops())
        rep.data["forward_tflop"] = flop / 1e12
        rep.add("FLOPs of one forward (counted)", f"{flop / 1e12:.1f} TFLOP", f"models.md: {FORWARD_TFLOP_480P}")

    # 1. eager forwards
    rep.data["forward_ms"] = {}
    with rep.section("eager forward"):
        configs = [("eager (defaults)", {}), ("eager temporal=bmm", dict(temporal_attention="bmm")),
                   ("eager temporal=sdpa", dict(temporal_attention="sdpa")),
                   ("eager fused_gelu=False", dict(fused_gelu=False)),
                   ("eager norm kernels off", dict(norms=False))]  # fmt: skip
        with torch.no_grad():
            ref = model(**inputs)
        for label, values in configs:
            with kernel_options(model, **values):
                ms = median_ms(fwd, device, w, n)
                with torch.no_grad():
                    err = rel_err(model(**inputs), ref)
            rep.data["forward_ms"][label] = ms
            rep.add(label, f"{ms:.1f} ms", f"{mfu(ms)}  x30 = {ms * 0.03:.2f} s  err vs defaults {err:.1e}")
        impl = stdit3.temporal_attention_impl(torch.empty(1, T, 3 * C, device=device, dtype=dtype), heads)
        rep.data["default_temporal_impl"] = impl
        rep.add("default temporal attention (TEMPORAL_ATTENTION=auto)", impl)
    if args.baseline:
        with rep.section("baseline forward (--baseline)"):
            spec = importlib.util.spec_from_file_location("stdit3_baseline", args.baseline)
            base_mod = importlib.util.module_from_spec(spec)
            sys.modules["stdit3_baseline"] = base_mod
            spec.loader.exec_module(base_mod)
            with torch.device(device):
                base = base_mod.STDiT3(base_mod.STDiT3Config(**base_mod.SIZES[args.size]))
            base.load_state_dict(model.state_dict())
            base = base.to(dtype).eval().requires_grad_(False)
            ms = median_ms(torch.no_grad()(lambda: base(**inputs)), device, w, n)
            with torch.no_grad():
                err = rel_err(base(**inputs), ref)
            rep.data["forward_ms"]["baseline (--baseline)"] = ms
            rep.add("baseline eager (older stdit3.py)", f"{ms:.1f} ms", f"{mfu(ms)}  rel diff vs now {err:.1e}")
            del base

    # 3. profiler table, eager
    with rep.section("profile eager forward"):
        table, kernels = profile_table(fwd, device, out_dir / "profile_eager.txt", 25)
        rep.data["top_kernels_eager"] = kernels
        print(table)

    # 4. components
    rep.data["components"] = comps = {}
    with rep.section("temporal attention"):
        attn = model.temporal_blocks[0].attn
        N = 2 * S
        x = torch.randn(N, T, C, device=device, dtype=dtype)
        attn32 = copy.deepcopy(attn).float()
        object.__setattr__(attn32, "rope", copy.deepcopy(model.rope).float())
        with kernel_options(attn32, temporal_attention="sdpa"), torch.no_grad():
            ref = attn32(x.float())
        core_flop = 4 * N * heads * T * T * hd
        for impl in ("triton", "bmm", "sdpa"):
            try:
                with kernel_options(attn, temporal_attention=impl), torch.no_grad():
                    ms = median_ms(lambda: attn(x), device, w, 5 * n)
                    err = rel_err(attn(x), ref)
                comps[f"temporal module eager {impl}"] = dict(ms=ms, rel_err=err)
                rep.add(f"temporal attn module eager {impl}", f"{ms:.3f} ms", f"err vs fp32 {err:.1e}")
            except Exception as e:  # noqa: BLE001 - e.g. no Triton on this machine
                comps[f"temporal module eager {impl}"] = dict(error=str(e)[:300])
                rep.add(f"temporal attn module eager {impl}", "n/a", f"{type(e).__name__}: {str(e)[:60]}")
        if not args.skip_compile:
            for impl in ("sdpa", "bmm"):
                torch._dynamo.reset()
                compiled = torch.compile(type(attn).forward)
                with kernel_options(attn, temporal_attention=impl), torch.no_grad():
                    t0 = time.perf_counter()
                    compiled(attn, x)
                    sync(device)
                    cs = time.perf_counter() - t0
                    ms = median_ms(lambda: compiled(attn, x), device, w, 5 * n)
                    err = rel_err(compiled(attn, x), ref)
                comps[f"temporal module compiled {impl}"] = dict(ms=ms, rel_err=err, compile_s=cs)
                rep.add(f"temporal attn module compiled {impl}", f"{ms:.3f} ms", f"err {err:.1e}, compile {cs:.0f} s")
        # the core alone, in the layout the module gives it (q, k normed + rotated, v a view of qkv)
        qkv = torch.randn(N, T, 3, heads, hd, device=device, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = q.contiguous(), k.contiguous()
        for backend in ("default", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with sdpa_backend(backend), torch.no_grad():
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, w, 5 * n)
                comps[f"temporal core sdpa {backend}"] = dict(ms=ms)
                rep.add(f"temporal core sdpa {backend}", f"{ms:.3f} ms", f"{core_flop / ms / 1e9:.1f} TFLOP/s")
            except Exception as e:  # noqa: BLE001 - a backend may not support the shape here
                comps[f"temporal core sdpa {backend}"] = dict(error=str(e)[:200])
                rep.add(f"temporal core sdpa {backend}", "n/a", str(e).splitlines()[0][:60])
        with torch.no_grad():
            ms = median_ms(lambda: stdit3._bmm_attention(q, k, v), device, w, 5 * n)
        comps["temporal core bmm"] = dict(ms=ms)
        rep.add("temporal core bmm", f"{ms:.3f} ms", f"{core_flop / ms / 1e9:.1f} TFLOP/s")

    with rep.section("temporal attention kernels, 480p and 720p"):
        temporal_kernels(rep, stdit3, model, args, device, dtype, S, T, w, n)

    with rep.section("spatial attention"):
        q, k, v = (torch.randn(2 * T, heads, S, hd, device=device, dtype=dtype) for _ in range(3))
        flop_s = 4 * 2 * T * heads * S * S * hd
        ref = None
        for backend in ("default", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_backend(backend), torch.no_grad():
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, w, n)
                    o = F.scaled_dot_product_attention(q, k, v)
                ref = o if ref is None else ref
                comps[f"spatial sdpa {backend}"] = dict(ms=ms, tflops=flop_s / ms / 1e9, rel_err=rel_err(o, ref))
                rep.add(f"spatial sdpa {backend}", f"{ms:.3f} ms", f"{flop_s / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:  # noqa: BLE001
                comps[f"spatial sdpa {backend}"] = dict(error=str(e)[:200])
                rep.add(f"spatial sdpa {backend}", "n/a", str(e).splitlines()[0][:60])
        # The layout the q/k norm kernel leaves: q, k as (N, H, L, D) views of (2, N, L, H, D), v inside qkv.
        qkv = torch.randn(2 * T, S, 3 * C, device=device, dtype=dtype)
        qk = torch.randn(2, 2 * T, S, heads, hd, device=device, dtype=dtype)
        vv = qkv.view(2 * T, S, 3, heads, hd)[:, :, 2].transpose(1, 2)
        with torch.no_grad():
            ms = median_ms(lambda: F.scaled_dot_product_attention(qk[0].transpose(1, 2), qk[1].transpose(1, 2), vv),
                           device, w, n)  # fmt: skip
        comps["spatial sdpa strided views"] = dict(ms=ms, tflops=flop_s / ms / 1e9)
        rep.add("spatial sdpa strided views", f"{ms:.3f} ms", f"{flop_s / ms / 1e9:.0f} TFLOP/s")
        # Would a padded head dim run faster? (zero-padded q/k/v give the same result; FLOPs counted at hd)
        for pad in (64, 80, 96, 128):
            qp, kp, vp = (torch.randn(2 * T, heads, S, pad, device=device, dtype=dtype) for _ in range(3))
            with torch.no_grad():
                ms = median_ms(lambda: F.scaled_dot_product_attention(qp, kp, vp), device, w, n)
            comps[f"spatial sdpa head_dim {pad}"] = dict(ms=ms, tflops_at_own_dim=flop_s * pad / hd / ms / 1e9)
            rep.add(f"spatial sdpa head_dim {pad}", f"{ms:.3f} ms", f"{flop_s * pad / hd / ms / 1e9:.0f} TFLOP/s at {pad}")

    with rep.section("norm kernels (pab.kernels.norms)"):
        norm_kernels(rep, model, device, dtype, T, S, C, heads, w, n)

    with rep.section("cross attention and MLP"):
        block = model.spatial_blocks[0]
        xs = torch.randn(2, T * S, C, device=device, dtype=dtype)
        y300 = torch.randn(2, L, C, device=device, dtype=dtype)
        m300 = torch.zeros(2, L, dtype=torch.bool, device=device)
        m300[:, :kept] = True
        with torch.no_grad():
            ms_masked = median_ms(lambda: block.cross_attn(xs, y300, m300), device, w, n)
            ms_cut = median_ms(lambda: block.cross_attn(xs, y300[:, :kept], None), device, w, n)
            err = rel_err(block.cross_attn(xs, y300[:, :kept], None), block.cross_attn(xs, y300, m300))
        comps["cross masked L=300"] = dict(ms=ms_masked)
        comps["cross unmasked cut"] = dict(ms=ms_cut, rel_err=err)
        rep.add(f"cross-attn module, {L} keys masked", f"{ms_masked:.3f} ms")
        rep.add(f"cross-attn module, {kept} keys no mask", f"{ms_cut:.3f} ms", f"rel diff {err:.1e}")
        mlp_flop = 2 * 2 * (2 * T * S) * C * int(C * cfg.mlp_ratio)
        for fused in (True, False):
            with kernel_options(block.mlp, fused_gelu=fused), torch.no_grad():
                ms = median_ms(lambda: block.mlp(xs), device, w, n)
                o = block.mlp(xs)
            if fused:
                fused_out = o
            comps[f"mlp fused_gelu={fused}"] = dict(ms=ms, tflops=mlp_flop / ms / 1e9)
            rep.add(f"MLP fused GELU={fused}", f"{ms:.3f} ms", f"{mlp_flop / ms / 1e9:.0f} TFLOP/s")
        rep.add("MLP fused vs unfused", f"{rel_err(fused_out, o):.1e}", "rel diff (tanh GELU both ways?)")

    # 6a. 30 steps eager (before compiling the model)
    rep.data["loop_s"] = {}

    def loop(label: str, pab: str) -> None:
        from pab.broadcast import PABConfig, PABState, apply_pab, remove_pab, use_state
        sampler = rflow_sampler(args.steps, height=args.height, width=args.width, num_frames=51)
        remove_pab(model)
        apply_pab(model, PABConfig.preset("opensora-v1.2", pab))
        z = inputs["x"][:1].float()
        state = PABState()
        sync(device)
        t0 = time.perf_counter()
        with use_state(state), torch.no_grad():
            for i, t in enumerate(sampler.timesteps):
                state.begin_step(i, float(t))
                pred = model(**dict(inputs, x=torch.cat([z, z]).to(dtype), timestep=torch.full((2,), float(t),
                                                                                                device=device)))
                cond, uncond = pred[:, :4].float().chunk(2)
                z = sampler.step(uncond + 7.0 * (cond - uncond), i, z)
        sync(device)
        s = time.perf_counter() - t0
        remove_pab(model)
        rep.data["loop_s"][f"{label} pab={pab}"] = dict(s=s, steps=len(sampler.timesteps), stats=state.stats)
        target = f"target <= {TARGETS_S[pab]:.0f} s" if args.steps == 30 and args.size == "full" else ""
        rep.add(f"{args.steps} steps {label}, PAB {pab}", f"{s:.2f} s", target)

    if not args.skip_loop:
        with rep.section("30 steps eager"):
            for pab in ("off", "paper"):
                loop("eager", pab)

    # 5. compiled forward
    if not args.skip_compile:
        with rep.section("compiled forward"):
            torch._dynamo.reset()
            handle = apply_compile(model)
            t0 = time.perf_counter()
            fwd()
            sync(device)
            cs = time.perf_counter() - t0
            ms = median_ms(fwd, device, w, n)
            with torch.no_grad():
                err = rel_err(model(**inputs), ref_forward(model, inputs, remove_compile, apply_compile, handle))
            rep.data["forward_ms"]["compiled"] = ms
            rep.data["compile_s"] = cs
            rep.add("compiled forward (apply_compile)", f"{ms:.1f} ms",
                    f"{mfu(ms)}  x30 = {ms * 0.03:.2f} s  first call {cs:.0f} s  err vs eager {err:.1e}")
            table, kernels = profile_table(fwd, device, out_dir / "profile_compiled.txt", 25)
            rep.data["top_kernels_compiled"] = kernels
            print("\n".join(table.splitlines()[:18]))
        if not args.skip_loop:
            with rep.section("30 steps compiled"):
                for pab in ("off", "paper"):
                    loop("compiled", pab)
        remove_compile(model)

    # 7. Latte-1
    if not args.skip_latte:
        with rep.section("latte-1 forward"):
            if importlib.util.find_spec("pab.models.latte") is None:
                rep.add("latte-1 forward", "skipped", "pab/models/latte.py not present")
            else:
                lname = "latte-1" if args.size == "full" else "latte-1-tiny"
                latte = build(lname, device=device, seed=0)
                randomize_weights(latte, seed=0)
                latte = latte.to(dtype)
                lf, lh = (16, 64) if args.size == "full" else (2, 8)
                g = torch.Generator().manual_seed(0)
                hs = torch.randn(2, 4, lf, lh, lh, generator=g).to(device, dtype)
                ehs = torch.randn(2, 16, latte.config.caption_channels, generator=g).to(device, dtype)
                tt = torch.full((2,), 500.0, device=device)
                lfwd = torch.no_grad()(lambda: latte(hs, timestep=tt, encoder_hidden_states=ehs, return_dict=False))
                ms = median_ms(lfwd, device, w, n)
                rep.data["forward_ms"]["latte-1 eager"] = ms
                note = f"MFU {67.9e12 / (ms * 1e-3) / (PEAK_TFLOPS * 1e12):.1%}  " if args.size == "full" else ""
                rep.add("latte-1 forward eager (512x512x16, L=16)", f"{ms:.1f} ms", f"{note}x50 = {ms * 0.05:.2f} s")
                table, rep.data["latte_kernels_eager"] = profile_table(lfwd, device, out_dir / "profile-latte-eager.txt", 25)
                print(table)
                if args.latte_compile:
                    torch._dynamo.reset()
                    apply_compile(latte)
                    lfwd()
                    ms = median_ms(lfwd, device, w, n)
                    rep.data["forward_ms"]["latte-1 compiled"] = ms
                    rep.add("latte-1 forward compiled", f"{ms:.1f} ms", f"x50 = {ms * 0.05:.2f} s")
                    table, rep.data["latte_kernels_compiled"] = profile_table(
                        lfwd, device, out_dir / "profile-latte-compiled.txt", 25)
                    print(table)

    rep.data["summary"] = [dict(what=a, measured=b, predicted=rep.predictions.get(a), note=c)
                           for a, b, c in rep.summary]  # fmt: skip
    return rep


# (heads per program, warps) tried for the short-sequence kernel besides its default, by BLOCK_L
KERNEL_SWEEP = {16: [(4, 4), (2, 4), (2, 2), (1, 1)], 32: [(2, 4), (1, 2), (1, 4), (2, 2)]}


def temporal_kernels(rep, stdit3, model, args, device, dtype, S, T, w, n) -> None:
    """The temporal attention at 480p (L = T) and 720p 4 s (N = 2 x 45 x 80, L = 30): the module with the
    Triton kernel and sdpa at 720p, and the kernel alone over a few (heads per program, warps), with GB/s
    and the error against float32 sdpa."""
    comps = rep.data["components"]
    attn = model.temporal_blocks[0].attn
    C, heads = attn.num_heads * attn.head_dim, attn.num_heads
    attn32 = copy.deepcopy(attn).float()
    object.__setattr__(attn32, "rope", copy.deepcopy(model.rope).float())

    def core32(qkv: torch.Tensor) -> torch.Tensor:  # float32 sdpa path of SelfAttention, (N, L, 3C) -> (N, L, C)
        q, k, v = qkv.float().unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn32.rope(attn32.q_norm(q)), attn32.rope(attn32.k_norm(k))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    has_norm = isinstance(attn.q_norm, stdit3.RMSNorm)
    wq, wk = (attn.q_norm.weight, attn.k_norm.weight) if has_norm else (None, None)
    eps = attn.q_norm.eps if has_norm else 0.0
    if args.size == "full":
        shapes = [("480p", 2 * S, T), ("720p", 2 * 45 * 80, 30)]
    else:
        shapes = [("480p", 2 * S, T), ("720p", 2 * S, 30)]  # tiny: the same code paths at small N
    for tag, N, L in shapes:
        x = torch.randn(N, L, C, device=device, dtype=dtype)
        if tag != "480p":  # the 480p module times are in the "temporal attention" section
            for impl in ("triton", "sdpa"):
                try:
                    with kernel_options(attn, temporal_attention=impl), torch.no_grad():
                        ms = median_ms(lambda: attn(x), device, w, 5 * n)
                    comps[f"temporal module eager {impl} {tag}"] = dict(ms=ms)
                    rep.add(f"temporal attn module eager {impl} {tag}", f"{ms:.3f} ms", f"N={N} L={L}")
                except Exception as e:  # noqa: BLE001 - e.g. no Triton on this machine
                    comps[f"temporal module eager {impl} {tag}"] = dict(error=str(e)[:300])
                    rep.add(f"temporal attn module eager {impl} {tag}", "n/a", f"{type(e).__name__}: {str(e)[:60]}")
        with torch.no_grad():
            qkv = attn.qkv(x)
            cos, sin = attn.rope.tables(L, device, torch.float32)
            ref = core32(qkv[:256])
        from pab.kernels import short_attention as short_attn

        runs = []
        block_l = max(16, 1 << (L - 1).bit_length())
        for hb, nw in dict.fromkeys([short_attn.launch_config(L, heads)] + KERNEL_SWEEP.get(block_l, [])):
            if heads % hb == 0:
                runs.append((f"{hb}x{nw}", lambda hb=hb, nw=nw: torch.ops.pab.short_attention(
                    qkv, wq, wk, cos, sin, heads, eps, hb, nw)))  # fmt: skip
        moved = (qkv.numel() + N * L * C) * qkv.element_size()
        for label, fn in runs:
            key = f"temporal kernel {label} {tag}"
            try:
                with torch.no_grad():
                    ms = median_ms(fn, device, w, 5 * n)
                    err = rel_err(fn()[:256], ref)
                comps[key] = dict(ms=ms, rel_err=err, gbps=moved / ms / 1e6)
                rep.add(key, f"{ms:.3f} ms", f"{moved / ms / 1e6:.0f} GB/s, err vs fp32 {err:.1e}")
            except Exception as e:  # noqa: BLE001 - e.g. no Triton on this machine
                comps[key] = dict(error=str(e)[:300])
                rep.add(key, "n/a", f"{type(e).__name__}: {str(e)[:60]}")


def graph_ms(fn: Callable[[], Any], reps: int = 10, iters: int = 5) -> float:
    """GPU time of one `fn()` call: `reps` calls captured in a CUDA graph and replayed (no CPU launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        for _ in range(reps):
            fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def cpu_us(fn: Callable[[], Any], calls: int = 300) -> float:
    """CPU cost of one call: wall time of many back-to-back calls on tensors too small to keep the GPU busy."""
    with torch.no_grad():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def norm_kernels(rep, model, device, dtype, T, S, C, heads, w, n) -> None:
    """Each pass alone at the real shapes: GPU time (CUDA graph) and GB/s against the bytes it must move, the
    PyTorch eager equivalent, the layer-norm kernel's launch shapes, and the CPU cost of a call."""
    from pab.kernels import norms

    if not norms.available(torch.empty(1, 1, 1, C, device=device, dtype=dtype)):
        rep.add("norm kernels", "n/a", "not available here (CUDA half precision only)")
        return
    comps = rep.data.setdefault("components", {})

    def cases(x, res, mod, qkv, w_):
        return {
            "ln_modulate": (lambda: norms.ln_modulate(x, mod[:, 0], mod[:, 1], 1e-6), 2),
            "ln_modulate frame-major": (lambda: norms.ln_modulate(x, mod[:, 0], mod[:, 1], 1e-6, frame_major=True), 2),
            "add_ln_modulate": (lambda: norms.add_ln_modulate(x, res, mod[:, 3], mod[:, 4], 1e-6), 4),
            "gated_residual": (lambda: norms.gated_residual(x, mod[:, 2], res), 3),
            "gated_residual frame-major": (lambda: norms.gated_residual(x, mod[:, 2], res, frame_major=True), 3),
            "qk_rmsnorm": (lambda: norms.qk_rmsnorm(qkv, heads, w_, w_, 1e-6), 4),
        }

    def tensors(T_, S_):
        x = torch.randn(2, T_, S_, C, device=device, dtype=dtype)
        return (x, torch.randn_like(x), torch.randn(2, 6, 1, 1, C, device=device, dtype=dtype),
                torch.randn(2 * T_, S_, 3 * C, device=device, dtype=dtype),
                torch.ones(C // heads, device=device, dtype=dtype))  # fmt: skip

    x, res, mod, qkv, w_ = tensors(T, S)
    nbytes = x.numel() * x.element_size()
    block = model.spatial_blocks[0]
    plain = {  # the same passes in PyTorch, for comparison
        "ln_modulate": lambda: torch.addcmul(mod[:, 0], block.norm1(x), 1 + mod[:, 1]),
        "add_ln_modulate": lambda: torch.addcmul(mod[:, 3], block.norm2(x + res), 1 + mod[:, 4]),
        "gated_residual": lambda: torch.addcmul(x, mod[:, 2], res),
        "qk_rmsnorm": lambda: [block.attn.q_norm(t) for t in qkv.view(2 * T, S, 3, heads, -1).permute(2, 0, 3, 1, 4)[:2]],
    }
    small = cases(*tensors(1, 16))
    for name, (fn, passes) in cases(x, res, mod, qkv, w_).items():
        ms = graph_ms(fn)
        ms_plain = graph_ms(plain[name]) if name in plain else None
        us = cpu_us(small[name][0])
        gbps = passes * nbytes / ms / 1e6
        comps[f"norms {name}"] = dict(ms=ms, gbps=gbps, pytorch_ms=ms_plain, cpu_us=us)
        note = f"{gbps:.0f} GB/s, CPU {us:.0f} us/call" + (f", PyTorch {ms_plain:.3f} ms" if ms_plain else "")
        rep.add(f"norm kernel {name}", f"{ms:.3f} ms", note)
    # the custom op's dispatch (what torch.compile calls) against the direct launch (eager)
    xs, _, ms_, _, _ = tensors(1, 16)
    us = cpu_us(lambda: torch.ops.pab.ln_modulate(xs, ms_[:, 0], ms_[:, 1], 1e-6, None, False))
    comps["norms ln_modulate via torch.ops"] = dict(cpu_us=us)
    rep.add("norm kernel ln_modulate via torch.ops", f"{us:.0f} us", "CPU per call")
    # layer-norm launch shapes: (rows per program, warps)
    for cfg in [(1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (1, 2)]:
        ms1 = graph_ms(lambda: norms._ln_modulate(x, mod[:, 0], mod[:, 1], 1e-6, None, False, config=cfg))
        ms2 = graph_ms(lambda: norms._ln_modulate(x, mod[:, 0], mod[:, 1], 1e-6, res, False, config=cfg))
        comps[f"norms ln config {cfg[0]}x{cfg[1]}"] = dict(ms=ms1, ms_residual=ms2)
        rep.add(f"norm kernel ln config {cfg[0]}x{cfg[1]}", f"{ms1:.3f} ms",
                f"{2 * nbytes / ms1 / 1e6:.0f} GB/s; with residual {ms2:.3f} ms {4 * nbytes / ms2 / 1e6:.0f} GB/s")


def ref_forward(model, inputs, remove_compile, apply_compile, handle):
    """The eager output of the same model (compile removed for one call, then put back)."""
    remove_compile(model)
    with torch.no_grad():
        out = model(**inputs)
    apply_compile(model, handle.mode)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/profile.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=854)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--baseline", help="an older pab/models/stdit3.py to time with the same weights")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-loop", action="store_true", help="skip the 30-step loops")
    p.add_argument("--skip-latte", action="store_true")
    p.add_argument("--latte-compile", action="store_true", help="also time Latte-1 with apply_compile")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rep = run(args)
    rep.data["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.write_text(json.dumps(rep.data, indent=1, default=str) + "\n")
    print(f"\n=== summary ({rep.data['env']['device']}, torch {torch.__version__}, {rep.data['total_s']:.0f} s)")
    print(f"{'what':<52} {'measured':>14} {'predicted':>9}  note")
    for what, value, note in rep.summary:
        print(f"{what:<52} {value:>14} {rep.predictions.get(what, ''):>9}  {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
