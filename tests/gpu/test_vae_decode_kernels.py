"""On a GPU: the Open-Sora 1.2 VAE decodes in bf16 through the GroupNorm kernels by default (pab.vae_kernels:
the folded biases, subpixel upsamplers and wide attention with them), in either layout,
to the same frames within bf16 rounding, and with no host sync."""

import pytest
import torch

from bench.vae import psnr  # on [-1, 1], the decoder's range
from pab.families import get_family
from pab.kernels import group_norm as gn
from pab.vae_kernels import apply_vae_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("channels_last", [False, True])
def test_opensora_vae_decodes_through_the_kernels(channels_last, monkeypatch):
    vae = get_family("opensora-v1.2").load_vae("full", None, torch.device("cuda"), torch.bfloat16)
    z = torch.randn(1, 4, 5, 24, 32, generator=torch.Generator().manual_seed(0)).cuda().bfloat16()
    calls = []
    real = gn.group_norm
    monkeypatch.setattr(gn, "group_norm", lambda *a, silu=False, **kw: calls.append(silu) or real(*a, silu=silu, **kw))
    with torch.inference_mode():
        exact = vae.float().decode(z.float(), num_frames=17)
        vae.to(torch.bfloat16)
        plain = vae.decode(z, num_frames=17)
        handle = apply_vae_kernels(vae, channels_last=channels_last)
        try:
            vae.decode(z, num_frames=17)  # builds the kernels
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fused = vae.decode(z, num_frames=17)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finally:
            handle.remove()
    assert handle.fused > 0 and calls.count(True) > 0 and handle.biases > 0 and handle.upsamplers == 3
    assert handle.resnets == handle.biases  # every resnet of the 2D decoder (no time embedding)
    assert handle.attentions == 2  # the encoder's and decoder's mid-block attentions: one head of 512
    assert psnr(fused, plain) > 40, psnr(fused, plain)  # bf16 rounding of the norms' outputs, nothing more
    # The folded biases and subpixel upsamplers round differently, not worse: as close to a float32 decode.
    assert psnr(fused, exact) > psnr(plain, exact) - 1, (psnr(fused, exact), psnr(plain, exact))
