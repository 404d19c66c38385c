"""KernelOptions: attached from outside to every module that reads them, restored by the context manager, and
what a model runs follows them (no module-level switch)."""

import sys
from pathlib import Path

import pytest
import torch

from pab.kernels import DEFAULT_KERNELS, KernelOptions, kernel_options, set_kernel_options
from pab.kernels import flash_attention as flash
from pab.models import build, stdit3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from support.kernels import DEVICE, needs_triton  # noqa: E402
from test_latte import tiny_inputs as latte_inputs  # noqa: E402
from test_latte import tiny_model as latte_model  # noqa: E402
from test_stdit3 import tiny_inputs, tiny_model  # noqa: E402


def readers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(type(m), "kernels", None), KernelOptions)]


@pytest.mark.parametrize("name", ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"])
def test_options_reach_every_reading_module_and_are_restored(name):
    model = build(name, dtype=torch.float32)
    mods = readers(model)
    assert len(mods) > 3 and all(m.kernels == DEFAULT_KERNELS for m in mods)
    with kernel_options(model, norms=False, fused_gelu=False) as opts:
        assert opts == KernelOptions(norms=False, fused_gelu=False)
        assert all(m.kernels is opts for m in mods)
    assert all(m.kernels == DEFAULT_KERNELS for m in mods)
    other = build(name, dtype=torch.float32)  # another instance of the same model is never touched
    before = set_kernel_options(model, KernelOptions(temporal_attention="bmm"))
    assert before == DEFAULT_KERNELS and all(m.kernels == DEFAULT_KERNELS for m in readers(other))


def test_a_bad_option_names_the_choices():
    with pytest.raises(ValueError, match="temporal_attention='flash'; choose one of auto, triton, bmm, sdpa"):
        KernelOptions(temporal_attention="flash")
    with pytest.raises(ValueError, match="spatial_attention='cudnn'; choose one of sdpa, triton"):
        KernelOptions(spatial_attention="cudnn")
    with pytest.raises(ValueError, match="cross_attention='flash'; choose one of sdpa, triton"):
        KernelOptions(cross_attention="flash")


@pytest.mark.parametrize("impl,calls", [("bmm", {"bmm": 2}), ("sdpa", {})])
def test_the_model_runs_what_its_options_say(impl, calls, monkeypatch):
    """The tiny STDiT3's 2 temporal blocks take the selected path; the bmm path is counted where it is taken."""
    seen: dict[str, int] = {}
    real = stdit3._bmm_attention
    monkeypatch.setattr(stdit3, "_bmm_attention", lambda *a: seen.update(bmm=seen.get("bmm", 0) + 1) or real(*a))
    model = tiny_model()
    set_kernel_options(model, KernelOptions(temporal_attention=impl))
    with torch.no_grad():
        model(**tiny_inputs(T=5))
    assert seen == calls


@needs_triton
@pytest.mark.parametrize("family,part", [("stdit3", "spatial"), ("stdit3", "cross"), ("latte", "spatial"),
                                         ("latte", "cross")])  # fmt: skip
def test_attention_through_the_flash_kernel(family, part, monkeypatch):
    """spatial_attention / cross_attention="triton" send those attentions (and nothing else) through
    pab.kernels.flash_attention, to the model's output with SDPA; the cross-attention with its text key mask.
    Float32 on DEVICE: in Triton's interpreter on the CPU, where `supported` (CUDA, half precision) would leave
    every call to SDPA, so it is told to accept them."""
    model, inputs = (tiny_model(), tiny_inputs(T=5)) if family == "stdit3" else (latte_model(), latte_inputs(F=5))
    model, inputs = model.to(DEVICE), {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}
    calls = []
    real = flash.flash_attention
    monkeypatch.setattr(flash, "supported", lambda *a: True)
    monkeypatch.setattr(flash, "flash_attention", lambda q, k, v, **kw: calls.append(
        (q.shape[2], k.shape[2], kw["key_mask"] is not None)) or real(q, k, v, **kw))  # fmt: skip
    with torch.no_grad():
        plain = model(**inputs)
        set_kernel_options(model, KernelOptions(**{f"{part}_attention": "triton"}))
        kernel = model(**inputs)
    plain, kernel = (x[0] if isinstance(x, tuple) else x for x in (plain, kernel))
    spatial = len([m for m in model.modules() if type(m).__name__ == "SpatialBlock"]) or len(model.spatial_blocks)
    if part == "spatial":  # 8 x 8 latents in 2 x 2 patches: 16 tokens, the spatial blocks only
        assert calls == [(16, 16, False)] * spatial
    elif family == "stdit3":  # every block's cross-attention: 5 frames x 16 tokens against 6 text tokens, a mask
        assert calls == [(80, 6, True)] * 2 * spatial
    else:  # the spatial blocks' cross-attention: a frame's 16 tokens against the 6 text tokens, no mask
        assert calls == [(16, 6, False)] * spatial
    torch.testing.assert_close(kernel, plain, atol=1e-4, rtol=1e-4)
