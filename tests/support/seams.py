"""What every DiT's tests check the same way: tiny random weights, the official fixture, and the PAB / DSP seams
(each broadcast target runs once per forward, at the shapes DSP splits; replaying a target's output is exact)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def randomize_state(model: nn.Module, seed: int = 0, *, skip: Iterable[str] = (), norms_at_one: bool = False):
    """Every tensor of `model.state_dict()` (buffers too) ~ N(0, 0.1²), as the official fixtures draw them, so every
    path carries signal (the official inits zero the output layers). `norms_at_one`: `*_norm.weight` ~ N(1, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    skip = set(skip)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in skip:
                continue
            shift = 1.0 if norms_at_one and name.endswith("_norm.weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + shift)
    return model


def assert_matches_official(run_case: Callable[[Path], dict[str, torch.Tensor]], fixture: Path) -> dict:
    """`run_case(fixture)` gives every output the official code recorded in `fixture`, in float32, within 1e-5."""
    ref = load_file(str(fixture / "output.safetensors"))
    out = run_case(fixture)
    assert set(out) == set(ref) == set(json.loads((fixture / "meta.json").read_text())["forward_calls"])
    for key in ref:
        assert out[key].dtype == torch.float32 and out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    return out


class TargetCalls:
    """Counts the calls of a model's broadcast targets and the input shapes each kind saw, while in a `with`."""

    def __init__(self, targets: dict[str, list[nn.Module]]):
        self.targets = targets
        self.modules = [m for ms in targets.values() for m in ms]
        assert len({id(m) for m in self.modules}) == len(self.modules), "a module is a target twice"
        self.calls: dict[int, int] = {}
        self.shapes: dict[str, set[tuple[int, ...]]] = {}
        self._handles = []

    def __enter__(self) -> "TargetCalls":
        self._handles = [m.register_forward_hook(self._hook(kind)) for kind, ms in self.targets.items() for m in ms]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, kind: str):
        def fn(module, args, output):
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1
            self.shapes.setdefault(kind, set()).add(tuple(args[0].shape))

        return fn

    def ran_once(self, modules: list[nn.Module] | None = None) -> bool:
        """Whether each of `modules` (default: every target) ran exactly once since the last `clear`."""
        return all(self.calls.get(id(m)) == 1 for m in (self.modules if modules is None else modules))

    def clear(self) -> None:
        self.calls.clear()


def assert_replay_exact(model: nn.Module, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """What PAB relies on: a target's output depends only on its inputs, so a forward whose every target returns
    its output of an earlier forward (a forward hook's return value replaces the output) equals it exactly.
    Returns that forward's output."""
    modules = [m for ms in model.broadcast_targets().values() for m in ms]
    cache = {}
    ref = _forward_hooked(modules, lambda mod, a, out: cache.__setitem__(id(mod), out), forward)
    replay = _forward_hooked(modules, lambda mod, a, out: cache[id(mod)], forward)
    assert torch.equal(ref, replay)
    return ref


def _forward_hooked(modules: list[nn.Module], hook, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            return forward()
    finally:
        for h in handles:
            h.remove()
