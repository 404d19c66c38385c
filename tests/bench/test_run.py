"""bench/run.py: counting FLOPs must not leave a "--compile" benchmark running eager code."""

import torch
from torch._dynamo.utils import counters

from bench.run import _flops_by_kind
from pab.pipeline import GenerationRequest, Pipeline


def test_flop_count_keeps_the_pipeline_compiled():
    """A compiled function first called under FlopCounterMode is never compiled afterwards by Dynamo; the
    benchmark counts FLOPs in force_eager so the generations after it still run compiled code."""
    torch._dynamo.reset()
    counters.clear()
    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cpu", dtype=torch.float32, compile=True)
    request = GenerationRequest(model="opensora-v1.2-tiny", prompt="a cat", steps=4, seed=0)
    flops, per_call = _flops_by_kind(pipe, request)
    eager = Pipeline.from_name("opensora-v1.2-tiny", device="cpu", dtype=torch.float32)
    assert flops == _flops_by_kind(eager, request)[0] > 0  # the compiled model's FLOPs are the eager ones
    assert set(per_call) == {"spatial", "temporal", "cross", "mlp"}
    assert counters["stats"]["unique_graphs"] == 0
    pipe.generate(request, decode=False)
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["frames"])
