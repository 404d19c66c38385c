"""One pass between two DiT blocks instead of two: a block's last residual and the next block's first norm.

A block ends with x + gate * MLP(...) and the block after it begins with norm + modulate of that sum. Apart,
they are two memory-bound passes over the whole hidden state, and the second reads back what the first just
wrote (110 MB a pass at Open-Sora 480p). `Handoff` lets the ending block run one pass that writes the sum and
the next block's attention input (`pab.kernels.norms.gated_ln_modulate`) and hand that input over; the next
block takes it instead of computing it.

The handoff is for one forward of the stack, made by the model's loop, and checked on both sides:
* the giver hands over only when the next block will read its input: not when PAB reuses that attention's
  output (the norm would be wasted);
* the taker uses it only if it is for this block and this very tensor, unchanged since (a hook or the model's
  loop may change or replace x between blocks: then it computes its input as always).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class NextInput:
    """A block's attention input and adaLN parameters, computed from `x` by the block before it."""

    block: nn.Module
    x: torch.Tensor
    version: int
    attn_input: torch.Tensor
    mod: torch.Tensor


class Handoff:
    """Carries a `NextInput` from one block's call to the next, for one forward of `blocks` (in forward order)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        self._after = {id(b): n for b, n in zip(blocks, blocks[1:])}
        self._next: NextInput | None = None

    def after(self, block: nn.Module) -> nn.Module | None:
        """The block that runs after `block` in this forward, or None for the last one."""
        return self._after.get(id(block))

    def put(self, block: nn.Module, x: torch.Tensor, attn_input: torch.Tensor, mod: torch.Tensor) -> None:
        self._next = NextInput(block, x, x._version, attn_input, mod)

    def take(self, block: nn.Module, x: torch.Tensor) -> NextInput | None:
        """What was handed to `block` for input `x`, or None (nothing, or for another block or tensor)."""
        given, self._next = self._next, None
        if given is None or given.block is not block or given.x is not x or x._version != given.version:
            return None
        return given
