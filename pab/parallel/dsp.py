"""Dynamic sequence parallelism (DSP) attached to a plain video DiT from outside, as removable hooks.

A spatial-temporal DiT attends over space (tokens of one frame) and over time (one token position
across frames) in alternating modules; everything else is token-local. DSP (Zhao et al., 2024,
arXiv:2403.10266) therefore splits the video along T and only re-shards around temporal attention:

    model entry      split the latent (B, C, T, H, W) and every per-frame input along T   (no comm)
    spatial / cross / MLP on the local frames, unchanged                                  (no comm)
    temporal attn    (B·S, T_local, C) --all-to-all--> (B·S/N, T, C) -> attn -> all-to-all back
    model exit       all-gather the output along T (every rank gets the whole prediction)

Three hooks do this, registered with `pab.hooks.registry` under the names below:

* `DSPEntryHook` on the model: frame split, output gather, stats.
* `DSPSwitchHook` on each temporal-attention module (from `model.broadcast_targets()["temporal"]`). A module
  with `accepts_frame_blocks = True` gets its sequences in the layout they arrive in when T divides evenly,
  (B·S/N, N, T/N, C), and answers in it, which saves both switches their reordering copy.
* `DSPFramePositionHook` on each 1-D temporal position module (e.g. Latte's `temp_pos_embed`), so that
  rank r adds the rows of its own frames `[start_r, start_r + count_r)` of the full clip's table.

What is split and gathered is data in a per-model `DSPPlan` (see `pab.parallel.plans`).

**PAB.** Apply DSP first, PAB second: the PAB hook then wraps the switch hook, and a broadcast temporal
attention returns its cached local-layout output without entering the switch, so both all-to-alls are
skipped. Every rank reaches the same decision without communicating, because the PAB rule depends only
on the step index and timestep, which all ranks share.

**Counting skipped all-to-alls.** The entry hook knows how many temporal modules the model has and
(through the plan's `temporal_flag`) whether this forward runs temporal attention at all; each switch
hook records that it ran. After the forward, `skipped += 2 * (temporal modules - switches that ran)`.
This needs nothing from PAB, so it also counts skips made by any other caching hook.

Inference only: the collectives carry no gradients.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from pab.hooks.registry import ModelHook, get_registry, register_hook, remove_hooks_named
from pab.parallel.comm import FrameLayout, FrameShard, even_frames, even_sizes
from pab.parallel.context import ParallelContext

DSP_ENTRY_HOOK = "dsp_entry"
DSP_SWITCH_HOOK = "dsp_temporal_switch"
DSP_POSITION_HOOK = "dsp_frame_positions"
_HOOK_NAMES = (DSP_ENTRY_HOOK, DSP_SWITCH_HOOK, DSP_POSITION_HOOK)


@dataclass(frozen=True)
class DSPPlan:
    """Data-only description of how DSP wraps one model class.

    Args:
        video_input (`str`): forward argument holding the latent video; its `frame_dim` is split.
        frame_dim (`int`): the T dim of `video_input` (2 for (B, C, T, H, W)).
        frame_inputs (`Mapping[str, int]`): other per-frame arguments and their T dim, e.g. `{"x_mask": 1}`.
        flat_frame_inputs (`Mapping[str, int]`): arguments with one dim that folds (batch, frame)
            sample-major (row b·T + t), e.g. an attention bias of shape (B·T, 1, L). Split only when that
            dim has size B·T; other forms of the argument (per sample) are passed on unchanged.
        output_index (`int`, *optional*): `None` if the forward returns the prediction tensor, else its
            index in the returned tuple.
        output_frame_dim (`int`): the T dim of the prediction.
        position_modules (`tuple[str, ...]`): names of submodules that add a 1-D temporal table to
            (B·S, T, C) tokens, called by the model as `x = module(x)` and accepting
            `module(x, frame_offset=, num_frames=)`; each rank adds its own frames' rows.
        temporal_flag (`str`, *optional*): boolean forward argument that switches temporal attention
            off (Latte's `enable_temporal_attentions`); used only for counting skipped all-to-alls.
        required (`Mapping[str, Any]`): arguments that must have this value under DSP, with the reason,
            e.g. `{"use_image_num": (0, "image frames would be split like video frames")}`.
    """

    video_input: str
    frame_dim: int = 2
    frame_inputs: Mapping[str, int] = field(default_factory=dict)
    flat_frame_inputs: Mapping[str, int] = field(default_factory=dict)
    output_index: int | None = None
    output_frame_dim: int = 2
    position_modules: tuple[str, ...] = ()
    temporal_flag: str | None = None
    required: Mapping[str, tuple[Any, str]] = field(default_factory=dict)


class _DSPRun:
    """State shared by the hooks of one parallelized model while one forward runs."""

    def __init__(self, ctx: ParallelContext, plan: DSPPlan, num_temporal: int) -> None:
        self.ctx = ctx
        self.plan = plan
        self.num_temporal = num_temporal
        self.shard: FrameShard | None = None  # this rank's frames while a forward runs
        self.switches = 0


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


class DSPEntryHook(ModelHook):
    """Split the per-frame inputs at model entry and gather the prediction along T at exit."""

    name = DSP_ENTRY_HOOK

    def __init__(self, run: _DSPRun, signature: inspect.Signature) -> None:
        self.run = run
        self.signature = signature

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        run, ctx, plan = self.run, self.run.ctx, self.run.plan
        bound = self.signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        for name, (value, reason) in plan.required.items():
            if name in a and a[name] != value:
                raise ValueError(f"{type(module).__name__} under sequence parallelism needs {name}={value!r} "
                                 f"({reason}); got {a[name]!r}")
        video = a[plan.video_input]
        if not _is_tensor(video):
            raise TypeError(f"{plan.video_input} must be a tensor, got {type(video).__name__}")

        # Entry: this rank's frames of every per-frame input.
        batch = video.size(0)
        temporal_on = plan.temporal_flag is None or bool(a.get(plan.temporal_flag, True))
        shard = FrameShard(FrameLayout(video.size(plan.frame_dim), ctx.sp_size), ctx.sp_rank, ctx.sp_group, ctx.stats)
        a[plan.video_input] = shard.split(video, plan.frame_dim)
        for name, dim in plan.frame_inputs.items():
            if _is_tensor(a.get(name)):
                a[name] = shard.split(a[name], dim)
        for name, dim in plan.flat_frame_inputs.items():
            value = a.get(name)
            if _is_tensor(value) and value.ndim > dim and value.size(dim) == batch * shard.layout.num_frames:
                a[name] = shard.split_flat(value, dim, batch)
        run.shard, run.switches = shard, 0
        try:
            out = forward(*bound.args[1:], **bound.kwargs)
        finally:
            run.shard = None

        # Exit: the whole prediction on every rank.
        ctx.stats.forwards += 1
        pred = out if plan.output_index is None else out[plan.output_index]
        if not _is_tensor(pred):
            raise TypeError(
                f"{type(module).__name__} returned {type(out).__name__}; sequence parallelism gathers a tensor "
                f"(output_index={plan.output_index}); call it with return_dict=False"
            )
        if temporal_on:
            ctx.stats.all_to_all_skipped += 2 * max(run.num_temporal - run.switches, 0)
        pred = shard.gather(pred, plan.output_frame_dim)
        if plan.output_index is None:
            return pred
        out = list(out)
        out[plan.output_index] = pred
        return tuple(out)


class DSPSwitchHook(ModelHook):
    """Around one temporal attention: all-to-all to full T, call it, all-to-all back to local frames."""

    name = DSP_SWITCH_HOOK

    def __init__(self, run: _DSPRun) -> None:
        self.run = run

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:  # fmt: skip
        run, shard = self.run, self.run.shard
        if shard is None:  # called outside a parallel forward (e.g. a block used on its own)
            return forward(x, *args, **kwargs)
        extra = [k for k, v in [*enumerate(args), *kwargs.items()] if _is_tensor(v)]
        if extra:
            raise NotImplementedError(
                f"DSP switches only the token tensor of {type(module).__name__}; it was also given tensor "
                f"argument(s) {extra}, whose rows would need the same re-sharding"
            )
        local_len = shard.layout.local_len(shard.rank)
        if x.ndim < 3 or x.size(1) != local_len:
            raise ValueError(f"temporal attention input must be (B·S, T_local={local_len}, C) on sp rank "
                             f"{shard.rank}, got {tuple(x.shape)}")  # fmt: skip
        rows = x.size(0)
        run.switches += 1
        chunks = [c for c in even_sizes(rows, min(run.ctx.config.overlap_chunks, rows)) if c]
        if len(chunks) == 1:
            # Frame blocks where the module reads them: (rows_r, N, T/N, C) as received, no reordering copies.
            blocks = bool(getattr(module, "accepts_frame_blocks", False)) and even_frames(shard.layout)
            y = forward(shard.start_to_full(x, blocks=blocks)(), *args, **kwargs)  # (rows_r, T, C), or frame blocks
            return shard.start_to_local(y, rows, blocks=blocks)()
        # Rows are independent sequences: switch and attend them in chunks, starting chunk k+1's all-to-all
        # before chunk k's attention so the two overlap; each chunk's result lands in its rows of `out`.
        has_frames = shard.count > 0
        out = x.new_empty(rows, shard.count, *x.shape[2:]) if has_frames else None
        pieces = x.split(chunks, dim=0)
        pending_in, pending_out, first = [shard.start_to_full(pieces[0])], [], 0
        for k, n in enumerate(chunks):
            if k + 1 < len(chunks):
                pending_in.append(shard.start_to_full(pieces[k + 1], count=False))  # a chunked switch counts once
            y = forward(pending_in[k](), *args, **kwargs)
            dst = out.narrow(0, first, n) if out is not None else None
            pending_out.append(shard.start_to_local(y, n, out=dst, count=k == 0))
            first += n
        results = [finish() for finish in pending_out]
        return out if has_frames else torch.cat(results, dim=0)  # no frames: zero pad frames


class DSPFramePositionHook(ModelHook):
    """Make a temporal position module add the rows of this rank's frames, not rows 0..T_local-1.

    The module's documented interface (e.g. Latte's `TemporalPosEmbed`) is
    `forward(x, frame_offset=0, num_frames=None)`: `x` holds frames [frame_offset, frame_offset + F) of a
    clip of `num_frames` frames. The hook passes this rank's range of the full clip, so decisions that
    depend on the clip length (Latte adds no table to a one-frame clip) are taken on the full T.
    """

    name = DSP_POSITION_HOOK

    def __init__(self, run: _DSPRun) -> None:
        self.run = run

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:  # fmt: skip
        shard = self.run.shard
        if shard is None:
            return forward(x, *args, **kwargs)
        if args or kwargs:
            raise NotImplementedError(
                f"{type(module).__name__} was called with a frame range already; DSP sets it itself"
            )
        if shard.count == 0:  # only a pad frame here: its value never leaves this rank
            return x
        return forward(x, frame_offset=shard.layout.starts[shard.rank], num_frames=shard.layout.num_frames)


@dataclass
class DSPHandle:
    """What `apply_dsp` attached to a model; `remove()` restores the plain model."""

    model: nn.Module
    ctx: ParallelContext
    plan: DSPPlan
    temporal_modules: list[nn.Module]
    position_modules: list[nn.Module]

    def remove(self) -> None:
        remove_dsp(self.model)


def _temporal_modules(model: nn.Module) -> list[nn.Module]:
    if not hasattr(model, "broadcast_targets"):
        raise TypeError(
            f"{type(model).__name__} does not declare broadcast_targets(); DSP needs its temporal-attention modules"
        )
    seen, modules = set(), []
    for m in model.broadcast_targets().get("temporal", []):
        if id(m) not in seen:
            seen.add(id(m))
            modules.append(m)
    return modules


def _check_no_outer_hooks(module: nn.Module, what: str) -> None:
    registry = get_registry(module, create=False)
    if registry is not None and registry.hooks:
        names = [h.name for h in registry.hooks]
        raise RuntimeError(
            f"{what} already has hooks {names}; apply sequence parallelism before PAB (or any caching hook) so "
            f"that a broadcast attention also skips the all-to-all: remove_pab(model), parallelize_model(model, "
            f"ctx), then apply_pab(model, config)"
        )


def apply_dsp(model: nn.Module, ctx: ParallelContext, plan: DSPPlan) -> DSPHandle:
    """Attach DSP over `ctx.sp_group` to `model` following `plan`.

    Args:
        model (`nn.Module`): a plain single-device model with `broadcast_targets()`.
        ctx (`ParallelContext`): from `init_parallel`.
        plan (`DSPPlan`): what to split and gather.

    Every rank of the sequence-parallel group must call the model with the same inputs (all frames);
    each gets the full prediction back. CFG parallelism is not done here: the caller feeds each CFG
    sub-group its half with `ctx.split_cfg` and reassembles with `ctx.gather_cfg`. Apply before PAB.

    Example:
        ```python
        ctx = init_parallel(ParallelConfig(sp=2))
        handle = apply_dsp(model, ctx, DSPPlan(video_input="x", frame_inputs={"x_mask": 1}))
        out = model(x, ...)     # same as the single-device model
        handle.remove()
        ```
    """
    temporal = _temporal_modules(model)
    named = dict(model.named_modules())
    positions = []
    for name in plan.position_modules:
        if name not in named:
            raise ValueError(f"{type(model).__name__} has no submodule {name!r} named in its DSP plan")
        positions.append(named[name])
    handle = DSPHandle(model=model, ctx=ctx, plan=plan, temporal_modules=temporal, position_modules=positions)
    if ctx.sp_size == 1:
        return handle  # no frames to split (CFG parallelism alone needs no hook): the model stays untouched
    if get_registry(model, create=False) is not None and get_registry(model).get(DSP_ENTRY_HOOK) is not None:
        raise ValueError(
            f"{type(model).__name__} is already parallelized (a hook named {DSP_ENTRY_HOOK!r} is registered); "
            f"call unparallelize_model(model) first"
        )
    _check_no_outer_hooks(model, type(model).__name__)
    for m in temporal + positions:
        _check_no_outer_hooks(m, f"{type(model).__name__}.{_name_of(model, m)}")
    signature = inspect.signature(type(model).forward)
    run = _DSPRun(ctx, plan, num_temporal=len(temporal))
    register_hook(model, DSPEntryHook(run, signature))
    for m in temporal:
        register_hook(m, DSPSwitchHook(run))
    for m in positions:
        register_hook(m, DSPFramePositionHook(run))
    return handle


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def remove_dsp(model: nn.Module) -> int:
    """Remove every DSP hook from `model`; returns how many were removed."""
    return sum(remove_hooks_named(model, name) for name in _HOOK_NAMES)
