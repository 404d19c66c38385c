"""Where the Triton kernel tests run: on CUDA, or in Triton's CPU interpreter (TRITON_INTERPRET=1, as
./run.sh test sets it); without either they skip, saying so."""

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available() and not INTERPRET
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or CUDA),
    reason="needs triton and CUDA, or triton with TRITON_INTERPRET=1 (CPU interpreter)",
)
DEVICE = "cuda" if CUDA else "cpu"
