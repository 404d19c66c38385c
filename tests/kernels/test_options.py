"""KernelOptions: attached from outside to every module that reads them, restored by the context manager, and
what a model runs follows them (no module-level switch)."""

import sys
from pathlib import Path

import pytest
import torch

from pab.kernels import DEFAULT_KERNELS, KernelOptions, kernel_options, set_kernel_options
from pab.models import build, stdit3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
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
