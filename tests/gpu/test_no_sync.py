"""On a GPU: one denoising step (CFG forward + guidance + sampler step) makes no host sync.

A sync per step lets the GPU run dry while the CPU queues the next step (the STDiT3 profile shows CPU
launch time about equal to GPU time), so the loop must stay sync-free for every model.
"""

import pytest
import torch

from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
def test_denoising_step_has_no_host_sync(model):
    pipe = Pipeline.from_name(model, device="cuda", dtype=torch.bfloat16)
    r = pipe.resolve(GenerationRequest(model=model, prompt="a cat", steps=8, seed=0))
    y, mask = pipe.encode_text(r)  # text is prepared once per generation, outside the loop
    sampler = pipe.family.new_sampler(pipe.size, r.steps, height=r.height, width=r.width, num_frames=r.num_frames)
    z = sampler.init_noise(pipe.latent_shape(r), dtype=torch.float32, device="cuda")
    z = sampler.step(pipe._cfg_step(z, sampler.timesteps[0], y, mask, r), 0, z)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            z = sampler.step(pipe._cfg_step(z, sampler.timesteps[i], y, mask, r), i, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(z).all()
