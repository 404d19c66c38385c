"""The GroupNorm kernels attached to the VAEs (pab/vae_kernels.py): the same decode as the plain model, in
either layout, and removable. The kernels run in Triton's CPU interpreter here (TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from pab.hooks.registry import get_hook
from pab.kernels import group_norm as gn
from pab.models.frame_vae import FrameVAE
from pab.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
from pab.vae_kernels import HOOK, apply_vae_kernels
from support.kernels import CUDA, DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_tf32")


@pytest.fixture(scope="module")
def no_tf32():
    """On CUDA, float32 convolutions in full precision, so the two decodes differ by the norms' rounding only."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def always(x: torch.Tensor, num_groups: int) -> bool:
    return True


def norms_of(model: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in model.modules() if type(m) is nn.GroupNorm]


def with_affine_noise(model: nn.Module, seed: int = 0) -> nn.Module:
    """GroupNorm weights and biases away from their (1, 0) init, so the affine part is checked too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in norms_of(model):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def counting(monkeypatch) -> list[bool]:
    """Record each kernel call's `silu` flag."""
    calls: list[bool] = []
    real = gn.group_norm

    def spy(*args, silu=False):
        calls.append(silu)
        return real(*args, silu=silu)

    monkeypatch.setattr(gn, "group_norm", spy)
    return calls


@pytest.fixture(scope="module")
def frame_vae():
    return with_affine_noise(FrameVAE.random("tiny", seed=0, micro_batch_size=2).eval()).to(DEVICE)


@pytest.fixture(scope="module")
def opensora_vae():
    torch.manual_seed(0)
    return with_affine_noise(OpenSoraVAE(OpenSoraVAEConfig.from_size("tiny")).eval()).to(DEVICE)


@needs_triton
def test_frame_vae_decodes_the_same_through_the_kernels(frame_vae, monkeypatch):
    """Channels-last, so the norms read NHWC in place (NCHW: tests/kernels/test_group_norm.py)."""
    z = torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        plain = frame_vae.decode(z, num_frames=3)
        calls = counting(monkeypatch)
        handle = apply_vae_kernels(frame_vae, channels_last=True, use_kernel=always)
        fused = frame_vae.decode(z, num_frames=3)
        handle.remove()
        again = frame_vae.decode(z, num_frames=3)
    decoder = frame_vae.vae.decoder
    # Every resnet's two norms and the decoder's last feed a SiLU; the mid-block attention's norm does not.
    resnets = [m for m in decoder.modules() if isinstance(m, ResnetBlock2D)]
    assert handle.norms == len(norms_of(frame_vae)) and handle.fused == handle.norms - 2  # encoder's attention too
    micro_batches = 2  # 3 frames, 2 at a time
    assert calls.count(True) == micro_batches * (2 * len(resnets) + 1) and calls.count(False) == micro_batches
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, plain) and all(get_hook(m, HOOK) is None for m in frame_vae.modules())
    assert all(m.weight.is_contiguous() for m in frame_vae.modules() if isinstance(m, nn.Conv2d))


@needs_triton
def test_opensora_vae_decodes_the_same_through_the_kernels_channels_last(opensora_vae, monkeypatch):
    z = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    frames = opensora_vae.num_frames(2)
    with torch.no_grad():
        plain = opensora_vae.decode(z, num_frames=frames)
        calls = counting(monkeypatch)
        handle = apply_vae_kernels(opensora_vae, channels_last=True, use_kernel=always)
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d)
                   for m in opensora_vae.modules() if isinstance(m, nn.Conv3d))  # fmt: skip
        fused = opensora_vae.decode(z, num_frames=frames)
        handle.remove()
    assert calls.count(True) > 0 and handle.fused > 0
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert all(m.weight.is_contiguous() for m in opensora_vae.modules() if isinstance(m, nn.Conv3d))


@needs_triton
def test_a_norm_modulated_before_its_activation_is_not_fused(monkeypatch):
    """ResnetBlock2D with "scale_shift" modulates norm2's output by the time embedding before the SiLU, and
    applies the same SiLU module to the time embedding: only norm1 may be fused, and the SiLU of anything
    but norm1's output is still applied."""
    torch.manual_seed(0)
    block = with_affine_noise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=2,
                                            time_embedding_norm="scale_shift").eval()).to(DEVICE)  # fmt: skip
    x, temb = torch.randn(2, 8, 5, 6, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    with torch.no_grad():
        plain = block(x, temb)
        calls = counting(monkeypatch)
        handle = apply_vae_kernels(block, use_kernel=always)
        fused = block(x, temb)
        t = torch.randn(3, 4, device=DEVICE)
        assert torch.equal(block.nonlinearity(t), F.silu(t))
        handle.remove()
    assert (handle.norms, handle.fused) == (2, 1) and calls == [True, False]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    CUDA, reason="on the CPU the default finds no kernel; tests/gpu/test_vae_decode_kernels.py covers CUDA"
)
def test_without_a_kernel_for_the_input_the_norms_run_as_before(frame_vae, monkeypatch):
    """On the CPU (no CUDA, so `gn.available` is false) nothing is launched and the decode is bit for bit the
    plain one."""
    calls = counting(monkeypatch)
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = frame_vae.decode(z, num_frames=2)
        handle = apply_vae_kernels(frame_vae)
        hooked = frame_vae.decode(z, num_frames=2)
        handle.remove()
    assert calls == [] and torch.equal(hooked, plain)
