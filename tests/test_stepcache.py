"""Step reuse against the plain model: nothing reused is bit-identical, the counters follow an independent
statement of each rule, a reused step runs no block, and each request's state is its own."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pab.errors import RequestError
from pab.pipeline import GenerationRequest, Pipeline
from pab.stepcache import StepReuseConfig, remove_step_cache

TINY = ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"]
COEFFS = (3.0, -1.0, 0.5)  # any polynomial: the rule is checked, not the fit


@pytest.fixture(scope="module", params=TINY)
def pipe(request):
    return Pipeline.from_name(request.param, device="cpu")


def req(pipe, **kw) -> GenerationRequest:
    return GenerationRequest(model=pipe.name, prompt="a red circle moving right", seed=2, steps=8, **kw)


def test_nothing_reused_is_bit_identical_to_off(pipe):
    off = pipe.generate(req(pipe))
    for cache in ({"policy": "teacache", "threshold": 0.0, "coefficients": COEFFS},
                  {"policy": "magcache", "threshold": 0.0, "ratios": [1.0, 0.9, 1.1]}):  # fmt: skip
        r = pipe.generate(req(pipe, cache=cache))
        assert torch.equal(r.latents, off.latents) and (r.frames == off.frames).all(), cache["policy"]
        assert r.cache_stats == {"computed": len(r.timesteps), "reused": 0, "reused_steps": []}
        assert r.pab_stats == off.pab_stats
    assert off.cache_stats == {} and off.cache["name"] == "off"


def _indicators(pipe):
    """The first block's modulated input at every model call, seen by a plain forward pre-hook (not ours)."""
    seen: list[torch.Tensor] = []
    block = pipe.transformer.step_cache_targets()["blocks"][0]
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(m.modulated_input(*args, **kwargs)),
                                             with_kwargs=True)  # fmt: skip
    return seen, handle


def test_teacache_reuses_where_its_rule_says(pipe):
    """The rule written out again here: accumulate the rescaled relative L1 change of the indicator; reuse while
    the sum is under the threshold, except the first and last step; a computed step resets the sum."""
    seen, handle = _indicators(pipe)
    try:
        cfg = {"policy": "teacache", "threshold": 0.6, "coefficients": COEFFS}
        r = pipe.generate(req(pipe, cache=cfg))
    finally:
        handle.remove()
    total, expected, acc = len(r.timesteps), [], 0.0
    for i in range(total):
        if 0 < i < total - 1:
            d = float((seen[i] - seen[i - 1]).abs().sum() / seen[i - 1].abs().sum())
            acc += max(0.0, float(np.polyval(COEFFS, d)))
            if acc < cfg["threshold"]:
                expected.append(i)
                continue
        acc = 0.0
    assert r.cache_stats["reused_steps"] == expected and expected, (expected, r.cache_stats)
    assert r.cache_stats["computed"] + r.cache_stats["reused"] == total


def test_magcache_reuses_where_its_rule_says(pipe):
    ratios = [1.0, 0.97, 0.95, 0.99, 0.9, 1.02, 0.96, 0.93]
    cfg = StepReuseConfig("magcache", threshold=0.12, ratios=tuple(ratios), max_skips=2, warmup=2)
    r = pipe.generate(req(pipe, cache=cfg.to_dict()))
    total, expected = len(r.timesteps), []
    acc, prod, run = 0.0, 1.0, 0
    for i in range(total):
        pos = i * (len(ratios) - 1) / (total - 1)
        lo = min(int(pos), len(ratios) - 2)
        prod *= ratios[lo] + (pos - lo) * (ratios[lo + 1] - ratios[lo])
        acc, run = acc + abs(1 - prod), run + 1
        if 2 <= i < total - 1 and acc < 0.12 and run <= 2:
            expected.append(i)
        else:
            acc, prod, run = 0.0, 1.0, 0
    assert r.cache_stats["reused_steps"] == expected and expected, (expected, r.cache_stats)


def test_a_fixed_schedule_reuses_its_steps_at_their_relative_positions(pipe):
    cfg = StepReuseConfig("fixed", reuse=(2, 3, 5, 9, 10), reuse_of=12)
    r = pipe.generate(req(pipe, cache=cfg.to_dict()))
    total = len(r.timesteps)
    expected = sorted({round(s * (total - 1) / 11) for s in (2, 3, 5, 9, 10)} - {0, total - 1})
    assert r.cache_stats["reused_steps"] == expected
    with pytest.raises(ValueError, match="reuse positions in"):
        StepReuseConfig("fixed", reuse=(12,), reuse_of=12)


def test_a_reused_step_runs_no_block_and_moves_the_output_boundedly(pipe):
    mlps = pipe.transformer.broadcast_targets()["mlp"]  # one per block: what a block computes last
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in mlps]
    try:
        off = pipe.generate(req(pipe))
        n_off = len(calls)
        calls.clear()
        r = pipe.generate(req(pipe, cache={"policy": "magcache", "threshold": 10.0, "ratios": [1.0], "max_skips": 1}))
    finally:
        for h in handles:
            h.remove()
    assert r.cache_stats["reused"] > 0
    assert n_off == len(mlps) * len(off.timesteps) and len(calls) == len(mlps) * r.cache_stats["computed"]
    assert sum(r.pab_stats["spatial"].values()) < sum(off.pab_stats["spatial"].values())
    change = (r.latents - off.latents).abs().mean() / off.latents.abs().mean()
    assert 0 < change < 1.0


def test_each_request_has_its_own_state(pipe):
    cfg = {"policy": "teacache", "threshold": 0.6, "coefficients": COEFFS}
    a = pipe.generate(req(pipe, cache=cfg))
    off = pipe.generate(req(pipe))
    b = pipe.generate(req(pipe, cache=cfg))
    assert torch.equal(a.latents, b.latents) and a.cache_stats == b.cache_stats
    assert torch.equal(off.latents, pipe.generate(req(pipe, cache="off")).latents)
    other = pipe.generate(replace(req(pipe, cache=cfg), prompt="a blue square moving up", seed=5))
    assert torch.equal(pipe.generate(req(pipe, cache=cfg)).latents, a.latents) and other.cache_stats
    # Removing the hooks gives the plain model back.
    assert remove_step_cache(pipe.transformer) == len(pipe.transformer.step_cache_targets()["blocks"]) + 1
    pipe._step_handle = None
    assert not any("forward" in b.__dict__ for b in pipe.transformer.step_cache_targets()["blocks"])
    assert torch.equal(pipe.generate(req(pipe)).latents, off.latents)


def test_bad_policies_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown step-reuse policy"):
        StepReuseConfig("fastcache", 0.1)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        StepReuseConfig("teacache", float("nan"))
    with pytest.raises(ValueError, match="needs the calibrated ratios"):
        StepReuseConfig("magcache", 0.1)
    with pytest.raises(ValueError, match="max_skips must be an integer"):
        StepReuseConfig("magcache", 0.1, ratios=(1.0,), max_skips=-1)
    with pytest.raises(ValueError, match=r"unknown step-reuse field\(s\) \['treshold'\]"):
        StepReuseConfig.from_dict({"policy": "teacache", "threshold": 0.1, "treshold": 2})


@pytest.mark.parametrize(
    "policy, field",
    [
        ({"policy": "fastcache", "threshold": 0.1}, "policy"),
        ({"policy": "teacache"}, "threshold"),
        ({"threshold": 0.1}, "policy"),
        ({"policy": "teacache", "threshold": float("inf")}, "threshold"),
        ({"policy": "magcache", "threshold": 0.1}, "ratios"),
        ({"policy": "magcache", "threshold": 0.1, "ratios": [1.0], "warmup": -1}, "warmup"),
        ({"policy": "teacache", "threshold": 0.1, "coefficients": [float("nan")]}, "coefficients"),
        ({"policy": "fixed", "reuse": [1]}, "reuse_of"),
        ({"policy": "fixed", "reuse": [5], "reuse_of": 3}, "reuse"),
        ({"policy": "teacache", "threshold": 0.1, "treshold": 2}, "treshold"),
    ],
)
def test_a_bad_policy_names_its_field(policy, field):
    """The field is relative to the policy; a request's checks put it under "cache" (the HTTP 400's param)."""
    with pytest.raises(RequestError) as e:
        StepReuseConfig.from_dict(policy)
    assert e.value.field == field, e.value
