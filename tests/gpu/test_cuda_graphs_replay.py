"""On a GPU: CUDA graphs of the transformer forward give the eager model's latents with PAB, and a second
request of the same shape only replays (pab.cudagraph)."""

import pytest
import torch

from pab.engine import EngineOptions
from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
@pytest.mark.parametrize("cache", ["off", "paper"])
def test_graphs_replay_the_eager_pipeline(model, cache):
    request = GenerationRequest(model=model, prompt="a red fox", steps=16, seed=5, cache=cache)
    eager = Pipeline.from_name(model, device="cuda", dtype=torch.float32).generate(request, decode=False)
    pipe = Pipeline.from_name(model, device="cuda", dtype=torch.float32,
                              engine=EngineOptions(cuda_graphs=True))  # fmt: skip
    first = pipe.generate(request, decode=False)
    captures = pipe.graphs.stats["captures"]
    second = pipe.generate(request, decode=False)
    assert pipe.graphs.stats["captures"] == captures  # the same shape and patterns: replays only
    for res in (first, second):
        # The same kernels on the same inputs; cuBLAS may pick another algorithm under capture.
        torch.testing.assert_close(res.latents, eager.latents, rtol=1e-4, atol=1e-4)
        assert res.pab_stats == eager.pab_stats
    assert torch.equal(first.latents, second.latents)


def _nccl_capture_worker(rank: int, world: int) -> list[float]:
    import torch.distributed as dist

    dev = torch.device("cuda", rank)
    send = torch.arange(8.0, device=dev)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # eager first: NCCL makes its communicator outside any graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # As pab.cudagraph captures under DSP: thread-local, so NCCL's watchdog thread may query its events.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        work = dist.all_to_all_single(recv, send, async_op=True)
        work.wait()
        out = recv * 2
    send.copy_(torch.arange(8.0, device=dev) + 10)
    graph.replay()
    torch.cuda.synchronize()
    return out.cpu().tolist()


def test_an_nccl_all_to_all_is_captured_and_replayed():
    """The mechanism the graphs of a DSP group rely on (tests/parallel/test_dsp_gpu.py runs the group itself
    on 2 GPUs): an all-to-all launched and waited on inside a capture, replayed on new data."""
    from pab.parallel import launch_local

    [out] = launch_local(1, _nccl_capture_worker, backend="nccl")
    assert out == [2.0 * (i + 10) for i in range(8)]
