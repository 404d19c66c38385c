"""Linears that a model runs as one GEMM, with their weights laid end to end so the GEMM reads a view.

Latte's attention runs to_q, to_k and to_v (a cross-attention's to_k and to_v) as one GEMM on their
concatenated weights, and keeps them as separate diffusers-named linears so checkpoints load as they are.
Concatenating per call costs a copy kernel each time (~8 MB at full size; 33 ms of Latte-1's 6.0 s on an
H100) and caching the result would hold a second copy of the weights (~0.5 GB). Instead:

    packed = pack_joint_linears(model)     # once, after the weights are loaded and on their device and dtype
    weight = end_to_end([l.weight for l in layers])   # a (sum N, K) view when packed, else None

`pack_joint_linears` re-homes each group's weights (and biases) into one buffer, as `nn.Parameter` views of it.
Names, values and the state dict are unchanged, and so is every result bit for bit (the GEMM gets the same
matrix). Anything that re-creates the parameters (`.to()` to another dtype or device, a load with
`assign=True`) separates them again, and the model falls back to concatenating: slower, never wrong.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors concatenated along dim 0 as a view without a copy, when they lie end to end in one
    storage in this order (contiguous, one dtype and device); None otherwise (concatenate them)."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    ptr = first.data_ptr()
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
                and t.shape[1:] == first.shape[1:] and t.data_ptr() == ptr
                and t.untyped_storage().data_ptr() == storage):  # fmt: skip
            return None
        ptr += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def pack_linears(*linears: nn.Linear) -> bool:
    """Lay the linears' weights (and biases) end to end in one buffer each; False if already so (nothing done)."""
    done = False
    for name in ("weight", "bias"):
        params = [getattr(lin, name) for lin in linears]
        if any(p is None for p in params):
            if all(p is None for p in params):
                continue
            raise ValueError("linears run as one GEMM must all have a bias or none")
        if end_to_end(params) is not None:
            continue
        with torch.no_grad():
            buffer = torch.cat([p.detach() for p in params])
        start = 0
        for lin, p in zip(linears, params):
            setattr(lin, name, nn.Parameter(buffer[start:start + p.shape[0]], requires_grad=p.requires_grad))
            start += p.shape[0]
        done = True
    return done


def pack_joint_linears(model: nn.Module) -> int:
    """Pack every group of linears that a module of `model` runs as one GEMM (`joint_linears()`, e.g. Latte's
    attention); returns how many groups are packed now."""
    groups = [g for m in model.modules() if hasattr(m, "joint_linears") for g in m.joint_linears()]
    for group in groups:
        pack_linears(*group)
    return len(groups)


__all__ = ["end_to_end", "pack_joint_linears", "pack_linears"]
