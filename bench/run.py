"""Real-size benchmark of the three DiTs: one command, a table on stdout, records in JSON.

    python -m bench.run                                  # every case, 1 GPU, PAB off and paper
    python -m bench.run --cases opensora-480p --sp 1,2,4 # DSP on 1, 2 and 4 GPUs
    python -m bench.run --peer                           # + diffusers' Latte with its own PAB hook

Random weights (no downloads), bf16, real shapes. Per record: DiT time per generation and per step,
end-to-end time (T5 text encoder, DiT, VAE decode), peak GPU memory, FLOPs actually executed (counted
with torch's FlopCounterMode per module kind, minus what PAB skipped) and MFU against the H100's
989 TFLOP/s dense bf16 peak. Under DSP the MFU is per GPU. Records are appended to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.records import read_records, write_records
from pab.engine import EngineOptions
from pab.kernels import ATTENTION_IMPLS, DEFAULT_KERNELS, KernelOptions, set_kernel_options
from pab.precision import Fp8Config
from pab.video import x264_settings

PEAK_TFLOPS = 989.4  # H100 SXM dense bf16 (vendor datasheet)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    resolution: str
    frames: int
    height: int
    width: int
    steps: int


CASES = {
    "opensora-480p": Case("opensora-480p", "opensora-v1.2", "480p-2s", 51, 480, 854, 30),
    "opensora-720p": Case("opensora-720p", "opensora-v1.2", "720p-4s", 102, 720, 1280, 30),
    "latte": Case("latte", "latte-1", "512x512-16f", 16, 512, 512, 50),
    "opensora-plan": Case("opensora-plan", "opensora-plan-v1.1", "512x512-65f", 65, 512, 512, 150),
}


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def register_fused_gelu_flops() -> None:
    """Teach torch's FLOP counter aten._addmm_activation (the MLP's first GEMM with its GELU fused), which it
    does not know: it is an addmm as far as FLOPs go. (The custom Triton short-sequence attention, ~0.1% of
    the FLOPs, stays uncounted.)"""
    from torch.utils import flop_counter

    if torch.ops.aten._addmm_activation not in flop_counter.flop_registry:

        def addmm_activation_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.mm_flop(a_shape, b_shape)

        flop_counter.register_flop_formula(torch.ops.aten._addmm_activation)(addmm_activation_flop)


def _flops_by_kind(pipe, request) -> tuple[float, dict[str, float]]:
    """FLOPs of one transformer call on the CFG batch, and FLOPs per single module call by PAB kind."""
    from torch.utils.flop_counter import FlopCounterMode

    register_fused_gelu_flops()
    request = pipe.resolve(request)
    shape = pipe.latent_shape(request)
    y, mask = pipe.encode_text(request)
    z = torch.randn(shape, device=pipe.device)
    # force_eager: a compiled function first called under a dispatch mode such as FlopCounterMode is never
    # compiled afterwards (Dynamo skips its code for good), which silently left "--compile" runs eager.
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as fc:
        pipe._forward(torch.cat([z, z]).to(pipe.dtype), 500.0, y, mask, request)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(pipe.transformer).__name__
    names = {id(m): n for n, m in pipe.transformer.named_modules()}
    per_call = {}
    for kind, modules in pipe.transformer.broadcast_targets().items():
        total = sum(counts.get(f"{root}.{names[id(m)]}", 0) for m in modules)
        per_call[kind] = total / max(1, len(modules))
    return float(fc.get_total_flops()), per_call


def fixed_schedule(name: str, calibration: str) -> tuple[str, str | dict[str, Any]]:
    """A --pab entry as (its name, the request's `cache`): a fixed-* name becomes that preset of `calibration`, a
    step-reuse schedule fixed in advance, so the time measured does not depend on the random weights."""
    if not name.startswith("fixed-"):
        return name, name
    presets = json.loads(Path(calibration).read_text()).get("presets", {})
    if name not in presets:
        raise SystemExit(f"{calibration} has no preset {name!r}; it has {sorted(presets)} (run `pab calibrate`)")
    return name, presets[name]


def schedules_for(case: Case) -> str:
    """The calibration whose fixed-* presets a case runs: its family's trained -small model's, at that model's
    step count (a schedule calibrated at another count is stretched, and reuses a different share)."""
    from pab.checkpoint import CALIBRATION_FILE
    from pab.models import WEIGHTS_DIR

    own = WEIGHTS_DIR / f"{case.model}-small" / CALIBRATION_FILE
    return str(own if own.is_file() else WEIGHTS_DIR / "opensora-v1.2-small" / CALIBRATION_FILE)


def _run_case(
    rank: int,
    world: int,
    case: Case,
    pabs: list[str],
    cfg_parallel: bool,
    repeat: int,
    engine: EngineOptions = EngineOptions(),
    decode: bool = True,
    overlap_chunks: int = 1,
    idle: int = 0,
    precisions: tuple[str, ...] = ("bf16",),
    kernels: KernelOptions = DEFAULT_KERNELS,
    x264: dict[str, str] | None = None,
    decode_idle: int = 0,
) -> list[dict]:
    from pab.pipeline import GenerationRequest, Pipeline

    parallel = None
    if world > 1:
        from pab.parallel import ParallelConfig, init_parallel

        cfg = 2 if cfg_parallel else 1
        parallel = init_parallel(ParallelConfig(sp=world // cfg, cfg=cfg, overlap_chunks=overlap_chunks))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    pipe = Pipeline.from_name(case.model, device=device, dtype=torch.bfloat16, parallel=parallel,
                              engine=engine)  # fmt: skip
    set_kernel_options(pipe.transformer, kernels)
    build_s = time.perf_counter() - t0
    base = dict(
        model=case.model,
        prompt="a red panda eating bamboo in the snow, cinematic",
        num_frames=case.frames,
        height=case.height,
        width=case.width,
        steps=case.steps,
        seed=0,
    )
    fwd_flops, per_call = _flops_by_kind(pipe, GenerationRequest(**base)) if world == 1 else (None, None)
    # Warm-up: kernels, cuBLAS/cuDNN heuristics and the allocator at the real shapes, once per precision (an
    # fp8 forward JIT-compiles its own Triton kernels, ~1 s that the first timed run would otherwise include),
    # and the decode to mp4 as it is timed (PyAV's and libx264's first use in the process).
    for precision in dict.fromkeys(p.split("+")[0] for p in precisions):
        generate_to_mp4(pipe, GenerationRequest(**{**base, "steps": 4, "precision": precision}), decode, x264)
    records = []
    bf16_latents: dict[str, torch.Tensor] = {}
    own_fp8 = pipe.fp8_config
    for (label, pab), precision in ((lp, pr) for lp in pabs for pr in precisions):
        base["precision"], pipe.fp8_config = precision_mode(precision, own_fp8)
        first_s = None
        if engine.cuda_graphs:  # the first request of a shape captures its patterns' graphs; a server's later ones replay
            first = pipe.generate(GenerationRequest(**base, cache=pab), decode=False)
            first_s = round(first.timings["denoise_s"], 3)
        best = None
        for _ in range(repeat):
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
            pipe.clear_text_cache()  # end to end starts from a prompt not seen before: its encoding is timed
            res = generate_to_mp4(pipe, GenerationRequest(**base, cache=pab), decode, x264)
            if best is None or res.timings["denoise_s"] < best.timings["denoise_s"]:
                best = res
        res = best
        rel_l2 = None  # fp8's error: the final latents against bf16's with the same cache and seed
        if precision == "bf16":
            bf16_latents[label] = res.latents
        elif label in bf16_latents:
            ref = bf16_latents[label]
            rel_l2 = round(float((res.latents - ref).norm() / ref.norm()), 5)
        prof = median_profile([gpu_profile(lambda: pipe.generate(GenerationRequest(**base, cache=pab), decode=False))
                               for _ in range(int(idle))]) if idle and torch.cuda.is_available() else {}  # fmt: skip
        dprof = median_profile([
            gpu_profile(lambda: generate_to_mp4(pipe, GenerationRequest(**base, cache=pab), True, x264),
                        region="pab.decode")
            for _ in range(int(decode_idle))
        ]) if decode_idle and decode and torch.cuda.is_available() else {}  # fmt: skip
        calls = len(res.timesteps)
        rec: dict[str, Any] = {
            "impl": "pab",
            "model": case.model,
            "resolution": case.resolution,
            "frames": case.frames,
            "height": case.height,
            "width": case.width,
            "steps": case.steps,
            "model_calls": calls,
            "sp": parallel.sp_size if parallel else 1,
            "cfg_parallel": bool(cfg_parallel),
            "overlap_chunks": overlap_chunks if parallel else 1,
            "pab": label,
            "precision": precision,
            "latent_rel_l2_vs_bf16": rel_l2,
            "cache": res.cache,
            "cache_stats": res.cache_stats,
            **engine.model_dump(),  # compile, cuda_graphs, vae_kernels
            "x264": x264_settings(x264) if decode else None,
            "spatial_attention": kernels.spatial_attention,
            "cross_attention": kernels.cross_attention,
            "first_dit_s": first_s,  # with graphs: the capturing request's DiT time
            "graphs": pipe.graphs.stats if pipe.graphs is not None else None,
            "dit_s": round(res.timings["denoise_s"], 3),
            "gpu_idle_pct": prof.get("gpu_idle_pct"),  # under the profiler, which slows every launch a little
            "gpu_idle_pcts": prof.get("gpu_idle_pcts"),  # each profiled generation's (--idle N); the median is above
            "gpu_ms_by_kind": prof.get("gpu_ms_by_kind"),  # the median generation's kernels in the loop (--idle)
            "top_kernels": prof.get("top_kernels"),
            # --decode-idle: the same for the decode to mp4 (the VAE, the frames' copies, the encoder beside it)
            "decode_gpu_idle_pct": dprof.get("gpu_idle_pct"),
            "decode_gpu_idle_pcts": dprof.get("gpu_idle_pcts"),
            "decode_gpu_ms_by_kind": dprof.get("gpu_ms_by_kind"),
            "decode_top_kernels": dprof.get("top_kernels"),
            "step_s": round(res.timings["denoise_s"] / calls, 4),
            "text_s": round(res.timings["text_s"], 3),
            "decode_s": round(res.timings.get("decode_s", 0.0), 3),
            "e2e_s": round(res.timings["total_s"], 3) if decode else None,
            "mp4_s": round(res.timings["mp4_s"], 3) if "mp4_s" in res.timings else None,
            "to_mp4_s": round(res.timings["to_mp4_s"], 3) if "to_mp4_s" in res.timings else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "pab_stats": res.pab_stats,
            "gpu": gpu_name(),
            "gpus": world,
            "build_s": round(build_s, 1),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
        }
        if res.parallel:
            rec["comm"] = res.parallel.get("comm")
            rec["comm_bytes_per_step"] = rec["comm"]["bytes_moved"] / calls if rec["comm"] else None
            rec["head_parallel_bytes_per_step"] = head_parallel_bytes(rec["comm"]) / calls if rec["comm"] else None
        if fwd_flops is not None:
            skipped = sum(res.pab_stats[k]["broadcast"] * per_call[k] for k in per_call)
            flops = fwd_flops * (calls - res.cache_stats.get("reused", 0)) - skipped  # a reused step: no block ran
            rec["tflop"] = round(flops / 1e12, 1)
            rec["mfu"] = round(flops / res.timings["denoise_s"] / (PEAK_TFLOPS * 1e12 * world), 4)
        records.append(rec)
    return records if rank == 0 else []


def generate_to_mp4(pipe: Any, request: Any, decode: bool, x264: dict[str, str] | None = None) -> Any:
    """One generation; with `decode`, the frames are encoded to an mp4 on a thread as they are decoded (as
    `pab generate` and the workers do; `x264` options over Mp4Writer's), and the timings gain mp4_s (the wait
    for the encoder after the decode) and to_mp4_s (prompt to mp4 on disk). Without PyAV, no mp4."""
    import importlib.util
    import tempfile

    if not decode or importlib.util.find_spec("av") is None:
        return pipe.generate(request, decode=decode)
    from pab.video import Mp4Writer

    with tempfile.TemporaryDirectory(prefix="pab-bench-") as tmp:
        t0 = time.perf_counter()
        writer = Mp4Writer(Path(tmp) / "video.mp4", pipe.resolve(request).fps, background=True, x264=x264)
        try:
            res = pipe.generate(request, frame_sink=writer.write)
            t = time.perf_counter()
            writer.close()
        finally:
            writer.abort()
        res.timings["mp4_s"] = time.perf_counter() - t
        res.timings["to_mp4_s"] = time.perf_counter() - t0
    return res


def x264_options(text: str) -> dict[str, str]:
    """"preset=faster,rc-lookahead=8" -> {"preset": "faster", "rc-lookahead": "8"} (argparse type)."""
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not k or not sep or not v for k, sep, v in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated KEY=VALUE libx264 options")
    return {k: v for k, _, v in pairs}


# What each "fp8+<mode>" of --precision changes in the pipeline's own Fp8Config (its family's, `Family.fp8`; "fp8" is
# that one): "exact": fp8 without Hopper's fast accumulation; "groups" / "nogroups": Latte's and Open-Sora-Plan's q, k,
# v in fp8 / in bf16 (Latte's family runs them in fp8, Open-Sora-Plan's in bf16); "crossbf16": the cross-attention's
# q in bf16 (Open-Sora's and Open-Sora-Plan's run in fp8 on the gate + residual pass's rows); "both": the norms write
# bf16 beside the e4m3 rows even where an fp8 GEMM is the only reader; "outbf16": the attentions' output projections
# in bf16, cuDNN's attention
FP8_MODES: dict[str, dict[str, bool]] = {"": {}, "exact": {"fast_accum": False}, "groups": {"linear_groups": True},
                                         "nogroups": {"linear_groups": False}, "crossbf16": {"produced_inputs": False},
                                         "both": {"e4m3_only_inputs": False}, "outbf16": {"attention_outputs": False}}
PRECISION_MODES = ("bf16", *(f"fp8+{m}" if m else "fp8" for m in FP8_MODES))


def precision_mode(precision: str, own: Fp8Config) -> tuple[str, Fp8Config]:
    """"fp8+groups" -> ("fp8", `own` with that mode's one field set): the request's precision and the pipeline's
    config for it (`own` is the pipeline's own, its family's)."""
    base, _, mode = precision.partition("+")
    return base, dataclasses.replace(own, **FP8_MODES[mode])


def precision_list(text: str) -> tuple[str, ...]:
    """"fp8,fp8+outbf16" -> ("fp8", "fp8+outbf16") (argparse type): each one of `PRECISION_MODES`, so that a
    misspelt mode is an error, not a run of the defaults under another name."""
    modes = tuple(m for m in text.split(",") if m)
    bad = [m for m in modes if m not in PRECISION_MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(PRECISION_MODES)}")
    return modes


def gpu_profile(generate: Callable[[], Any], top: int = 12, region: str = "pab.denoise") -> dict[str, Any]:
    """One `generate()` under torch.profiler: the GPU's idle share inside the pipeline's `region` (the denoising
    loop, or "pab.decode"), its kernel time by kind (`kernel_kind`) and its `top` kernels by total time, in ms per
    generation (None / empty where there are no kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate()
    events = prof.events()
    span = next((e for e in events if e.name == region and e.device_type == DeviceType.CPU), None)
    # GPU-side events, less the annotations (record_function ranges are mirrored on the GPU timeline too).
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    if span is None:
        return {"gpu_idle_pct": None, "gpu_ms_by_kind": {}, "top_kernels": []}
    lo, hi = span.time_range.start, span.time_range.end
    inside = [e for e in kernels if lo <= e.time_range.start < hi]
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in inside:
        us, kind = e.time_range.end - e.time_range.start, kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    return {
        "gpu_idle_pct": idle_pct(lo, hi, [(e.time_range.start, e.time_range.end) for e in kernels]),
        "gpu_ms_by_kind": {k: round(v / 1e3, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [[name[:120], round(us / 1e3, 1)]
                        for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],  # fmt: skip
    }


# Kernel names by kind, first match wins. cuBLAS's Hopper GEMMs are "nvjet_*" or "sm90_xmma_gemm_*" (fp8 ones
# carry e4m3 in the name, or "qqtst" and "ovscale", the row-wise scales, for nvjet); cuDNN's and FlashAttention's
# attention kernels "*fmha*", "*flash*" or "cudnn*sdpa*"; our Triton kernels are named after their Python functions.
KERNEL_KINDS = (
    ("attention", ("fmha", "flash", "attn", "sdpa", "attention")),
    ("gemm fp8", ("e4m3", "f8f8", "fp8", "_scaled_mm", "qqtst", "ovscale")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "bmm")),
    ("norm / modulate / residual (Triton)", ("ln_", "layer_norm", "rms", "modulate", "_norm", "residual", "gate")),
    ("quantise / gelu (Triton)", ("quant", "gelu")),
    ("copy / layout", ("copy", "cat", "transpose", "permute", "contiguous", "index")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "triton")),
)


def median_profile(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile of the generation with the median idle share among `profiles` (`gpu_profile`'s), with every
    generation's share as "gpu_idle_pcts": one generation's share moves with whatever else the host runs (a
    stalled host thread shows as idle GPU), so `--idle N` reports the middle one of N and keeps the rest."""
    measured = sorted((p for p in profiles if p.get("gpu_idle_pct") is not None), key=lambda p: p["gpu_idle_pct"])
    if not measured:
        return profiles[0] if profiles else {}
    # The lower middle for an even count: a stall only ever adds idle time.
    return {**measured[(len(measured) - 1) // 2], "gpu_idle_pcts": [p["gpu_idle_pct"] for p in profiles]}


def kernel_kind(name: str) -> str:
    """Which of KERNEL_KINDS a kernel's name falls under ("other" for none)."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def idle_pct(lo: float, hi: float, kernels: list[tuple[float, float]]) -> float | None:
    """Percent of [lo, last kernel end] covered by no kernel interval (start, end) (None without kernels)."""
    kernels = sorted((max(a, lo), min(b, hi)) for a, b in kernels if b > lo and a < hi)
    if not kernels:
        return None
    busy, end = 0.0, lo
    for a, b in kernels:  # the union of the kernels' intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    window = max(b for _, b in kernels) - lo  # to the last kernel: the range's closing sync is not GPU time
    return round(100 * (1 - busy / window), 2)


PEER_CACHES = ("off", "paper", "fastercache", "firstblockcache", "magcache")


def _peer_cache(model: Any, cache: str, steps: int, current: dict, ratios: Any) -> None:
    """Attach one of diffusers' own cache hooks to its Latte, at the settings its docs and the PAB paper give."""
    from diffusers import hooks

    timestep = lambda: current["t"]  # noqa: E731 - the hooks read the loop's timestep through a callback
    if cache == "paper":
        hooks.apply_pyramid_attention_broadcast(model, hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=3,
            cross_attention_block_skip_range=6, spatial_attention_timestep_skip_range=(100, 800),
            temporal_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep))  # fmt: skip
    elif cache == "fastercache":  # diffusers' documented settings; Latte's latents are (B, C, F, H, W)
        hooks.apply_faster_cache(model, hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
            attention_weight_callback=lambda _: 0.3, current_timestep_callback=timestep, tensor_format="BCFHW",
            is_guidance_distilled=False))  # fmt: skip
    elif cache == "firstblockcache":
        hooks.apply_first_block_cache(model, hooks.FirstBlockCacheConfig(threshold=0.05))
    elif cache == "magcache":  # without ratios: calibration mode, which computes every step and prints them
        config = hooks.MagCacheConfig(num_inference_steps=steps, threshold=0.06, mag_ratios=ratios,
                                      calibrate=ratios is None)  # fmt: skip
        hooks.apply_mag_cache(model, config)
    elif cache != "off":
        raise ValueError(f"unknown peer cache {cache!r}; use one of {PEER_CACHES}")


def run_peer_latte(pab: str, repeat: int = 1, device: str = "cuda", size: str = "full", steps: int | None = None) -> dict:
    """diffusers' LatteTransformer3DModel with one of diffusers' own cache hooks (`PEER_CACHES`), same loop and
    settings as ours; the record counts the steps it reused. `size="tiny"` runs on the CPU.

    diffusers 0.42's first-block and mag caches do not run on Latte: they subtract the first block's input
    (frames-major) from the stack's output (tokens-major) and fail wherever frames != tokens per frame (at
    real size, 16 != 1024); the record then says so (bench/results/h200.json)."""
    import contextlib
    import io
    import re

    from diffusers import DDIMScheduler, LatteTransformer3DModel

    from pab.models.latte import SIZES

    case = CASES["latte"]
    steps = steps or case.steps
    cfg = {k: v for k, v in SIZES[size].items() if k != "video_length"}
    current = {"t": 1000}
    frames, height, width = (case.frames, case.height, case.width) if size == "full" else (SIZES[size]["video_length"], 96, 96)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, 4, frames, height // 8, width // 8, generator=gen).to(device)
    text = torch.randn(2, 16, cfg["caption_channels"], generator=gen).to(device, torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    computed = {"n": 0}

    def build(ratios: Any = None) -> Any:
        torch.manual_seed(0)  # the same random weights for every setting
        with torch.device(device):
            model = LatteTransformer3DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
        _peer_cache(model, pab, steps, current, ratios)
        # The last spatial block's norm runs only when its block computes (a skipped step replaces the block's
        # forward; PAB and FasterCache skip attention inside it): counts the computed steps.
        model.transformer_blocks[-1].norm1.register_forward_hook(lambda *_: computed.__setitem__("n", computed["n"] + 1))
        return model

    def loop(model: Any, n: int) -> float:
        sched = DDIMScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            steps_offset=0,
            clip_sample=False,
            timestep_spacing="leading",
        )
        sched.set_timesteps(n)
        x = z.clone()
        if hasattr(model, "_diffusers_hook"):
            model._diffusers_hook.reset_stateful_hooks()
        computed["n"] = 0
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in sched.timesteps:
                current["t"] = int(t)
                with model.cache_context("cfg"):  # first-block and mag caches keep their state per context
                    out = model(
                        torch.cat([x, x]).to(torch.bfloat16),
                        encoder_hidden_states=text,
                        timestep=t.expand(2).to(device),
                        return_dict=False,
                    )[0]
                eps_c, eps_u = out[:, :4].float().chunk(2)
                x = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
        sync()
        return time.perf_counter() - t0

    ratios = None
    if pab == "magcache":  # the model's magnitude ratios, from diffusers' own calibration run
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            loop(build(), steps)
        ratios = [float(v) for v in re.findall(r"[-+]?[0-9.]+(?:e[-+]?[0-9]+)?", printed.getvalue().split("mag_ratios=...):")[-1])]

    model = build(ratios)
    loop(model, steps)  # warm-up; a step cache's state is only right after a full run
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dit = min(loop(model, steps) for _ in range(repeat))
    reuse = steps - computed["n"]
    return {
        "impl": "diffusers",
        "model": "latte-1",
        "resolution": case.resolution if size == "full" else f"{size} {width}x{height}-{frames}f",
        "frames": frames,
        "height": height,
        "width": width,
        "steps": steps,
        "model_calls": steps,
        "sp": 1,
        "pab": pab,
        "reused_steps": reuse,
        "dit_s": round(dit, 3),
        "step_s": round(dit / steps, 4),
        "e2e_s": None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "mfu": None,
        "gpu": gpu_name(),
        "gpus": 1,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
    }


VAE_CASES = [  # (vae, resolution, frames, height, width)
    ("opensora-vae-v1.2", "480p-2s", 51, 480, 848),
    ("opensora-vae-v1.2", "720p-4s", 102, 720, 1280),
    ("opensora-plan-vae-v1.1", "480p-2s", 49, 480, 848),
    ("opensora-plan-vae-v1.1", "720p-4s", 97, 720, 1280),
]


def run_vae_decode(repeat: int = 1) -> list[dict]:
    """Decode time and peak memory of the two video VAEs (random weights, bf16), tiled as released."""
    from pab.models import build

    records = []
    for name, res, frames, h, w in VAE_CASES:
        vae = build(name, device="cuda", dtype=torch.bfloat16)
        if hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        z = torch.randn(
            1, vae.latent_channels, vae.latent_frames(frames), h // 8, w // 8, device="cuda", dtype=torch.bfloat16
        )
        with torch.no_grad():
            vae.decode(
                z[:, :, : vae.latent_frames(1 if "plan" in name else 17)], num_frames=1 if "plan" in name else 17
            )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                video = vae.decode(z, num_frames=frames)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
        assert video.shape[2] == frames
        records.append(
            {
                "impl": "pab",
                "model": name,
                "resolution": res,
                "frames": frames,
                "height": h,
                "width": w,
                "decode_s": round(best, 3),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "gpu": gpu_name(),
                "gpus": 1,
                "date": datetime.date.today().isoformat(),
                "torch": torch.__version__,
            }
        )
        print(f"{name:>24} {res:>8} {frames:>4} frames: decode {best:.2f}s, peak {records[-1]['peak_mem_gib']} GiB")
        del vae, z, video
        torch.cuda.empty_cache()
    return records


def print_table(records: list[dict]) -> None:
    cols = [
        "impl",
        "model",
        "resolution",
        "sp",
        "pab",
        "precision",
        "spatial_attention",
        "cross_attention",
        "cuda_graphs",
        "dit_s",
        "gpu_idle_pct",
        "step_s",
        "e2e_s",
        "to_mp4_s",
        "peak_mem_gib",
        "mfu",
        "speedup",
        "comm_bytes_per_step",
        "head_parallel_bytes_per_step",
    ]
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in records:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "speedup":
                v = speedup(r, records)
            if c.endswith("bytes_per_step") and v is not None:
                v = f"{v / 2**20:.1f}MiB"
            cells.append(f"{'-' if v is None else v!s:>12}")
        print(" | ".join(cells))


def print_breakdown(records: list[dict]) -> None:
    """Where each profiled record's DiT time (`--idle`) and decode to mp4 (`--decode-idle`) go: kernel time by
    kind, as ms and as a share."""
    for r in records:
        for prefix, part in (("", "DiT"), ("decode_", "decode to mp4")):
            kinds = r.get(f"{prefix}gpu_ms_by_kind")
            if not kinds:
                continue
            total = sum(kinds.values())
            each = r.get(f"{prefix}gpu_idle_pcts") or []
            of = f" (the median of {', '.join(map(str, each))})" if len(each) > 1 else ""
            print(f"\n{r['model']} {r['resolution']} pab={r['pab']} {r['precision']}, {part}: {total:.0f} ms of "
                  f"kernels, {r[f'{prefix}gpu_idle_pct']}% idle{of}")
            for kind, ms in kinds.items():
                print(f"  {kind:<28} {ms:>9.1f} ms  {100 * ms / total:5.1f}%")
            for name, ms in r.get(f"{prefix}top_kernels") or []:
                print(f"    {ms:>9.1f} ms  {name}")


def head_parallel_bytes(comm: dict) -> float:
    """Bytes a rank would send with Ulysses-style head parallelism for the same attentions: an all-to-all of
    q, k, v and of the output around each temporal attention where DSP switches the activation in and out
    (twice DSP's all-to-all bytes, docs/parallel.md), plus the same output gathers."""
    return 2 * comm["all_to_all_bytes"] + comm["gather_bytes"] + comm.get("cfg_gather_bytes", 0)


def speedup(rec: dict, records: list[dict]) -> str | None:
    """DiT time of the one-GPU record of the same case among `records` (same run) over this record's."""
    key = ("impl", "model", "resolution", "pab", "precision", "compile", "cuda_graphs", "spatial_attention",
           "cross_attention")
    base = [r for r in records if r.get("gpus") == 1 and all(r.get(k) == rec.get(k) for k in key)]
    if not base or rec.get("gpus", 1) == 1:
        return None
    return f"{base[-1]['dit_s'] / rec['dit_s']:.2f}x"


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {sorted(CASES)}")
    p.add_argument("--sp", default="1", help="comma list of group sizes, e.g. 1,2,4")
    p.add_argument("--pab", default="off,paper",
                   help="comma list of caches: off, paper, PAB rule files, or fixed-slow / fixed-fast (the step-reuse "
                        "schedules of --schedules, at each case's step count)")
    p.add_argument("--schedules", help="the `pab calibrate` file whose fixed-* presets --pab may name (default: "
                        "the shipped -small model's of each case's family, calibrated on its trained weights)")
    p.add_argument("--cfg-parallel", action="store_true", help="groups of 2k GPUs run CFG 2 x DSP k")
    p.add_argument("--dsp-chunks", type=int, default=1,
                   help="switch temporal attention in this many row chunks, overlapping all-to-all and compute")
    p.add_argument("--peer", action="store_true", help="also diffusers' Latte with its own cache hooks")
    p.add_argument("--peer-caches", default=",".join(PEER_CACHES),
                   help=f"diffusers' caches the peer runs (comma list of {list(PEER_CACHES)})")
    EngineOptions.add_arguments(p)  # --compile, --cuda-graphs, --vae-kernels
    for part in ("spatial", "cross"):
        p.add_argument(f"--{part}-attention", choices=ATTENTION_IMPLS, default="sdpa",
                       help=f"the DiT's {part} attention: SDPA or pab.kernels.flash_attention (KernelOptions)")
    p.add_argument("--idle", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="N more generations per setting (1 without N) under torch.profiler: the GPU's idle share of "
                        "the loop, its kernel time by kind and its top kernels, of the generation with the median "
                        "idle share (printed after the table)")
    p.add_argument("--decode-idle", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="N more generations to mp4 per setting (1 without N) under torch.profiler: the GPU's idle "
                        "share of the decode (the VAE and the frames' copies, with x264 encoding beside them), its "
                        "kernel time by kind and its top kernels, of the generation with the median idle share")
    p.add_argument("--precision", type=precision_list, default=("bf16",),
                   help="comma list of bf16, fp8 (the model family's own Fp8Config), fp8+exact (without fast "
                   "accumulation), fp8+groups / fp8+nogroups (Latte's and Open-Sora-Plan's q, k, v in fp8 / bf16), fp8+crossbf16 "
                   "(the cross-attention's q in bf16), "
                   "fp8+both (norms write bf16 beside e4m3), fp8+outbf16 (output projections in bf16) "
                   "(pab.precision.Fp8Config); fp8 records its latents' error against bf16")
    p.add_argument("--dit-only", action="store_true", help="skip the VAE decode (no e2e time)")
    p.add_argument("--x264", type=x264_options, default=None,
                   help="libx264 options over Mp4Writer's defaults for the end-to-end mp4, e.g. preset=faster,rc-lookahead=8")
    p.add_argument("--vae", action="store_true", help="also the VAE decode benchmark (480p 2s, 720p 4s)")
    p.add_argument("--repeat", type=int, default=1, help="timed generations per setting (best is kept)")
    p.add_argument("--out", default="bench/results/h100.json")
    p.add_argument("--machine", default=os.environ.get("PAB_BENCH_MACHINE", os.uname().nodename),
                   help="recorded with each result, e.g. the device kind (nvidia-h100-x1)")
    args = p.parse_args(argv)
    engine = EngineOptions.from_args(args)
    kernels = KernelOptions(spatial_attention=args.spatial_attention, cross_attention=args.cross_attention)
    records: list[dict] = []
    out = Path(args.out)
    existing = read_records(out)

    def save() -> None:  # after every case, so a later failure loses nothing measured
        for rec in records:
            rec.setdefault("machine", args.machine)
        write_records(out, existing + records)

    for name in filter(None, args.cases.split(",")):
        case = CASES[name]
        pabs = [fixed_schedule(pab, args.schedules or schedules_for(case)) for pab in args.pab.split(",")]
        for sp in (int(s) for s in args.sp.split(",")):
            if sp == 1:
                recs = _run_case(0, 1, case, pabs, False, args.repeat, engine, not args.dit_only, idle=args.idle,
                                 precisions=args.precision, kernels=kernels, x264=args.x264,
                                 decode_idle=args.decode_idle)  # fmt: skip
            else:
                from pab.parallel import launch_local

                recs = launch_local(
                    sp,
                    _run_case,
                    case,
                    pabs,
                    args.cfg_parallel,
                    args.repeat,
                    engine,
                    not args.dit_only,
                    args.dsp_chunks,
                    args.idle,
                    args.precision,
                    kernels,
                    args.x264,
                    args.decode_idle,
                    threads=None,
                    timeout_s=1800,
                )[0]
            records += recs
            save()
            print_table(recs)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.peer:
        for pab in filter(None, args.peer_caches.split(",")):
            try:
                records.append(run_peer_latte(pab, args.repeat))
            except Exception as e:  # the peer is optional: record why a cache of its is missing
                print(f"peer (diffusers Latte, cache={pab}) failed: {type(e).__name__}: {e}")
                records.append({"impl": "diffusers", "model": "latte-1", "pab": pab, "gpus": 1,
                                "error": f"{type(e).__name__}: {e}"[:500], "date": datetime.date.today().isoformat()})
            save()
            print_table(records[-1:])
    if args.vae:
        records += run_vae_decode(args.repeat)
        save()
    print("\nall records:")
    print_table(records)
    print_breakdown(records)
    save()
    print(f"\nwrote {len(records)} records to {out} ({gpu_name()}, {os.uname().nodename})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
