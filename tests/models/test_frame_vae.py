"""Per-frame AutoencoderKL (Latte-1's VAE) behind the VideoVAE interface, with a tiny CPU model."""

import pytest
import torch

from pab.models.frame_vae import FrameVAE
from pab.models.vae import VideoVAE


@pytest.fixture(scope="module")
def vae():
    return FrameVAE.random("tiny", seed=0, micro_batch_size=2)


def _video(b=1, f=3, h=16, w=24, seed=0):
    return torch.rand((b, 3, f, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_interface_and_factors(vae):
    assert isinstance(vae, VideoVAE)
    assert vae.latent_channels == 4 and vae.spatial_factor == 8
    assert vae.scaling_factor == pytest.approx(0.18215)
    assert [vae.latent_frames(f) for f in (1, 2, 16, 17)] == [1, 2, 16, 17]
    assert vae.num_frames(16) == 16
    with pytest.raises(ValueError, match=">= 1"):
        vae.latent_frames(0)


def test_encode_shapes_and_scaling(vae):
    video = _video(b=2, f=3)
    z = vae.encode(video)
    assert z.shape == (2, 4, 3, 2, 3)  # 16x24 / 8
    # per frame, scaled: frame (b=1, f=2) equals the raw VAE's posterior mean of that image * 0.18215
    raw = vae.vae.encode(video[1, :, 2][None]).latent_dist.mode()
    torch.testing.assert_close(z[1, :, 2], raw[0] * 0.18215, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(h=12))


def test_decode_shapes_and_micro_batching(vae):
    z = torch.randn(2, 4, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    out = vae.decode(z, num_frames=3)  # 6 frames through micro batches of 2
    assert out.shape == (2, 3, 3, 16, 24) and torch.isfinite(out).all()
    whole = FrameVAE(vae.vae, micro_batch_size=64).decode(z, num_frames=3)
    torch.testing.assert_close(out, whole, rtol=1e-4, atol=1e-5)
    # decode undoes the scaling: the raw VAE decode of z / 0.18215 for one frame
    raw = vae.vae.decode(z[0, :, 1][None] / 0.18215).sample
    torch.testing.assert_close(out[0, :, 1], raw[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_frames"):
        vae.decode(z, num_frames=4)


def test_single_frame_and_sampled_encode(vae):
    v = _video(f=1)
    assert vae.decode(vae.encode(v), 1).shape == v.shape
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = vae.encode(v, sample=True, generator=g())
    assert torch.equal(a, vae.encode(v, sample=True, generator=g()))
    assert not torch.equal(a, vae.encode(v))


def test_tiny_is_deterministic_per_seed(vae):
    z = torch.randn(1, 4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(FrameVAE.random("tiny", seed=0).decode(z, 1), vae.decode(z, 1))
    assert not torch.equal(FrameVAE.random("tiny", seed=1).decode(z, 1), vae.decode(z, 1))


def test_from_pretrained_local(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")  # diffusers pipeline layout: <root>/vae
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    for path in (tmp_path / "vae", tmp_path):
        loaded = FrameVAE.from_pretrained(path, micro_batch_size=1)
        torch.testing.assert_close(loaded.decode(z, 2), vae.decode(z, 2))
    half = FrameVAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with pytest.raises(FileNotFoundError):
        FrameVAE.from_pretrained(tmp_path / "nope")


def test_sd_architecture_random_weights():
    sd = FrameVAE.random(device="meta")  # shapes only, no memory
    assert sum(p.numel() for p in sd.parameters()) == 83_653_863  # the SD 1.x VAE
    assert sd.spatial_factor == 8 and sd.latent_channels == 4 and sd.scaling_factor == pytest.approx(0.18215)


def test_small_size_normalises_latents_per_channel_and_keeps_it_through_save_and_load(tmp_path):
    """Latte-1-small's VAE: 4x, per-channel latents_mean / latents_std (written by training) survive save/load."""
    vae = FrameVAE.random("small", seed=0)
    assert vae.spatial_factor == 4
    video = torch.rand(1, 3, 2, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw = vae.encode(video)  # no statistics yet: the scaling factor alone (1.0)
    mean, std = [0.5, -0.25, 0.0, 1.0], [2.0, 0.5, 1.0, 4.0]
    vae.set_latent_stats(mean, std)
    z = vae.encode(video)
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(vae.decode(z, 2), vae.vae.decode(raw[0].transpose(0, 1)).sample.transpose(0, 1)[None])
    vae.vae.save_pretrained(tmp_path / "vae")
    again = FrameVAE.from_pretrained(tmp_path / "vae")
    torch.testing.assert_close(again.encode(video), z)
