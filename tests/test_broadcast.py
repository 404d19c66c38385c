"""PAB hooks on a toy spatial-temporal model: the rule, the counters, isolation, removal."""

import json

import pytest
import torch
import torch.nn as nn

from pab.broadcast import KINDS, BroadcastRule, PABConfig, PABState, apply_pab, remove_pab, use_state
from pab.caching import resolve_cache
from pab.errors import RequestError
from pab.hooks.registry import ModelHook, register_hook, remove_hook


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.cross = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn(x))
        x = x + torch.tanh(self.cross(x))
        return x + torch.tanh(self.mlp(x))


class ToyDiT(nn.Module):
    """Two spatial and two temporal blocks; the time embedding makes every step's output differ."""

    def __init__(self, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.spatial_blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.t_embed = nn.Linear(1, dim)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        x = x + self.t_embed(torch.tensor([[t / 1000.0]]))
        for s, tb in zip(self.spatial_blocks, self.temporal_blocks):
            x = tb(s(x))
        return x

    def broadcast_targets(self):
        return {
            "spatial": [b.attn for b in self.spatial_blocks],
            "temporal": [b.attn for b in self.temporal_blocks],
            "cross": [b.cross for b in [*self.spatial_blocks, *self.temporal_blocks]],
            "mlp": [b.mlp for b in [*self.spatial_blocks, *self.temporal_blocks]],
        }


TIMESTEPS = [980.0 - 20 * i for i in range(50)]  # Latte's DDIM schedule: 980, 960, ..., 0


def run(model: ToyDiT, state: PABState | None, x: torch.Tensor, steps=TIMESTEPS) -> list[torch.Tensor]:
    outs = []
    for i, t in enumerate(steps):
        if state is None:
            outs.append(model(x, t))
            continue
        with use_state(state):
            state.begin_step(i, t)
            outs.append(model(x, t))
    return outs


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyDiT(), torch.randn(3, 8)


def test_off_and_range_one_are_bit_identical(toy):
    model, x = toy
    plain = run(model, None, x)
    for config in (PABConfig.off(), PABConfig(**{k: BroadcastRule(1, (0, 1000)) for k in KINDS})):
        handle = apply_pab(model, config)
        state = PABState()
        hooked = run(model, state, x)
        assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
        assert all(v["broadcast"] == 0 for v in state.stats.values())
        assert state.stats["spatial"]["computed"] == 2 * len(TIMESTEPS)
        handle.remove()


def expected_counts(rule: BroadcastRule, n_modules: int, steps=TIMESTEPS, blocks=None) -> tuple[int, int]:
    """Independent statement of the rule: reuse iff lo < t < hi and i % r != 0 (and a cache exists)."""
    computed = broadcast = 0
    for block in blocks if blocks is not None else [None] * n_modules:
        has_cache = False
        for i, t in enumerate(steps):
            reuse = has_cache and rule.window[0] < t < rule.window[1] and i % rule.range != 0
            if rule.blocks is not None and block not in rule.blocks:
                reuse = False
            computed += not reuse
            broadcast += reuse
            has_cache = has_cache or not reuse
    return computed, broadcast


def test_stats_follow_the_rule_for_the_latte_paper_preset(toy):
    model, x = toy
    config = PABConfig.preset("latte-1", "paper")
    apply_pab(model, config)
    state = PABState()
    run(model, state, x)
    assert state.stats["spatial"] == dict(zip(("computed", "broadcast"), expected_counts(config.spatial, 2)))
    assert state.stats["temporal"] == dict(zip(("computed", "broadcast"), expected_counts(config.temporal, 2)))
    assert state.stats["cross"] == dict(zip(("computed", "broadcast"), expected_counts(config.cross, 4)))
    # MLP broadcast is limited to blocks 0-4; the toy has blocks 0, 1 (spatial) and 0, 1 (temporal).
    assert state.stats["mlp"] == dict(
        zip(("computed", "broadcast"), expected_counts(config.mlp, 4, blocks=[0, 1, 0, 1]))
    )
    # Window (100, 800) at steps of 20: t = 780..120 inside; spatial range 2 reuses the odd steps there.
    assert state.stats["spatial"]["broadcast"] == 2 * sum(
        1 for i, t in enumerate(TIMESTEPS) if 100 < t < 800 and i % 2
    )
    assert (
        state.stats["spatial"]["broadcast"] > 0
        and state.stats["cross"]["broadcast"] > state.stats["spatial"]["broadcast"]
    )


def test_broadcast_reuses_the_last_computed_output(toy):
    model, x = toy
    seen = []

    class Record(ModelHook):  # registered first, so it sits inside PAB and sees real computations
        name = "record"

        def new_forward(self, module, forward, *args, **kwargs):
            seen.append(args[0])
            return forward(*args, **kwargs)

    register_hook(model.spatial_blocks[0].attn, Record())
    apply_pab(model, PABConfig(spatial=BroadcastRule(2, (0, 1000))))
    state = PABState()
    outs = run(model, state, x, steps=[900.0, 890.0, 880.0])
    # Step 1 reuses step 0's attention output, so the module ran at steps 0 and 2 only.
    assert len(seen) == 2
    # And the result differs from the plain model at step 1 only.
    remove_pab(model)
    remove_hook(model.spatial_blocks[0].attn, "record")
    plain = run(model, None, x, steps=[900.0, 890.0, 880.0])
    assert torch.equal(outs[0], plain[0]) and not torch.equal(outs[1], plain[1])


def test_requests_and_cfg_branches_keep_their_own_caches(toy):
    model, x = toy
    apply_pab(model, PABConfig.preset("latte-1", "paper"))
    x2 = torch.randn(3, 8)
    a_alone = run(model, PABState(), x)
    b_alone = run(model, PABState(), x2)
    # Interleave two generations step by step on the same model.
    sa, sb, a_mix, b_mix = PABState(), PABState(), [], []
    for i, t in enumerate(TIMESTEPS):
        for state, inp, outs in ((sa, x, a_mix), (sb, x2, b_mix)):
            with use_state(state):
                state.begin_step(i, t)
                outs.append(model(inp, t))
    assert all(torch.equal(p, q) for p, q in zip(a_alone, a_mix))
    assert all(torch.equal(p, q) for p, q in zip(b_alone, b_mix))
    # Two CFG branches of one request run as separate forwards: each reuses only its own outputs.
    s = PABState()
    cond, uncond = [], []
    for i, t in enumerate(TIMESTEPS):
        with use_state(s):
            s.begin_step(i, t)
            with s.cfg_branch("cond"):
                cond.append(model(x, t))
            with s.cfg_branch("uncond"):
                uncond.append(model(x2, t))
    assert all(torch.equal(p, q) for p, q in zip(a_alone, cond))
    assert all(torch.equal(p, q) for p, q in zip(b_alone, uncond))


def test_remove_restores_the_plain_model_and_double_apply_fails(toy):
    model, x = toy
    plain = run(model, None, x)
    apply_pab(model, PABConfig.preset("latte-1", "paper"))
    with pytest.raises(ValueError, match="already registered"):
        apply_pab(model, PABConfig.off())
    assert remove_pab(model) == 2 + 2 + 4 + 4
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(plain, run(model, PABState(), x)))


def test_config_parsing_and_errors(tmp_path):
    cfg = PABConfig.resolve("opensora-v1.2", "paper")
    assert cfg.to_dict()["spatial"] == {"range": 2, "window": [450.0, 930.0]}
    assert (cfg.temporal.range, cfg.cross.range) == (4, 6)
    assert PABConfig.resolve("latte-1-tiny", "paper").temporal.range == 3
    assert PABConfig.resolve("opensora-plan-v1.1", "paper").spatial.window == (100.0, 850.0)
    f = tmp_path / "rules.json"
    f.write_text('{"spatial": {"range": 3, "window": [200, 700]}, "cross": null}')
    assert resolve_cache("latte-1", str(f)).pab.spatial == BroadcastRule(3, (200, 700))
    with pytest.raises(ValueError, match="unknown PAB preset|unknown PAB setting"):
        PABConfig.resolve("latte-1", "fast")
    with pytest.raises(ValueError, match="range must be an integer >= 1"):
        PABConfig.from_dict({"spatial": {"range": 0, "window": [1, 2]}})
    with pytest.raises(ValueError, match="unknown PAB kind"):
        PABConfig.from_dict({"spacial": {"range": 2, "window": [1, 2]}})
    with pytest.raises(ValueError, match="lo < hi"):
        BroadcastRule(2, (800, 100))


TINY_RANGE = "opensora-v1.2-tiny has blocks 0-1$"


@pytest.mark.parametrize(
    "model, block, message",
    [
        ("opensora-v1.2-tiny", 999999, r"^spatial block 999999 does not exist; " + TINY_RANGE),
        ("opensora-v1.2-tiny", -1, r"^spatial block -1 does not exist \(blocks count from 0, not from"),
        ("opensora-v1.2-tiny", -1, TINY_RANGE),
        ("opensora-v1.2-tiny", 2, "block 2 does not exist; " + TINY_RANGE),
        ("opensora-v1.2-small", 4, "block 4 does not exist; opensora-v1.2-small has blocks 0-3$"),
        ("latte-1", 28, "block 28 does not exist; latte-1 has blocks 0-27$"),
    ],
)
def test_blocks_outside_the_model_are_an_error_naming_the_field_and_the_range(tmp_path, model, block, message):
    """#19 item 6: an index the model lacks matched no hook, so the rule was ignored without a word."""
    rules = {"spatial": {"range": 2, "window": [450, 930], "blocks": [0, block]}}
    with pytest.raises(RequestError, match=message) as e:
        PABConfig.resolve(model, rules)
    assert e.value.field == "spatial.blocks"  # the message leaves the field to whoever shows it
    f = tmp_path / "rules.json"  # `pab generate --pab FILE.json` goes the same way
    f.write_text(json.dumps(rules))
    with pytest.raises(ValueError, match=message):
        resolve_cache(model, str(f))


@pytest.mark.parametrize(
    "rules, field",
    [
        ({"spatial": {"range": 0, "window": [1, 2]}}, "spatial.range"),
        ({"cross": {"range": 2, "window": [9, 1]}}, "cross.window"),
        ({"temporal": {"range": 2}}, "temporal.window"),
        ({"mlp": {"range": 2, "window": [1, 2], "block": [0]}}, "mlp.block"),
        ({"spacial": {"range": 2, "window": [1, 2]}}, "spacial"),
        ({"mlp": {"range": 2, "window": [1, 2], "blocks": [2]}}, "mlp.blocks"),
    ],
)
def test_a_bad_rule_names_its_path_in_the_rules(rules, field):
    """A RequestError's field, relative to the rules: the request's checks put it under "cache"
    (`pab.pipeline.resolve_request`), so the HTTP 400 names the nested field."""
    with pytest.raises(RequestError) as e:
        PABConfig.resolve("opensora-v1.2-tiny", rules)
    assert e.value.field == field, e.value


def test_blocks_inside_the_model_and_presets_still_resolve():
    rules = {"mlp": {"range": 3, "window": [590, 870], "blocks": [0, 1]}}
    assert PABConfig.resolve("opensora-v1.2-tiny", rules).mlp.blocks == (0, 1)
    last = {"cross": {"range": 6, "window": [100, 800], "blocks": [27]}}
    assert PABConfig.resolve("latte-1", last).cross.blocks == (27,)
    # The paper preset names MLP blocks 0-4 for the full-size models; a 2-block tiny model keeps it as is.
    assert PABConfig.resolve("opensora-v1.2-tiny", "paper").mlp.blocks == (0, 1, 2, 3, 4)


def test_output_reused_is_the_outermost_hooks_answer(toy):
    """A model may skip computing a module's input only when nothing outside PAB's hook would read it."""
    from pab.hooks.registry import output_reused

    model, x = toy
    attn = model.spatial_blocks[0].attn
    apply_pab(model, PABConfig(spatial=BroadcastRule(2, (0, 1000))))
    state = PABState()
    answers = []
    for i, t in enumerate([900.0, 890.0, 880.0]):
        with use_state(state):
            state.begin_step(i, t)
            answers.append(output_reused(attn))
            model(x, t)
    assert answers == [False, True, False] and not output_reused(attn)  # no request running: computes

    class Reads(ModelHook):  # outside PAB: it would read the input
        name = "reads"

    register_hook(attn, Reads())
    with use_state(state):
        state.begin_step(3, 870.0)
        assert not output_reused(attn)
    assert not output_reused(model.spatial_blocks[0].mlp)  # no PAB hook answers for it
