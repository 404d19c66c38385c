"""How fast a model's VAE decodes, by how it is run (#20 item 4: end to end within 0.8 s of the DiT).

At Open-Sora 480p the VAE decode (1.5-1.6 s on an H200) is most of what a user waits for beyond the DiT. The
2D stage is diffusers' AutoencoderKL run on every frame: convolutions and GroupNorms at full resolution, which
PyTorch runs in NCHW unless asked otherwise. This times `decode` on the model's latents as shipped and with
each way of running it that leaves its output unchanged, and prints the time, the peak memory and how far the
frames moved from the shipped way's (PSNR on [-1, 1]; with `--float32-reference` also from a float32 decode's):

    python -m bench.vae                                   # Open-Sora 1.2 480p, 51 frames, bf16, random weights
    python -m bench.vae --variants eager,channels-last+cudnn-benchmark --out /tmp/vae.json

Variants (join with `+` to combine):
  eager             as the pipeline runs it
  cudnn-benchmark   cuDNN picks each convolution's algorithm by timing it (first call slower)
  channels-last     conv weights, so activations, in NHWC / NDHWC: the layout Hopper's cuDNN convolutions want
  mb<N> / mb-all    N frames per 2D decode call instead of the VAE's micro-batch (all frames at once)
  compile           torch.compile of the 2D decoder (fuses GroupNorm + SiLU; the first call compiles)
  gn-kernel         every GroupNorm through pab.kernels.group_norm, SiLU fused where it follows (pab.vae_kernels);
                    with channels-last the norms read NHWC in place (CUDA, or the CPU under TRITON_INTERPRET=1);
                    each resnet's conv1 leaves its bias to norm2 and conv2's goes into the residual sum (saves
                    PyTorch's separate bias passes), and the nearest-2x upsamplers run as subpixel convolutions
                    (pab.vae_kernels' docstring), and the mid-block attention runs as pab.kernels.wide_attention
  gn-kernel-s20     gn-kernel with the mid-block attention through SDPA (its memory-efficient kernel): session 20's
                    set (the subpixel interleave is one kernel now)
  gn-kernel-bias    gn-kernel-s20 without the subpixel upsamplers (conv biases in the norms and residual sums)
  gn-kernel-unfolded  gn-kernel-bias without the conv biases either (session 19's kernels)
  stile<N> / sprog<N>  the GroupNorm statistics kernel's tile (pab.kernels.group_norm.STATS_TILE elements) and the
                    programs it aims for (STATS_PROGRAMS), to tune them: e.g. channels-last+gn-kernel+stile8192

`--profile` also runs one decode of each variant under torch.profiler and prints where its time goes, by
kernel (the record keeps the top entries).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import re
import statistics
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch

from bench.records import append_records

DEFAULT_VARIANTS = "eager,cudnn-benchmark,channels-last,mb8,mb-all,compile,gn-kernel,channels-last+gn-kernel"
_SDPA = {"wide_attention_from": None}  # the mid-block attention as diffusers runs it
GN_KERNEL_VARIANTS: dict[str, dict[str, Any]] = {  # name -> apply_vae_kernels' options
    "gn-kernel": {},
    "gn-kernel-s20": _SDPA,
    "gn-kernel-bias": {"subpixel": False, **_SDPA},
    "gn-kernel-unfolded": {"conv_bias": False, "subpixel": False, **_SDPA},
}


@contextmanager
def variant(vae: Any, name: str) -> Iterator[None]:
    """Run `vae` one way inside the block, and as it was after it."""
    module = vae.spatial_vae.module if hasattr(vae, "spatial_vae") else None
    if name == "eager":
        yield
    elif name == "cudnn-benchmark":
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
    elif name == "channels-last":
        _set_layout(vae, last=True)
        try:
            yield
        finally:
            _set_layout(vae, last=False)
    elif name.startswith("mb"):
        if module is None:
            raise SystemExit(f"{name}: this VAE has no 2D micro-batch")
        before = vae.micro_batch_size
        vae.micro_batch_size = None if name == "mb-all" else int(name[2:])
        try:
            yield
        finally:
            vae.micro_batch_size = before
    elif name == "compile":
        target = module if module is not None else vae
        decoder = target.decoder
        target.decoder = torch.compile(decoder)
        try:
            yield
        finally:
            target.decoder = decoder
    elif re.fullmatch(r"(stile|sprog)\d+", name):
        from pab.kernels import group_norm as gn

        attr = {"stile": "STATS_TILE", "sprog": "STATS_PROGRAMS"}[name[:5]]
        before = getattr(gn, attr)
        setattr(gn, attr, int(name[5:]))
        try:
            yield
        finally:
            setattr(gn, attr, before)
    elif name in GN_KERNEL_VARIANTS:
        from pab.kernels import group_norm as gn
        from pab.vae_kernels import apply_vae_kernels

        # Wherever the kernels can take the input, so a CPU check under TRITON_INTERPRET=1 runs them too.
        handle = apply_vae_kernels(vae, use_kernel=gn.takes, **GN_KERNEL_VARIANTS[name])
        try:
            yield
        finally:
            handle.remove()
    else:
        raise SystemExit(f"unknown variant {name!r} (module docstring lists them)")


def _set_layout(model: torch.nn.Module, last: bool) -> None:
    """Conv weights (4-D and 5-D) channels-last, or back; convolutions then run, and hand on, that layout."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d} if last else {}
    for p in model.parameters():
        if p.dim() in (4, 5):
            p.data = p.data.contiguous(memory_format=formats.get(p.dim(), torch.contiguous_format))


def timed(fn, iters: int, device: torch.device) -> tuple[float, float, Any]:
    """(first call s, median of the next `iters` s, last output)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def profile(fn, device: torch.device, top: int = 15) -> list[dict[str, Any]]:
    """Run `fn` once under torch.profiler; its `top` most expensive kernels (CUDA) or ops (CPU), self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, attr) / 1e3,
             "share": getattr(e, attr) / total} for e in events[:top] if getattr(e, attr) > 0]  # fmt: skip


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # peak-to-peak 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opensora-v1.2")
    p.add_argument("--frames", type=int, default=51)
    p.add_argument("--size", default="480x854", help="HxW as requested (rounded as the pipeline renders it)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--vae-size", default="full", help="full, or small/tiny for a quick check of the script")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="bench/results/vae-h200.json")
    p.add_argument("--profile", action="store_true", help="print and record each variant's most expensive kernels")
    p.add_argument("--top", type=int, default=15, help="how many kernels --profile keeps")
    p.add_argument("--float32-reference", action="store_true",
                   help="also each variant's PSNR against a float32 decode of the same latents, so a variant's error "
                   "reads against the half-precision decode's own")
    args = p.parse_args(argv)
    device, cuda = torch.device(args.device), torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench.vae times the decode on a CUDA GPU and none is visible; --device cpu for a check")

    from pab.families import get_family
    from pab.pipeline import rendered_size

    vae = get_family(args.model).load_vae(args.vae_size, None, device, getattr(torch, args.dtype))
    h, w = (int(v) for v in args.size.split("x"))
    H, W = rendered_size(vae, h, w)
    f = vae.spatial_factor
    shape = (1, vae.latent_channels, vae.latent_frames(args.frames), H // f, W // f)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, getattr(torch, args.dtype))

    rows: list[dict[str, Any]] = []
    reference = exact = None
    with torch.inference_mode():
        if args.float32_reference:  # a float32 copy of the same weights; kept on the host, out of the peaks measured
            exact = copy.deepcopy(vae).float().decode(latents.float(), args.frames).cpu()
        for combo in args.variants.split(","):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with ExitStack() as stack:
                for name in combo.split("+"):
                    stack.enter_context(variant(vae, name))
                first, median, out = timed(lambda: vae.decode(latents, args.frames), args.iters, device)
                kernels = profile(lambda: vae.decode(latents, args.frames), device, args.top) if args.profile else None
            peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            out = out.cpu()  # the first variant's output is kept on the host, out of the later variants' peaks
            if reference is None:
                reference = out
            rows.append({
                "variant": combo, "first_s": first, "decode_s": median, "peak_gib": peak_gib,
                "psnr_vs_first_db": psnr(out, reference), "max_abs_diff": float((out - reference).abs().max()),
                **({"psnr_vs_float32_db": psnr(out, exact)} if exact is not None else {}),
                **({"profile": kernels} if kernels is not None else {}),
            })  # fmt: skip
            r = rows[-1]
            peak = "" if r["peak_gib"] is None else f" | peak {r['peak_gib']:5.1f} GiB"
            exact_db = "" if exact is None else f" | {r['psnr_vs_float32_db']:6.1f} dB vs float32"
            print(f"{combo:>45} | first {first:7.3f} s | decode {median:6.3f} s{peak} | "
                  f"{r['psnr_vs_first_db']:6.1f} dB{exact_db}")
            for k in kernels or []:
                print(f"{'':>47}{k['ms']:9.2f} ms {100 * k['share']:5.1f}% x{k['calls']:<5} {k['name']}")

    append_records(args.out, {
        "date": datetime.date.today().isoformat(), "host": platform.node(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None, "vae_size": args.vae_size, "dtype": args.dtype,
        "torch": torch.__version__, "model": args.model, "frames": args.frames, "size": f"{H}x{W}",
        "latents": list(shape), "iters": args.iters, "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
