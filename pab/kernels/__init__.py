"""Custom GPU kernels shared by the models (Triton; every one has a plain PyTorch path beside it)."""
