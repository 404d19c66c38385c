"""Custom GPU kernels shared by the models (Triton; every one has a plain PyTorch path beside it)."""

import torch


def no_grad_needed(x: torch.Tensor) -> bool:
    """Whether autograd records nothing through `x`. The kernels and fused epilogues here have no backward
    pass, so a training step (`pab.train`) takes the plain PyTorch path, which autograd differentiates."""
    return not (torch.is_grad_enabled() and x.requires_grad)
