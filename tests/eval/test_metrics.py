"""PSNR and SSIM against hand-computed values; the U-curve measurement against a direct recording."""

import math

import numpy as np
import pytest

from pab.eval.metrics import psnr, ssim


def test_psnr_matches_its_definition():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0, 0] = 255  # one pixel of 384 off by 255: mse = 255^2 / 384
    assert psnr(a, b) == pytest.approx(10 * math.log10(384))


def test_ssim_identity_symmetry_and_order():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    slight = np.clip(a.astype(int) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, slight) == pytest.approx(ssim(slight, a))
    assert 1.0 > ssim(a, slight) > ssim(a, heavy) > 0.0
    # flat images: only the luminance term is left, (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    x, y = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    with pytest.raises(ValueError):
        ssim(a, a[:, :16])


def test_change_curves_match_a_direct_recording():
    from pab.eval.changes import measure_changes
    from pab.pipeline import GenerationRequest, Pipeline

    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cpu")
    request = GenerationRequest(model=pipe.name, prompt="a fox", seed=0, steps=4, pab="paper")
    curves = measure_changes(pipe, [request])
    assert set(curves.mean) == {"spatial", "temporal", "cross", "mlp"} and len(curves.timesteps) == 4
    # record every spatial attention's outputs ourselves, with PAB off, and average the same way
    modules = pipe.transformer.broadcast_targets()["spatial"]
    outs = {id(m): [] for m in modules}
    handles = [m.register_forward_hook(lambda m, a, o: outs[id(m)].append(o.detach().float())) for m in modules]
    try:
        pipe.generate(GenerationRequest(model=pipe.name, prompt="a fox", seed=0, steps=4, pab="off"), decode=False)
    finally:
        for h in handles:
            h.remove()
    want = [np.mean([float((o[i] - o[i - 1]).norm() / o[i - 1].norm()) for o in outs.values()]) for i in (1, 2, 3)]
    assert math.isnan(curves.mean["spatial"][0])
    assert curves.mean["spatial"][1:] == pytest.approx(want, rel=1e-6)
    assert all(not m._forward_hooks for m in modules)  # measure_changes left nothing attached
