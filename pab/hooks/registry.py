"""A small, removable hook registry for `nn.Module`s.

Cross-cutting techniques (PAB, sequence parallelism) are attached to plain models from outside by
wrapping the `forward` of chosen submodules. Each technique is a `ModelHook` with a unique name;
hooks on one module form a chain, the one registered last being the outermost. Removing every hook
restores the module's own `forward`, so a model can be handed back unchanged.

Order matters and is deliberate: sequence parallelism registers its all-to-all around an attention
first, PAB registers after it, so a broadcast attention skips the communication too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch.nn as nn

_REGISTRY_ATTR = "_pab_hook_registry"
T = TypeVar("T")


class ModelHook:
    """One named behaviour wrapped around a module's forward.

    Subclasses override `new_forward`; `forward` is the next callable in the chain (the module's
    own forward, or the next inner hook).
    """

    name: str = "hook"
    reads_input: bool = True
    """Whether this hook may read the values of the module's input itself (send, keep or compare them) rather than
    only hand it on. A producer may skip writing what no reader needs (`passes_input_on`); unknown hooks read."""

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    def reuses_output(self, module: nn.Module) -> bool:
        """Whether this call of `module` would return a kept output without reading its input (`output_reused`)."""
        return False

    def on_attach(self, module: nn.Module) -> None:
        """Called once when the hook is registered on `module`."""

    def on_detach(self, module: nn.Module) -> None:
        """Called once when the hook is removed from `module`."""


class HookRegistry:
    """The ordered hooks of one module (innermost first)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # The bound forward of the class, captured before any wrapping.
        self._original_forward = module.forward
        self.hooks: list[ModelHook] = []

    def _rebuild(self) -> None:
        forward: Callable[..., Any] = self._original_forward
        for hook in self.hooks:
            forward = functools.partial(hook.new_forward, self.module, forward)
        if self.hooks:
            # An instance attribute shadows the class method, so nn.Module.__call__ picks it up.
            self.module.forward = forward
        elif "forward" in self.module.__dict__:
            del self.module.forward

    def register(self, hook: ModelHook, innermost: bool = False) -> None:
        if any(h.name == hook.name for h in self.hooks):
            raise ValueError(
                f"a hook named {hook.name!r} is already registered on {type(self.module).__name__}; "
                "remove it first (each technique may be applied once per module)"
            )
        if innermost:  # e.g. compilation: it must wrap the module's own math, under DSP and PAB
            self.hooks.insert(0, hook)
        else:
            self.hooks.append(hook)
        hook.on_attach(self.module)
        self._rebuild()

    def remove(self, name: str) -> ModelHook | None:
        for i, hook in enumerate(self.hooks):
            if hook.name == name:
                del self.hooks[i]
                hook.on_detach(self.module)
                self._rebuild()
                return hook
        return None

    @property
    def original_forward(self) -> Callable[..., Any]:
        """The module's own forward, as it was before any hook wrapped it."""
        return self._original_forward

    def get(self, name: str) -> ModelHook | None:
        return next((h for h in self.hooks if h.name == name), None)


def get_registry(module: nn.Module, create: bool = True) -> HookRegistry | None:
    registry = module.__dict__.get(_REGISTRY_ATTR)
    if registry is None and create:
        registry = HookRegistry(module)
        # Stored in __dict__ directly so nn.Module does not treat it as a submodule.
        module.__dict__[_REGISTRY_ATTR] = registry
    return registry


def register_hook(module: nn.Module, hook: ModelHook, innermost: bool = False) -> None:
    """Wrap `module.forward` with `hook`: outermost so far, or innermost (next to the module's own forward)."""
    get_registry(module).register(hook, innermost=innermost)


def remove_hook(module: nn.Module, name: str) -> ModelHook | None:
    """Remove the hook called `name` from `module`, if any; returns it."""
    registry = get_registry(module, create=False)
    return registry.remove(name) if registry is not None else None


def get_hook(module: nn.Module, name: str) -> ModelHook | None:
    registry = get_registry(module, create=False)
    return registry.get(name) if registry is not None else None


def output_reused(module: nn.Module) -> bool:
    """Whether calling `module` now returns a kept output without reading its input (PAB broadcasting it), so a
    model may skip computing that input (the norm before an attention). Only the outermost hook's answer counts:
    a hook outside it may read the input."""
    registry = get_registry(module, create=False)
    return registry is not None and bool(registry.hooks) and registry.hooks[-1].reuses_output(module)


def passes_input_on(*modules: nn.Module) -> bool:
    """Whether no hook on any of `modules` reads their input's values itself: what reaches the input is then only
    what the modules' own forwards (and the hooks standing in for them) read."""
    for module in modules:
        registry = get_registry(module, create=False)
        if registry is not None and any(h.reads_input for h in registry.hooks):
            return False
    return True


@contextlib.contextmanager
def active(var: contextvars.ContextVar[T | None], state: T) -> Iterator[T]:
    """Make `state` the one a technique's hooks read from `var` while the block runs (this thread/task only):
    hooks hold no per-request data, so concurrent requests on other threads never see each other's."""
    token = var.set(state)
    try:
        yield state
    finally:
        var.reset(token)


def remove_hooks_named(model: nn.Module, name: str) -> int:
    """Remove every hook called `name` anywhere in `model`; returns how many were removed."""
    return sum(remove_hook(m, name) is not None for m in model.modules())
