"""pab.cudagraph: the graph bookkeeping (pattern keys, cache arena, replayed effects) against the plain model.

On CPU the "eager" backend reruns the forward where a GPU replays a graph, so everything around the graph is
proven here; tests/gpu/test_cudagraph.py proves the captured graphs on a GPU.
"""

import pytest
import torch

from pab.cudagraph import CUDA_GRAPH_HOOK, CacheArena, apply_cuda_graphs
from pab.engine import EngineOptions
from pab.hooks.registry import get_hook
from pab.pipeline import GenerationRequest, Pipeline

MODELS = ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"]

GRAPHS = EngineOptions(cuda_graphs=True)


def _generate(pipe, model, cache="paper", steps=12, **kw):
    return pipe.generate(GenerationRequest(model=model, prompt="a red fox", steps=steps, seed=3, cache=cache, **kw),
                         decode=False)  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_graphed_pab_is_bit_identical_to_the_plain_pipeline(model):
    plain = _generate(Pipeline.from_name(model, device="cpu"), model)
    pipe = Pipeline.from_name(model, device="cpu", engine=GRAPHS)
    first, second = _generate(pipe, model), _generate(pipe, model)
    for res in (first, second):
        assert torch.equal(res.latents, plain.latents)
        assert res.pab_stats == plain.pab_stats  # the counts come back with every replay
    assert sum(c["broadcast"] for c in plain.pab_stats.values()) > 0
    stats = pipe.graphs.stats
    # One capture per pattern of reuse: fewer than the steps, and none at all for the second request.
    calls = len(plain.timesteps)  # model calls (PNDM makes more than the steps)
    assert 1 < stats["graphs"] == stats["captures"] < calls
    assert stats["replays"] == 2 * calls - 1  # all but the first call, which made the arena


def test_the_patterns_are_the_pab_decisions():
    model = "latte-1-tiny"
    pipe = Pipeline.from_name(model, device="cpu", engine=GRAPHS)
    _generate(pipe, model, cache="off")
    assert pipe.graphs.stats["graphs"] == 1  # nothing is ever reused: every step is the same graph
    _generate(pipe, model, cache="paper")  # another PAB config: new hooks, the old graphs are dropped
    assert pipe.graphs.stats["graphs"] > 1


def test_only_the_most_recent_shapes_are_kept():
    model = "opensora-v1.2-tiny"
    pipe = Pipeline.from_name(model, device="cpu")
    handle = apply_cuda_graphs(pipe.transformer, max_shapes=1, backend="eager")
    _generate(pipe, model, steps=4)
    _generate(pipe, model, steps=4, height=96, width=96)
    assert handle.stats["shapes"] == 1
    handle.remove()
    assert get_hook(pipe.transformer, CUDA_GRAPH_HOOK) is None


def test_step_reuse_runs_eager_and_stays_right():
    model = "opensora-v1.2-tiny"
    policy = {"policy": "fixed", "reuse": [2, 3, 5], "reuse_of": 8}
    plain = _generate(Pipeline.from_name(model, device="cpu"), model, cache=policy, steps=8)
    pipe = Pipeline.from_name(model, device="cpu", engine=GRAPHS)
    res = _generate(pipe, model, cache=policy, steps=8)
    assert torch.equal(res.latents, plain.latents)
    assert res.cache_stats["reused_steps"] == [2, 3, 5]
    assert pipe.graphs.stats["captures"] == 0


def test_the_arena_keeps_addresses_and_refuses_new_buffers_while_capturing():
    arena = CacheArena()
    a = torch.ones(3)
    kept = arena.keep("k", a)
    assert kept is a
    again = arena.keep("k", torch.full((3,), 2.0))
    assert again is a and torch.equal(a, torch.full((3,), 2.0))  # copied in place: the address a graph read
    arena.frozen = True
    with pytest.raises(RuntimeError, match="no cache buffer"):
        arena.keep("other", torch.ones(2))


def test_cuda_backend_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    pipe = Pipeline.from_name("latte-1-tiny", device="cpu")
    with pytest.raises(RuntimeError, match="backend='eager'"):
        apply_cuda_graphs(pipe.transformer)


def test_a_shape_first_seen_outside_a_generation_still_renders_right():
    """Calls without a PABState (warm-ups, benchmarks of the bare forward) make no cache buffers; the first
    generation at that shape must still run eager once to make them before any graph reads them."""
    model = "opensora-v1.2-tiny"
    plain = _generate(Pipeline.from_name(model, device="cpu"), model, steps=6, height=96, width=96)
    pipe = Pipeline.from_name(model, device="cpu", engine=GRAPHS)
    _generate(pipe, model, steps=4)  # PAB hooks attached, at another shape
    r = pipe.resolve(GenerationRequest(model=model, prompt="a red fox", steps=6, seed=3, height=96, width=96))
    y, mask = pipe.encode_text(r)
    z = torch.randn(pipe.latent_shape(r))
    with torch.no_grad():
        outs = [pipe._forward(torch.cat([z, z]), 500.0, y, mask, r) for _ in range(3)]  # eager, capture, replay
    assert all(torch.equal(o, outs[0]) for o in outs)
    res = _generate(pipe, model, steps=6, height=96, width=96)
    assert torch.equal(res.latents, plain.latents) and res.pab_stats == plain.pab_stats
