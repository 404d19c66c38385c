"""Per-model DSP plans and `parallelize_model`, the one entry point the pipeline and actors call.

Each plan says, as data, which forward inputs carry frames (split along T), what the prediction is
(gathered along T) and which submodules hold a 1-D temporal position table. Temporal-attention
modules come from the model's own `broadcast_targets()["temporal"]`, the seam PAB uses too. Plans are
looked up by class name so this file imports no model code.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.nn as nn

from pab.parallel.context import ParallelContext
from pab.parallel.dsp import DSPHandle, DSPPlan, apply_dsp, remove_dsp

logger = logging.getLogger(__name__)


def _stdit3_plan(model: nn.Module) -> DSPPlan:
    # Open-Sora 1.2 STDiT3.forward(x, timestep, y, mask, x_mask, fps, height, width).
    # Temporal attention gets its RoPE positions from the full T it sees after the switch, so no
    # position module is needed. x_mask (B, T) selects t or t0 modulation per frame: split with x.
    if model.patch_size[0] != 1:
        raise NotImplementedError(
            f"DSP splits STDiT3 frames one latent frame at a time; temporal patch size {model.patch_size[0]} "
            f"would need splits on patch boundaries"
        )
    return DSPPlan(
        video_input="x",
        frame_dim=2,
        frame_inputs={"x_mask": 1},
        output_index=None,
        output_frame_dim=2,
    )


def _latte_plan(model: nn.Module) -> DSPPlan:
    # Latte-1 LatteTransformer3DModel.forward(hidden_states, timestep, encoder_hidden_states,
    # encoder_attention_mask=None, enable_temporal_attentions=True, return_dict=False) -> (out,).
    # The frame table `temp_pos_embed` is added before the first temporal block; each rank adds its own
    # rows (and "no table for a one-frame clip" is decided on the full clip). The text mask may be an
    # additive bias with one row per (sample, frame), b·F + f, which is split like the frames.
    return DSPPlan(
        video_input="hidden_states",
        frame_dim=2,
        flat_frame_inputs={"encoder_attention_mask": 0},
        output_index=0,
        output_frame_dim=2,
        position_modules=("temp_pos_embed",),
        temporal_flag="enable_temporal_attentions",
    )


def _opensora_plan_plan(model: nn.Module) -> DSPPlan:
    # Open-Sora-Plan v1.1 LatteT2V.forward(hidden_states, timestep, encoder_hidden_states,
    # added_cond_kwargs=None, encoder_attention_mask=None, use_image_num=0, enable_temporal_attentions=True,
    # return_dict=False) -> (out,). Latte's layout; its text mask is per sample only (nothing per frame).
    return DSPPlan(
        video_input="hidden_states",
        frame_dim=2,
        output_index=0,
        output_frame_dim=2,
        position_modules=("temp_pos_embed",),
        temporal_flag="enable_temporal_attentions",
        required={"use_image_num": (0, "image frames appended after the video would be split as video frames")},
    )


_PLANS: dict[str, Callable[[nn.Module], DSPPlan]] = {
    "STDiT3": _stdit3_plan,
    "LatteTransformer3DModel": _latte_plan,
    "LatteT2V": _opensora_plan_plan,
}


def plan_for(model: nn.Module) -> DSPPlan:
    """The DSP plan of `model`'s class (or of its closest base class that has one)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _PLANS:
            return _PLANS[cls.__name__](model)
    raise NotImplementedError(
        f"no sequence-parallel plan for {type(model).__name__}; known models: {sorted(_PLANS)} "
        f"(pass plan= to parallelize_model for others)"
    )


def parallelize_model(model: nn.Module, ctx: ParallelContext, plan: DSPPlan | None = None) -> DSPHandle:
    """Apply DSP (the frames of one video over the `ctx.sp_size` ranks of `ctx.sp_group`) to `model` in place.

    Call on every rank of the group, before `apply_pab`. Afterwards every rank of an sp group calls the
    model with the same inputs (all frames) and gets the same full output as one device would. With
    `sp == 1` the model is left untouched. Undo with `unparallelize_model`.

    CFG parallelism (`ctx.cfg_size == 2`) is the caller's loop: feed the model `ctx.split_cfg(batch)` (this
    sub-group's half of the [cond, uncond] batch) and reassemble with `ctx.gather_cfg(pred)`.

    Args:
        model (`nn.Module`): STDiT3, LatteTransformer3DModel or LatteT2V (or any model with `plan`).
        ctx (`ParallelContext`): from `init_parallel`.
        plan (`DSPPlan`, *optional*): overrides the plan looked up from the model class.

    Example:
        ```python
        ctx = init_parallel(ParallelConfig(sp=2, cfg=2))   # 4 processes
        parallelize_model(model, ctx)
        apply_pab(model, PABConfig.preset("opensora-v1.2", "paper"))
        pred = ctx.gather_cfg(model(ctx.split_cfg(x2), ctx.split_cfg(t2), ctx.split_cfg(y2), ...))
        ```
    """
    plan = plan if plan is not None else plan_for(model)
    handle = apply_dsp(model, ctx, plan)
    if ctx.is_parallel:
        logger.info(
            "parallelized %s: sp=%d (rank %d), cfg=%d (rank %d), %d temporal switches, %d position tables",
            type(model).__name__, ctx.sp_size, ctx.sp_rank, ctx.cfg_size, ctx.cfg_rank,
            len(handle.temporal_modules), len(handle.position_modules),
        )  # fmt: skip
    return handle


def unparallelize_model(model: nn.Module) -> int:
    """Remove the DSP/CFG-parallel hooks from `model`; returns how many were removed."""
    return remove_dsp(model)
