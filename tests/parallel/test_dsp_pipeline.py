"""`Pipeline.generate` under DSP / CFG parallelism gives the single-device latents (gloo, tiny models, PAB paper).

This is the integration seam: the pipeline calls `parallelize_model` before PAB, splits the CFG batch
with `ctx.split_cfg`/`ctx.gather_cfg`, resets `ctx.stats` per generation, and only rank 0 decodes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pab.engine import EngineOptions
from pab.parallel import ParallelConfig, init_parallel, launch_local
from pab.pipeline import GenerationRequest, Pipeline
from pab.precision import Fp8Config

# 17 frames -> 5 latent frames (Open-Sora, Open-Sora-Plan) or 17 (Latte); 48x80 px is non-square.
# Steps are enough for each paper preset's window to broadcast temporal attention at least once.
REQUESTS = {
    "opensora-v1.2-tiny": dict(num_frames=17, height=48, width=80, steps=10),
    "latte-1-tiny": dict(num_frames=17, height=48, width=80, steps=6),
    "opensora-plan-v1.1-tiny": dict(num_frames=17, height=48, width=80, steps=4),
}


def _worker(rank: int, world: int, sp: int, cfg: int) -> dict:
    ctx = init_parallel(ParallelConfig(sp=sp, cfg=cfg))
    summary = {}
    for name, size in REQUESTS.items():
        request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, pab="paper", **size)
        ref = Pipeline.from_name(name, device="cpu", dtype=torch.float32).generate(request)
        out = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx).generate(request)
        # Random tiny weights with guidance 7.5 grow the latents to |z| ~ 100, where one float32 ulp is ~1e-5;
        # the bound is therefore 1e-5 relative to the largest latent. (In float64 the latents were bit-equal.)
        scale = max(1.0, ref.latents.abs().max().item())
        torch.testing.assert_close(out.latents, ref.latents, atol=1e-5 * scale, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")  # fmt: skip
        assert out.pab_stats == ref.pab_stats, name
        assert (out.frames is not None) == (rank == 0)
        if rank == 0:
            # uint8 frames: at most one level apart where float rounding crosses a level boundary
            diff = (torch.as_tensor(out.frames).int() - torch.as_tensor(ref.frames).int()).abs().max().item()
            assert diff <= 1, (name, diff)
        comm = out.parallel["comm"]
        temporal = out.pab_stats["temporal"]
        assert temporal["broadcast"] > 0, (name, out.pab_stats)
        if sp > 1:
            assert comm["all_to_all_done"] == 2 * temporal["computed"]
            assert comm["all_to_all_skipped"] == 2 * temporal["broadcast"]
        if cfg > 1:
            assert comm["cfg_gather_bytes"] > 0
        summary[name] = comm
    return summary


@pytest.mark.parametrize(
    "sp,cfg",
    [(2, 1), pytest.param(3, 1, marks=pytest.mark.slow), (1, 2), pytest.param(2, 2, marks=pytest.mark.slow)],
    ids=["sp2", "sp3", "cfg2", "cfg2xsp2"],
)
def test_pipeline_under_dsp_matches_single_device(sp, cfg):
    results = launch_local(sp * cfg, _worker, sp, cfg, backend="gloo")
    for name in REQUESTS:  # the same communication on every rank (same PAB decisions, same splits)
        assert len({r[name]["all_to_all_done"] for r in results}) == 1


def _fp8_worker(rank: int, world: int, sp: int, cfg: int, name: str) -> list[bool]:
    """An fp8 request on a group runs the attentions' output projections in fp8 too, on rows every rank scales by
    the group's amax, so it lands where one device lands."""
    from pab.kernels import fp8 as kern
    from pab.precision import Fp8OutputHook

    ctx = init_parallel(ParallelConfig(sp=sp, cfg=cfg))
    request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, pab="paper", precision="fp8",
                                **REQUESTS[name])  # fmt: skip
    rows = []
    real = Fp8OutputHook.new_forward

    def spy(self, module, forward, x):
        rows.append(kern.companion(x.reshape(-1, x.shape[-1])) is not None)
        return real(self, module, forward, x)

    Fp8OutputHook.new_forward = spy
    ref = Pipeline.from_name(name, device="cpu", dtype=torch.float32).generate(request, decode=False)
    alone = list(rows)
    rows.clear()
    out = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx).generate(request, decode=False)
    scale = max(1.0, ref.latents.abs().max().item())
    torch.testing.assert_close(out.latents, ref.latents, atol=1e-5 * scale, rtol=1e-5)
    assert sum(alone) > 0 and sum(rows) == sum(alone), (sum(rows), sum(alone))  # the same calls ran on rows
    return rows


@pytest.mark.parametrize("name", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
def test_fp8_output_projections_under_dsp_match_single_device(name):
    results = launch_local(2, _fp8_worker, 2, 1, name, backend="gloo")
    assert all(r == results[0] for r in results)


def _cfg_split_fp8_worker(rank: int, world: int) -> tuple[float, float]:
    """CFG halves on two ranks, fp8: (how far the video lands from one device's with the output projections in bf16,
    and in fp8). A batch of one rounds a few values across an e4m3 boundary that a batch of two does not (float32
    GEMMs block differently), so under a CFG split fp8 lands ~1e-3 away here whatever the projections run in; with
    them in fp8 on the group's amax it lands 1.7e-6 away, and on each rank's own amax (no all-reduce) 1.2e-2."""
    ctx = init_parallel(ParallelConfig(cfg=2))
    name = "opensora-v1.2-tiny"
    request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, precision="fp8", num_frames=17,
                                height=48, width=80, steps=3)  # fmt: skip
    one = Pipeline.from_name(name, device="cpu", dtype=torch.float32)
    group = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx)
    gaps = {}
    for outputs in (True, False):  # True first: the hooks are attached by the first fp8 request's config
        one.fp8_config = group.fp8_config = Fp8Config(attention_outputs=outputs)
        ref, out = (p.generate(request, decode=False) for p in (one, group))
        gaps[outputs] = float((out.latents - ref.latents).abs().max())
    return gaps[False], gaps[True]


def test_a_cfg_split_group_scales_its_fp8_outputs_as_one_device():
    """The projections in fp8 take a CFG-split group no further from one device than fp8 already is."""
    without, with_outputs = launch_local(2, _cfg_split_fp8_worker, backend="gloo")[0]
    assert with_outputs <= 1.5 * without + 1e-6, (without, with_outputs)


TEACACHE = {"policy": "teacache", "threshold": 0.6, "coefficients": [3.0, -1.0, 0.5]}


def _step_reuse_worker(rank: int, world: int, sp: int, cfg: int) -> dict:
    ctx = init_parallel(ParallelConfig(sp=sp, cfg=cfg))
    summary = {}
    for name in ("opensora-v1.2-tiny", "latte-1-tiny"):
        request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, cache=TEACACHE, **REQUESTS[name])
        ref = Pipeline.from_name(name, device="cpu", dtype=torch.float32).generate(request)
        out = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx).generate(request)
        # The decision sums its norms over the group: every rank reuses the steps one device reuses.
        assert out.cache_stats == ref.cache_stats and ref.cache_stats["reused"] > 0, (name, ref.cache_stats)
        scale = max(1.0, ref.latents.abs().max().item())
        torch.testing.assert_close(out.latents, ref.latents, atol=1e-5 * scale, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")  # fmt: skip
        comm = out.parallel["comm"]
        if sp > 1:  # a reused step runs no block, so none of its all-to-alls
            per_step = comm["all_to_all_done"] // out.cache_stats["computed"]
            assert comm["all_to_all_skipped_by_step_reuse"] == per_step * out.cache_stats["reused"] > 0
        summary[name] = out.cache_stats["reused_steps"]
    return summary


@pytest.mark.parametrize("sp,cfg", [(2, 1), (1, 2)], ids=["sp2", "cfg2"])
def test_step_reuse_under_dsp_matches_single_device(sp, cfg):
    results = launch_local(sp * cfg, _step_reuse_worker, sp, cfg, backend="gloo")
    assert all(r == results[0] for r in results)


def _graphs_and_fp8_worker(rank: int, world: int) -> dict:
    """The CUDA-graph bookkeeping (pab.cudagraph's eager backend: keys, arena, replayed effects) and fp8 requests
    on a DSP group: the code path a group of GPUs takes, against one device without either."""
    ctx = init_parallel(ParallelConfig(sp=world))
    summary = {}
    for name in ("opensora-v1.2-tiny", "latte-1-tiny"):
        size = REQUESTS[name]
        for precision in ("bf16", "fp8"):
            request = GenerationRequest(model=name, prompt="a red fox in snow", seed=3, pab="paper",
                                        precision=precision, **size)  # fmt: skip
            one = Pipeline.from_name(name, device="cpu", dtype=torch.float32)
            # CUDA graphs run the attentions' output projections in bf16 (Pipeline._fp8_request_config): so does
            # the reference here
            one.fp8_config = replace(one.fp8_config, attention_outputs=False)
            ref = one.generate(request, decode=False)
            eager = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx)
            comm = eager.generate(request, decode=False).parallel["comm"]  # what the group sends without graphs
            pipe = Pipeline.from_name(name, device="cpu", dtype=torch.float32, parallel=ctx,
                                      engine=EngineOptions(cuda_graphs=True))  # fmt: skip
            first, again = (pipe.generate(request, decode=False) for _ in range(2))  # capture, then replay only
            scale = max(1.0, ref.latents.abs().max().item())
            for out in (first, again):
                torch.testing.assert_close(out.latents, ref.latents, atol=1e-5 * scale, rtol=1e-5,
                                           msg=lambda m: f"{name} {precision}: {m}")  # fmt: skip
                assert out.pab_stats == ref.pab_stats and out.precision == ref.precision
                # A replay sends what the captured forward sent; its counts come back as recorded effects.
                assert out.parallel["comm"] == comm and comm["all_to_all_done"] > 0
            stats = pipe.graphs.stats
            assert stats["captures"] > 0 and stats["replays"] > len(ref.timesteps), stats
            summary[f"{name}/{precision}"] = stats["graphs"]
    return summary


def test_graphs_and_fp8_under_dsp_match_single_device():
    results = launch_local(2, _graphs_and_fp8_worker, backend="gloo")
    assert results[0] == results[1]  # the same patterns captured on every rank
