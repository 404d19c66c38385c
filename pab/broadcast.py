"""Pyramid Attention Broadcast (PAB), attached to a plain model from outside.

Between adjacent denoising steps the outputs of attention change little in the middle of the
schedule, so PAB computes an attention at some steps and reuses ("broadcasts") its output at the
next few. Spatial attention varies most and gets the shortest range, then temporal, then
cross-attention (Zhao et al., 2024, arXiv:2408.12588).

The rule, identical on every rank of a sequence-parallel group (it depends only on the step index
and the timestep, so no communication is needed): at denoising step i with timestep t, a module of
kind k is recomputed unless ``lo_k < t < hi_k and i % range_k != 0`` and a cached output exists;
otherwise its last computed output is reused.

Pieces, in the diffusers hooks style:
* `BroadcastRule` / `PABConfig`: what to broadcast (dataclasses, validated).
* `PABState`: everything that belongs to one generation: the step, the caches (per module and per
  classifier-free-guidance branch) and the counters. Never shared between requests.
* `PABHook`: wraps one module of a model; reads the active state from a context variable.
* `apply_pab(model, config)` / `remove_pab(model)`.

Example:
    handle = apply_pab(model, PABConfig.preset("opensora-v1.2", "paper"))
    state = PABState()
    with use_state(state):
        for i, t in enumerate(timesteps):
            state.begin_step(i, t)
            out = model(...)
    print(state.stats)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch.nn as nn

from pab.errors import RequestError, about
from pab.hooks.registry import ModelHook, active, get_hook, register_hook, remove_hooks_named

PAB_HOOK = "pyramid_attention_broadcast"
KINDS = ("spatial", "temporal", "cross", "mlp")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BroadcastRule:
    """Broadcast one kind of module.

    Args:
        range: recompute every `range` steps inside the window (1 = always recompute).
        window: open interval (lo, hi) of timesteps (0-1000 scale) inside which reuse is allowed.
        blocks: only these block indices broadcast (None = all blocks). The reference code limits
            MLP broadcast to the first few blocks.
    """

    range: int
    window: tuple[float, float]
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.range, int) or self.range < 1:
            raise RequestError("range", f"broadcast range must be an integer >= 1, got {self.range!r}")
        lo, hi = self.window
        if not lo < hi:
            raise RequestError("window", f"broadcast window must be (lo, hi) with lo < hi, got {self.window!r}")
        object.__setattr__(self, "window", (float(lo), float(hi)))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    def broadcasts(self, step: int, timestep: float, block: int | None = None) -> bool:
        """True if a module governed by this rule may reuse its cache at (step, timestep)."""
        if self.blocks is not None and block not in self.blocks:
            return False
        lo, hi = self.window
        return lo < timestep < hi and step % self.range != 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"range": self.range, "window": list(self.window)}
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BroadcastRule":
        unknown = set(d) - {"range", "window", "blocks"}
        if unknown:
            raise RequestError(
                str(min(unknown)), f"unknown broadcast rule field(s) {sorted(unknown)}; use range, window, blocks"
            )
        if "range" not in d or "window" not in d:
            raise RequestError(
                "range" if "range" not in d else "window",
                'a broadcast rule needs "range" and "window", e.g. {"range": 2, "window": [450, 930]}',
            )
        blocks = d.get("blocks")
        return cls(range=d["range"], window=tuple(d["window"]), blocks=tuple(blocks) if blocks is not None else None)


@dataclass(frozen=True)
class PABConfig:
    """Which module kinds broadcast, each with its own rule (None = always recompute)."""

    spatial: BroadcastRule | None = None
    temporal: BroadcastRule | None = None
    cross: BroadcastRule | None = None
    mlp: BroadcastRule | None = None

    @property
    def enabled(self) -> bool:
        return any(getattr(self, k) is not None for k in KINDS)

    def rule(self, kind: str) -> BroadcastRule | None:
        return getattr(self, kind)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: for each kind either null or {"range": r, "window": [lo, hi]} (+ "blocks")."""
        return {k: (r.to_dict() if (r := getattr(self, k)) is not None else None) for k in KINDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PABConfig":
        unknown = set(d) - set(KINDS)
        if unknown:
            raise RequestError(
                str(min(unknown)), f"unknown PAB kind(s) {sorted(unknown)}; valid kinds are {list(KINDS)}"
            )
        rules = {}
        for kind, rule in d.items():
            with about(kind):  # an error in the rule names its path under the kind ("spatial.range")
                rules[kind] = BroadcastRule.from_dict(rule) if rule is not None else None
        return cls(**rules)

    @classmethod
    def off(cls) -> "PABConfig":
        return cls()

    @classmethod
    def preset(cls, model: str, name: str) -> "PABConfig":
        """A named preset for a model family: "off" or "paper"."""
        from pab.families import get_family

        family = get_family(model)  # the presets are the family's (pab/families/)
        if name == "off":
            return cls()
        if name != "paper":
            raise ValueError(f"unknown PAB preset {name!r}; use 'off', 'paper' or a JSON file of rules")
        if family.paper_pab is None:
            raise ValueError(f"no 'paper' PAB preset for model {model!r}")
        p = family.paper_pab
        window = p["window"]
        s, t, c = (BroadcastRule(r, window) for r in p["ranges"])
        mlp_range, mlp_window, mlp_blocks = p["mlp"]
        return cls(spatial=s, temporal=t, cross=c, mlp=BroadcastRule(mlp_range, mlp_window, mlp_blocks))

    @classmethod
    def resolve(cls, model: str, spec: "PABConfig | str | Mapping[str, Any] | None") -> "PABConfig":
        """Turn a choice (None, "off", "paper", a dict of rules) into a config; rules are checked against
        `model`'s blocks (`check_blocks`). A request's `cache` field (files included) goes through
        `pab.caching.resolve_cache`, which calls this for PAB."""
        if spec is None:
            return cls()
        if isinstance(spec, PABConfig):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec).check_blocks(model)
        if spec in ("off", "paper"):
            # Presets are written for the full-size models; blocks a smaller size lacks simply never match.
            return cls.preset(model, spec)
        raise ValueError(f"unknown PAB setting {spec!r}; use 'off', 'paper' or a dict of rules")

    def check_blocks(self, model: str) -> "PABConfig":
        """This config, or a RequestError at "KIND.blocks" naming the first block index `model` does not have.

        A hook only matches blocks that exist, so an index outside the model would be ignored without a
        word; a negative one is not read from the end either.
        """
        depth = transformer_depth(model)
        for kind in KINDS:
            rule = self.rule(kind)
            for b in rule.blocks if rule is not None and rule.blocks is not None else ():
                if not 0 <= b < depth:
                    hint = " (blocks count from 0, not from the end)" if b < 0 else ""
                    raise RequestError(f"{kind}.blocks", f"{kind} block {b} does not exist{hint}; {model} has blocks "
                                       f"0-{depth - 1}")  # fmt: skip
        return self


def transformer_depth(model: str) -> int:
    """Blocks in each stack (spatial and temporal alike) of `model`'s transformer, read from its size's config.

    Builds no weights. A checkpoint whose config.json has another depth than the registry's is not seen here.
    """
    from pab.models import get_spec, split_name

    config = get_spec(model).transformer.config(split_name(model)[1])
    return config.depth if hasattr(config, "depth") else config.num_layers


# ----------------------------------------------------------------------------------------------------
# Per-generation state
# ----------------------------------------------------------------------------------------------------


@dataclass
class PABState:
    """The state of one generation: current step, caches and counters. Reset between requests."""

    step: int = -1
    timestep: float | None = None
    branch: str = "batch"
    cache: dict[tuple[int, str], Any] = field(default_factory=dict)
    # Where computed outputs are kept instead of `cache` holding them: buffers at fixed addresses that CUDA
    # graphs read and write (pab.cudagraph sets it around a forward). None: `cache` holds each output itself.
    arena: Any = None
    stats: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {"computed": 0, "broadcast": 0} for k in KINDS}
    )

    def begin_step(self, step: int, timestep: float) -> None:
        """Called by the sampler loop before the model call(s) of denoising step `step`."""
        self.step = int(step)
        self.timestep = float(timestep)

    @contextlib.contextmanager
    def cfg_branch(self, name: str) -> Iterator[None]:
        """Run the model for one classifier-free-guidance branch with its own caches."""
        previous, self.branch = self.branch, name
        try:
            yield
        finally:
            self.branch = previous

    def reset(self) -> None:
        self.step, self.timestep, self.branch = -1, None, "batch"
        self.cache.clear()
        for counts in self.stats.values():
            counts["computed"] = counts["broadcast"] = 0


_ACTIVE_STATE: contextvars.ContextVar[PABState | None] = contextvars.ContextVar("pab_state", default=None)


def current_state() -> PABState | None:
    """The PABState of the generation running in this thread/task (None outside one)."""
    return _ACTIVE_STATE.get()


def use_state(state: PABState) -> contextlib.AbstractContextManager[PABState]:
    """Make `state` the one PAB hooks read and write while the block runs (this thread/task only)."""
    return active(_ACTIVE_STATE, state)


# ----------------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------------


class PABHook(ModelHook):
    """Reuse a module's last computed output when the rule allows it; count every call."""

    name = PAB_HOOK
    reads_input = False  # it hands the input to the module or, broadcasting, ignores it

    def __init__(self, kind: str, rule: BroadcastRule | None, block: int | None) -> None:
        self.kind = kind
        self.rule = rule
        self.block = block
        # The rule can ever broadcast this module: only then is it worth keeping its output around.
        self.caches = rule is not None and rule.range > 1 and (rule.blocks is None or block in rule.blocks)

    def should_compute(self, state: PABState) -> bool:
        if not self.caches or state.timestep is None:
            return True
        if (id(self), state.branch) not in state.cache:
            return True
        return not self.rule.broadcasts(state.step, state.timestep, self.block)

    def reuses_output(self, module: nn.Module) -> bool:
        state = _ACTIVE_STATE.get()
        return state is not None and not self.should_compute(state)

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = _ACTIVE_STATE.get()
        if state is None:  # outside a generation: behave like the plain model
            return forward(*args, **kwargs)
        key = (id(self), state.branch)
        if not self.should_compute(state):
            state.stats[self.kind]["broadcast"] += 1
            return state.cache[key]
        out = forward(*args, **kwargs)
        state.stats[self.kind]["computed"] += 1
        if self.caches:
            state.cache[key] = out if state.arena is None else state.arena.keep(key, out)
        return out


_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


def _block_index(name: str) -> int | None:
    m = _BLOCK_INDEX.search(name + ".")
    return int(m.group(1)) if m else None


@dataclass
class PABHandle:
    """What `apply_pab` attached; `remove()` restores the plain model."""

    model: nn.Module
    config: PABConfig
    hooks: dict[str, list[PABHook]]

    def remove(self) -> None:
        remove_pab(self.model)

    def attached(self) -> bool:
        """Whether its hooks are still on the model (`remove_pab(model)` takes them off behind its back)."""
        mine = {id(h) for hs in self.hooks.values() for h in hs}
        return any(id(get_hook(m, PAB_HOOK)) in mine for m in self.model.modules())


def apply_pab(model: nn.Module, config: PABConfig) -> PABHandle:
    """Attach PAB hooks to every module of `model.broadcast_targets()`.

    Apply sequence parallelism first: a hook registered later wraps an earlier one, so a broadcast
    attention then skips the all-to-all around it as well. Kinds whose rule is None are still
    hooked, only to count their calls.
    """
    if not hasattr(model, "broadcast_targets"):
        raise TypeError(f"{type(model).__name__} does not declare broadcast_targets(); PAB cannot be applied")
    names = {id(m): n for n, m in model.named_modules()}
    targets = model.broadcast_targets()
    unknown = set(targets) - set(KINDS)
    if unknown:
        raise ValueError(f"{type(model).__name__}.broadcast_targets() returned unknown kinds {sorted(unknown)}")
    hooks: dict[str, list[PABHook]] = {k: [] for k in KINDS}
    for kind, modules in targets.items():
        for module in modules:
            hook = PABHook(kind, config.rule(kind), _block_index(names.get(id(module), "")))
            register_hook(module, hook)
            hooks[kind].append(hook)
    return PABHandle(model=model, config=config, hooks=hooks)


def remove_pab(model: nn.Module) -> int:
    """Remove every PAB hook from `model`; returns how many were removed."""
    return remove_hooks_named(model, PAB_HOOK)


__all__ = [
    "BroadcastRule",
    "PABConfig",
    "PABState",
    "PABHook",
    "PABHandle",
    "apply_pab",
    "remove_pab",
    "use_state",
    "current_state",
    "transformer_depth",
    "KINDS",
    "PAB_HOOK",
]
