"""Video fidelity metrics between two renders of the same request: PSNR and SSIM over all frames.

Both take uint8 frames (F, H, W, 3), the layout the pipeline returns. SSIM is the standard one (Wang et
al. 2004: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255) per channel and frame,
averaged; PSNR is over every pixel of the clip. These are the measures PAB's paper reports against the
un-broadcast model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 clips of the same shape (inf when identical)."""
    _check(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two uint8 clips (F, H, W, 3): per frame and channel, then averaged."""
    _check(a, b)
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2).flatten(0, 1)[:, None]  # (F·3, 1, H, W)
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2).flatten(0, 1)[:, None]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]  # (1, 1, w, w)

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid convolution, as the reference implementation
        return F.conv2d(t, kernel)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"clips differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected frames (F, H, W, 3), got {a.shape}")
