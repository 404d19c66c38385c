"""Per-model DSP plans and `parallelize_model`, the one entry point the pipeline and actors call.

Each plan (written in the model's family adapter, pab/families/) says, as data, which forward inputs carry
frames (split along T), what the prediction is (gathered along T) and which submodules hold a 1-D temporal
position table. Temporal-attention modules come from the model's own `broadcast_targets()["temporal"]`, the
seam PAB uses too. Plans are found by the transformer's class name, so this file imports no model code.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from pab.parallel.context import ParallelContext
from pab.parallel.dsp import DSPHandle, DSPPlan, apply_dsp, remove_dsp

logger = logging.getLogger(__name__)


def plan_for(model: nn.Module) -> DSPPlan:
    """The DSP plan of `model`'s class (or of its closest base class that has one), from its family."""
    from pab.families import FAMILIES

    by_class = {f.spec.transformer.cls: f for f in FAMILIES.values()}
    for cls in type(model).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__].dsp_plan(model)
    raise NotImplementedError(
        f"no sequence-parallel plan for {type(model).__name__}; known models: {sorted(by_class)} "
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
