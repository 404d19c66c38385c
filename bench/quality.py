"""What caching costs in quality, on a trained model: one command, a table on stdout, a JSON record.

    python -m bench.quality                                     # opensora-v1.2-small, 64 held-out prompts
    python -m bench.quality --prompts 16 --settings off,paper   # fewer, faster (CPU)
    python -m bench.quality --settings off,paper --precision fp8   # the same settings in fp8 as well
    python -m bench.quality --model latte-1-small --settings off,paper --precision fp8+nogroups,fp8+groups

With `--precision fp8` every setting also runs with the attentions' and MLPs' GEMMs in fp8 (pab.precision;
emulated in float32 on CPU), as "<setting>@fp8", and PSNR / SSIM compare with the same setting in bf16. A comma
list runs each mode (bench.run's: fp8 is the model family's own Fp8Config, fp8+<mode> changes one field of it).

For every held-out prompt of the synthetic data (`pab.data.shapes.held_out_scenes`, never seen in training)
and every cache setting (PAB rules, or a step-reuse preset from the model's `pab calibrate` file), the same
request (seed = the prompt's index) is rendered at the model's default steps. Per setting:
* the judge's accuracy (`pab.eval.judge`): colour, shape, motion, background and all of them together;
* PSNR and SSIM of each video against the cache-off video of the same request (the paper's fidelity measure);
* the DiT time per video, its speed-up over off, and the share of the module calls (attention, MLP) off
  computes that this setting did not compute (what PAB broadcast and what a reused step skipped: the FLOPs
  saved, to within the cheap embedding and output layers).
Records are appended to --out with the machine they ran on.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.records import append_records
from bench.run import precision_list, precision_mode

# Settings beside the presets: the paper's ranges over a wider window, every attention every other step, and
# both over (90, 420), late in the small model's flat stretch; the paper's (450, 930) starts where its outputs
# still change 10-20% a step (docs/quality.md has the U-curve).
SETTINGS: dict[str, Any] = {
    "off": "off",
    "paper": "paper",
    "all-r2": {k: {"range": 2, "window": [450, 930]} for k in ("spatial", "temporal", "cross")},
    "paper-wide": {"spatial": {"range": 2, "window": [100, 950]}, "temporal": {"range": 4, "window": [100, 950]},
                   "cross": {"range": 6, "window": [100, 950]}},
    "all-r2-wide": {k: {"range": 2, "window": [100, 950]} for k in ("spatial", "temporal", "cross")},
    "paper-low": {"spatial": {"range": 2, "window": [90, 420]}, "temporal": {"range": 4, "window": [90, 420]},
                  "cross": {"range": 6, "window": [90, 420]}},
    "all-r2-low": {k: {"range": 2, "window": [90, 420]} for k in ("spatial", "temporal", "cross")},
    # Step reuse, at the presets `pab calibrate` wrote beside the model's weights (cache.json).
    "teacache-slow": "teacache-slow",
    "teacache-fast": "teacache-fast",
    "magcache-slow": "magcache-slow",
    "magcache-fast": "magcache-fast",
}  # fmt: skip
DEFAULT = ("off", "paper", "all-r2-wide", "teacache-slow", "teacache-fast", "magcache-slow", "magcache-fast")
FLAGS = ("colour", "shape", "motion", "background", "match")


def evaluate(
    pipeline, settings: dict[str, Any], prompts: int, steps: int | None = None, precisions: tuple[str, ...] = ("bf16",)
) -> dict[str, dict]:
    """Render every held-out prompt under every setting; per setting, the aggregated figures. A precision other
    than bf16 runs every setting again as "<setting>@<precision>", compared with that setting in bf16."""
    from pab.data.shapes import held_out_scenes
    from pab.eval.judge import judge
    from pab.eval.metrics import psnr, ssim
    from pab.pipeline import GenerationRequest

    scenes = held_out_scenes()[:prompts]
    reference: dict[int, np.ndarray] = {}
    same_setting: dict[tuple[str, int], np.ndarray] = {}
    results: dict[str, dict] = {}
    runs = [(f"{name}@{p}" if p != "bf16" else name, name, cache, p) for p in precisions for name, cache in settings.items()]
    own_fp8 = pipeline.fp8_config  # the family's; each fp8+<mode> changes one field of it
    for label, name, cache, mode in runs:
        precision, pipeline.fp8_config = precision_mode(mode, own_fp8)
        verdicts, psnrs, ssims, dit_s = [], [], [], []
        calls = {"computed": 0, "broadcast": 0}
        steps_reused = 0
        for i, scene in enumerate(scenes):
            r = pipeline.generate(
                GenerationRequest(model=pipeline.name, prompt=scene.caption(), seed=i, steps=steps, cache=cache,
                                  precision=precision)
            )  # fmt: skip
            steps_reused += r.cache_stats.get("reused", 0)
            verdicts.append(judge(r.frames, scene.caption()))
            dit_s.append(r.timings["denoise_s"])
            for counts in r.pab_stats.values():
                calls["computed"] += counts["computed"]
                calls["broadcast"] += counts["broadcast"]
            if precision == "bf16":
                same_setting[name, i] = r.frames
            # fp8 compares with its setting in bf16 (what fp8 changes); a bf16 setting with cache off.
            ref = reference.get(i) if precision == "bf16" else same_setting.get((name, i))
            if label == "off":
                reference[i] = r.frames
            elif ref is not None:
                psnrs.append(psnr(r.frames, ref))
                ssims.append(ssim(r.frames, ref))
        results[label] = {
            "cache": cache,
            "precision": mode,
            "policy": r.cache,
            "prompts": len(scenes),
            **{f: float(np.mean([getattr(v, f) for v in verdicts])) for f in FLAGS},
            "psnr_db": float(np.mean(psnrs)) if psnrs else None,
            "ssim": float(np.mean(ssims)) if ssims else None,
            "dit_s": float(np.median(dit_s)),
            "calls": calls,
            "steps_reused_per_video": steps_reused / len(scenes),
            "misses": [v.prompt for v in verdicts if not v.match][:10],
        }
        off = results.get("off")
        if off is not None:
            results[label]["speedup"] = off["dit_s"] / results[label]["dit_s"]
            results[label]["calls_saved"] = 1 - calls["computed"] / max(1, off["calls"]["computed"])
        print(_row(label, results[label]), flush=True)
    pipeline.fp8_config = own_fp8
    return results


def _row(name: str, r: dict) -> str:
    acc = "  ".join(f"{100 * r[f]:5.1f}" for f in FLAGS)
    fid = f"{r['psnr_db']:6.2f}  {r['ssim']:.4f}" if r["psnr_db"] is not None else f"{'-':>6}  {'-':>6}"
    speed = f"{r['speedup']:5.2f}x" if "speedup" in r else f"{'-':>6}"
    saved = f"{100 * r['calls_saved']:5.1f}%" if "calls_saved" in r else f"{'-':>6}"
    return f"{name:<18} {acc}  {fid}  {r['dit_s']:7.3f}  {speed}  {saved}  {r['steps_reused_per_video']:5.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opensora-v1.2-small")
    p.add_argument("--checkpoint", help="default: the model's shipped weights")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to use (at most 64)")
    p.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated, from {list(SETTINGS)}")
    p.add_argument("--steps", type=int, help="default: the model's (30 rectified-flow steps for Open-Sora)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--precision", type=precision_list, default=("bf16",),
                   help="fp8: run every setting in bf16 and again in fp8 (pab.precision); a comma list of bench.run's "
                   "modes (fp8+groups, fp8+nogroups, ...) runs each")
    p.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = p.parse_args(argv)

    from pab.pipeline import Pipeline

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if not 1 <= args.prompts <= 64:
        p.error(f"--prompts must be 1 to 64 (the held-out prompts), got {args.prompts}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if "off" in names:  # the reference every other setting is compared with runs first
        names = ["off"] + [s for s in names if s != "off"]
    pipeline = Pipeline.from_name(args.model, device=args.device, checkpoint=args.checkpoint)
    device = str(pipeline.device)
    machine = torch.cuda.get_device_name() if pipeline.device.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"{args.model} on {machine}, {min(args.prompts, 64)} held-out prompts, {pipeline.dtype}")
    print(f"{'setting':<18} {'  '.join(f'{f[:5]:>5}' for f in FLAGS)}    psnr    ssim    dit s  speed  calls"
          "  steps reused")  # fmt: skip
    t0 = time.perf_counter()
    precisions = ("bf16", *(p for p in args.precision if p != "bf16"))
    results = evaluate(pipeline, {n: SETTINGS[n] for n in names}, args.prompts, args.steps, precisions)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "machine": machine,
        "device": device,
        "dtype": str(pipeline.dtype),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    append_records(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
