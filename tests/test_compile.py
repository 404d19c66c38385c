"""pab.compile on CPU: a compiled tiny STDiT3 equals the eager one, PAB is unaffected, removal restores it.

Also the STDiT3 fast paths that only change how the math runs: the temporal-attention implementations
(float32 on CPU; the Triton kernel on CUDA only) must compute the same function.

Tolerance for compiled vs eager (float32): atol = rtol = 2e-5. Inductor fuses and reorders the float32
reductions (LayerNorm, RMSNorm, softmax), which moves these outputs (|ref| up to ~5) by ~1.5e-6; 2e-5
leaves a 10x margin and would still catch any real change in the math.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pab.models.stdit3 as stdit3
from pab.kernels import KernelOptions, set_kernel_options
from pab.kernels import short_attention as short_attn
from pab.broadcast import PABConfig, PABState, apply_pab, remove_pab, use_state
from pab.compile import COMPILE_HOOK, apply_compile, is_compiled, remove_compile
from pab.hooks.registry import get_registry

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
from test_stdit3 import tiny_inputs, tiny_model  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def inductor(inductor):
    """tests/conftest.py's skip where torch.compile cannot build kernels, and one CPU thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; one thread also keeps float32 results reproducible
    yield
    torch.set_num_threads(n)


def _run_steps(model, kw, steps):
    """A miniature denoising loop: one forward per (step, timestep), PAB state as the pipeline keeps it."""
    state, outs = PABState(), []
    with use_state(state), torch.no_grad():
        for i, t in enumerate(steps):
            state.begin_step(i, t)
            outs.append(model(**dict(kw, timestep=torch.full((2,), t))))
    return outs, state.stats


def test_compiled_tiny_stdit3_matches_eager_and_removes_cleanly(inductor):
    model = tiny_model()
    cases = [tiny_inputs(T=3), tiny_inputs(T=3, x_mask=False), dict(tiny_inputs(T=3), mask=None)]
    with torch.no_grad():
        refs = [model(**kw) for kw in cases]
        handle = apply_compile(model)
        assert is_compiled(model)
        assert len(handle.hooked) == 4 * stdit3.SIZES["tiny"]["depth"]  # spatial + temporal + 2 cross per depth
        blocks = 2 * stdit3.SIZES["tiny"]["depth"]
        assert handle.regions == {name: blocks for name in stdit3.STDiT3Block.compile_regions}
        for kw, ref in zip(cases, refs):
            out = model(**kw)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            torch.testing.assert_close(out, ref, **TOL)
        remove_compile(model)
        assert not is_compiled(model)
        assert all("attn_in" not in m.__dict__ for m in model.modules())
        assert torch.equal(model(**cases[0]), refs[0])  # the eager model, bit for bit


def test_blocks_share_compiled_graphs(inductor):
    """Dynamo treats parameters as inputs: 4 blocks of a kind compile no more graphs than 2 would."""
    from torch._dynamo.utils import counters

    graphs = {}
    for depth in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(depth=depth)
        apply_compile(model)
        with torch.no_grad():
            model(**tiny_inputs(T=3))
        graphs[depth] = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[4] == graphs[2]


@pytest.mark.parametrize("pab_first", [True, False])
def test_pab_stats_and_outputs_unaffected_by_compile(inductor, pab_first):
    kw = tiny_inputs(T=3)
    steps = [950.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0]  # crosses the paper window (450, 930)
    config = PABConfig.preset("opensora-v1.2", "paper")

    eager = tiny_model()
    apply_pab(eager, config)
    ref, ref_stats = _run_steps(eager, kw, steps)
    assert sum(s["broadcast"] for s in ref_stats.values()) > 0  # PAB really reused outputs

    model = tiny_model()
    if pab_first:
        apply_pab(model, config)
        apply_compile(model)
    else:
        apply_compile(model)
        apply_pab(model, config)
    # The compile hook is innermost wherever it was registered: PAB decides before anything compiled runs.
    for module in model.broadcast_targets()["spatial"]:
        assert [h.name for h in get_registry(module).hooks][0] == COMPILE_HOOK
    outs, stats = _run_steps(model, kw, steps)
    assert stats == ref_stats
    for out, r in zip(outs, ref):
        torch.testing.assert_close(out, r, **TOL)
    remove_pab(model)
    remove_compile(model)
    assert all(not get_registry(m).hooks for m in model.modules() if get_registry(m, create=False) is not None)


def test_cuda_graph_modes_are_refused():
    with pytest.raises(ValueError, match="no-cudagraphs"):
        apply_compile(tiny_model(), mode="reduce-overhead")


def test_compile_twice_is_an_error(inductor):
    model = tiny_model()
    apply_compile(model)
    with pytest.raises(ValueError, match="already compiled"):
        apply_compile(model)
    remove_compile(model)


# ---------------------------------------------------------------------------- STDiT3 fast paths


def temporal_impl(module: torch.nn.Module, impl: str) -> None:
    set_kernel_options(module, KernelOptions(temporal_attention=impl))


def test_bmm_temporal_attention_equals_sdpa():
    model = tiny_model()
    kw = tiny_inputs(T=5)
    with torch.no_grad():
        temporal_impl(model, "sdpa")
        ref = model(**kw)
        temporal_impl(model, "bmm")
        out = model(**kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temporal_attention='nope'; choose one of auto"):
        temporal_impl(model, "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or short_attn.triton is None, reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_temporal_attention_matches_sdpa_on_cuda(dtype):
    torch.manual_seed(0)
    attn = stdit3.SelfAttention(1152, 16, True, rope=stdit3.RotaryEmbedding(72)).cuda().to(dtype)
    x = torch.randn(64, 15, 1152, device="cuda", dtype=dtype)
    with torch.no_grad():
        temporal_impl(attn, "sdpa")
        ref = attn(x).float()
        temporal_impl(attn, "triton")
        out = attn(x).float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_text_is_cut_to_the_last_kept_token():
    model = tiny_model()
    y = torch.randn(2, 1, 6, stdit3.SIZES["tiny"]["caption_channels"])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    emb, m = model.encode_text(y, mask, 2)
    assert emb.shape[1] == 3 and m.tolist() == [[True] * 3, [True, True, False]]
    emb, m = model.encode_text(y, torch.tensor([[1, 1, 0, 0, 0, 0]] * 2), 2)
    assert emb.shape[1] == 2 and m is None  # all kept after the cut: no mask, so flash attention can run
