"""Fixtures shared across the test tree."""

import pytest
import torch


@pytest.fixture(scope="module")
def inductor():
    """Skip (with the reason) where torch.compile cannot build CPU kernels, e.g. no C++ compiler."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(4))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        pytest.skip(f"torch.compile (inductor) unavailable on this machine: {type(e).__name__}: {e}")
