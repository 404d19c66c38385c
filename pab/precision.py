"""Per-request precision of a DiT's big GEMMs: "bf16" (the pipeline's dtype) or "fp8" (e4m3, row-wise scales).

    handle = apply_fp8(transformer)            # once: quantises the weights, attaches inert hooks
    with use_precision(PrecisionState("fp8", num_steps=30)) as p:
        for i, t in enumerate(timesteps):
            p.begin_step(i)
            ...                                 # the attentions' and MLPs' linears run in fp8
    handle.remove()                             # the plain model again

What runs in fp8: the `nn.Linear`s inside the modules the model names in `broadcast_targets()` (the self-,
temporal and cross-attentions and the MLPs: ~all of a DiT's FLOPs) whose output is at least
`min_out_ratio` x their input (a square projection loses: its input's quantisation costs more than fp8
saves), each weight quantised once per output channel, each activation per token (`pab.kernels.fp8`). The
embedders, the adaLN tables and the final layer stay in the model's dtype: they are a sliver of the work and
the outputs are most sensitive there. The first `bf16_first_steps` and last `bf16_last_steps` denoising
steps may stay in bf16 too, if a model's error asks. Three shapes of module take part:

* an MLP that names its parts (`gelu_linears()` -> fc1, GELU approximation, fc2) runs as fc1 in fp8 -> one
  pass adding fc1's bias, applying the GELU and quantising for fc2 -> fc2 in fp8;
* linears a module runs as one GEMM (`linear_groups()`, e.g. Latte's q, k, v) run as one fp8 GEMM where the
  request's config asks (`Fp8Config.linear_groups`; each family's own config, `Family.fp8`, decides);
* a square linear whose input the model's own kernel can write in e4m3 (`quantized_input_linears()`: Open-Sora's
  cross-attention q, fed by the gate + residual kernel) runs in fp8 when that input comes with its rows
  (`Fp8Config.produced_inputs`);
* any other eligible linear runs alone.

Where a model's norm kernel writes the input of such a module, it writes its e4m3 rows in the same pass when
the module asks (`pab.kernels.fp8.fp8_input`), and where the module is that input's only reader, the rows alone
(`Fp8Config.e4m3_only_inputs`). Outputs are in the model's dtype; Hopper's fast accumulation
is on by default (`Fp8Config.fast_accum`).

The hooks are innermost (they replace a linear's own math, beneath PAB and sequence parallelism) and hold no
request data: which precision a forward runs at is the `PrecisionState` of the request running in this
thread (`use_precision`); with none, or "bf16", the hooks call the module's own forward. On CPU the fp8 GEMMs
are emulated in float32 on the same e4m3 operands (slower than the plain model, there to measure fp8's error
on the small models without a GPU).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from pab.hooks.registry import ModelHook, active, register_hook, remove_hooks_named
from pab.kernels import fp8 as kern
from pab.kernels import no_grad_needed
from pab.kernels.fp8 import fp8_capable

PRECISIONS = ("bf16", "fp8")
FP8_HOOK = "fp8"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)} (bf16: the pipeline's "
                         f"own dtype for every GEMM; fp8: e4m3 GEMMs in the attentions and MLPs)")  # fmt: skip
    return precision


@dataclass(frozen=True)
class Fp8Config:
    """Where fp8 applies. The defaults are what `Pipeline` uses for precision "fp8"."""

    kinds: tuple[str, ...] = ("spatial", "temporal", "cross", "mlp")
    """Which of the model's `broadcast_targets()` kinds run their linears in fp8."""
    min_out_ratio: float = 2.0
    """A linear runs in fp8 when out_features >= this x in_features. Quantising the input costs a read of it
    and fp8 saves ~30% of the GEMM, so a square projection loses: on an H200 at 480p the 1152 x 1152 output
    projection takes 0.206 ms in bf16 and 0.159 + 0.100 (quantisation) in fp8; qkv (3x) and fc1 (4x) gain
    (bench/fp8.py, docs/performance.md). MLPs with `gelu_linears` run in fp8 whole (the GELU pays for fc2's)."""
    linear_groups: bool = False
    """Also the linears a module runs as one GEMM (`linear_groups()`: Latte's and Open-Sora-Plan's q, k, v). Their
    attentions have no q/k norm, and fp8 q, k, v cost the trained small models 2-3 dB against their float32 video
    (64 held-out prompts: latte-1-small 34.5 -> 31.7 dB, opensora-plan-v1.1-small 32.3 -> 30.1; docs/quality.md)
    for 8.5% of Latte's DiT time and 6.7% of Open-Sora-Plan's (one H100). So each family decides (`Family.fp8`):
    Latte's turns it on, Open-Sora-Plan's, at the 30 dB bar, leaves it off. STDiT3's qkv (one linear, q and k
    RMS-normed) runs in fp8 either way."""
    produced_inputs: bool = True
    """Also the square linears a module names in `quantized_input_linears()`, whose input the model's kernel writes
    in e4m3 in the pass that makes it (Open-Sora's cross-attention q: the gate + residual kernel), so fp8 saves
    the GEMM's ~25% without a quantisation pass. Given no rows they run in bf16 on a GPU (a pass of their own
    would cost more than fp8 saves) and quantise themselves on the CPU, where fp8 is emulated to measure its
    error: opensora-v1.2-small stayed at 40-41 dB against bf16 with its q in fp8 (16 held-out prompts). Latte's
    blocks name theirs too, but the family decides (`Family.fp8`): the q cost latte-1-small 1.2-2.1 dB (to
    30.0-30.3), so Latte's config turns this off; opensora-plan-v1.1-small keeps 31.4 dB (64 prompts) with it, so
    Open-Sora-Plan's leaves it on (docs/quality.md)."""
    attention_outputs: bool = True
    """Also the output projections a module names in `attention_output_linears()` (square, so bf16 otherwise): the
    attention kernel writes its output in e4m3 with one scale per tensor, the largest |value| of the request's
    earlier steps of that attention x 2 (`pab.kernels.fp8.DelayedScale`; a row's own scale would need every head
    of a token, which the kernels split over programs). A request's first call of each attention runs its
    projection in bf16 and records the scale. It takes the spatial and cross-attention through
    `pab.kernels.flash_attention` (not cuDNN, which cannot write e4m3) and the temporal one through the
    short-sequence kernel; where neither runs (CPU, other shapes) PyTorch does the same arithmetic. In a
    sequence-parallel group each rank's amax is maxed over the group before it is read (`PrecisionState.reduce_max`),
    so a group scales as one device does. The projections stay in bf16 under torch.compile and CUDA graphs (a replay
    runs none of the Python that counts steps; `Pipeline._fp8_request_config`).
    On one H100 it took Open-Sora 480p from 5.73 to 5.57 s off, 4.42 to 4.32 s `paper` (docs/performance.md)."""
    e4m3_only_inputs: bool = True
    """Where an fp8 module is the only reader of its input and a norm kernel writes that input, the kernel writes
    the e4m3 rows alone, not the bf16 values too: 2 of its 5 bytes an element written and read (2 of 9 with the
    residual add), the same rows, so the same result (tests/gpu/test_fp8_pipeline.py). Off: both, as before."""
    bf16_first_steps: int = 0
    bf16_last_steps: int = 0
    fast_accum: bool = True
    """Hopper's fp8 fast accumulation (no periodic promotion of partial sums to float32). On an H200 it took
    Open-Sora 480p from 6.86 to 6.05 s and its latents' error against bf16 from 0.1774 to 0.1769: the error
    is the e4m3 rounding of the operands, not the sums (bench/results/h200.json)."""

    def __post_init__(self) -> None:
        if self.bf16_first_steps < 0 or self.bf16_last_steps < 0 or self.min_out_ratio < 0:
            raise ValueError(f"{self}: step counts and min_out_ratio must be >= 0")


@dataclass
class PrecisionState:
    """One request's precision, and how many of its steps ran in fp8."""

    precision: str = "bf16"
    num_steps: int = 0
    config: Fp8Config = field(default_factory=Fp8Config)
    step: int = -1
    stats: dict[str, int] = field(default_factory=lambda: {"fp8_steps": 0, "bf16_steps": 0})
    output_calls: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    """Per fp8 output projection: (how many steps its attention ran in so far, less one; the step it last ran at),
    which pick `DelayedScale`'s slots. A step's several calls (sequence parallelism's chunks) share them."""
    reduce_max: Callable[[torch.Tensor], Any] | None = None
    """In a sequence-parallel group: takes a tensor's max over the group's ranks in place, so that every rank scales
    its share of an attention's output as one device scales all of it (`Pipeline`)."""

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def begin_step(self, step: int) -> None:
        self.step = int(step)
        self.stats["fp8_steps" if self.fp8 else "bf16_steps"] += 1

    @property
    def fp8(self) -> bool:
        """Whether this step's forwards run their linears in fp8."""
        if self.precision != "fp8":
            return False
        c = self.config
        return self.step < 0 or c.bf16_first_steps <= self.step < self.num_steps - c.bf16_last_steps

    def quantized(
        self, x: torch.Tensor, gelu: str = "none", bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """e4m3 rows (M, K) and scales (M, 1) of `x` (..., K) (+ bias, GELU): those its producer wrote (a norm
        kernel), or one pass. Checked against `x` itself: a reshape of a strided view would copy values never
        written where the producer wrote the rows alone."""
        x2d = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        made = kern.companion(x2d) if gelu == "none" and bias is None else None
        if made is not None:
            return made
        kern.check_written(x)
        return kern.quantize_rows(x2d, gelu, bias)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, **self.stats}


_ACTIVE: contextvars.ContextVar[PrecisionState | None] = contextvars.ContextVar("pab_precision", default=None)


def use_precision(state: PrecisionState):
    """Make `state` the precision of the forwards run in this block (this thread/task only)."""
    return active(_ACTIVE, state)


def current_fp8() -> PrecisionState | None:
    """The running request's state if its current step runs in fp8, else None."""
    state = _ACTIVE.get()
    return state if state is not None and state.fp8 else None


class _Fp8Weight:
    """A linear's weight in e4m3 (N, K) with its per-output-channel scales (1, N), and its bias; or those of
    several linears on one input, concatenated along N (one GEMM whose output is theirs side by side)."""

    def __init__(self, *linears: nn.Linear) -> None:
        weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
        self.q, self.scale = kern.quantize_weight(weight)  # per output channel: the same as quantising each
        biases = [lin.bias for lin in linears]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("linears run as one GEMM must all have a bias or none")
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])

    def __call__(self, x: torch.Tensor, state: PrecisionState) -> torch.Tensor:
        """(..., K) -> (..., N) in x's dtype: x's e4m3 rows (`state.quantized`) times these weights, + bias."""
        xq, xs = state.quantized(x)
        out = kern.fp8_matmul(xq, xs, self.q, self.scale, self.bias, x.dtype, state.config.fast_accum)
        return out.view(*x.shape[:-1], out.shape[-1])


def _shapes_ok(weight: torch.Tensor) -> bool:
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0  # _scaled_mm takes N and K in multiples of 16


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # autograd has no fp8 backward here (training stays plain); the norm kernels never run where it is needed
    return no_grad_needed(x) and x.shape[-1] == weight.shape[1] and _shapes_ok(weight) and x.numel() > 0


class _AsksForFp8(ModelHook):
    """The hooked module answers `fp8_input_mode()` (pab.kernels.fp8.fp8_input): a model's norm kernel then writes
    the e4m3 rows of the module's input in the same pass, or those alone. What it reads of its input is those rows;
    a fallback to the module's own forward (the bf16 math) first checks that the input's values were written."""

    name = FP8_HOOK
    reads_input = False  # it reads the e4m3 rows, which the producer writes in every mode

    def active(self) -> PrecisionState | None:
        """The request's state when this hook runs its module in fp8 this forward."""
        return current_fp8()

    def takes(self) -> bool:
        """Whether every input this hook's GEMMs get goes through fp8 (their shapes allow it), whatever its rows."""
        return True

    def input_mode(self) -> str | None:
        state = self.active()
        if state is None or not self.takes():
            return None
        return "only" if state.config.e4m3_only_inputs else "also"

    def fallback(self, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        kern.check_written(x)
        return forward(x)

    def on_attach(self, module: nn.Module) -> None:
        module.fp8_input_mode = self.input_mode

    def on_detach(self, module: nn.Module) -> None:
        module.__dict__.pop("fp8_input_mode", None)


class Fp8LinearHook(_AsksForFp8):
    """One linear in fp8. With `produced_only` (a square linear, `Fp8Config.produced_inputs`) only where its input
    comes with e4m3 rows its producer wrote, or on the CPU (emulation); the producer is asked for "also"."""

    def __init__(self, linear: nn.Linear, produced_only: bool = False) -> None:
        self.w = _Fp8Weight(linear)
        self.produced_only = produced_only

    def active(self) -> PrecisionState | None:
        state = current_fp8()
        return None if state is None or (self.produced_only and not state.config.produced_inputs) else state

    def takes(self) -> bool:
        return _shapes_ok(self.w.q)

    def input_mode(self) -> str | None:
        mode = super().input_mode()
        return "also" if mode is not None and self.produced_only else mode

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        state = self.active()
        if state is None or not _eligible(x, self.w.q):
            return self.fallback(forward, x)
        if self.produced_only and x.is_cuda and kern.companion(x.reshape(-1, x.shape[-1])) is None:
            return forward(x)  # no rows from its producer: quantising here would cost more than fp8 saves
        return self.w(x, state)


class Fp8OutputHook(Fp8LinearHook):
    """An attention's output projection (square) in fp8, on the e4m3 rows the attention kernel wrote with a delayed
    per-tensor scale (`Fp8Config.attention_outputs`). The attention asks `fp8_delayed_scale()` before it runs
    (`pab.kernels.fp8.fp8_output`); the scale's history lives here, on the device, and is reset by a request's
    first call. Without rows (that first call, a reader that did not ask) the projection runs in bf16 everywhere,
    so the CPU's emulation is the GPU's arithmetic."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, produced_only=True)
        self.amax = torch.zeros(2, device=linear.weight.device, dtype=torch.float32)

    def active(self) -> PrecisionState | None:
        state = current_fp8()
        return None if state is None or not state.config.attention_outputs else state

    def on_attach(self, module: nn.Module) -> None:
        super().on_attach(module)
        module.fp8_delayed_scale = self.delayed_scale

    def on_detach(self, module: nn.Module) -> None:
        module.__dict__.pop("fp8_delayed_scale", None)
        super().on_detach(module)

    def delayed_scale(self) -> kern.DelayedScale | None:
        """This call's slots of the scale history, counted per request (None: write the output as it is)."""
        state = self.active()
        if state is None or not self.takes() or torch.compiler.is_compiling():
            return None
        if self.amax.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # a replayed graph runs no Python: no call counting, so no delayed scale
        # Slots go by the steps this attention ran at, not its calls: a step's chunks (sequence parallelism) all
        # read the history up to the step before and add to the same slot. Without steps (step < 0), each call is one.
        ran, last = state.output_calls.get(id(self), (-1, None))
        at = state.step if state.step >= 0 else None
        new_step = at is None or at != last
        ran += new_step
        state.output_calls[id(self)] = (ran, at)
        if ran == 0 and new_step:
            self.amax.zero_()  # another request's history must not scale this one's outputs
        if ran > 0 and new_step and state.reduce_max is not None:
            state.reduce_max(self.amax[(ran - 1) % 2:][:1])  # the group's max: every rank takes one device's scale
        return kern.DelayedScale(self.amax, read=-1 if ran == 0 else (ran - 1) % 2, write=ran % 2,
                                 only=state.config.e4m3_only_inputs)  # fmt: skip

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        state = self.active()
        if state is None or not _eligible(x, self.w.q) or kern.companion(x.reshape(-1, x.shape[-1])) is None:
            return self.fallback(forward, x)
        return self.w(x, state)


class Fp8GroupHook(_AsksForFp8):
    """Linears of a module that share an input and run as one GEMM (`linear_groups()`: Latte's q, k and v go
    through `_linear_cat`), in fp8 as one GEMM on their concatenated e4m3 weights. The module's forward is
    left as it is; the group's first linear gets `run_group(x, layers)`, which the grouped GEMM asks first
    (None: run the plain GEMM). Hooking the linears themselves would split the GEMM into one per linear."""

    def __init__(self, groups: list[tuple[nn.Linear, ...]]) -> None:
        self.groups = groups
        self.weights = {tuple(map(id, g)): _Fp8Weight(*g) for g in groups}

    def on_attach(self, module: nn.Module) -> None:
        super().on_attach(module)
        for group in self.groups:
            group[0].run_group = self._run

    def on_detach(self, module: nn.Module) -> None:
        for group in self.groups:
            group[0].__dict__.pop("run_group", None)
        super().on_detach(module)

    def active(self) -> PrecisionState | None:
        state = current_fp8()
        return state if state is not None and state.config.linear_groups else None

    def takes(self) -> bool:
        return all(_shapes_ok(w.q) for w in self.weights.values())

    def _run(self, x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> torch.Tensor | None:
        state = self.active()
        w = self.weights.get(tuple(map(id, layers)))
        if state is None or w is None or not _eligible(x, w.q):
            kern.check_written(x)  # the plain GEMM reads x's values
            return None
        return w(x, state)


class Fp8MlpHook(_AsksForFp8):
    """fc1 (fp8) -> GELU and quantisation in one pass -> fc2 (fp8)."""

    def __init__(self, fc1: nn.Linear, gelu: str, fc2: nn.Linear) -> None:
        self.fc1, self.fc2, self.gelu = _Fp8Weight(fc1), _Fp8Weight(fc2), gelu

    def takes(self) -> bool:
        return _shapes_ok(self.fc1.q) and _shapes_ok(self.fc2.q)

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        state = self.active()
        if state is None or not (_eligible(x, self.fc1.q) and _shapes_ok(self.fc2.q)):
            return self.fallback(forward, x)
        xq, xs = state.quantized(x)
        # fc1 without its bias: the pass that applies the GELU and quantises for fc2 adds it (a row-wise
        # scaled GEMM adds a bias in a pass of its own over the 4C-wide output)
        h = kern.fp8_matmul(xq, xs, self.fc1.q, self.fc1.scale, None, x.dtype, state.config.fast_accum)  # (M, 4C)
        hq, hs = state.quantized(h, gelu=self.gelu, bias=self.fc1.bias)
        out = kern.fp8_matmul(hq, hs, self.fc2.q, self.fc2.scale, self.fc2.bias, x.dtype, state.config.fast_accum)
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class Fp8Handle:
    """What `apply_fp8` attached: how many linears run in fp8, and `remove()`."""

    model: nn.Module
    config: Fp8Config
    linears: int
    weight_bytes: int

    def remove(self) -> None:
        remove_fp8(self.model)


def apply_fp8(model: nn.Module, config: Fp8Config | None = None) -> Fp8Handle:
    """Quantise the weights of `model`'s attention and MLP linears and attach the (inert) fp8 hooks."""
    config = config or Fp8Config()
    targets = getattr(model, "broadcast_targets", None)
    if targets is None:
        raise TypeError(f"{type(model).__name__} names no attention/MLP modules (broadcast_targets); "
                        "fp8 applies to the DiTs of pab.models")  # fmt: skip
    device = next(model.parameters()).device
    ok, why = fp8_capable(device)
    if not ok:
        raise RuntimeError(why)
    hooked: list[_Fp8Weight] = []
    seen: set[int] = set()
    for kind, modules in targets().items():
        if kind not in config.kinds:
            continue
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            groups = [g for g in (module.linear_groups() if hasattr(module, "linear_groups") else ())
                      if sum(lin.out_features for lin in g) >= config.min_out_ratio * g[0].in_features]
            if groups:
                group_hook = Fp8GroupHook(groups)
                register_hook(module, group_hook, innermost=True)
                hooked += list(group_hook.weights.values())
                seen.update(id(lin) for g in groups for lin in g)
            parts = module.gelu_linears() if hasattr(module, "gelu_linears") else None
            if parts is not None and parts[1] in kern.GELUS and parts[1] != "none":
                hook = Fp8MlpHook(*parts)
                register_hook(module, hook, innermost=True)
                hooked += [hook.fc1, hook.fc2]
                continue
            produced = {id(lin) for lin in getattr(module, "quantized_input_linears", list)()}
            outputs = {id(lin) for lin in getattr(module, "attention_output_linears", list)()}
            for sub in module.modules():
                if not isinstance(sub, nn.Linear) or id(sub) in seen:
                    continue
                if id(sub) in outputs and config.attention_outputs and sub.out_features == sub.in_features:
                    seen.add(id(sub))
                    out_hook = Fp8OutputHook(sub)
                    register_hook(sub, out_hook, innermost=True)
                    hooked.append(out_hook.w)
                    continue
                wide = sub.out_features >= config.min_out_ratio * sub.in_features
                if wide or id(sub) in produced:
                    seen.add(id(sub))
                    hook = Fp8LinearHook(sub, produced_only=not wide)
                    register_hook(sub, hook, innermost=True)
                    hooked.append(hook.w)
    return Fp8Handle(model, config, len(hooked), sum(w.q.numel() + 4 * w.scale.numel() for w in hooked))


def remove_fp8(model: nn.Module) -> int:
    """Detach every fp8 hook from `model` (its e4m3 weights are freed); returns how many were removed."""
    return remove_hooks_named(model, FP8_HOOK)


__all__ = ["FP8_HOOK", "PRECISIONS", "Fp8Config", "Fp8GroupHook", "Fp8Handle", "Fp8LinearHook", "Fp8MlpHook",
           "Fp8OutputHook",
           "PrecisionState", "apply_fp8", "check_precision", "current_fp8", "fp8_capable", "remove_fp8",
           "use_precision"]  # fmt: skip
