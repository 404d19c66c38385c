"""CUDA graphs of the transformer forward, one per reuse pattern, attached from outside and removable.

Why: an eager DiT forward is hundreds of small kernel launches. Latte's costs the host ~95 ms per call, so
PAB's cheaper steps (and every GPU of a DSP group) wait on the CPU instead of computing. A replayed graph
launches the whole forward at once.

What makes it correct with PAB:

* **One graph per pattern.** Which modules a step computes and which it reuses is decided in Python by the
  PAB hooks from the step index and timestep alone. The hook computes that decision for every PAB hook
  *before* the forward (`PABHook.should_compute`); the tuple of decisions, the CFG branch and the inputs'
  shapes are the graph's key. A forward whose key was seen replays; a new key is captured once, then
  replayed.
* **Caches outside the graphs.** A reused attention reads what an earlier step - maybe another graph -
  wrote. So every PAB cache lives in a `CacheArena` buffer allocated by the first, eager forward of a shape
  (outside any graph's memory pool): a graph that computes a module copies its output into that buffer, a
  graph that reuses it reads the buffer. The addresses never change, whichever graph ran last.
* **Python's effects replayed.** A replay runs no Python, so what the hooks did to the request's
  `PABState` while the graph was captured (cache entries made valid, computed/broadcast counters) is
  recorded at capture and applied again at every replay.

What falls back to eager, per call: a step-reuse policy (teacache decides from the data, mid-forward),
autograd, and a first call at a new shape (it also allocates the arena and warms up kernels).

**Under sequence parallelism** (pab.parallel.dsp) the graph holds the frame split, every all-to-all and the
output gather: NCCL operations are captured like kernels (NCCL >= 2.9). Every rank of the group keys the same
pattern at the same call, so all capture together and replay together, as NCCL requires. The DSP hooks'
communication counters (`CommStats`) are recorded at capture and added at every replay, like PAB's. Capture
is thread-local there, so NCCL's watchdog thread may go on querying its events meanwhile. On CPU the "eager"
backend runs the same bookkeeping over gloo (tests/parallel/test_dsp_pipeline.py). On one GPU,
tests/gpu/test_cuda_graphs_replay.py replays the pipeline against eager and captures an all-to-all on a one-rank
NCCL group (it runs in the GPU suite); tests/parallel/test_dsp_gpu.py runs a 2-GPU group with graphs against one
without, and waits for a machine with two GPUs. On one H100 or H200 the eager step already leaves the GPU idle
under ~1.5% of the loop, so graphs win nothing there and cost a copy per computed attention; they stay opt-in
(docs/performance.md).

Graphs and arenas belong to the model, not to a request: they are reused by every request of the same shape
(a pipeline runs one generation at a time). The `max_shapes` most recent input shapes are kept; an older
one's graphs and buffers are freed.

Example:
    handle = apply_cuda_graphs(transformer)   # after PAB/compile, before the first request
    ... pipeline.generate(...) ...            # first request of a shape captures; later ones replay
    handle.remove()                           # back to the eager model, graphs freed
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
import torch.nn as nn

from pab.broadcast import PAB_HOOK, PABHook, PABState, current_state
from pab.hooks.registry import ModelHook, get_hook, register_hook, remove_hook
from pab.precision import current_fp8

CUDA_GRAPH_HOOK = "cuda_graph"


class CacheArena:
    """Buffers for the PAB caches of one input shape, at fixed addresses for as long as the shape's graphs live."""

    def __init__(self) -> None:
        self.buffers: dict[Hashable, torch.Tensor] = {}
        self.frozen = False  # True while a graph is captured: no new buffer may be made then
        self.written: list[Hashable] = []  # keys kept while frozen: the caches a captured graph writes

    def keep(self, key: Hashable, value: Any) -> Any:
        """Store `value` (a tensor) under `key` and return the stored tensor: in its buffer if it has one."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"CUDA graphs keep tensor caches only, got {type(value).__name__}")
        buf = self.buffers.get(key)
        if buf is not None and buf.shape == value.shape and buf.dtype == value.dtype and buf.device == value.device:
            buf.copy_(value)
            if self.frozen:
                self.written.append(key)
            return buf
        if self.frozen:
            raise RuntimeError(f"no cache buffer for {key!r} while capturing a CUDA graph: the eager first call "
                               "of this shape should have made it (a module computed only inside a graph)")
        self.buffers[key] = value  # made by an eager forward: outside every graph's pool
        return value


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a graph's inputs must match: tensors by shape/dtype/device, everything else by value."""

    def sig(v: Any) -> Hashable:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device, v.requires_grad)
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(sig(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple((k, sig(x)) for k, x in sorted(v.items())))
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"CUDA graphs cannot key an input of type {type(v).__name__}")

    return (tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in sorted(kwargs.items())))


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


def _clone_tree(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    return tree


@dataclass
class _Effects:
    """What the Python hooks did to a request's PABState during one forward: replayed with the graph."""

    cache: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    comm: dict[str, int] = field(default_factory=dict)  # what the DSP hooks added to the group's CommStats

    @classmethod
    def between(cls, before: PABState, after: PABState, written: list[Hashable]) -> "_Effects":
        # Every cache the forward wrote, also one already valid: a later request starts with none valid.
        cache = {k: after.cache[k] for k in written}
        stats = {kind: {n: after.stats[kind][n] - before.stats[kind][n] for n in counts}
                 for kind, counts in after.stats.items()}  # fmt: skip
        return cls(cache, stats)

    def apply(self, state: PABState | None, comm: Any = None) -> None:
        if state is not None:
            state.cache.update(self.cache)
            for kind, counts in self.stats.items():
                for n, d in counts.items():
                    state.stats[kind][n] += d
        if comm is not None:
            for n, d in self.comm.items():
                setattr(comm, n, getattr(comm, n) + d)


def _counts(comm: Any) -> dict[str, int]:
    """The counters of a `CommStats` (a dataclass of ints), by name."""
    return {f.name: getattr(comm, f.name) for f in dataclasses.fields(comm)}


def _restore(comm: Any, counts: dict[str, int]) -> None:
    for n, v in counts.items():
        setattr(comm, n, v)


class _CudaGraph:
    """One captured forward (torch.cuda.CUDAGraph). A replay runs no Python, so it changes no counter (`comm`)."""

    def __init__(self, fn: Callable[[], Any], pool: Any, error_mode: str = "global", comm: Any = None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=error_mode):
            self.output = fn()

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


class EagerReplay:
    """A stand-in for a captured graph on a device without CUDA graphs: 'replay' runs the function again.

    Used on CPU (tests, gloo groups) to exercise everything around the graph - keys, arena, effects - with
    the same code path; the Python side effects of a rerun are undone, so only the recorded ones count.
    """

    def __init__(self, fn: Callable[[], Any], pool: Any, error_mode: str = "global", comm: Any = None) -> None:
        self.fn = fn
        self.comm = comm  # the DSP group's CommStats, whose counts a rerun must not change either
        self.output = fn()

    def replay(self) -> Any:
        state = current_state()
        counts = _counts(self.comm) if self.comm is not None else None
        if state is None:
            self.output = self.fn()
        else:
            stats, cache = copy.deepcopy(state.stats), dict(state.cache)
            self.output = self.fn()
            state.stats = stats
            state.cache.clear()
            state.cache.update(cache)
        # A graph's replay runs no Python: what the hooks just did is undone, only the recorded effects may count.
        if counts is not None:
            _restore(self.comm, counts)
        return self.output


@dataclass
class _Shape:
    """The graphs of one input signature, with their static inputs, cache arena and memory pool."""

    inputs: tuple[tuple, dict]  # static copies of the forward's arguments
    arena: CacheArena = field(default_factory=CacheArena)
    graphs: dict[Hashable, tuple[Any, _Effects]] = field(default_factory=dict)
    pool: Any = None
    arena_made: bool = False  # an eager call inside a generation has made the arena's buffers
    calls: int = 0


class CudaGraphHook(ModelHook):
    """On the transformer: replay the graph of this call's pattern, capturing it the first time."""

    name = CUDA_GRAPH_HOOK

    def __init__(self, max_shapes: int = 2, backend: type = _CudaGraph) -> None:
        self.max_shapes = max_shapes
        self.backend = backend
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self.pab_hooks: list[PABHook] = []
        self.captures = 0
        self.replays = 0

    def on_attach(self, module: nn.Module) -> None:
        self.module = module

    def _comm(self) -> Any:
        """The group's CommStats when sequence parallelism is applied to the model (its DSP entry hook), else None."""
        from pab.parallel.dsp import DSP_ENTRY_HOOK

        entry = get_hook(self.module, DSP_ENTRY_HOOK)
        return entry.run.ctx.stats if entry is not None else None

    def clear(self) -> None:
        """Free every graph and cache buffer (their memory returns to the allocator)."""
        self.shapes.clear()

    def _hooks(self) -> list[PABHook]:
        hooks = [h for m in self.module.modules() if (h := get_hook(m, PAB_HOOK)) is not None]
        if [id(h) for h in hooks] != [id(h) for h in self.pab_hooks]:
            self.clear()  # PAB was re-applied (another config): the graphs hold the old hooks' decisions
            self.pab_hooks = hooks
        return hooks

    def _eager(self) -> bool:
        from pab.stepcache import _active as step_reuse_active

        return torch.is_grad_enabled() or step_reuse_active() is not None

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._eager():
            return forward(*args, **kwargs)
        state = current_state()
        hooks = self._hooks()
        sig = _signature(args, kwargs)
        shape = self.shapes.get(sig)
        if shape is None:
            shape = _Shape(inputs=(_clone_tree(args), _clone_tree(kwargs)))
            self.shapes[sig] = shape
            while len(self.shapes) > self.max_shapes:
                self.shapes.popitem(last=False)
        self.shapes.move_to_end(sig)
        first, shape.calls = shape.calls == 0, shape.calls + 1
        if state is not None and not shape.arena_made:
            # The first call at this shape in a generation runs eager: it makes the arena's buffers outside every
            # graph's pool (and warms the kernels up before any capture).
            shape.arena_made = True
            return self._with_arena(state, shape.arena, lambda: forward(*args, **kwargs))
        if first:  # outside a generation there are no caches: the eager call only warms up
            return forward(*args, **kwargs)
        for dst, src in zip(_tensors(shape.inputs), _tensors((args, kwargs))):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        # fp8 or not changes the kernels a forward launches (pab.precision), so it is part of the pattern too.
        fp8 = current_fp8() is not None
        pattern = (state.branch, tuple(h.should_compute(state) for h in hooks), fp8) if state is not None else fp8
        entry = shape.graphs.get(pattern)
        if entry is None:
            entry = self._capture(forward, state, shape)
            shape.graphs[pattern] = entry
        graph, effects = entry
        self.replays += 1
        out = self._with_arena(state, shape.arena, graph.replay)
        effects.apply(state, self._comm())
        return _clone_tree(out)  # the graph's output is overwritten by its next replay

    def _with_arena(self, state: PABState | None, arena: CacheArena, fn: Callable[[], Any]) -> Any:
        if state is None:
            return fn()
        previous, state.arena = state.arena, arena
        try:
            return fn()
        finally:
            state.arena = previous

    def _capture(self, forward: Callable[..., Any], state: PABState | None, shape: _Shape) -> tuple[Any, _Effects]:
        args, kwargs = shape.inputs
        before = copy.copy(state) if state is not None else None
        if before is not None:
            before.cache, before.stats = dict(state.cache), copy.deepcopy(state.stats)
        if shape.pool is None and self.backend is _CudaGraph:
            shape.pool = torch.cuda.graph_pool_handle()  # one pool per shape: its graphs replay one at a time
        comm = self._comm()
        comm_before = _counts(comm) if comm is not None else {}
        # Thread-local under DSP: a global capture would fail on NCCL's watchdog thread querying its events.
        error_mode = "thread_local" if comm is not None else "global"
        shape.arena.frozen, shape.arena.written = True, []
        try:
            capture = lambda: self.backend(lambda: forward(*args, **kwargs), shape.pool, error_mode, comm)  # noqa: E731
            graph = self._with_arena(state, shape.arena, capture)
        finally:
            shape.arena.frozen = False
        self.captures += 1
        effects = _Effects()
        if state is not None:
            effects = _Effects.between(before, state, shape.arena.written)
            state.stats = before.stats  # capture ran no kernel: its counts come back with every replay
        if comm is not None:
            effects.comm = {n: getattr(comm, n) - v for n, v in comm_before.items()}
            _restore(comm, comm_before)  # nothing was sent while capturing; every replay sends (and counts) it
        return graph, effects


@dataclass
class CudaGraphHandle:
    """What `apply_cuda_graphs` attached; `remove()` frees the graphs and restores the eager model."""

    model: nn.Module
    hook: CudaGraphHook

    @property
    def stats(self) -> dict[str, int]:
        return {"shapes": len(self.hook.shapes), "graphs": sum(len(s.graphs) for s in self.hook.shapes.values()),
                "captures": self.hook.captures, "replays": self.hook.replays}  # fmt: skip

    def remove(self) -> None:
        remove_cuda_graphs(self.model)


def apply_cuda_graphs(model: nn.Module, max_shapes: int = 2, backend: str = "cuda") -> CudaGraphHandle:
    """Replay `model`'s forward as CUDA graphs, one per PAB pattern and input shape.

    Args:
        max_shapes: input shapes whose graphs and cache buffers are kept (least recently used go first).
        backend: "cuda" (torch.cuda.CUDAGraph), or "eager" to run the same bookkeeping without graphs
            (CPU: tests and gloo groups).
    """
    if backend not in ("cuda", "eager"):
        raise ValueError(f"backend must be 'cuda' or 'eager', got {backend!r}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA GPU; use backend='eager' on CPU, or leave graphs off")
    hook = CudaGraphHook(max_shapes=max_shapes, backend=_CudaGraph if backend == "cuda" else EagerReplay)
    register_hook(model, hook)
    return CudaGraphHandle(model, hook)


def remove_cuda_graphs(model: nn.Module) -> bool:
    """Remove the graphs hook from `model` (True if there was one); its graphs and buffers are freed."""
    hook = remove_hook(model, CUDA_GRAPH_HOOK)
    if hook is not None:
        hook.clear()
    return hook is not None


__all__ = ["CacheArena", "CudaGraphHandle", "CudaGraphHook", "EagerReplay", "apply_cuda_graphs",
           "remove_cuda_graphs", "CUDA_GRAPH_HOOK"]  # fmt: skip
