"""`pab calibrate`: measure what the step-reuse policies decide from, and write their presets.

    pab calibrate --model opensora-v1.2-small                      # 16 training-distribution prompts
    pab calibrate --model latte-1-small --prompts prompts.txt --out cache.json --plot cache.png

The full model renders every prompt (nothing reused) while a recorder notes, at each step, the relative L1
change of the first block's modulated input (teacache's indicator), the relative L1 change of the residual
(what a reused step gets wrong) and the residual's mean magnitude (magcache's ratios). From these:

* teacache: a degree-4 polynomial from the indicator's change to the residual's (the rescaling);
* magcache: the residual magnitude ratio of each step to the step before, averaged over the prompts;
* presets ``teacache-slow/fast`` and ``magcache-slow/fast``: the smallest threshold at which the policy,
  replayed on the measured runs, reuses at least 40% (slow) or 70% (fast) of the steps;
* ``fixed-slow/fast``: as many steps as teacache's preset reuses on average, those it reuses most often, as a
  schedule fixed in advance
  (real-size benchmarks on random weights run it; `python -m bench.run --pab fixed-slow`).

The file goes beside the weights by default (`cache.json` of the checkpoint), where the pipeline reads it,
so `--cache teacache-slow` then works for that model; a PNG shows what was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pab.stepcache import StepCacheState, StepReuseConfig

# Fraction of steps reused, replayed on the calibration runs. magcache's fast preset allows longer runs of reuse
# after a shorter warm-up (its paper keeps the first fifth): with 4 in a row after 20% it could not reach 70%.
TARGETS = {"slow": 0.4, "fast": 0.7}
MAGCACHE = {"slow": {"max_skips": 2, "warmup": 0.2}, "fast": {"max_skips": 6, "warmup": 0.1}}
DEGREE = 4


class Recorder(StepCacheState):
    """Computes every step and writes down what each policy decides from."""

    def __init__(self) -> None:
        # Threshold 0: every step computes; the teacache rule still measures the indicator's change.
        super().__init__(config=StepReuseConfig("teacache", threshold=0.0, warmup=0, cooldown=0))
        self.residual_change: list[float] = []  # step i >= 1 against i - 1
        self.residual_norm: list[float] = []  # mean per-token L2 norm at step i

    def keep(self, residual: torch.Tensor) -> None:
        r = residual.float()
        if self.residual is not None:
            prev = self.residual.float()
            self.residual_change.append(float((r - prev).abs().sum() / prev.abs().sum().clamp_min(1e-12)))
        self.residual_norm.append(float(r.norm(dim=-1).mean()))
        super().keep(residual)


def replay(config: StepReuseConfig, changes: list[float], total: int) -> list[int]:
    """The steps `config` reuses on a run whose indicator changed by `changes` (steps 1..total-1): the real
    rule (`StepCacheState.decide`) fed an indicator with exactly those relative changes."""
    state = StepCacheState(config=config)
    indicator = torch.ones(1, dtype=torch.float64)
    reused = []
    for i in range(total):
        state.begin_step(i, total)
        if i > 0:
            indicator = indicator * (1.0 + changes[i - 1])
        if state.decide(lambda ind=indicator: ind):
            state.residual = indicator  # what the rule needs to know: a residual exists
        else:
            reused.append(i)
    return reused


def threshold_for(make: Any, runs: list[list[float]], total: int, target: float) -> tuple[float, float]:
    """The smallest threshold whose replayed runs reuse at least `target` of the steps on average (bisection),
    and the fraction reached; the largest fraction the policy can reach when `target` is out of its range."""

    def fraction(threshold: float) -> float:  # rounded: 7/10 averaged over runs must not read as 0.6999...
        return round(float(np.mean([len(replay(make(threshold), run, total)) / total for run in runs])), 9)

    hi = 1.0
    while fraction(hi) < target and hi < 1e6:
        hi *= 4
    if fraction(hi) < target:
        return hi, fraction(hi)
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fraction(mid) >= target else (mid, hi)
    return hi, fraction(hi)


def short_of_target(doc: dict[str, Any]) -> list[str]:
    """The threshold presets of a calibration that reuse fewer steps than their target, at any threshold."""
    return [name for name, got in sorted(doc["reuse_on_calibration"].items())
            if not name.startswith("fixed-") and got < TARGETS[name.rsplit("-", 1)[1]]]  # fmt: skip


def calibrate(pipeline, prompts: list[str], steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Render `prompts` with `pipeline` and return the calibration document (see the module docstring)."""
    from pab.pipeline import GenerationRequest

    changes, residual_changes, norms = [], [], []
    total = 0
    for i, prompt in enumerate(prompts):
        rec = Recorder()
        r = pipeline.generate(GenerationRequest(model=pipeline.name, prompt=prompt, seed=seed + i, steps=steps),
                              decode=False, step_state=rec)  # fmt: skip
        total = len(r.timesteps)
        changes.append(list(rec.changes))
        residual_changes.append(rec.residual_change)
        norms.append(rec.residual_norm)
        print(f"calibrate: {i + 1}/{len(prompts)} {prompt!r}", file=sys.stderr, flush=True)
    x, y = np.concatenate(changes), np.concatenate(residual_changes)
    coefficients = np.polyfit(x, y, min(DEGREE, len(x) - 1)).tolist()
    n = np.asarray(norms)
    ratios = [1.0, *np.mean(n[:, 1:] / np.maximum(n[:, :-1], 1e-12), axis=0).tolist()]
    presets: dict[str, dict[str, Any]] = {}
    reached: dict[str, float] = {}
    for speed, target in TARGETS.items():
        def tea(th: float) -> StepReuseConfig:
            return StepReuseConfig("teacache", th, coefficients=tuple(coefficients))

        skips, warmup = MAGCACHE[speed]["max_skips"], max(1, round(MAGCACHE[speed]["warmup"] * total))

        def mag(th: float, k: int = skips, w: int = warmup) -> StepReuseConfig:
            return StepReuseConfig("magcache", th, ratios=tuple(ratios), max_skips=k, warmup=w)

        for policy, make in (("teacache", tea), ("magcache", mag)):
            threshold, got = threshold_for(make, changes, total, target)
            presets[f"{policy}-{speed}"] = make(threshold).to_dict()
            reached[f"{policy}-{speed}"] = got
        # As a schedule fixed in advance, what a benchmark of the full-size model with random weights runs (its
        # own decisions would follow the random weights): as many steps as teacache reuses on average, the ones
        # it reuses most often on the calibration runs (earlier steps first among equals).
        runs = [replay(StepReuseConfig.from_dict(presets[f"teacache-{speed}"]), run, total) for run in changes]
        often = sorted(range(total), key=lambda i: (-sum(i in r for r in runs), i))
        common = sorted(often[: round(float(np.mean([len(r) for r in runs])))])
        presets[f"fixed-{speed}"] = StepReuseConfig("fixed", reuse=tuple(common), reuse_of=total).to_dict()
        reached[f"fixed-{speed}"] = len(common) / total
    return {
        "model": pipeline.name,
        "steps": total,
        "prompts": prompts,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "teacache": {"coefficients": coefficients, "fit_on": "relative L1 change of the residual"},
        "magcache": {"ratios": ratios},
        "presets": presets,
        "reuse_on_calibration": reached,
        # Kept for the plot and for refitting; 4 significant digits keep a 150-step model's file small (it ships).
        "measured": {
            "indicator_change": _rounded(changes),
            "residual_change": _rounded(residual_changes),
            "residual_norm": _rounded(norms),
        },
    }


def dumps(doc: dict[str, Any]) -> str:
    """The calibration file's text: indented, but each list of numbers on one line (the file ships)."""
    text = json.dumps(doc, indent=1)
    numbers = re.compile(r"\[([-+0-9.eE,\s]+)\]")
    return numbers.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _rounded(runs: list[list[float]], digits: int = 4) -> list[list[float]]:
    return [[float(f"{v:.{digits}g}") for v in run] for run in runs]


def plot(doc: dict[str, Any], path: Path) -> None:
    """What was measured, in four panels: the fit, the change per step, the ratios, reuse against threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = doc["measured"]
    x, y = np.concatenate(m["indicator_change"]), np.concatenate(m["residual_change"])
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].scatter(x, y, s=6, alpha=0.5, label="steps of the calibration runs")
    grid = np.linspace(x.min(), x.max(), 100)
    ax[0, 0].plot(grid, np.polyval(doc["teacache"]["coefficients"], grid), "r", label=f"degree-{DEGREE} fit")
    ax[0, 0].set(xlabel="indicator change (rel. L1)", ylabel="residual change (rel. L1)", title="teacache rescaling")
    ax[0, 0].legend()
    steps = np.arange(1, doc["steps"])
    ax[0, 1].plot(steps, np.mean(m["indicator_change"], axis=0), label="indicator")
    ax[0, 1].plot(steps, np.mean(m["residual_change"], axis=0), label="residual")
    ax[0, 1].set(xlabel="step", ylabel="rel. L1 change from the step before", title="change per step (mean)")
    ax[0, 1].legend()
    ax[1, 0].plot(np.arange(doc["steps"]), doc["magcache"]["ratios"])
    ax[1, 0].set(xlabel="step", ylabel="|residual| ratio to the step before", title="magcache ratios")
    names = sorted(doc["presets"])
    ax[1, 1].bar(names, [100 * doc["reuse_on_calibration"][n] for n in names])
    ax[1, 1].set(ylabel="% of steps reused (replayed)", title="presets")
    ax[1, 1].tick_params(axis="x", rotation=20)
    fig.suptitle(f"{doc['model']}: step-reuse calibration on {len(doc['prompts'])} prompts, {doc['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def default_prompts(n: int, seed: int = 1234) -> list[str]:
    """`n` captions of the training distribution (never the held-out evaluation scenes)."""
    from pab.data.shapes import sample_scenes

    return [s.caption() for s in sample_scenes(n, torch.Generator().manual_seed(seed))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pab calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model from `pab models`")
    p.add_argument("--checkpoint", help="its weights (default: a -small model's shipped ones)")
    p.add_argument("--prompts", help="a text file, one prompt per line (default: --count synthetic captions)")
    p.add_argument("--count", type=int, default=16, help="prompts when --prompts is not given (default: 16)")
    p.add_argument("--steps", type=int, help="denoising steps, at least 2 (default: the model's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", help="the calibration file (default: cache.json beside the weights)")
    p.add_argument("--plot", help="PNG of what was measured (default: next to --out)")
    args = p.parse_args(argv)
    from pab.checkpoint import CALIBRATION_FILE, resolve_sources
    from pab.pipeline import Pipeline

    try:
        # Checked before the weights load and the measurement runs, which take minutes.
        if args.steps is not None and args.steps < 2:
            raise ValueError(f"--steps must be at least 2 (a step's change is measured against the one before), "
                             f"got {args.steps}")
        if not args.prompts and args.count < 1:
            raise ValueError(f"--count must be at least 1, got {args.count}")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: this machine has no CUDA device; use --device cpu, or leave it out")
        sources = resolve_sources(args.model, args.checkpoint)
        if args.prompts:
            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        else:
            prompts = default_prompts(args.count)
        if not prompts:
            raise ValueError(f"no prompts in {args.prompts}")
        if args.out is None and sources is None:
            raise ValueError(f"{args.model} has random weights: there is nothing to calibrate; pass --checkpoint")
        out = Path(args.out) if args.out else sources.root / CALIBRATION_FILE
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        for path in (out, png):  # before the measurement, which takes minutes: not after it
            if path.is_dir():
                raise ValueError(f"{path} is a folder: give a file path")
            if not path.parent.is_dir():
                raise ValueError(f"{path.parent} is not a folder: create it, or write elsewhere")
            if not os.access(path.parent, os.W_OK):
                raise ValueError(f"{path.parent} is not writable here: write elsewhere with --out / --plot")
        pipeline = Pipeline.from_name(args.model, device=args.device, checkpoint=args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"pab calibrate: error: {e}", file=sys.stderr)
        return 2
    doc = calibrate(pipeline, prompts, args.steps)
    out.write_text(dumps(doc))
    plot(doc, png)
    print(f"{'preset':<16} {'threshold':>10} {'reused (replayed)':>18}")
    for name, cfg in sorted(doc["presets"].items()):
        print(f"{name:<16} {cfg['threshold']:>10.4g} {100 * doc['reuse_on_calibration'][name]:>17.1f}%")
    for name in short_of_target(doc):
        got, target = doc["reuse_on_calibration"][name], TARGETS[name.rsplit("-", 1)[1]]
        print(f"pab calibrate: {name} reuses {100 * got:.0f}% of the steps, short of its {100 * target:.0f}% "
              "target, even at the largest threshold tried: at "
              f"{doc['steps']} steps its warm-up and run of skips leave no more; calibrate with more --steps",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
