"""Dynamic sequence parallelism (DSP) and CFG parallelism for the video DiTs, applied from outside.

    ctx = init_parallel(ParallelConfig(sp=2))      # every rank of the group
    parallelize_model(model, ctx)                  # before apply_pab
    out = model(...)                               # same inputs and output as one device

See docs/parallel.md for the design and communication volumes.
"""

from pab.parallel.context import CommStats, ParallelConfig, ParallelContext, init_parallel
from pab.parallel.dsp import (
    DSP_ENTRY_HOOK,
    DSP_POSITION_HOOK,
    DSP_SWITCH_HOOK,
    DSPHandle,
    DSPPlan,
    apply_dsp,
    remove_dsp,
)
from pab.parallel.launch import LaunchError, launch_local
from pab.parallel.plans import parallelize_model, plan_for, unparallelize_model

__all__ = [
    "CommStats",
    "DSPHandle",
    "DSPPlan",
    "DSP_ENTRY_HOOK",
    "DSP_POSITION_HOOK",
    "DSP_SWITCH_HOOK",
    "LaunchError",
    "ParallelConfig",
    "ParallelContext",
    "apply_dsp",
    "init_parallel",
    "launch_local",
    "parallelize_model",
    "plan_for",
    "remove_dsp",
    "unparallelize_model",
]
