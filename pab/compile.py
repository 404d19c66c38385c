"""torch.compile for the DiTs, attached from outside like PAB and DSP, and removable.

What is compiled, and why this way:

* **Each broadcast target** (`model.broadcast_targets()`: spatial/temporal/cross attention by default)
  gets a hook that calls a `torch.compile`d version of the module's own forward. The hook is inserted
  *innermost* in the module's hook chain, so the DSP all-to-all and the PAB cache decision around it
  stay plain eager Python: their dict/contextvar/state logic is never traced (no graph breaks, no
  recompiles when the step changes) and a broadcast step still skips the compiled call entirely.
* **The elementwise glue between the targets** - the norm + modulate before an attention, the gate +
  residual after it - is named by the block class in `compile_regions` (e.g. STDiT3Block's `attn_in`,
  `attn_out`, `mlp_in`, `mlp_out`). Each named method is replaced *on the instance* by its compiled
  version. These are memory-bound passes over the whole (B, T·S, C) hidden state; compiled, each one is a
  single fused kernel.

One compiled function is made per Python function and shared by every block: Dynamo treats module
parameters as graph inputs, so the 28 blocks of a kind share one graph instead of compiling 28.

Order: apply sequence parallelism first (it refuses modules that already carry hooks), then
`apply_compile`, PAB before or after it (the compile hook always goes innermost).

CUDA-graph modes ("reduce-overhead", "max-autotune") are refused: a CUDA-graph replay writes its outputs
into the same memory every time, while PAB keeps an attention's output across denoising steps and would
read it back overwritten. Use "max-autotune-no-cudagraphs" for autotuned kernels.

Example:
    handle = apply_compile(model)            # or apply_compile(model, mode="max-autotune-no-cudagraphs")
    ... model(...) ...                       # first call at a new shape compiles (tens of seconds)
    remove_compile(model)                    # back to the eager model
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from pab.hooks.registry import ModelHook, get_registry, remove_hooks_named

COMPILE_HOOK = "compile"
DEFAULT_KINDS = ("spatial", "temporal", "cross")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_REGIONS_ATTR = "_pab_compiled_regions"  # instance attribute: names of methods replaced on that instance

# (function, mode, options) -> compiled function, shared by every module that uses that function.
_COMPILED: dict[tuple, Callable[..., Any]] = {}


def _compiled(fn: Callable[..., Any], mode: str | None, options: dict[str, Any]) -> Callable[..., Any]:
    key = (fn, mode, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode=mode, **options)
    return _COMPILED[key]


class CompileHook(ModelHook):
    """Innermost hook: runs the compiled version of the module's own forward."""

    name = COMPILE_HOOK

    def __init__(self, compiled_forward: Callable[..., Any]) -> None:
        self.compiled_forward = compiled_forward  # called as f(module, *args, **kwargs)

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # `forward` is the module's own forward (this hook is innermost); the compiled one replaces it.
        return self.compiled_forward(module, *args, **kwargs)


def _register_innermost(module: nn.Module, hook: ModelHook) -> None:
    """Put `hook` first in the module's chain, under hooks (DSP, PAB) that may already be registered."""
    registry = get_registry(module)
    if any(h.name == hook.name for h in registry.hooks):
        raise ValueError(f"{type(module).__name__} is already compiled; call remove_compile(model) first")
    registry.register(hook, innermost=True)


def _own_forward(module: nn.Module) -> Callable[..., Any]:
    """The plain function behind the module's forward, called as f(module, *args)."""
    registry = get_registry(module)
    original = registry.original_forward  # captured before any hook wrapped it
    func = getattr(original, "__func__", None)
    if func is not None and getattr(original, "__self__", None) is module:
        return func
    return lambda _module, *a, **k: original(*a, **k)  # an instance-level forward someone set: keep it


@dataclass
class CompileHandle:
    """What `apply_compile` attached; `remove()` restores the eager model."""

    model: nn.Module
    mode: str | None
    hooked: list[nn.Module] = field(default_factory=list)
    regions: dict[str, int] = field(default_factory=dict)  # region name -> instances replaced

    def remove(self) -> int:
        return remove_compile(self.model)


def apply_compile(
    model: nn.Module,
    mode: str | None = None,
    *,
    kinds: Iterable[str] = DEFAULT_KINDS,
    regions: bool = True,
    **options: Any,
) -> CompileHandle:
    """Compile the heavy parts of `model` in place; outputs keep their shapes and (up to rounding) values.

    Args:
        model: a model with `broadcast_targets()` (STDiT3, Latte, Open-Sora-Plan).
        mode: torch.compile mode (None = default). CUDA-graph modes are refused (see the module doc).
        kinds: which broadcast-target kinds to compile ("mlp" is off by default: on CUDA it is two GEMMs
            with the GELU already in the first one's epilogue, so compiling adds nothing).
        regions: also compile the methods each module class lists in `compile_regions`.
        options: passed to torch.compile (e.g. dynamic=False, fullgraph=True, options={...}).
    """
    if mode in _CUDAGRAPH_MODES:
        raise ValueError(
            f"mode={mode!r} replays CUDA graphs, whose outputs are overwritten by the next replay; PAB keeps "
            "outputs across steps. Use None or 'max-autotune-no-cudagraphs'."
        )
    if not hasattr(model, "broadcast_targets"):
        raise TypeError(f"{type(model).__name__} does not declare broadcast_targets(); nothing to compile")
    targets = model.broadcast_targets()
    unknown = set(kinds) - set(targets)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; {type(model).__name__} has {sorted(targets)}")
    handle = CompileHandle(model=model, mode=mode)
    for kind in kinds:
        for module in targets[kind]:
            _register_innermost(module, CompileHook(_compiled(_own_forward(module), mode, options)))
            handle.hooked.append(module)
    if regions:
        for module in model.modules():
            names = getattr(type(module), "compile_regions", ())
            if not names or _REGIONS_ATTR in module.__dict__:
                continue
            for name in names:
                fn = getattr(type(module), name)
                # An instance attribute shadows the class method; the compiled function is shared.
                module.__dict__[name] = functools.partial(_compiled(fn, mode, options), module)
                handle.regions[name] = handle.regions.get(name, 0) + 1
            module.__dict__[_REGIONS_ATTR] = tuple(names)
    return handle


def remove_compile(model: nn.Module) -> int:
    """Remove every compile hook and compiled region from `model`; returns how many were removed."""
    removed = remove_hooks_named(model, COMPILE_HOOK)
    for module in model.modules():
        for name in module.__dict__.pop(_REGIONS_ATTR, ()):
            module.__dict__.pop(name, None)
            removed += 1
    return removed


def is_compiled(model: nn.Module) -> bool:
    """True if `apply_compile` left anything on `model`."""
    for m in model.modules():
        registry = get_registry(m, create=False)
        if _REGIONS_ATTR in m.__dict__ or (registry is not None and registry.get(COMPILE_HOOK) is not None):
            return True
    return False


__all__ = ["COMPILE_HOOK", "CompileHandle", "CompileHook", "apply_compile", "remove_compile", "is_compiled"]
