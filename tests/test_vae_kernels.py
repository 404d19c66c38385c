"""The GroupNorm kernels attached to the VAEs (pab/vae_kernels.py): the same decode as the plain model, in
either layout, and removable. The kernels run in Triton's CPU interpreter here (TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from pab.hooks.registry import get_hook
from pab.kernels import conv_epilogue as ep
from pab.kernels import group_norm as gn
from pab.kernels import wide_attention as wa
from pab.models.frame_vae import FrameVAE
from pab.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
from pab.vae_kernels import HOOK, apply_vae_kernels, subpixel_weight
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


def counting(monkeypatch, biases: list[torch.Tensor] | None = None) -> list[bool]:
    """Record each kernel call's `silu` flag (and into `biases`, each input bias it was handed)."""
    calls: list[bool] = []
    real = gn.group_norm

    def spy(*args, silu=False, input_bias=None):
        calls.append(silu)
        if input_bias is not None and biases is not None:
            biases.append(input_bias)
        return real(*args, silu=silu, input_bias=input_bias)

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
    """Channels-last, so the norms read NHWC in place (NCHW: tests/kernels/test_group_norm.py); the mid-block
    attention through wide_attention (from its tiny heads' width here)."""
    z = torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        plain = frame_vae.decode(z, num_frames=3)
        biases: list[torch.Tensor] = []
        calls = counting(monkeypatch, biases)
        attended = []
        real = wa.wide_attention
        monkeypatch.setattr(wa, "wide_attention", lambda *a, **kw: attended.append(a[0].shape) or real(*a, **kw))
        handle = apply_vae_kernels(frame_vae, channels_last=True, use_kernel=always, wide_attention_from=1)
        fused = frame_vae.decode(z, num_frames=3)
        handle.remove()
        again = frame_vae.decode(z, num_frames=3)
    decoder = frame_vae.vae.decoder
    # Every resnet's two norms and the decoder's last feed a SiLU; the mid-block attention's norm does not.
    resnets = [m for m in decoder.modules() if isinstance(m, ResnetBlock2D)]
    assert handle.norms == len(norms_of(frame_vae)) and handle.fused == handle.norms - 2  # encoder's attention too
    micro_batches = 2  # 3 frames, 2 at a time
    assert calls.count(True) == micro_batches * (2 * len(resnets) + 1) and calls.count(False) == micro_batches
    # Each decoder resnet's conv1 left its bias to norm2 (the encoder's resnets too, not run here).
    all_resnets = [m for m in frame_vae.modules() if isinstance(m, ResnetBlock2D)]
    assert handle.biases == len(all_resnets) and len(biases) == micro_batches * len(resnets)
    assert {id(b) for b in biases} == {id(r.conv1.bias) for r in resnets}
    upsamplers = [m for m in decoder.modules() if isinstance(m, Upsample2D)]
    assert handle.upsamplers == len(upsamplers) > 0 and handle.resnets == len(all_resnets)
    assert handle.attentions == 2 and [s[0] for s in attended] == [2, 1]  # the decoder's, a call a micro-batch
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, plain) and all(get_hook(m, HOOK) is None for m in frame_vae.modules())
    assert all(m.weight.is_contiguous() for m in frame_vae.modules() if isinstance(m, nn.Conv2d))


@needs_triton
@pytest.mark.parametrize("heads", [1, 2])
def test_the_vae_attention_runs_as_wide_attention(heads):
    """diffusers' VAE attention (group norm, residual, output scale) with its core through wide_attention, from
    the head width asked for (the VAEs' 512 is above any flash kernel's; the tiny ones' are not)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, heads=heads, dim_head=8 // heads, rescale_output_factor=2.0, eps=1e-6, norm_num_groups=2,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    attn = with_affine_noise(attn.eval()).to(DEVICE)  # fmt: skip
    x = torch.randn(2, 8, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    calls = []
    real = wa.wide_attention
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(wa, "wide_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
        plain = attn(x)
        handle = apply_vae_kernels(attn, use_kernel=always)  # from 257 channels a head: not these
        narrow = attn(x)
        handle.remove()
        assert handle.attentions == 1 and calls == []
        handle = apply_vae_kernels(attn, use_kernel=always, wide_attention_from=8 // heads)
        wide = attn(x, temb=None)  # as UNetMidBlock2D calls it
        masked = attn(x.flatten(2).transpose(1, 2), attention_mask=torch.ones(2, 1, 30, device=DEVICE))
        handle.remove()
    torch.testing.assert_close(narrow, plain, rtol=1e-5, atol=1e-5)
    assert calls == [(2 * heads, 30, 8 // heads)]  # the masked call ran as written
    assert wide.shape == plain.shape and wide.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-5)
    assert masked.shape == (2, 30, 8) and apply_vae_kernels(attn, wide_attention_from=None).attentions == 0


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


@needs_triton
@pytest.mark.parametrize("mode", ["default", "scale_shift"])
def test_a_time_embedding_between_conv_and_norm_keeps_the_bias(monkeypatch, mode):
    """In "default" mode the time embedding is added to conv1's output before norm2: the norm adds the bias the
    conv left it to the sum, which is the same sum."""
    torch.manual_seed(0)
    block = with_affine_noise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=2,
                                            time_embedding_norm=mode).eval()).to(DEVICE)  # fmt: skip
    with torch.no_grad():
        block.conv1.bias.add_(3.0)  # a bias that would show if it were dropped
    x, temb = torch.randn(2, 8, 5, 6, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    with torch.no_grad():
        plain = block(x, temb)
        biases: list[torch.Tensor] = []
        counting(monkeypatch, biases)
        handle = apply_vae_kernels(block, use_kernel=always)
        fused = block(x, temb)
        handle.remove()
    assert handle.biases == 1 and [id(b) for b in biases] == [id(block.conv1.bias)]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("out_channels, scale", [(8, 1.0), (12, 2.0)])
def test_a_resnet_adds_its_last_biases_in_the_residual_sum(monkeypatch, out_channels, scale):
    """A VAE's resnet (no time embedding): conv2's bias (and the 1x1 shortcut's, where the width changes) go
    into the residual sum, which divides by the output scale in the same pass."""
    torch.manual_seed(0)
    block = with_affine_noise(ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=None, groups=2,
                                            output_scale_factor=scale).eval()).to(DEVICE)  # fmt: skip
    with torch.no_grad():
        for conv in (block.conv2, block.conv_shortcut):
            if conv is not None:
                conv.bias.add_(2.0)  # biases that would show if one were dropped
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    calls = []
    real = ep.bias_residual
    monkeypatch.setattr(ep, "bias_residual", lambda *a: calls.append(len(a[2])) or real(*a))
    with torch.no_grad():
        plain = block(x, None)
        handle = apply_vae_kernels(block, use_kernel=always)
        hooked = block(x.contiguous(memory_format=torch.channels_last), None)
        handle.remove()
    assert handle.resnets == 1 and calls == [1 if out_channels == 8 else 2]
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an NCHW input into channels-last convs: layouts the kernel does not take, same sum
        for conv in (block.conv1, block.conv2):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        handle = apply_vae_kernels(block, use_kernel=always)
        mixed = block(x, None)
        handle.remove()
    assert len(calls) == 1  # the kernel was not asked
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-5)


def test_a_resnet_with_a_time_embedding_runs_as_written():
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=2)
    assert apply_vae_kernels(block, use_kernel=always).resnets == 0


@needs_triton
def test_a_norm_that_cannot_take_the_kernel_adds_the_bias_itself(monkeypatch):
    """The conv asks about its output's shape before it drops its bias; should the norm then find the real input
    too large for the kernel (here: more than 100 elements), it adds the bias before PyTorch's GroupNorm."""
    torch.manual_seed(0)
    block = with_affine_noise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=2).eval())
    block = block.to(DEVICE)
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    with torch.no_grad():
        block.conv1.bias.add_(3.0)
        plain = block(x, None)
        calls = counting(monkeypatch)
        handle = apply_vae_kernels(block, use_kernel=lambda t, g: t.numel() < 100)
        hooked = block(x, None)
        handle.remove()
    assert calls == [] and handle.biases == 1
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_a_nearest_upsampler_runs_as_a_subpixel_convolution(fmt, bias):
    """In float64 the 2x2 convolution and its interleaving give Upsample2D's output to rounding, in the input's
    layout, odd sizes and the borders included."""
    torch.manual_seed(0)
    up = Upsample2D(6, use_conv=True, out_channels=5, bias=bias).double().eval().to(DEVICE)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, device=DEVICE).contiguous(memory_format=fmt)
    with torch.no_grad():
        plain = up(x)
        handle = apply_vae_kernels(up, use_kernel=always)
        sub = up(x)
        handle.remove()
        again = up(x)
    assert handle.upsamplers == 1 and sub.shape == plain.shape == (2, 5, 10, 14)
    assert sub.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(sub, plain, rtol=1e-12, atol=1e-12)
    assert torch.equal(again, plain)


def test_the_subpixel_weight_sums_the_taps_that_land_on_one_input_pixel():
    w = torch.arange(9.0).view(1, 1, 3, 3)  # taps 0..8, row-major
    k = subpixel_weight(w)[:, 0]  # phases (0,0), (0,1), (1,0), (1,1)
    # Even rows read input rows i-1 (tap row 0) and i (rows 1 + 2); even columns likewise.
    assert k[0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert k[3].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_only_the_upsamplers_it_reproduces_are_hooked():
    others = [Upsample2D(4, use_conv=False), Upsample2D(4, use_conv=True, kernel_size=1, padding=0),
              Upsample2D(4, use_conv_transpose=True), Upsample2D(4, use_conv=True, norm_type="rms_norm", eps=1e-6,
                                                             elementwise_affine=True)]  # fmt: skip
    for up in others:
        assert apply_vae_kernels(up, use_kernel=always).upsamplers == 0


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
