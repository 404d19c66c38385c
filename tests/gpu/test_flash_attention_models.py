"""On a GPU: the tiny models in bf16 with spatial_attention / cross_attention = "triton" take the flash kernel by
default (`supported`, no patching), make the same step as SDPA within bf16 rounding, and make no host sync."""

import pytest
import torch

from pab.kernels import KernelOptions, set_kernel_options
from pab.kernels import flash_attention as flash
from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
def test_a_step_through_the_flash_kernel(model, monkeypatch):
    pipe = Pipeline.from_name(model, device="cuda", dtype=torch.bfloat16)
    r = pipe.resolve(GenerationRequest(model=model, prompt="a cat on a skateboard", steps=8, seed=0))
    y, mask = pipe.encode_text(r)
    sampler = pipe.family.new_sampler(pipe.size, r.steps, height=r.height, width=r.width, num_frames=r.num_frames)
    z = sampler.init_noise(pipe.latent_shape(r), dtype=torch.float32, device="cuda")
    plain = pipe._cfg_step(z, sampler.timesteps[0], y, mask, r)
    calls = []
    real = flash.flash_attention
    monkeypatch.setattr(flash, "flash_attention", lambda *a, **kw: calls.append(kw.get("key_mask")) or real(*a, **kw))
    set_kernel_options(pipe.transformer, KernelOptions(spatial_attention="triton", cross_attention="triton"))
    pipe._cfg_step(z, sampler.timesteps[0], y, mask, r)  # builds the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = pipe._cfg_step(z, sampler.timesteps[0], y, mask, r)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls, "the flash kernel never ran"
    err = (fused.float() - plain.float()).norm() / plain.float().norm()
    assert err < 2e-2, err  # bf16 rounding of p and the outputs, nothing more
