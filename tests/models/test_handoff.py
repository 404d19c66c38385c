"""The handoff between blocks (pab/models/handoff.py): one pass for a block's MLP residual and the next block's
first norm, proved against the same model with the handoff off (Open-Sora's and Latte's blocks), under PAB and
with a hook between blocks. The official fixtures (test_stdit3, test_latte, test_opensora_plan) run with it on."""

import pytest
import torch

from pab.broadcast import BroadcastRule, PABConfig, PABState, apply_pab, use_state
from pab.hooks.registry import ModelHook, register_hook
from pab.models.handoff import Handoff
from pab.models.latte import LatteBlock
from pab.models.stdit3 import STDiT3Block
from support.kernels import CUDA

import test_latte  # tests/models: the tiny models and their inputs
from test_stdit3 import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_take_hands_over_once_and_only_for_its_block_and_tensor():
    a, b, c = (torch.nn.Linear(1, 1) for _ in range(3))
    handoff = Handoff([a, b, c])
    assert handoff.after(a) is b and handoff.after(b) is c and handoff.after(c) is None
    x, attn_in, mod = torch.zeros(2), torch.ones(2), torch.ones(1)
    handoff.put(b, x, attn_in, mod)
    assert handoff.take(c, x) is None  # another block
    assert handoff.take(b, x) is None  # taken (and dropped) by the failed take above: once only
    handoff.put(b, x, attn_in, mod)
    assert handoff.take(b, x.clone()) is None  # another tensor with the same values
    handoff.put(b, x, attn_in, mod)
    x.add_(1)
    assert handoff.take(b, x) is None  # the same tensor, changed since
    handoff.put(b, x, attn_in, mod)
    given = handoff.take(b, x)
    assert given.attn_input is attn_in and given.mod is mod


def _calls(monkeypatch, cls=STDiT3Block) -> list:
    """Record each block that computes its input from the block before's residual (one call per handoff)."""
    calls, real = [], cls.attn_in_after

    def spy(self, *args):
        calls.append(self)
        return real(self, *args)

    monkeypatch.setattr(cls, "attn_in_after", spy)
    return calls


def _no_handoff(monkeypatch) -> None:
    monkeypatch.setattr(Handoff, "after", lambda self, block: None)


def test_stdit3_with_the_handoff_is_the_model_without_it(monkeypatch):
    """Every block but the first takes its input from the one before, and the output is the same bits (float32,
    the PyTorch path: the same operations, in one method instead of two)."""
    model, kw = tiny_model(), tiny_inputs()
    calls = _calls(monkeypatch)
    with torch.no_grad():
        out = model(**kw)
    assert calls == model.block_order()[1:]
    with monkeypatch.context() as m, torch.no_grad():
        _no_handoff(m)
        assert torch.equal(model(**kw), out)
    assert len(calls) == len(model.block_order()) - 1  # nothing handed over with it off


def test_no_handoff_to_a_block_whose_attention_is_broadcast(monkeypatch):
    """Under PAB a reused attention reads no input, so nothing is computed for it; each step's output is what the
    model without the handoff gives."""
    model, kw = tiny_model(), tiny_inputs()
    apply_pab(model, PABConfig(spatial=BroadcastRule(2, (0, 1000)), mlp=BroadcastRule(2, (0, 1000), (0,))))
    steps = [900.0, 880.0, 860.0]

    def run():
        state, outs = PABState(), []
        for i, t in enumerate(steps):
            with use_state(state), torch.no_grad():
                state.begin_step(i, t)
                outs.append(model(**kw))
        return outs

    calls = _calls(monkeypatch)
    outs = run()
    blocks = model.block_order()
    temporal = [b for b in blocks[1:] if b.temporal]
    # step 1 broadcasts every spatial attention: only the temporal blocks get their input handed over
    assert calls == blocks[1:] + temporal + blocks[1:]
    with monkeypatch.context() as m:
        _no_handoff(m)
        for got, want in zip(run(), outs):
            assert torch.equal(got, want)


def test_a_hook_that_changes_a_blocks_input_gets_it_computed_afresh(monkeypatch):
    """A hook outside a block that passes it another tensor: the block computes its own input from that tensor,
    as without the handoff (what was handed over was for the tensor the block before returned)."""

    class Shift(ModelHook):
        name = "shift"

        def new_forward(self, module, forward, x, *args, **kwargs):
            return forward(x + 0.5, *args, **kwargs)

    model, kw = tiny_model(), tiny_inputs()
    blocks = model.block_order()
    register_hook(blocks[2], Shift())
    with torch.no_grad():
        out = model(**kw)
    with monkeypatch.context() as m, torch.no_grad():
        _no_handoff(m)
        assert torch.equal(model(**kw), out)


@pytest.mark.parametrize("temporal", [True, False])
def test_latte_with_the_handoff_is_the_model_without_it(monkeypatch, temporal):
    """Latte hands over between every two blocks but the first two (the frame table is added between them), and
    between the spatial blocks alone without temporal attention; the output is the same bits (float32)."""
    model, kw = test_latte.tiny_model(), test_latte.tiny_inputs()
    kw["enable_temporal_attentions"] = temporal
    calls = _calls(monkeypatch, LatteBlock)
    out = test_latte.run(model, **kw)
    order = model.block_order()
    assert calls == (order[2:] if temporal else list(model.transformer_blocks)[1:])
    with monkeypatch.context() as m:
        _no_handoff(m)
        assert torch.equal(test_latte.run(model, **kw), out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the kernel path runs on CUDA")
def test_stdit3_kernel_path_with_the_handoff_is_the_same_bits(monkeypatch):
    """bf16 on CUDA: the fused kernel (gated residual + the next norm) gives what the two kernels give apart."""
    from pab.kernels import norms

    model = tiny_model().cuda().to(torch.bfloat16)
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in tiny_inputs().items()}
    calls = _calls(monkeypatch)
    with torch.no_grad():
        out = model(**kw)
        assert norms._CHECKED and len(calls) == len(model.block_order()) - 1
        _no_handoff(monkeypatch)
        assert torch.equal(model(**kw), out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the kernel path runs on CUDA")
def test_latte_kernel_path_with_the_handoff_is_the_same_bits(monkeypatch):
    """bf16 on CUDA: the fused passes (between blocks, and the temporal block's attention residual + MLP norm) give
    what the separate kernels give."""
    from pab.models.latte import TemporalBlock

    model = test_latte.tiny_model().cuda().to(torch.bfloat16)
    kw = {k: v.cuda().to(torch.bfloat16) for k, v in test_latte.tiny_inputs().items()}
    with torch.no_grad():
        out = test_latte.run(model, **kw)
        _no_handoff(monkeypatch)

        def apart(self, x, a, mod):
            x = self.attn_out(x, a, mod)
            return x, self.mlp_in(x, mod)

        monkeypatch.setattr(TemporalBlock, "attn_out_mlp_in", apart)
        assert torch.equal(test_latte.run(model, **kw), out)
