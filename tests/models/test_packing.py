"""Linears run as one GEMM, packed end to end: the GEMM reads a view, and nothing a user sees changes."""

import pytest
import torch
import torch.nn as nn

from pab.models.latte import SIZES, LatteConfig, LatteTransformer3DModel, _linear_cat
from pab.models.opensora_plan import SIZES as PLAN_SIZES
from pab.models.opensora_plan import LatteT2V, LatteT2VConfig
from pab.models.packing import end_to_end, pack_joint_linears, pack_linears
from pab.pipeline import Pipeline
from support.seams import randomize_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_latte(seed: int = 0) -> LatteTransformer3DModel:
    return randomize_state(LatteTransformer3DModel(LatteConfig(**SIZES["tiny"])).eval(), seed)


def latte_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.tensor([900.0, 300.0]),
                encoder_hidden_states=torch.randn(2, 5, SIZES["tiny"]["caption_channels"], generator=g))  # fmt: skip


def groups(model: nn.Module) -> list[tuple[nn.Linear, ...]]:
    return [g for m in model.modules() if hasattr(m, "joint_linears") for g in m.joint_linears()]


def test_end_to_end_is_a_view_only_of_tensors_laid_in_order():
    buf = torch.arange(24.0).view(6, 4)
    a, b, c = buf[0:1], buf[1:3], buf[3:6]
    view = end_to_end([a, b, c])
    assert view is not None and view.data_ptr() == buf.data_ptr() and torch.equal(view, buf)
    assert end_to_end([b, c]).data_ptr() == b.data_ptr()  # a run that starts inside the buffer
    assert end_to_end([b, a]) is None  # out of order
    assert end_to_end([a, c]) is None  # a gap
    assert end_to_end([buf[:, :2], buf[:, 2:]]) is None  # not contiguous
    assert end_to_end([torch.zeros(2, 4), torch.zeros(2, 4)]) is None  # separate tensors
    assert end_to_end([buf[0:2].view(4, 2), buf[2:4]]) is None  # rows of different widths
    vec = torch.arange(6.0)
    assert torch.equal(end_to_end([vec[:2], vec[2:]]), vec)  # biases: one dimension


def test_pack_linears_keeps_names_values_and_grad_flags_and_is_idempotent():
    torch.manual_seed(0)
    lins = [nn.Linear(8, n) for n in (8, 8, 16)]
    lins[2].requires_grad_(False)
    before = {f"{i}.{k}": v.clone() for i, lin in enumerate(lins) for k, v in lin.state_dict().items()}
    assert pack_linears(*lins)
    after = {f"{i}.{k}": v for i, lin in enumerate(lins) for k, v in lin.state_dict().items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(lin.weight, nn.Parameter) for lin in lins)
    assert [lin.weight.requires_grad for lin in lins] == [True, True, False]
    assert end_to_end([lin.weight for lin in lins]) is not None
    assert end_to_end([lin.bias for lin in lins]) is not None
    assert not pack_linears(*lins)  # already end to end: nothing re-made
    with pytest.raises(ValueError, match="all have a bias or none"):
        pack_linears(nn.Linear(4, 4), nn.Linear(4, 4, bias=False))


def test_packed_latte_gives_the_same_output_bit_for_bit_and_joins_no_copy():
    model, kw = tiny_latte(), latte_inputs()
    with torch.no_grad():
        plain = model(**kw)[0]
    n = pack_joint_linears(model)
    assert n == 2 * SIZES["tiny"]["num_layers"] + SIZES["tiny"]["num_layers"]  # q,k,v x 2 stacks; cross k,v
    for group in groups(model):
        assert end_to_end([lin.weight for lin in group]).data_ptr() == group[0].weight.data_ptr()
    with torch.no_grad():
        packed = model(**kw)[0]
    assert torch.equal(packed, plain)


def test_a_load_into_a_packed_model_keeps_it_packed_and_a_dtype_change_falls_back_correctly():
    model, other, kw = tiny_latte(0), tiny_latte(7), latte_inputs()
    pack_joint_linears(model)
    model.load_state_dict(other.state_dict())  # copies into the packed buffers
    assert all(end_to_end([lin.weight for lin in g]) is not None for g in groups(model))
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], other(**kw)[0])
    model = model.to(torch.float64)  # new tensors per parameter: no longer end to end
    assert all(end_to_end([lin.weight for lin in g]) is None for g in groups(model))
    with torch.no_grad():
        out = model(**{k: v.double() if v.is_floating_point() else v for k, v in kw.items()})[0]
    torch.testing.assert_close(out.float(), other(**kw)[0], rtol=1e-4, atol=1e-5)


def test_linear_cat_on_packed_weights_equals_separate_linears_with_and_without_bias():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    for bias in (True, False):
        lins = [nn.Linear(8, 8, bias=bias) for _ in range(3)]
        want = torch.cat([lin(x) for lin in lins], dim=-1)
        pack_linears(*lins)
        torch.testing.assert_close(_linear_cat(x, *lins), want)


def test_open_sora_plan_packs_its_latte_attentions():
    model = LatteT2V(LatteT2VConfig(**PLAN_SIZES["tiny"])).eval()
    assert pack_joint_linears(model) == len(groups(model)) > 0
    assert all(end_to_end([lin.weight for lin in g]) is not None for g in groups(model))


def test_the_pipeline_packs_the_transformer_it_is_given():
    pipe = Pipeline.from_name("latte-1-tiny", device="cpu")
    assert groups(pipe.transformer)
    assert all(end_to_end([lin.weight for lin in g]) is not None for g in groups(pipe.transformer))
