"""DDIM (Latte-1) and PNDM (Open-Sora-Plan v1.1) wrappers over diffusers' schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from pab.samplers import SAMPLER_DEFAULTS, build_sampler

SHAPE = (1, 4, 2, 4, 4)


def _fake_eps(z, t):
    """A deterministic stand-in for a denoiser's (guided, sliced) epsilon."""
    return torch.tanh(z) * (0.5 + t / 2000)


def _run(sampler, seed=0):
    z = sampler.init_noise(SHAPE, torch.Generator().manual_seed(seed))
    for i, t in enumerate(sampler.timesteps):
        z = sampler.step(_fake_eps(z, t), i, z)
    return z


def test_ddim_latte_50_steps():
    s = build_sampler("ddim", 50)
    assert s.timesteps == [float(t) for t in range(980, -1, -20)]
    assert s.num_steps == 50 and s.num_model_calls == 50


def test_ddim_reads_latte_scheduler_config_file_contents():
    # maxin-cn/Latte-1 scheduler/scheduler_config.json (variance_type is for the pipeline, dropped here)
    latte_file = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.29.0.dev0",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "thresholding": False,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "variance_type": "learned_range",
        "clip_sample": False,
    }
    a = build_sampler("ddim", 50, config=latte_file)
    assert a.timesteps == build_sampler("ddim", 50).timesteps
    assert torch.equal(_run(a), _run(build_sampler("ddim", 50)))


def test_pndm_150_steps_is_159_model_calls():
    s = build_sampler("pndm", 150)
    assert s.num_steps == 150
    assert len(s.timesteps) == 159
    # 12 Runge-Kutta evaluations over the first three steps, then PLMS from 876 down to 0 by 6
    assert s.timesteps[:12] == [894.0, 891.0, 891.0, 888.0, 888.0, 885.0, 885.0, 882.0, 882.0, 879.0, 879.0, 876.0]
    assert s.timesteps[12:] == [float(t) for t in range(876, -1, -6)]
    assert SAMPLER_DEFAULTS["pndm"]["model_calls"] == 159


@pytest.mark.parametrize(
    "name,steps,reference",
    [
        (
            "ddim",
            10,
            lambda: DDIMScheduler(
                beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="leading", clip_sample=False
            ),
        ),
        ("pndm", 10, lambda: PNDMScheduler()),
    ],
)
def test_wrapper_equals_the_plain_diffusers_loop(name, steps, reference):
    """What VideoSys' Latte / Open-Sora-Plan pipelines do with the diffusers scheduler directly."""
    sched = reference()
    sched.set_timesteps(steps)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    for t in sched.timesteps:
        assert torch.equal(sched.scale_model_input(z, t), z)  # identity: the pipeline can skip it
        z = sched.step(_fake_eps(z, float(t)), t, z, return_dict=False)[0]
    assert torch.equal(_run(build_sampler(name, steps)), z)


@pytest.mark.parametrize("name", ["ddim", "pndm"])
def test_generations_do_not_share_scheduler_state(name):
    """Two generations interleaved step by step give what each gives alone (PNDM keeps history)."""
    alone_a, alone_b = _run(build_sampler(name, 8), seed=1), _run(build_sampler(name, 8), seed=2)
    sa, sb = build_sampler(name, 8), build_sampler(name, 8)
    za = sa.init_noise(SHAPE, torch.Generator().manual_seed(1))
    zb = sb.init_noise(SHAPE, torch.Generator().manual_seed(2))
    for i, t in enumerate(sa.timesteps):
        za = sa.step(_fake_eps(za, t), i, za)
        zb = sb.step(_fake_eps(zb, t), i, zb)
    assert torch.equal(za, alone_a) and torch.equal(zb, alone_b)
    assert sa.scheduler is not sb.scheduler


def test_ddim_deterministic_and_eta_uses_the_generator():
    assert torch.equal(_run(build_sampler("ddim", 5)), _run(build_sampler("ddim", 5)))
    noisy = [_run(build_sampler("ddim", 5, eta=1.0, generator=torch.Generator().manual_seed(s))) for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])


def test_build_sampler_options():
    # geometry is accepted by every sampler so the pipeline can pass it uniformly
    assert build_sampler("ddim", 50, height=512, width=512, num_frames=16).timesteps[0] == 980.0
    assert len(build_sampler("pndm", None).timesteps) == 159
    assert len(build_sampler("ddim", None).timesteps) == 50
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("euler", 10)
    with pytest.raises(TypeError, match="unknown scheduler option"):
        build_sampler("pndm", 10, not_an_option=1)
    with pytest.raises(RuntimeError, match="expected i=0"):
        s = build_sampler("pndm", 10)
        z = torch.zeros(SHAPE)
        s.step(z, 1, z)
