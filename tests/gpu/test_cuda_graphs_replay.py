"""On a GPU: CUDA graphs of the transformer forward give the eager model's latents with PAB, and a second
request of the same shape only replays (pab.cudagraph)."""

import pytest
import torch

from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
@pytest.mark.parametrize("cache", ["off", "paper"])
def test_graphs_replay_the_eager_pipeline(model, cache):
    request = GenerationRequest(model=model, prompt="a red fox", steps=16, seed=5, cache=cache)
    eager = Pipeline.from_name(model, device="cuda", dtype=torch.float32).generate(request, decode=False)
    pipe = Pipeline.from_name(model, device="cuda", dtype=torch.float32, cuda_graphs=True)
    first = pipe.generate(request, decode=False)
    captures = pipe.graphs.stats["captures"]
    second = pipe.generate(request, decode=False)
    assert pipe.graphs.stats["captures"] == captures  # the same shape and patterns: replays only
    for res in (first, second):
        # The same kernels on the same inputs; cuBLAS may pick another algorithm under capture.
        torch.testing.assert_close(res.latents, eager.latents, rtol=1e-4, atol=1e-4)
        assert res.pab_stats == eager.pab_stats
    assert torch.equal(first.latents, second.latents)
