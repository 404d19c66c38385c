"""The parts every training stage shares: the step loop with its log line, EMA weights, state files.

A stage supplies `step(i) -> loss` (forward, backward, optimizer step); `run` calls it until the step
target or the time budget is reached, prints progress, and saves a resumable state now and then. The
batch of step `i` is drawn from `seed` and `i` alone, so a resumed run sees the very batches an
uninterrupted one would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class LoopConfig:
    """When a stage stops, and how often it reports and saves."""

    steps: int
    """Total optimizer steps of the stage; a resumed run continues up to this number."""
    minutes: float | None = None
    """Stop earlier when this much wall time has passed in this run (the state is saved either way)."""
    log_every: int = 50
    save_every: int = 1000
    batch: int = 1
    """Clips per step, for the clips/s figure of the log line."""


class EMA:
    """Exponential moving average of a module's floating-point parameters; buffers are copied as they are."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        # Warm-up of the decay (as in timm / diffusers): early averages follow the weights closely.
        d = min(self.decay, (1 + step) / (10 + step))
        # Every name of a tied weight (T5's shared / embed_tokens) is averaged: `named_parameters` would list it
        # once, and the stale other name would overwrite it in `copy_to`.
        params = {k: p for k, p in module.state_dict(keep_vars=True).items()
                  if isinstance(p, nn.Parameter) and p.requires_grad}  # fmt: skip
        torch._foreach_lerp_([self.shadow[k] for k in params], [p.detach().float() for p in params.values()], 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def save_state(path: Path, step: int, objects: dict[str, object]) -> None:
    """Write `{name: obj.state_dict()}` and the step atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, **{k: v.state_dict() for k, v in objects.items()}}, tmp)
    tmp.replace(path)


def load_state(path: Path, objects: dict[str, object], device: torch.device) -> int:
    """Restore what `save_state` wrote; returns the step to continue from."""
    state = torch.load(path, map_location=device, weights_only=True)
    for k, v in objects.items():
        v.load_state_dict(state[k])
    return int(state["step"])


def run(step: Callable[[int], torch.Tensor], start: int, cfg: LoopConfig, label: str,
        save: Callable[[int], None]) -> tuple[int, list[tuple[int, float]]]:  # fmt: skip
    """Call `step(i)` for i = start..cfg.steps-1 or until the time budget is spent; returns the last step
    and the logged (step, mean loss) pairs. Losses stay on the device between log lines (no sync a step)."""
    t0 = time.perf_counter()
    t_log, s_log = t0, start
    pending: list[torch.Tensor] = []
    history: list[tuple[int, float]] = []
    i = start
    while i < cfg.steps:
        if cfg.minutes is not None and time.perf_counter() - t0 > cfg.minutes * 60:
            print(f"[{label}] time budget of {cfg.minutes:g} min reached at step {i}", flush=True)
            break
        pending.append(step(i).detach())
        i += 1
        if i % cfg.log_every == 0 or i == cfg.steps:
            loss = float(torch.stack(pending).float().mean())
            now = time.perf_counter()
            rate = (i - s_log) / max(now - t_log, 1e-9)
            history.append((i, loss))
            print(
                f"[{label}] step {i}/{cfg.steps}  loss {loss:.4f}  {rate:.1f} steps/s  "
                f"{rate * cfg.batch:.0f} clips/s  {now - t0:.0f} s",
                flush=True,
            )
            pending, t_log, s_log = [], now, i
        if i % cfg.save_every == 0:
            save(i)
    if pending:
        history.append((i, float(torch.stack(pending).float().mean())))
    save(i)
    return i, history


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws batch `step` of a run seeded `seed`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
