"""DSP over NCCL on 2 and 4 GPUs: the uneven all-to-all and gather on CUDA, and the three models vs one GPU,
with plain and with chunked (overlapped) switches.

Runs only where the CUDA devices exist (`-m gpu`); CI has none. Tolerances: float32 1e-5 as on CPU
(TF32 is switched off so matmuls are true fp32); bfloat16 2e-2, the rounding of a bf16 forward whose
linear layers see a different number of rows per call (another cuBLAS kernel may be chosen).
"""

from __future__ import annotations

import pytest
import torch
from test_dsp_models import CASES, MODELS, build_tiny, make_inputs, predict

from pab.engine import EngineOptions
from pab.parallel import ParallelConfig, init_parallel, launch_local, parallelize_model, unparallelize_model
from pab.parallel.comm import FrameLayout, FrameShard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def _to(args: dict, device, dtype) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k in ("x", "hidden_states", "y", "encoder_hidden_states"):
                v = v.to(dtype)
        out[k] = v
    return out


def _gpu_worker(rank: int, world: int, chunks: int = 1) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = init_parallel(ParallelConfig(sp=world, overlap_chunks=chunks))
    assert ctx.device == torch.device("cuda", rank)
    dev = ctx.device

    # primitives on CUDA, including empty pieces (fewer rows / frames than ranks)
    for R, T, C in [(7, 5, 4), (1, 3, 2), (6, 1, 3)]:
        full = torch.arange(R * T * C, dtype=torch.float32, device=dev).view(R, T, C)
        shard = FrameShard(FrameLayout(T, world), rank, ctx.sp_group, ctx.stats)
        local = shard.split(full, 1)
        back = shard.to_local(shard.to_full(local), R)
        assert torch.equal(back[:, :shard.count], local[:, :shard.count])
        assert torch.equal(shard.gather(local, 1), full)
    # frame blocks: received as they lie, sent back from the transposed view without a copy
    full = torch.randn(6, 2 * world, 8, device=dev, generator=torch.Generator(dev).manual_seed(0))
    shard = FrameShard(FrameLayout(2 * world, world), rank, ctx.sp_group)
    local = shard.split(full, 1)
    blocks = shard.start_to_full(local, blocks=True)()
    assert blocks.shape[1:] == (world, 2, 8) and blocks.transpose(0, 1).is_contiguous()
    back = shard.start_to_local(blocks * 2, 6, blocks=True)()
    assert torch.equal(back, local * 2)

    errors = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for name in MODELS:
            model = build_tiny(name).to(dev, dtype)
            worst = 0.0
            # + T = 2·world frames: even frame blocks on this group (STDiT3 takes them in its kernel)
            for i, case in enumerate(CASES[name] + [(2 * world, 4, 6, "plain")]):
                args = _to(make_inputs(name, *case, seed=i), dev, dtype)
                with torch.no_grad():
                    ref = predict(ctx.__class__(config=ParallelConfig()), model, **args)
                    parallelize_model(model, ctx)
                    out = predict(ctx, model, **args)
                    unparallelize_model(model)
                torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
                worst = max(worst, (out.float() - ref.float()).abs().max().item())
            errors[f"{name}/{str(dtype).removeprefix('torch.')}"] = worst
    return errors


@pytest.mark.parametrize("world,chunks", [(2, 1), (4, 1), (4, 3)], ids=["sp2", "sp4", "sp4-chunks3"])
def test_models_under_nccl_dsp_match_one_gpu(world, chunks):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    errors = launch_local(world, _gpu_worker, chunks, backend="nccl")
    print("max abs error vs one GPU:", errors[0])


def _graphs_worker(rank: int, world: int) -> dict:
    """The DSP pipeline replaying CUDA graphs (NCCL captured in them) against the same group without graphs."""
    from pab.pipeline import GenerationRequest, Pipeline

    ctx = init_parallel(ParallelConfig(sp=world))
    out = {}
    for name in ("opensora-v1.2-tiny", "latte-1-tiny"):
        request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, pab="paper", steps=12)
        eager = Pipeline.from_name(name, device=ctx.device, dtype=torch.float32, parallel=ctx)
        ref = eager.generate(request, decode=False)
        pipe = Pipeline.from_name(name, device=ctx.device, dtype=torch.float32, parallel=ctx,
                                  engine=EngineOptions(cuda_graphs=True))  # fmt: skip
        first, again = (pipe.generate(request, decode=False) for _ in range(2))  # capture, then replay only
        for res in (first, again):
            torch.testing.assert_close(res.latents, ref.latents, rtol=1e-4, atol=1e-4)
            assert res.pab_stats == ref.pab_stats and res.parallel["comm"] == ref.parallel["comm"]
        assert torch.equal(first.latents, again.latents)
        out[name] = pipe.graphs.stats
    return out


def test_cuda_graphs_capture_the_all_to_alls_of_a_dsp_group():
    """#20 item 3: the graphs path a DSP group takes, with NCCL's all-to-alls and gather inside the graphs."""
    stats = launch_local(2, _graphs_worker, backend="nccl")
    assert stats[0] == stats[1] and all(s["captures"] > 0 and s["replays"] > 0 for s in stats[0].values())
