"""PAB's observation, reproduced: each kind of module's output change between consecutive steps.

    python -m bench.ucurve                                   # opensora-v1.2-small, 8 held-out prompts
    python -m bench.ucurve --png docs/img/ucurve.png --json bench/results/ucurve.json

Plots the mean relative change |o_i - o_(i-1)| / |o_(i-1)| of the spatial, temporal, cross-attention and
MLP outputs against the denoising step (and its timestep), with the `paper` preset's window shaded, and
writes the numbers. See `pab.eval.changes`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def plot(curves: dict, title: str, window: tuple[float, float] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = curves["timesteps"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for kind, ys in curves["mean_relative_change"].items():
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=kind)
    if window is not None:
        inside = [i for i, t in enumerate(ts) if window[0] < t < window[1]]
        if inside:
            ax.axvspan(inside[0] - 0.5, inside[-1] + 0.5, color="0.9", zorder=0, label=f"paper window {window}")
    ax.set_xlabel("denoising step (timestep below)")
    ax.set_ylabel("mean relative change of output")
    ax.set_yscale("log")
    ticks = list(range(0, len(ts), max(1, len(ts) // 10)))
    ax.set_xticks(ticks, [f"{i}\n{ts[i]:.0f}" for i in ticks])
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ucurve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opensora-v1.2-small")
    p.add_argument("--checkpoint", help="default: the model's shipped weights")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts averaged over")
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--png", type=Path, default=Path("docs/img/ucurve-opensora-v1.2-small.png"))
    p.add_argument("--json", type=Path, default=Path("bench/results/ucurve-opensora-v1.2-small.json"))
    args = p.parse_args(argv)

    from pab.broadcast import PABConfig
    from pab.data.shapes import held_out_scenes
    from pab.eval.changes import measure_changes
    from pab.pipeline import GenerationRequest, Pipeline

    pipeline = Pipeline.from_name(args.model, device=args.device, checkpoint=args.checkpoint)
    requests = [
        GenerationRequest(model=args.model, prompt=s.caption(), seed=i, steps=args.steps)
        for i, s in enumerate(held_out_scenes()[: args.prompts])
    ]
    curves = measure_changes(pipeline, requests).to_dict()
    rule = PABConfig.preset(args.model, "paper").rule("spatial")
    window = tuple(rule.window) if rule is not None else None
    print(f"{'step':>4} {'t':>7} " + " ".join(f"{k:>9}" for k in curves["mean_relative_change"]))
    for i, t in enumerate(curves["timesteps"]):
        vals = [v[i] for v in curves["mean_relative_change"].values()]
        print(f"{i:>4} {t:7.1f} " + " ".join("        -" if math.isnan(v) else f"{v:9.4f}" for v in vals))
    plot(curves, f"{args.model}: output change per step ({len(requests)} prompts)", window, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(curves).replace("NaN", "null"))
    args.json.write_text(json.dumps({"model": args.model, **clean}, indent=1) + "\n")
    print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
