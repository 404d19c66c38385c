"""Per-model runners for the official reference fixtures; `support.fidelity.run_fixture` dispatches here."""

from __future__ import annotations

import torch


def to_device(tensors: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating inputs in the run's dtype; integer and boolean ones (masks) keep theirs."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
