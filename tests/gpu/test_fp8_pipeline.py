"""On a GPU with fp8 tensor cores: an fp8 request through the pipeline runs torch._scaled_mm and the Triton
quantisation, and lands near the bf16 video (tests/test_precision.py proves the arithmetic on CPU)."""

from dataclasses import replace

import pytest
import torch

from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a GPU with fp8 tensor cores"),  # fmt: skip
]


@pytest.mark.parametrize("model", ["opensora-v1.2-small", "latte-1-small"])
def test_fp8_request_on_gpu_is_close_to_bf16(model):
    pipe = Pipeline.from_name(model, device="cuda")
    req = dict(model=model, prompt="a red circle moving left on a black background", seed=1)
    bf16 = pipe.generate(GenerationRequest(**req))
    low = pipe.generate(GenerationRequest(**req, precision="fp8"))
    assert low.precision["fp8_steps"] == len(low.timesteps) and pipe._fp8.linears > 0
    err = float((low.latents - bf16.latents).norm() / bf16.latents.norm())
    assert 0 < err < 0.3, err
    diff = (low.frames.astype(float) - bf16.frames.astype(float)) ** 2
    psnr = 10 * torch.log10(torch.tensor(255.0**2 / diff.mean())).item()
    assert psnr > 25, psnr  # bench.quality: 33-40 dB on average over held-out prompts


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny"])
def test_norm_kernels_write_the_fp8_rows_the_linears_would_make(model, monkeypatch):
    """The e4m3 rows written by the norm kernels are the ones the linears' own quantisation makes: the fp8
    forward is bit-identical with them and without them (each linear then quantises its input itself), and
    with the rows written alone (the bf16 values skipped where the fp8 module is their only reader)."""
    from pab.kernels import fp8 as kern
    from pab.kernels import norms

    pipe = Pipeline.from_name(model, device="cuda")
    req = GenerationRequest(model=model, prompt="a red fox", seed=2, steps=4, precision="fp8")
    modes = []
    real_ln = norms._ln_modulate
    monkeypatch.setattr(norms, "_ln_modulate", lambda *a, **kw: modes.append(kw.get("fp8")) or real_ln(*a, **kw))
    alone = pipe.generate(req, decode=False)
    assert "only" in modes and "also" not in modes  # no hook reads these inputs on one GPU
    own = pipe.fp8_config  # the family's (Latte's runs its q, k, v in fp8 too)
    pipe.fp8_config = replace(own, e4m3_only_inputs=False)
    modes.clear()
    fused = pipe.generate(req, decode=False)
    assert "also" in modes and "only" not in modes
    assert torch.equal(alone.latents, fused.latents)
    # Without the rows a linear quantises its input itself, except the cross-attention's q and the output projections,
    # which then run in bf16 (tested below and in tests/test_precision.py): so both runs here leave them in bf16.
    pipe.fp8_config = replace(own, e4m3_only_inputs=False, produced_inputs=False, attention_outputs=False)
    fused = pipe.generate(req, decode=False)
    made = []
    real = kern.companion
    monkeypatch.setattr(kern, "companion", lambda x: made.append(real(x) is not None))
    separate = pipe.generate(req, decode=False)
    assert any(made)  # the norm kernels did write rows (the patched lookup ignored them)
    assert torch.equal(fused.latents, separate.latents)


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "opensora-plan-v1.1-tiny"])
def test_the_gate_residual_kernel_writes_the_cross_q_rows_its_own_quantisation_would(model, monkeypatch):
    """Every computed cross-attention q of an fp8 request finds e4m3 rows on its input (the residual stream, from
    the gate + residual kernel), bit for bit those `quantize_rows` makes; with produced_inputs off it runs in bf16,
    so the latents differ."""
    from pab.kernels import fp8 as kern
    from pab.precision import Fp8LinearHook

    pipe = Pipeline.from_name(model, device="cuda")
    req = GenerationRequest(model=model, prompt="a red fox", seed=2, steps=4, precision="fp8")
    seen = []
    real = Fp8LinearHook.new_forward

    def spy(self, module, forward, x):
        if self.produced_only:
            x2d = x.reshape(-1, x.shape[-1])
            rows = kern.companion(x2d)
            seen.append(rows is not None and all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if
                                                 a.dtype == kern.E4M3 else torch.equal(a, b)
                                                 for a, b in zip(rows, kern.quantize_rows(x2d))))  # fmt: skip
        return real(self, module, forward, x)

    monkeypatch.setattr(Fp8LinearHook, "new_forward", spy)  # before the first fp8 request attaches the hooks
    with_rows = pipe.generate(req, decode=False)
    assert seen and all(seen), seen
    pipe.fp8_config = replace(pipe.fp8_config, produced_inputs=False)
    without = pipe.generate(req, decode=False)
    assert not torch.equal(with_rows.latents, without.latents)


@pytest.mark.parametrize("model", ["opensora-v1.2-tiny", "latte-1-tiny"])
def test_output_projections_run_on_the_rows_the_attention_kernels_write(model, monkeypatch):
    """Each attention's first call in a request runs its output projection in bf16 (no scale yet); every later call
    finds e4m3 rows on the projection's input, written by the attention kernel (flash, short-sequence) itself."""
    from pab.kernels import fp8 as kern
    from pab.precision import Fp8OutputHook

    pipe = Pipeline.from_name(model, device="cuda")
    req = GenerationRequest(model=model, prompt="a red fox", seed=2, steps=4, precision="fp8")
    calls: dict[int, list[bool]] = {}
    real = Fp8OutputHook.new_forward

    def spy(self, module, forward, x):
        calls.setdefault(id(self), []).append(kern.companion(x.reshape(-1, x.shape[-1])) is not None)
        return real(self, module, forward, x)

    monkeypatch.setattr(Fp8OutputHook, "new_forward", spy)
    for _ in range(2):  # the second request starts each history again
        calls.clear()
        pipe.generate(req, decode=False)
        attentions = [m for m in pipe.transformer.modules() if hasattr(m, "attention_output_linears")]
        assert len(calls) == len(attentions) > 0  # every self- and cross-attention's projection
        assert all(c == [False, True, True, True] for c in calls.values()), calls
