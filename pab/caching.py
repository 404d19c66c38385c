"""Which cache a request runs with: PAB (`pab.broadcast`), step reuse (`pab.stepcache`), or neither.

A request names it once, in its `cache` field (`pab` is the older name of the same field):

* ``"off"``, ``"paper"`` (the paper's PAB preset for the model), or PAB rules (a dict, or a .json file of them);
* the name of a step-reuse preset calibrated for the model (``teacache-slow``, ``teacache-fast``,
  ``magcache-slow``, ``magcache-fast``), read from the `cache.json` beside its weights that `pab calibrate`
  writes (the shipped `-small` models have one); a full-size model without one has TeaCache's published
  ``teacache-slow`` / ``teacache-fast`` (its authors' polynomial, thresholds 0.1 / 0.2);
* a step-reuse policy: a dict or .json file with a ``"policy"`` key (`StepReuseConfig`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pab.broadcast import PABConfig
from pab.stepcache import StepReuseConfig

@dataclass(frozen=True)
class CachePolicy:
    """What one request reuses: PAB's attention outputs, whole steps, or nothing."""

    name: str
    pab: PABConfig
    step: StepReuseConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pab": self.pab.to_dict(), "step": self.step.to_dict() if self.step else None}


def load_calibration(path: str | Path | None) -> Any:
    """A JSON settings file (a `pab calibrate` file, rules or a policy), or None when there is none."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"settings file {str(path)!r} is not valid JSON: {e}") from e


PUBLISHED_THRESHOLDS = {"teacache-slow": 0.1, "teacache-fast": 0.2}  # what TeaCache evaluated its numbers at


def presets(model: str, calibration: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The step-reuse presets of `model`: TeaCache's published ones for a full-size model, then (winning) those
    of the calibration file beside its weights."""
    from pab.families import get_family
    from pab.models import split_name

    named: dict[str, dict[str, Any]] = {}
    published = get_family(model).published_teacache
    if published is not None and split_name(model)[1] == "full":
        named = {n: {"policy": "teacache", "threshold": t, "coefficients": list(published)}
                 for n, t in PUBLISHED_THRESHOLDS.items()}  # fmt: skip
    return {**named, **((calibration or {}).get("presets") or {})}


def cache_names(model: str, calibration: Mapping[str, Any] | None) -> list[str]:
    """Every name `resolve_cache` takes for `model`: off, paper, then its step-reuse `presets` in order."""
    return ["off", "paper", *sorted(presets(model, calibration))]


def resolve_cache(
    model: str, spec: str | Mapping[str, Any] | PABConfig | None, calibration: Mapping[str, Any] | None = None
) -> CachePolicy:
    """A user's choice, resolved against `model` and its calibration; ValueError says what is accepted."""
    if spec is None or spec == "off":
        return CachePolicy("off", PABConfig())
    if isinstance(spec, PABConfig):
        return CachePolicy("pab", spec)
    if isinstance(spec, Mapping):
        if "policy" in spec:
            return CachePolicy(str(spec["policy"]), PABConfig(), StepReuseConfig.from_dict(spec))
        return CachePolicy("pab", PABConfig.resolve(model, spec))
    if spec == "paper":
        return CachePolicy("paper", PABConfig.preset(model, "paper"))
    named = presets(model, calibration)
    if spec in named:
        return CachePolicy(spec, PABConfig(), StepReuseConfig.from_dict(named[spec]))
    if str(spec).endswith(".json"):
        path = Path(spec)
        doc = load_calibration(path) if path.is_file() else None
        if doc is None:
            raise ValueError(f"cache settings file {spec!r} does not exist")
        if isinstance(doc, Mapping) and "presets" in doc:
            raise ValueError(f"{spec} is a calibration file; pass one of its presets by name with the model's "
                             f"weights beside it, or a file of one policy: {sorted(doc['presets'])}")  # fmt: skip
        policy = resolve_cache(model, doc, calibration)
        return CachePolicy(path.stem, policy.pab, policy.step)
    names = cache_names(model, calibration)
    # The calibration lives beside the weights: the command must name the same ones, or it calibrates (and
    # overwrites) another model's, e.g. the shipped weights instead of a checkpoint trained with pab.train.
    hint = "" if named else (f" (these {model} weights have no step-reuse calibration: `pab calibrate --model {model} "
                             "--checkpoint DIR`, DIR the weights' folder, writes one beside them; random weights "
                             "cannot be calibrated)")
    raise ValueError(f"unknown cache {spec!r}; use one of {names}, or a .json file of PAB rules or a policy{hint}")
