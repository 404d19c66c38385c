"""Step reuse: skip the whole block stack on a denoising step and reuse the last computed residual.

Where PAB reuses single attention outputs on a fixed schedule, step reuse skips every block of a step and
adds the residual (block-stack output minus input) of the last computed step to this step's input. When
to skip is measured, per request:

* ``teacache`` (Liu et al., arXiv:2411.19108): the relative L1 change of the first block's
  timestep-modulated input between consecutive steps, rescaled by a polynomial fitted offline to the change
  of the model's output (`pab calibrate`), is summed over steps; while the sum stays under `threshold` the
  step reuses, otherwise it computes and the sum starts again.
* ``magcache`` (Ma et al., arXiv:2506.09045): the residual's magnitude ratio between consecutive steps,
  measured once by `pab calibrate` and nearly the same for every prompt, gives an error estimate
  ``|1 - prod(ratios since the last computed step)|`` that is summed; a step reuses while the sum stays under
  `threshold` and at most `max_skips` steps in a row.

The first `warmup` and last `cooldown` steps always compute. The decision is the same on every rank of a
sequence- or CFG-parallel group: teacache sums its two norms over the group (`StepCacheState.agree`),
magcache depends on the step alone. A skipped step runs no block, so it skips its all-to-alls as well.

Pieces, as in `pab.broadcast`: `StepReuseConfig` (what), `StepCacheState` (one generation's residual,
decisions and counters), three hooks on the modules the model declares in `step_cache_targets()` (entry:
the first block decides; every other block passes its input through on a skipped step; head: keeps the
residual, or applies it), `apply_step_cache` / `remove_step_cache`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn as nn

from pab.errors import RequestError
from pab.hooks.registry import ModelHook, active, get_hook, register_hook, remove_hooks_named

STEP_HOOK = "step_cache"
POLICIES = ("teacache", "magcache", "fixed")


@dataclass(frozen=True)
class StepReuseConfig:
    """One step-reuse policy with its calibrated numbers.

    Args:
        policy: "teacache" or "magcache".
        threshold: teacache: the budget of accumulated rescaled change; magcache: of accumulated error.
        coefficients: teacache: polynomial (highest power first) from the indicator's relative L1 change to
            the output's; () = no rescaling.
        ratios: magcache: the residual magnitude ratio at each step of a calibration run, over `ratio_steps`
            steps (read at this request's relative position in the schedule, so another step count works).
        max_skips: magcache: reused steps in a row at most.
        warmup, cooldown: first and last steps that always compute.
        reuse: fixed: the steps reused, out of a schedule of `reuse_of` steps (a calibrated policy's typical
            choice, `pab calibrate`): the same every request, so its time does not depend on the weights
            (benchmarks at real size) and the steps it runs are known in advance.
        reuse_of: fixed: the number of steps `reuse` was chosen for; another step count takes the same
            relative positions.
    """

    policy: Literal["teacache", "magcache", "fixed"]
    threshold: float = 0.0
    coefficients: tuple[float, ...] = ()
    ratios: tuple[float, ...] = ()
    max_skips: int = 2
    warmup: int = 1
    cooldown: int = 1
    reuse: tuple[int, ...] = ()
    reuse_of: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise RequestError("policy", f"unknown step-reuse policy {self.policy!r}; use one of {list(POLICIES)}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise RequestError("threshold", f"threshold must be a finite number >= 0, got {self.threshold!r}")
        for name in ("max_skips", "warmup", "cooldown", "reuse_of"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RequestError(name, f"{name} must be an integer >= 0, got {v!r}")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "reuse", tuple(int(s) for s in self.reuse))
        if self.policy == "fixed" and not (self.reuse_of > 0 and all(0 <= s < self.reuse_of for s in self.reuse)):
            raise RequestError("reuse" if self.reuse_of > 0 else "reuse_of",
                               "a fixed policy needs reuse_of > 0 steps and reuse positions in [0, reuse_of)")
        if self.policy == "magcache" and not self.ratios:
            raise RequestError("ratios", "a magcache policy needs the calibrated ratios; `pab calibrate` writes them")
        for name in ("coefficients", "ratios"):
            if not all(math.isfinite(x) for x in getattr(self, name)):
                raise RequestError(name, "coefficients and ratios must be finite numbers")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coefficients"], d["ratios"], d["reuse"] = list(self.coefficients), list(self.ratios), list(self.reuse)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepReuseConfig":
        known = {"policy", "threshold", "coefficients", "ratios", "max_skips", "warmup", "cooldown", "reuse",
                 "reuse_of"}
        unknown = set(d) - known
        if unknown:
            raise RequestError(str(min(unknown)),
                               f"unknown step-reuse field(s) {sorted(unknown)}; use {sorted(known)}")
        if "policy" not in d or ("threshold" not in d and d["policy"] != "fixed"):
            raise RequestError("policy" if "policy" not in d else "threshold",
                               'a step-reuse policy needs "policy" and "threshold", e.g. '
                               '{"policy": "teacache", "threshold": 0.1, "coefficients": [...]}')  # fmt: skip
        return cls(**{k: tuple(v) if k in ("coefficients", "ratios", "reuse") else v for k, v in d.items()})

    def reused_at(self, total: int) -> frozenset[int]:
        """fixed: the steps of a `total`-step schedule at the relative positions of `reuse`."""
        if total == self.reuse_of or self.reuse_of <= 1:
            return frozenset(self.reuse)
        return frozenset(round(s * (total - 1) / (self.reuse_of - 1)) for s in self.reuse)

    def ratio_at(self, step: int, total: int) -> float:
        """The calibrated magnitude ratio at `step` of `total`, linearly interpolated across schedules."""
        n = len(self.ratios)
        if n == 1 or total <= 1:
            return self.ratios[min(step, n - 1)]
        pos = step * (n - 1) / (total - 1)
        lo = min(int(pos), n - 2)
        return self.ratios[lo] + (pos - lo) * (self.ratios[lo + 1] - self.ratios[lo])


def rescale(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial (highest power first) at x; x itself when there are no coefficients."""
    if not coefficients:
        return x
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


# ----------------------------------------------------------------------------------------------------
# Per-generation state
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepCacheState:
    """One generation's decisions, residual and counters. `agree(t)` sums a tensor over the parallel group."""

    config: StepReuseConfig | None = None
    total: int = 0
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None
    step: int = -1
    skipping: bool = False
    x_in: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # teacache: last step's indicator
    accumulated: float = 0.0
    accumulated_ratio: float = 1.0
    run: int = 0  # reused steps in a row
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)  # teacache: the rescaled change seen at each step

    def begin_step(self, step: int, total: int) -> None:
        self.step, self.total = int(step), int(total)

    def keep(self, residual: torch.Tensor) -> None:
        """The residual of a computed step (what a reused step adds); `pab calibrate` also measures it here."""
        self.residual = residual

    @property
    def stats(self) -> dict[str, Any]:
        return {"computed": len(self.computed), "reused": len(self.reused), "reused_steps": list(self.reused)}

    def decide(self, indicator: Callable[[], torch.Tensor]) -> bool:
        """True to compute this step. `indicator()` is only evaluated by a policy that reads it."""
        cfg, i = self.config, self.step
        edge = i < cfg.warmup or i >= self.total - cfg.cooldown or self.residual is None
        if cfg.policy == "fixed":
            return edge or i not in cfg.reused_at(self.total)
        if cfg.policy == "teacache":
            ind = indicator().float()
            previous, self.previous = self.previous, ind
            if previous is not None and not edge:
                sums = torch.stack([(ind - previous).abs().sum(), previous.abs().sum()])
                if self.agree is not None:
                    sums = self.agree(sums)
                change, base = sums.tolist()  # one host sync per step: the decision must be known here
                # A fitted polynomial can dip below 0 outside the range it was fitted on; no step undoes change.
                self.accumulated += max(0.0, rescale(cfg.coefficients, change / max(base, 1e-12)))
                self.changes.append(self.accumulated)
                if self.accumulated < cfg.threshold:
                    return False
            self.accumulated = 0.0
            return True
        # magcache: the calibrated ratio of this step, multiplied since the last computed step
        self.accumulated_ratio *= cfg.ratio_at(i, self.total)
        self.accumulated += abs(1.0 - self.accumulated_ratio)
        self.run += 1
        if not edge and self.accumulated < cfg.threshold and self.run <= cfg.max_skips:
            return False
        self.accumulated, self.accumulated_ratio, self.run = 0.0, 1.0, 0
        return True


_ACTIVE: contextvars.ContextVar[StepCacheState | None] = contextvars.ContextVar("step_cache_state", default=None)


def use_step_state(state: StepCacheState) -> contextlib.AbstractContextManager[StepCacheState]:
    """Make `state` the one the step-cache hooks use while the block runs (this thread/task only)."""
    return active(_ACTIVE, state)


def _active() -> StepCacheState | None:
    state = _ACTIVE.get()
    return state if state is not None and state.config is not None else None


# ----------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------


class _EntryHook(ModelHook):
    """On the first block: decide the step; keep its input; pass the input through on a skipped step."""

    name = STEP_HOOK

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = _active()
        if state is None:
            return forward(*args, **kwargs)
        state.x_in = args[0]
        compute = state.decide(lambda: module.modulated_input(*args, **kwargs))
        state.skipping = not compute
        (state.computed if compute else state.reused).append(state.step)
        return forward(*args, **kwargs) if compute else args[0]


class _PassHook(ModelHook):
    """On every later block: its input unchanged on a skipped step."""

    name = STEP_HOOK

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = _active()
        if state is not None and state.skipping:
            return args[0]
        return forward(*args, **kwargs)


class _HeadHook(ModelHook):
    """On the module after the stack: keep the residual of a computed step, add it on a skipped one."""

    name = STEP_HOOK

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = _active()
        if state is None or state.x_in is None:
            return forward(*args, **kwargs)
        x = args[0]
        x_in = state.x_in.reshape(x.shape)  # the stack keeps one layout; the head may view it flatter
        if state.skipping:
            # From this step's stack input (what the model adds between blocks, e.g. a position table, is in
            # the residual already), not from what the skipped stack passed through.
            x = x_in + state.residual
        else:
            state.keep(x - x_in)
        state.x_in = None
        return forward(x, *args[1:], **kwargs)


@dataclass
class StepCacheHandle:
    model: nn.Module

    def remove(self) -> None:
        remove_step_cache(self.model)

    def attached(self) -> bool:
        """Whether the hooks are still on the model (`remove_step_cache(model)` takes them off too)."""
        return any(get_hook(m, STEP_HOOK) is not None for m in self.model.modules())


def apply_step_cache(model: nn.Module) -> StepCacheHandle:
    """Attach the step-reuse hooks to `model.step_cache_targets()`; they do nothing without an active state
    that holds a config, so the model stays the plain model for requests without step reuse."""
    if not hasattr(model, "step_cache_targets"):
        raise TypeError(f"{type(model).__name__} does not declare step_cache_targets(); step reuse cannot apply")
    targets = model.step_cache_targets()
    blocks, head = targets["blocks"], targets["head"]
    if not hasattr(blocks[0], "modulated_input"):
        raise TypeError(f"{type(blocks[0]).__name__} has no modulated_input(); teacache has no indicator")
    register_hook(blocks[0], _EntryHook())
    for block in blocks[1:]:
        register_hook(block, _PassHook())
    register_hook(head, _HeadHook())
    return StepCacheHandle(model)


def remove_step_cache(model: nn.Module) -> int:
    return remove_hooks_named(model, STEP_HOOK)


__all__ = [
    "POLICIES",
    "STEP_HOOK",
    "StepCacheHandle",
    "StepCacheState",
    "StepReuseConfig",
    "apply_step_cache",
    "remove_step_cache",
    "rescale",
    "use_step_state",
]
