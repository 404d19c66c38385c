"""Open-Sora 1.2 rectified flow: timesteps, bf16 rounding, exact integration, official semantics."""

import pytest
import torch

from pab.samplers import RFlowSampler, build_sampler, round_timesteps, timestep_transform

# docs models.md 1.2 (and pab.md 2.3): 480p 9:16 = 480x854, 51 frames, 30 steps, after the
# transform and bf16 rounding as VideoSys' STDiT3 sees them.
OPENSORA_480P_51F_BF16 = [
    1000, 992, 984, 976, 968, 960, 952, 940, 932, 920, 908, 892, 880, 864, 848,
    828, 808, 788, 764, 736, 708, 676, 636, 596, 548, 492, 426, 350, 258, 143,
]  # fmt: skip

GEOM_480P = dict(height=480, width=854, num_frames=51)


@pytest.mark.parametrize("info_dtype", [None, torch.float32, torch.bfloat16])
def test_480p_51f_bf16_rounded_timesteps_match_reference(info_dtype):
    s = build_sampler("rflow", 30, info_dtype=info_dtype, **GEOM_480P)
    assert len(s.timesteps) == 30
    assert round_timesteps(s.timesteps, torch.bfloat16) == [float(t) for t in OPENSORA_480P_51F_BF16]
    # the sampler itself returns unrounded floats: the cast belongs to the model
    assert s.timesteps[1] != 992.0 and abs(s.timesteps[1] - 992.93) < 0.01


def test_timesteps_are_float_and_decreasing_and_dts_reach_zero():
    s = RFlowSampler(30, **GEOM_480P)
    assert all(isinstance(t, float) for t in s.timesteps)
    assert s.timesteps[0] == 1000.0
    assert all(a > b for a, b in zip(s.timesteps, s.timesteps[1:]))
    assert all(d > 0 for d in s.dts)
    assert s.dts[-1] == pytest.approx(s.timesteps[-1] / 1000)  # last step integrates down to t = 0
    assert sum(s.dts) == pytest.approx(1.0, abs=1e-12)


def test_transform_formula_and_untransformed_schedule():
    # r = sqrt(480*854/512^2) * sqrt(51 // 17 * 5)
    r = (480 * 854 / 512**2) ** 0.5 * 15**0.5
    for t in (1000.0, 500.0, 100.0):
        u = t / 1000
        assert timestep_transform(t, **GEOM_480P) == pytest.approx(1000 * r * u / (1 + (r - 1) * u), rel=1e-12)
    plain = RFlowSampler(4, use_timestep_transform=False)
    assert plain.timesteps == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    assert plain.dts == pytest.approx([0.25] * 4)
    # a 512x512 image has r = 1: the transform is the identity
    img = RFlowSampler(4, height=512, width=512, num_frames=1)
    assert img.timesteps == pytest.approx(plain.timesteps)


def test_discrete_timesteps_round_before_transform():
    s = RFlowSampler(3, use_timestep_transform=False, use_discrete_timesteps=True)
    assert s.timesteps == [1000.0, 667.0, 333.0]


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="height and width"):
        RFlowSampler(30)
    with pytest.raises(ValueError, match="num_frames // 17"):
        RFlowSampler(30, height=64, width=64, num_frames=16)
    RFlowSampler(30, height=64, width=64, num_frames=17)  # 17 frames -> 5 latent frames: fine


def test_constant_velocity_is_integrated_exactly():
    s = RFlowSampler(30, **GEOM_480P)
    g = torch.Generator().manual_seed(0)
    z0 = s.init_noise((1, 4, 3, 4, 4), g)
    v = torch.randn(z0.shape, generator=g)
    z = z0
    for i, _ in enumerate(s.timesteps):
        z = s.step(v, i, z)
    # sum of dt is t_0 / 1000 = 1: z_final = z0 + v
    torch.testing.assert_close(z, z0 + v, rtol=0, atol=1e-5)


def test_straight_path_velocity_lands_on_the_data():
    """The true rectified-flow field for one data point x0: v(z, t) = (x0 - z) / (t/1000).

    Euler is exact on straight lines, so every step stays on the line from noise to x0 and the
    last step (dt = t_last/1000) ends exactly on x0.
    """
    s = RFlowSampler(7, height=256, width=320, num_frames=34)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((2, 4, 10, 4, 5), generator=g, dtype=torch.float64)
    z = s.init_noise(x0.shape, g, dtype=torch.float64)
    noise = z.clone()
    for i, t in enumerate(s.timesteps):
        sigma = t / 1000
        torch.testing.assert_close(z, (1 - sigma) * x0 + sigma * noise)  # on the straight path
        z = s.step((x0 - z) / sigma, i, z)
    torch.testing.assert_close(z, x0, rtol=0, atol=1e-12)


def _official_loop(z, model, num_steps, height, width, num_frames, dtype):
    """Open-Sora 1.2 RFLOW.sample for text-to-video, written out with the official tensor dtypes.

    height/width/num_frames are `dtype` tensors (the pipeline dtype), timesteps float32 tensors,
    dt float32, an all-ones frame mask (whose `where`s are identities), z promoted by dt.
    """
    h = torch.tensor([height], dtype=dtype)
    w = torch.tensor([width], dtype=dtype)
    f = torch.tensor([num_frames], dtype=dtype)
    ts = []
    for i in range(num_steps):
        t = torch.tensor([(1.0 - i / num_steps) * 1000]) / 1000
        r = (h * w / (512 * 512)).sqrt() * ((f // 17 * 5) / 1).sqrt() * 1.0
        ts.append(r * t / (1 + (r - 1) * t) * 1000)
    mask = torch.ones(1, z.shape[2])
    for i, t in enumerate(ts):
        x0 = z.clone()
        mask_t_upper = mask * 1000 >= t.unsqueeze(1)
        v = model(z, t)
        dt = ts[i] - ts[i + 1] if i < len(ts) - 1 else ts[i]
        dt = dt / 1000
        z = z + v * dt[:, None, None, None, None]
        z = torch.where(mask_t_upper[:, None, :, None, None], z, x0)
    return z, [float(t) for t in ts]


def test_matches_official_loop_bit_for_bit_in_bf16():
    def model(z, t):  # any deterministic function of (z, t), output in the model dtype
        return (torch.sin(z.float() * 3 + t.float() / 100) - 0.5 * z.float()).to(torch.bfloat16)

    g = torch.Generator().manual_seed(3)
    s = RFlowSampler(30, info_dtype=torch.bfloat16, **GEOM_480P)
    z = s.init_noise((1, 4, 15, 6, 10), g, dtype=torch.bfloat16)
    ref, ref_ts = _official_loop(z.clone(), model, 30, 480, 854, 51, torch.bfloat16)
    assert s.timesteps == ref_ts
    for i, t in enumerate(s.timesteps):
        z = s.step(model(z, torch.tensor([t], dtype=torch.float32)), i, z)
    assert z.dtype == torch.float32 == ref.dtype
    assert torch.equal(z, ref)


def test_step_order_and_shapes_are_enforced():
    s = RFlowSampler(3, use_timestep_transform=False)
    z = torch.zeros(1, 4, 2, 2, 2)
    with pytest.raises(RuntimeError, match="expected i=0"):
        s.step(z, 1, z)
    with pytest.raises(ValueError, match="slice"):
        s.step(torch.zeros(1, 8, 2, 2, 2), 0, z)
    for i in range(3):
        z = s.step(z, i, z)
    with pytest.raises(RuntimeError, match="finished"):
        s.step(z, 3, z)


def test_sampling_is_deterministic_given_a_generator():
    def run(seed):
        s = build_sampler("rflow", 5, height=128, width=128, num_frames=17)
        z = s.init_noise((1, 4, 5, 4, 4), torch.Generator().manual_seed(seed), torch.bfloat16)
        for i, t in enumerate(s.timesteps):
            z = s.step(torch.tanh(z) * (t / 1000), i, z)
        return z

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_init_noise_is_dtype_independent():
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    s = RFlowSampler(2, use_timestep_transform=False)
    n32 = s.init_noise((2, 3), g(), torch.float32)
    nbf = s.init_noise((2, 3), g(), torch.bfloat16)
    assert nbf.dtype == torch.bfloat16
    assert torch.equal(n32.to(torch.bfloat16), nbf)
    assert torch.equal(n32, torch.randn((2, 3), generator=g()))
