"""One `cache` field for every cache: names, files and dicts resolve to PAB rules or a step-reuse policy."""

from __future__ import annotations

import json

import pytest
import torch

from pab.broadcast import PABConfig
from pab.caching import resolve_cache
from pab.pipeline import GenerationRequest, Pipeline

CALIBRATION = {"presets": {"teacache-slow": {"policy": "teacache", "threshold": 0.1, "coefficients": [1.0, 0.0]}}}


def test_names_dicts_and_files_resolve(tmp_path):
    assert resolve_cache("latte-1-tiny", None).name == "off" and not resolve_cache("latte-1-tiny", "off").pab.enabled
    paper = resolve_cache("latte-1-tiny", "paper")
    assert paper.pab == PABConfig.preset("latte-1-tiny", "paper") and paper.step is None
    named = resolve_cache("latte-1-tiny", "teacache-slow", CALIBRATION)
    assert named.name == "teacache-slow" and named.step.threshold == 0.1 and not named.pab.enabled
    rules = {"spatial": {"range": 2, "window": [100, 900]}}
    assert resolve_cache("latte-1-tiny", rules).pab.spatial.range == 2
    policy = {"policy": "magcache", "threshold": 0.2, "ratios": [1.0, 0.9]}
    assert resolve_cache("latte-1-tiny", policy).step.ratios == (1.0, 0.9)
    (tmp_path / "mine.json").write_text(json.dumps(policy))
    from_file = resolve_cache("latte-1-tiny", str(tmp_path / "mine.json"))
    assert from_file.name == "mine" and from_file.step.policy == "magcache"
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    assert resolve_cache("latte-1-tiny", str(tmp_path / "rules.json")).pab.spatial.window == (100.0, 900.0)


def test_full_size_models_have_teacaches_published_presets():
    for model, first in (("opensora-v1.2", 2.17546007e02), ("latte-1", -2.46434137e03),
                         ("opensora-plan-v1.1", 2.05943668e05)):  # fmt: skip
        slow, fast = resolve_cache(model, "teacache-slow"), resolve_cache(model, "teacache-fast")
        assert (slow.step.threshold, fast.step.threshold) == (0.1, 0.2) and slow.step.coefficients[0] == first
    # A calibration beside the weights wins over the published numbers.
    assert resolve_cache("opensora-v1.2", "teacache-slow", CALIBRATION).step.threshold == 0.1
    assert resolve_cache("opensora-v1.2", "teacache-slow", CALIBRATION).step.coefficients == (1.0, 0.0)
    with pytest.raises(ValueError, match="magcache-slow"):  # magcache needs a measurement: no published preset
        resolve_cache("opensora-v1.2", "magcache-slow")


def test_what_is_not_accepted_says_what_is(tmp_path):
    with pytest.raises(ValueError, match=r"unknown cache 'teacache-slow'.*`pab calibrate --model latte-1-tiny --checkpoint DIR`"):
        resolve_cache("latte-1-tiny", "teacache-slow")
    with pytest.raises(ValueError, match=r"use one of \['off', 'paper', 'teacache-slow'\]"):
        resolve_cache("latte-1-tiny", "fast", CALIBRATION)
    (tmp_path / "cal.json").write_text(json.dumps(CALIBRATION))
    with pytest.raises(ValueError, match=r"is a calibration file; pass one of its presets by name"):
        resolve_cache("latte-1-tiny", str(tmp_path / "cal.json"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_cache("latte-1-tiny", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="block 9 does not exist"):
        resolve_cache("latte-1-tiny", {"spatial": {"range": 2, "window": [1, 2], "blocks": [9]}})
    with pytest.raises(ValueError, match="disagree"):
        GenerationRequest(model="latte-1-tiny", prompt="p", pab="paper", cache="off").cache_spec()
    assert GenerationRequest(model="latte-1-tiny", prompt="p", pab="paper").cache_spec() == "paper"


def test_the_shipped_model_has_its_presets_and_pab_is_cache():
    pipe = Pipeline.from_name("opensora-v1.2-small", device="cpu")
    assert {"teacache-slow", "teacache-fast", "magcache-slow", "magcache-fast"} <= set(pipe.calibration["presets"])
    base = dict(model=pipe.name, prompt="a red circle moving right on a black background", seed=1)  # 30 steps
    fast = pipe.generate(GenerationRequest(**base, cache="teacache-fast"))
    assert fast.cache["name"] == "teacache-fast" and fast.cache_stats["reused"] > 0
    assert fast.sidecar()["cache"] == {"policy": fast.cache, "stats": fast.cache_stats}
    # `pab` is the older name of the same field: one policy, the same video.
    a = pipe.generate(GenerationRequest(**base, pab="paper"))
    b = pipe.generate(GenerationRequest(**base, cache="paper"))
    assert torch.equal(a.latents, b.latents) and a.cache == b.cache and a.pab_stats == b.pab_stats


def test_hooks_taken_off_the_transformer_by_hand_are_attached_again():
    """`remove_pab` / `remove_step_cache` on `pipe.transformer` left the pipeline holding handles to hooks that were
    gone: the next request ran without reuse and was still reported as `paper` or a step-reuse policy."""
    from pab.broadcast import remove_pab
    from pab.stepcache import remove_step_cache

    name = "opensora-v1.2-tiny"
    pipe = Pipeline.from_name(name, device="cpu")
    fixed = {"policy": "fixed", "reuse": [2, 3], "reuse_of": 6}
    for cache, removal in (("paper", remove_pab), (fixed, remove_step_cache)):
        r = GenerationRequest(model=name, prompt="a fox", steps=6, seed=3, cache=cache)
        first = pipe.generate(r)
        assert removal(pipe.transformer) > 0
        again = pipe.generate(r)
        assert torch.equal(again.latents, first.latents)
        assert again.pab_stats == first.pab_stats and again.cache_stats == first.cache_stats
    assert first.cache_stats["reused_steps"] == [2, 3]
