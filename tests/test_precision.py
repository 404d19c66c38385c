"""pab.precision: fp8 GEMMs attached from outside, per request, proven against the plain model.

On CPU the fp8 GEMMs are emulated in float32 on the same e4m3 operands (pab.kernels.fp8.fp8_matmul), so what
fp8 computes is checked here exactly; tests/kernels/test_fp8.py checks the GPU GEMM against the emulation.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pab.engine import EngineOptions
from pab.hooks.registry import ModelHook, get_hook, register_hook
from pab.kernels import fp8 as kern
from pab.models import build
from pab.models.latte import _linear_cat
from pab.pipeline import GenerationRequest, Pipeline
from pab.precision import (
    FP8_HOOK, Fp8Config, Fp8GroupHook, Fp8LinearHook, Fp8MlpHook, Fp8OutputHook, PrecisionState, apply_fp8, remove_fp8,
    use_precision,
)  # fmt: skip
from pab.request import VideoSettings, add_options, from_options


def _stdit3_inputs(model, T=3, H=8, W=8, B=2):
    torch.manual_seed(0)
    c = model.config
    x = torch.randn(B, c.in_channels, T, H, W)
    y = torch.randn(B, 1, c.model_max_length, c.caption_channels)
    return dict(x=x, timestep=torch.tensor([500.0] * B), y=y, mask=None, fps=torch.tensor([24.0] * B),
                height=torch.tensor([64.0] * B), width=torch.tensor([64.0] * B))  # fmt: skip


@pytest.fixture(scope="module")
def stdit3():
    torch.manual_seed(0)
    return build("opensora-v1.2-tiny", device="cpu").eval()


def _hooked(model):
    return {name for name, m in model.named_modules() if get_hook(m, FP8_HOOK) is not None}


def test_apply_hooks_qkv_kv_the_mlps_the_cross_q_and_the_output_projections(stdit3):
    handle = apply_fp8(stdit3)
    try:
        hooked = _hooked(stdit3)
        blocks = len(stdit3.spatial_blocks) + len(stdit3.temporal_blocks)
        # per block: qkv (3C from C) and the text's kv (2C), the MLP whole (fc1 + fc2 weights), the cross q, whose
        # input the gate + residual kernel quantises, and the two output projections, whose inputs the attention
        # kernels write in e4m3; nothing else
        assert handle.linears == 7 * blocks
        assert all(n.endswith(("attn.qkv", "cross_attn.kv_linear", "cross_attn.q_linear", "mlp", "attn.proj"))
                   for n in hooked)  # fmt: skip
        assert not any("t_block" in n or "final" in n or "embedder" in n for n in hooked), sorted(hooked)
        produced = {n for n in hooked if getattr(get_hook(stdit3.get_submodule(n), FP8_HOOK), "produced_only", 0)}
        outputs = {n for n in hooked if isinstance(get_hook(stdit3.get_submodule(n), FP8_HOOK), Fp8OutputHook)}
        assert outputs == {n for n in hooked if n.endswith("proj")} and len(outputs) == 2 * blocks
        assert produced - outputs == {n for n in hooked if n.endswith("q_linear")} and len(produced) == 3 * blocks
    finally:
        assert remove_fp8(stdit3) == len(hooked)
    assert _hooked(stdit3) == set()
    apply_fp8(stdit3, Fp8Config(attention_outputs=False))  # the output projections stay bf16
    try:
        assert not any(n.endswith("proj") for n in _hooked(stdit3))
    finally:
        remove_fp8(stdit3)


def test_latte_output_projections_take_the_attention_kernels_rows():
    """Latte names each attention's `to_out.0` (self and cross) as a projection the kernels can feed in e4m3."""
    latte = build("latte-1-tiny", device="cpu").eval()
    apply_fp8(latte)
    try:
        hooked = _hooked(latte)
        outputs = {n for n in hooked if isinstance(get_hook(latte.get_submodule(n), FP8_HOOK), Fp8OutputHook)}
        attentions = [n for n, m in latte.named_modules() if hasattr(m, "attention_output_linears")]
        assert outputs == {f"{n}.to_out.0" for n in attentions} and any(".attn2" in n for n in attentions)
    finally:
        remove_fp8(latte)


def test_the_hooks_are_inert_without_an_fp8_request_and_close_with_one(stdit3):
    kw = _stdit3_inputs(stdit3)
    with torch.no_grad():
        plain = stdit3(**kw)
        handle = apply_fp8(stdit3)
        try:
            assert torch.equal(stdit3(**kw), plain)  # no request
            with use_precision(PrecisionState("bf16")):
                assert torch.equal(stdit3(**kw), plain)
            with use_precision(PrecisionState("fp8")):
                low = stdit3(**kw)
        finally:
            handle.remove()
        assert torch.equal(stdit3(**kw), plain)  # removed: the plain model again
    err = float((low - plain).norm() / plain.norm())
    assert 1e-4 < err < 0.08, err


def test_a_linear_runs_on_its_e4m3_weight_and_the_e4m3_input():
    torch.manual_seed(1)
    lin = nn.Linear(32, 96)
    x = torch.randn(2, 5, 32)
    register_hook(lin, Fp8LinearHook(lin), innermost=True)
    with torch.no_grad(), use_precision(PrecisionState("fp8")):
        out = lin(x)
    xq, xs = kern.quantize_rows_reference(x.reshape(-1, 32))
    wq, ws = kern.quantize_weight(lin.weight)
    want = ((xq.float() * xs) @ (wq.float() * ws.t()).t() + lin.bias).reshape(2, 5, 96)
    assert out.shape == (2, 5, 96) and torch.allclose(out, want, atol=1e-5)


def test_the_mlp_applies_the_gelu_before_quantising_for_fc2(stdit3):
    mlp = stdit3.spatial_blocks[0].mlp
    fc1, gelu, fc2 = mlp.gelu_linears()
    x = torch.randn(7, fc1.in_features)
    register_hook(mlp, Fp8MlpHook(fc1, gelu, fc2), innermost=True)
    try:
        with torch.no_grad(), use_precision(PrecisionState("fp8")):
            out = mlp(x)
    finally:
        remove_fp8(mlp)
    (w1q, w1s), (w2q, w2s) = kern.quantize_weight(fc1.weight), kern.quantize_weight(fc2.weight)
    h = kern.fp8_matmul(*kern.quantize_rows_reference(x), w1q, w1s, fc1.bias, x.dtype)
    hq, hs = kern.quantize_rows_reference(F.gelu(h, approximate="tanh"))  # bias in the GEMM: the same in float32
    assert torch.allclose(out, kern.fp8_matmul(hq, hs, w2q, w2s, fc2.bias, x.dtype), atol=1e-5)


def test_a_square_linear_with_a_producer_takes_its_rows_and_otherwise_runs_as_configured():
    """A produced-only hook (the cross-attention q): asks its producer for "also" under fp8, nothing under bf16 or
    with produced_inputs off; runs on the rows attached to its input; without rows quantises itself on the CPU
    (the emulation of what the GPU's producer writes); with produced_inputs off runs the plain linear."""
    torch.manual_seed(4)
    lin = nn.Linear(32, 32)
    x = torch.randn(6, 32)
    with torch.no_grad():
        plain = lin(x)
    hook = Fp8LinearHook(lin, produced_only=True)
    register_hook(lin, hook, innermost=True)
    wq, ws = kern.quantize_weight(lin.weight)
    try:
        with torch.no_grad():
            assert lin.fp8_input_mode() is None
            with use_precision(PrecisionState("fp8", config=Fp8Config(produced_inputs=False))):
                assert lin.fp8_input_mode() is None and torch.equal(lin(x), plain)
            with use_precision(PrecisionState("fp8")):
                assert lin.fp8_input_mode() == "also"  # never "only": a producer of the residual stream writes it
                own = lin(x)
                other = torch.randn(6, 32)  # rows that are not x's: proof that the GEMM takes what is attached
                kern.attach(x, *kern.quantize_rows_reference(other))
                given = lin(x)
        want = kern.fp8_matmul(*kern.quantize_rows_reference(x), wq, ws, lin.bias, x.dtype)
        assert torch.allclose(own, want, atol=1e-6) and not torch.equal(own, plain)
        assert torch.allclose(given, kern.fp8_matmul(*kern.quantize_rows_reference(other), wq, ws, lin.bias, x.dtype),
                              atol=1e-6)  # fmt: skip
    finally:
        remove_fp8(lin)


def test_stdit3_asks_for_the_cross_q_rows_only_when_it_runs_in_fp8_and_is_computed():
    """The block asks its gate + residual pass for the residual stream's e4m3 rows when the cross-attention q runs
    in fp8 this forward, and not when PAB broadcasts the cross-attention (its q is not computed)."""
    from pab.broadcast import BroadcastRule, PABConfig, PABState, apply_pab, use_state

    torch.manual_seed(0)
    model = build("opensora-v1.2-tiny", device="cpu").eval()
    cross = model.broadcast_targets()["cross"][0]
    q = cross.q_linear
    handle = apply_fp8(model)
    try:
        assert kern.fp8_input(q) is None
        with use_precision(PrecisionState("fp8")):
            assert kern.fp8_input(q) == "also"
        with use_precision(PrecisionState("fp8", config=Fp8Config(produced_inputs=False))):
            assert kern.fp8_input(q) is None
    finally:
        handle.remove()
    # What the block passes on: recorded at the gate + residual step (the CPU path takes the argument and ignores
    # it: PyTorch's addcmul writes no rows)
    asked = []
    block = next(m for m in model.modules() if hasattr(m, "attn_out") and any(c is cross for c in m.children()))
    real = block.attn_out
    block.attn_out = lambda x, a, mod, fp8=None: asked.append(fp8) or real(x, a, mod, fp8=fp8)
    kw = _stdit3_inputs(model)
    handle = apply_fp8(model)
    pab = apply_pab(model, PABConfig(cross=BroadcastRule(2, (0, 1000))))
    try:
        with torch.no_grad(), use_precision(PrecisionState("fp8")):
            state = PABState()
            with use_state(state):
                for step in range(2):  # step 0 computes the cross-attention, step 1 broadcasts it
                    state.begin_step(step, 500.0)
                    model(**kw)
    finally:
        handle.remove()
        pab.remove()
        del block.attn_out
    assert asked == ["also", None], asked


def _proj_inputs(module: nn.Module, calls: int, state: PrecisionState, seed: int = 0):
    """Run a STDiT3 attention `calls` times on new inputs under `state`; (its outputs, what its proj got)."""
    seen = []
    handle = module.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    g = torch.Generator().manual_seed(seed)
    outs = []
    try:
        with torch.no_grad(), use_precision(state):
            for i in range(calls):
                outs.append(module(torch.randn(2, 16, module.proj.in_features, generator=g) * (1 + i)))
    finally:
        handle.remove()
    return outs, seen


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_an_output_projection_runs_on_rows_scaled_by_the_requests_earlier_calls(kind):
    """A request's first call of an attention runs its projection in bf16 and records the output's amax; each later
    call runs it in fp8 on the output's e4m3 rows, all scaled by 2 x the largest |output| so far (the kernels'
    `DelayedScale`, emulated on the CPU). A new request starts the history again: it repeats exactly."""
    torch.manual_seed(3)
    model = build("opensora-v1.2-tiny", device="cpu").eval()
    attn = model.broadcast_targets()[kind][0]
    proj = attn.proj
    with torch.no_grad():
        proj.weight.normal_(0, 0.1)  # zero at initialisation (DiT's), which would hide the projection's rounding
    wq, ws = kern.quantize_weight(proj.weight)
    handle = apply_fp8(model)
    try:
        outs, seen = _proj_inputs(attn, 3, PrecisionState("fp8"))
        again, _ = _proj_inputs(attn, 3, PrecisionState("fp8"))
    finally:
        handle.remove()
    assert torch.equal(outs[0], F.linear(seen[0], proj.weight, proj.bias))  # the first call: bf16, amax recorded
    top = seen[0].abs().amax()
    for out, x in zip(outs[1:], seen[1:]):
        xq, xs = kern.quantize_delayed(x.reshape(-1, x.shape[-1]), top)
        assert torch.equal(xs, torch.full_like(xs, float(2 * top / 448)))
        want = kern.fp8_matmul(xq, xs, wq, ws, proj.bias, x.dtype).view(out.shape)
        assert torch.allclose(out, want, atol=1e-5)
        assert not torch.allclose(out, F.linear(x, proj.weight, proj.bias), atol=1e-4)
        top = torch.maximum(top, x.abs().amax())
    for a, b in zip(outs, again):
        assert torch.equal(a, b)


def test_output_projections_stay_bf16_when_asked():
    torch.manual_seed(3)
    model = build("opensora-v1.2-tiny", device="cpu").eval()
    attn = model.broadcast_targets()["spatial"][0]
    handle = apply_fp8(model)
    try:
        outs, seen = _proj_inputs(attn, 2, PrecisionState("fp8", config=Fp8Config(attention_outputs=False)))
    finally:
        handle.remove()
    assert all(torch.equal(out, F.linear(x, attn.proj.weight, attn.proj.bias)) for out, x in zip(outs, seen))


def test_bf16_first_and_last_steps():
    state = PrecisionState("fp8", num_steps=6, config=Fp8Config(bf16_first_steps=1, bf16_last_steps=2))
    ran = []
    for i in range(6):
        state.begin_step(i)
        ran.append(state.fp8)
    assert ran == [False, True, True, True, False, False]
    assert state.to_dict() == {"precision": "fp8", "fp8_steps": 3, "bf16_steps": 3}
    with pytest.raises(ValueError, match=">= 0"):
        Fp8Config(bf16_last_steps=-1)


def test_latte_linear_cat_calls_hooked_linears_themselves():
    class Twice(ModelHook):
        name = "twice"

        def new_forward(self, module, forward, x):
            return 2 * forward(x)

    torch.manual_seed(2)
    layers = [nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(3, 8)
    plain = _linear_cat(x, *layers)
    register_hook(layers[1], Twice())
    out = _linear_cat(x, *layers)
    assert torch.allclose(out[:, :8], plain[:, :8], atol=1e-6) and torch.allclose(out[:, 8:16], 2 * plain[:, 8:16], atol=1e-6)


def test_precision_is_a_field_of_every_edge():
    assert VideoSettings.model_validate({"precision": "fp8"}).engine_fields()["precision"] == "fp8"
    with pytest.raises(ValueError, match="bf16"):
        VideoSettings.model_validate({"precision": "fp16"})
    import argparse

    p = argparse.ArgumentParser()
    add_options(p)
    assert from_options(p.parse_args(["--precision", "fp8"])).precision == "fp8"
    with pytest.raises(ValueError, match="--precision"):
        from_options(p.parse_args(["--precision", "int4"]))


@pytest.fixture(scope="module")
def latte():
    return Pipeline.from_name("latte-1-tiny", device="cpu")


def _req(**kw):
    return GenerationRequest(model="latte-1-tiny", prompt="a red fox", steps=6, seed=5, **kw)


def test_pipeline_runs_a_request_in_fp8_and_the_next_in_bf16_unchanged(latte):
    before = latte.generate(_req(cache="paper"), decode=False)
    assert before.request.precision == "bf16" and before.precision["bf16_steps"] == len(before.timesteps)
    low = latte.generate(_req(cache="paper", precision="fp8"), decode=False)
    after = latte.generate(_req(cache="paper"), decode=False)
    assert low.precision == {"precision": "fp8", "fp8_steps": len(low.timesteps), "bf16_steps": 0, "dtype": "float32"}
    assert low.sidecar()["precision"]["precision"] == "fp8"
    assert before.sidecar()["precision"]["dtype"] == "float32"  # "bf16" asked for no fp8; the CPU ran float32
    assert torch.equal(after.latents, before.latents)  # the hooks stay attached, inert for bf16
    assert low.pab_stats == before.pab_stats  # PAB decides the same over fp8 modules
    err = float((low.latents - before.latents).norm() / before.latents.norm())
    assert 0 < err < 0.1, err
    with pytest.raises(ValueError, match="precision='fp16'"):
        latte.generate(_req(precision="fp16"))


@pytest.mark.parametrize("name, grouped", [("latte-1-tiny", True), ("opensora-plan-v1.1-tiny", False)])
def test_each_family_decides_whether_its_q_k_v_run_in_fp8(name, grouped, monkeypatch):
    """Latte's fp8 requests run each self-attention's q, k, v as one fp8 GEMM (Family.fp8); Open-Sora-Plan's, on the
    same blocks but at the 30 dB bar with them, keep them in bf16 unless its pipeline's config asks."""
    ran = []
    real = Fp8GroupHook._run
    monkeypatch.setattr(Fp8GroupHook, "_run", lambda self, x, layers: ran.append(real(self, x, layers) is not None))
    pipe = Pipeline.from_name(name, device="cpu")
    req = GenerationRequest(model=name, prompt="a red fox", steps=4, seed=5, precision="fp8")
    pipe.generate(req, decode=False)
    assert ran and all(ran) is grouped and any(ran) is grouped
    ran.clear()
    pipe.fp8_config = replace(pipe.fp8_config, linear_groups=not grouped)
    pipe.generate(req, decode=False)
    assert ran and all(ran) is not grouped and any(ran) is not grouped


@pytest.mark.parametrize("name, in_fp8", [("latte-1-tiny", False), ("opensora-plan-v1.1-tiny", True)])
def test_each_family_decides_whether_its_cross_attention_q_runs_in_fp8(name, in_fp8, monkeypatch):
    """The blocks Latte and Open-Sora-Plan share name their cross-attention's q as fed by the gate + residual pass
    (`quantized_input_linears`); Open-Sora-Plan's config runs it in fp8, Latte's (1.2-2.1 dB on its small model)
    keeps it in bf16. On the CPU the q quantises its own input, so the video shows which."""
    ran = []
    real = Fp8LinearHook.new_forward

    def spy(self, module, forward, x):
        if self.produced_only:
            ran.append(self.active() is not None)
        return real(self, module, forward, x)

    monkeypatch.setattr(Fp8LinearHook, "new_forward", spy)
    pipe = Pipeline.from_name(name, device="cpu")
    req = GenerationRequest(model=name, prompt="a red fox", steps=4, seed=5, precision="fp8")
    own = pipe.generate(req, decode=False)
    assert ran and all(ran) is in_fp8 and any(ran) is in_fp8
    pipe.fp8_config = replace(pipe.fp8_config, produced_inputs=not in_fp8)
    flipped = pipe.generate(req, decode=False)
    assert not torch.equal(own.latents, flipped.latents)


def test_cuda_graph_patterns_tell_fp8_from_bf16():
    pipe = Pipeline.from_name("latte-1-tiny", device="cpu", engine=EngineOptions(cuda_graphs=True))
    pipe.generate(_req(cache="off"), decode=False)
    assert pipe.graphs.stats["graphs"] == 1
    low = pipe.generate(_req(cache="off", precision="fp8"), decode=False)
    assert pipe.graphs.stats["graphs"] == 2  # an fp8 forward launches other kernels: its own graph
    plain = Pipeline.from_name("latte-1-tiny", device="cpu")
    plain.fp8_config = replace(plain.fp8_config, attention_outputs=False)  # what a graphed request runs (Pipeline)
    assert torch.equal(low.latents, plain.generate(_req(cache="off", precision="fp8"), decode=False).latents)


def test_a_gpu_without_fp8_refuses_the_request_before_any_work(latte, monkeypatch):
    import pab.pipeline

    monkeypatch.setattr(pab.pipeline, "fp8_capable", lambda device: (False, "no fp8 tensor cores; ask for bf16"))
    with pytest.raises(ValueError, match="ask for bf16"):
        latte.resolve(_req(precision="fp8"))
    assert latte.resolve(_req()).precision == "bf16"


def test_latte_qkv_run_as_one_fp8_gemm_when_asked_and_bf16_keeps_its_single_gemm(monkeypatch):
    import pab.models.latte as latte_mod

    torch.manual_seed(3)
    model = build("latte-1-tiny", device="cpu").eval()
    attn = model.broadcast_targets()["spatial"][0]
    x = torch.randn(2, 12, attn.to_q.in_features)
    with torch.no_grad():
        plain = attn(x)
        handle = apply_fp8(model)
        try:
            assert getattr(attn.to_q, "run_group", None) is not None and get_hook(attn.to_q, FP8_HOOK) is None
            calls = []
            real = F.linear
            monkeypatch.setattr(latte_mod.F, "linear", lambda *a: calls.append(a[1].shape) or real(*a))
            assert torch.equal(attn(x), plain)  # bf16: inert, and still one grouped GEMM (3C x C) plus to_out
            assert calls[0] == (3 * attn.to_q.out_features, attn.to_q.in_features)
            with use_precision(PrecisionState("fp8")):  # groups are opt-in (Fp8Config.linear_groups)
                assert torch.equal(attn(x), plain) and attn.fp8_input_mode() is None
            with use_precision(PrecisionState("fp8", config=Fp8Config(linear_groups=True))):
                assert attn.fp8_input_mode() == "only"
                low = attn(x)
            w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
            b = None if attn.to_q.bias is None else torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
            qkv = kern.fp8_matmul(*kern.quantize_rows_reference(x.reshape(-1, x.shape[-1])), *kern.quantize_weight(w),
                                  b, x.dtype).view(2, 12, -1)  # fmt: skip
            want = attn._self_attention(qkv, None)
            assert torch.allclose(low, want, atol=1e-6)
        finally:
            handle.remove()
    assert getattr(attn.to_q, "run_group", None) is None and getattr(attn, "fp8_input_mode", None) is None


def test_a_norm_writes_e4m3_alone_only_where_the_fp8_module_is_its_sole_reader(stdit3):
    """What STDiT3's norms are asked to write (pab.kernels.fp8.fp8_input): nothing extra for bf16; the rows alone
    for the qkv and MLP of an fp8 request, unless a hook on the way reads the values (sequence parallelism sends
    them), or the request's config asks for both."""
    from pab.broadcast import BroadcastRule, PABConfig, apply_pab

    block = stdit3.temporal_blocks[0]
    rule = BroadcastRule(2, (0, 1000))
    handle, pab = apply_fp8(stdit3), apply_pab(stdit3, PABConfig(temporal=rule, mlp=rule))
    try:
        assert kern.fp8_input(block.attn.qkv, block.attn) is None and kern.fp8_input(block.mlp) is None
        with use_precision(PrecisionState("fp8")):
            assert kern.fp8_input(block.attn.qkv, block.attn) == "only" and kern.fp8_input(block.mlp) == "only"

            class Sends(ModelHook):
                name = "sends"

            register_hook(block.attn, Sends())
            assert kern.fp8_input(block.attn.qkv, block.attn) == "also"
        with use_precision(PrecisionState("fp8", config=Fp8Config(e4m3_only_inputs=False))):
            assert kern.fp8_input(block.mlp) == "also"
    finally:
        from pab.hooks.registry import remove_hook

        remove_hook(block.attn, "sends")
        handle.remove()
        pab.remove()


def test_an_fp8_hook_never_runs_bf16_math_on_an_input_written_as_rows_only():
    lin = nn.Linear(32, 96)
    x = torch.empty(4, 32)
    kern.attach(x, *kern.quantize_rows_reference(torch.randn(4, 32)), written=False)
    hook = Fp8LinearHook(lin)
    register_hook(lin, hook, innermost=True)
    try:
        with torch.no_grad(), use_precision(PrecisionState("fp8")):
            assert lin(x).shape == (4, 96)  # the GEMM takes the rows
        with torch.no_grad(), pytest.raises(RuntimeError, match="e4m3 rows only"):
            lin(x)  # no fp8 request: the plain GEMM would read values that were never written
        with torch.no_grad(), use_precision(PrecisionState("fp8")), pytest.raises(RuntimeError, match="rows only"):
            lin(x.view(2, 2, 32).transpose(0, 1))  # another layout: its reshape would copy unwritten values
    finally:
        lin.__dict__.pop("forward", None)


def test_graphs_keep_the_output_projections_in_bf16(monkeypatch):
    """Under CUDA graphs (here the eager backend's bookkeeping) a request's output projections never take e4m3
    rows: a replay would not count the attention's calls that pick a scale's slots."""
    model = "opensora-v1.2-tiny"
    req = GenerationRequest(model=model, prompt="a red fox", seed=2, steps=3, precision="fp8")
    rows = []
    real = Fp8OutputHook.new_forward

    def spy(self, module, forward, x):
        rows.append(kern.companion(x.reshape(-1, x.shape[-1])) is not None)
        return real(self, module, forward, x)

    monkeypatch.setattr(Fp8OutputHook, "new_forward", spy)
    Pipeline.from_name(model, device="cpu").generate(req, decode=False)
    assert rows and any(rows)  # one device, eager: the later calls run on rows
    rows.clear()
    Pipeline.from_name(model, device="cpu", engine=EngineOptions(cuda_graphs=True)).generate(req, decode=False)
    assert rows and not any(rows)
