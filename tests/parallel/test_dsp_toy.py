"""DSP on a toy spatial-temporal DiT equals one device: gloo, 2 and 3 processes, CFG parallel, PAB.

Tolerance: 1e-5 absolute and relative in float32. DSP moves values without arithmetic; the only
differences come from temporal attention running on a different number of rows per call, which can
change how BLAS blocks its matmuls (last-bit rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from parallel_toy import TOY_PLAN, cfg_call, toy_inputs, toy_model

from pab.hooks.registry import get_registry
from pab.parallel import (
    DSP_ENTRY_HOOK,
    DSP_POSITION_HOOK,
    DSP_SWITCH_HOOK,
    DSPPlan,
    ParallelConfig,
    ParallelContext,
    init_parallel,
    launch_local,
    parallelize_model,
    unparallelize_model,
)
from pab.parallel.dsp import apply_dsp

TOL = dict(atol=1e-5, rtol=1e-5)
# (batch, frames, height, width): odd and even frame counts, fewer frames than ranks, one frame,
# non-square sizes, batch 1.
CASES = [(2, 5, 3, 4), (1, 7, 2, 5), (2, 2, 4, 3), (2, 1, 3, 2), (1, 6, 5, 3)]


def _equivalence_worker(rank: int, world: int, sp: int, cfg: int) -> dict:
    ctx = init_parallel(ParallelConfig(sp=sp, cfg=cfg))
    model = toy_model()
    checked = 0
    for B, T, H, W in CASES:
        if cfg == 2 and B % 2:
            B *= 2
        inputs = toy_inputs(B, T, H, W)
        with torch.no_grad():
            ref = model(**inputs)
            ref_no_mask = model(inputs["x"], inputs["timestep"], inputs["text"])
            parallelize_model(model, ctx, plan=TOY_PLAN)
            before = ctx.stats.as_dict()
            out = cfg_call(ctx, model, **inputs)
            x, t, text, frame_mask = inputs["x"], inputs["timestep"], inputs["text"], inputs["frame_mask"]
            out_positional = cfg_call(ctx, model, x, t, text, frame_mask)
            out_no_mask = cfg_call(ctx, model, x, t, text)
            after = ctx.stats.as_dict()
            assert unparallelize_model(model) == (4 if sp > 1 else 0)  # entry + 2 switches + table
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(out_positional, ref, **TOL)
        torch.testing.assert_close(out_no_mask, ref_no_mask, **TOL)
        # 2 temporal modules x 2 switches per forward, 3 forwards, nothing skipped without PAB
        expected_a2a = 3 * 2 * 2 if sp > 1 else 0
        assert after["all_to_all_done"] - before["all_to_all_done"] == expected_a2a
        assert after["all_to_all_skipped"] == before["all_to_all_skipped"]
        assert after["forwards"] - before["forwards"] == (3 if sp > 1 else 0)  # counted by the DSP entry hook
        if sp > 1:
            assert after["gather_bytes"] > before["gather_bytes"]
        if cfg > 1:
            assert after["cfg_gather_bytes"] > before["cfg_gather_bytes"]
        checked += 1
    # the model is plain again: no hooks left anywhere
    assert all(not (r := get_registry(m, create=False)) or not r.hooks for m in model.modules())
    return {"checked": checked}




def _pab_worker(rank: int, world: int, sp: int, cfg: int) -> dict:
    from pab.broadcast import PABConfig, PABState, apply_pab, remove_pab, use_state

    ctx = init_parallel(ParallelConfig(sp=sp, cfg=cfg))
    model = toy_model()
    config = PABConfig.preset("latte-1", "paper")  # ranges 2/3/6 in (100, 800), MLP 3 in (350, 730)
    timesteps = torch.linspace(950, 50, 12).tolist()

    def denoise(x0, c):
        state, x = PABState(), x0.clone()
        inputs = toy_inputs(2, 5, 3, 4, seed=1)
        with torch.no_grad(), use_state(state):
            for i, t in enumerate(timesteps):
                state.begin_step(i, t)
                out = cfg_call(c, model, x, torch.full((2,), t), inputs["text"], inputs["frame_mask"])
                x = x - 0.05 * out[:, : x.shape[1]]
        return x, state

    x0 = toy_inputs(2, 5, 3, 4, seed=2)["x"]
    apply_pab(model, config)
    ref, ref_state = denoise(x0, ParallelContext(config=ParallelConfig()))  # one device
    remove_pab(model)

    parallelize_model(model, ctx, plan=TOY_PLAN)
    apply_pab(model, config)  # after DSP: a broadcast temporal attention skips both all-to-alls
    ctx.stats.reset()
    out, state = denoise(x0, ctx)
    torch.testing.assert_close(out, ref, **TOL)
    assert state.stats == ref_state.stats  # every rank took the single-device decisions
    temporal = state.stats["temporal"]
    assert temporal["broadcast"] > 0
    if sp > 1:
        assert ctx.stats.all_to_all_done == 2 * temporal["computed"]
        assert ctx.stats.all_to_all_skipped == 2 * temporal["broadcast"]
    # Removing PAB then DSP hands back the plain model.
    remove_pab(model)
    unparallelize_model(model)
    assert all(not (r := get_registry(m, create=False)) or not r.hooks for m in model.modules())
    return ctx.stats.as_dict()




def _worker(rank: int, world: int, sp: int, cfg: int) -> dict:
    # One launch per group shape runs both checks: starting processes dominates the run time.
    return {"plain": _equivalence_worker(rank, world, sp, cfg), "pab": _pab_worker(rank, world, sp, cfg)}


@pytest.mark.parametrize(
    "sp,cfg",
    [(2, 1), (3, 1), (1, 2), pytest.param(2, 2, marks=pytest.mark.slow)],
    ids=["sp2", "sp3", "cfg2", "cfg2xsp2"],
)
def test_toy_dsp_matches_single_device_with_and_without_pab(sp, cfg):
    out = launch_local(sp * cfg, _worker, sp, cfg, backend="gloo")  # CPU tensors, also on GPU hosts
    assert all(o["plain"]["checked"] == len(CASES) for o in out)
    assert len({o["pab"]["all_to_all_done"] for o in out}) == 1  # same PAB decisions on every rank


# ------------------------------------------------------------------------------------------------
# Attachment rules (one process; a fake 2-rank context never communicates before a forward)
# ------------------------------------------------------------------------------------------------


def _fake_ctx(sp: int = 2):
    return ParallelContext(config=ParallelConfig(sp=sp), rank=0, world_size=sp, sp_size=sp)


def test_dsp_hooks_go_on_the_model_temporal_modules_and_position_table():
    model = toy_model()
    handle = apply_dsp(model, _fake_ctx(), TOY_PLAN)
    assert get_registry(model).get(DSP_ENTRY_HOOK) is not None
    for block in model.blocks:
        assert get_registry(block.temporal).get(DSP_SWITCH_HOOK) is not None
        assert get_registry(block.spatial, create=False) is None
    assert get_registry(model.temp_pos_embed).get(DSP_POSITION_HOOK) is not None
    assert len(handle.temporal_modules) == 2 and handle.position_modules == [model.temp_pos_embed]
    with pytest.raises(ValueError, match="already parallelized"):
        apply_dsp(model, _fake_ctx(), TOY_PLAN)
    handle.remove()
    assert "forward" not in model.__dict__ and "forward" not in model.blocks[0].temporal.__dict__


def test_dsp_must_be_applied_before_pab():
    from pab.broadcast import PABConfig, apply_pab

    model = toy_model()
    apply_pab(model, PABConfig.preset("latte-1", "paper"))
    with pytest.raises(RuntimeError, match="apply sequence parallelism before PAB"):
        apply_dsp(model, _fake_ctx(), TOY_PLAN)


def test_single_device_context_leaves_the_model_untouched():
    model = toy_model()
    ctx = init_parallel(ParallelConfig())
    parallelize_model(model, ctx, plan=TOY_PLAN)
    assert all(get_registry(m, create=False) is None for m in model.modules())


def test_plan_errors_name_what_is_missing():
    model = toy_model()
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        apply_dsp(model, _fake_ctx(), DSPPlan(video_input="x", position_modules=("nope",)))
    with pytest.raises(TypeError, match="broadcast_targets"):
        apply_dsp(nn.Linear(2, 2), _fake_ctx(), DSPPlan(video_input="x"))
    with pytest.raises(NotImplementedError, match="no sequence-parallel plan for Linear"):
        parallelize_model(nn.Linear(2, 2), _fake_ctx())

