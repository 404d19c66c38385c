"""pab/request.py: one schema of a video's settings, and every edge derived from it."""

import argparse
import dataclasses
import json

import pytest
from pydantic import ValidationError

from pab.errors import RequestError
from pab.request import (
    VideoSettings, add_options, describe, field_path, from_options,
)  # fmt: skip


def test_every_edge_takes_the_same_fields():
    from cluster.api import VideoCreate
    from jobs.manifest import ROW_SETTINGS, RenderSettings
    from pab.pipeline import GenerationRequest

    fields = set(VideoSettings.model_fields)
    assert {f.name for f in dataclasses.fields(GenerationRequest)} == fields | {"model", "prompt"}
    assert set(ROW_SETTINGS) == fields and set(RenderSettings.model_fields) == fields
    assert set(VideoCreate.model_fields) == fields | {"model", "prompt", "seconds", "size"}
    # and the same limits: a bound is written once
    for schema in (VideoCreate, RenderSettings):
        for name in fields:
            assert schema.model_fields[name].metadata == VideoSettings.model_fields[name].metadata, (schema, name)


def parse(*argv: str, **defaults) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_options(p, **defaults)
    return p.parse_args(list(argv))


def test_options_are_the_fields():
    args = parse("--num-frames", "17", "--guidance", "4.5", "--seed", "3", "--negative-prompt", "blur")
    s = from_options(args)
    assert (s.num_frames, s.guidance_scale, s.seed, s.negative_prompt) == (17, 4.5, 3, "blur")
    assert from_options(parse("--guidance-scale", "2")).guidance_scale == 2.0
    assert parse().seed is None and parse(seed=0).seed == 0  # an edge may choose its own default
    assert s.engine_fields()["pab"] == "off" and s.engine_fields()["cache"] is None


@pytest.mark.parametrize("argv, field, message", [
    (["--steps", "0"], "steps", "--steps: Input should be greater than or equal to 1 (got 0)"),
    (["--num-frames", "2000"], "num_frames", "--num-frames: Input should be less than or equal to 1024 (got 2000)"),
    (["--num-frames", "2000", "--seed", "-1"], "num_frames", "--num-frames: "),  # the first the message names
    (["--seed", "-1"], "seed", "--seed: Input should be greater than or equal to 0 (got -1)"),
    (["--cache", "Tea Cache"], "cache", "--cache: String should match pattern"),
    (["--cache", '{"spatial": {"range": 0, "window": [1, 2]}}'], "cache.spatial.range",  # the deepest
     "--cache.spatial.range: Input should be greater"),
    (["--cache", "missing.json"], "cache", "--cache: settings file 'missing.json' does not exist"),
    (["--pab", "{nope"], "pab", "--pab: '{nope' is not valid JSON"),
    # an explicit off beside another cache: the engine would have run the cache (it takes pab's default for off)
    (["--pab", "off", "--cache", "paper"], "pab", "--pab: cache 'paper' and pab 'off' disagree"),
])  # fmt: skip
def test_a_bad_option_is_a_request_error_naming_it(argv, field, message):
    with pytest.raises(RequestError) as e:
        from_options(parse(*argv))
    assert e.value.field == field and str(e.value).startswith(message), str(e.value)


def test_cache_and_its_older_name_may_agree():
    for both in ("paper", "off"):
        assert from_options(parse("--pab", both, "--cache", both)).engine_fields()["cache"] == both
    assert from_options(parse("--pab", "paper")).engine_fields()["pab"] == "paper"


def test_a_json_file_is_read_at_the_edge(tmp_path):
    rules = {"spatial": {"range": 2, "window": [450, 930]}}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    s = from_options(parse("--cache", str(tmp_path / "rules.json")))
    assert s.engine_fields()["cache"] == {"spatial": {"range": 2, "window": (450.0, 930.0)}}
    (tmp_path / "cal.json").write_text(json.dumps({"presets": {"teacache-slow": {}}}))
    with pytest.raises(ValueError, match="is a calibration file; pass one of its presets by name"):
        from_options(parse("--cache", str(tmp_path / "cal.json")))


def test_a_request_body_names_no_file():
    """Over HTTP or in a manifest, a cache is a preset's name or rules: never a path the server would read."""
    for bad in ("../cal.json", "/etc/passwd", "Teacache"):
        with pytest.raises(ValidationError):
            VideoSettings(cache=bad)
    assert VideoSettings(cache="teacache-slow").cache == "teacache-slow"


def test_describe_reports_the_branch_a_value_was_meant_for():
    with pytest.raises(ValidationError) as e:
        VideoSettings(cache={"policy": "teacache", "threshold": -1}, steps=0)
    text = describe(e.value)
    assert text.startswith("cache.threshold: Input should be greater than or equal to 0")
    with pytest.raises(ValidationError) as e:
        VideoSettings(num_frames=0)
    assert describe(e.value).startswith("num_frames: ")  # a manifest's column name, as written
    assert describe(e.value, prefix="--").startswith("--num-frames: ")  # an option, as typed
    assert "steps: Input should be greater than or equal to 1 (got 0)" in text and "PABSettings" not in text


@pytest.mark.parametrize("cache, said", [
    ({"spatial": {"range": 0, "window": [450, 930]}}, "cache.spatial.range: Input should be greater than or equal"),
    ({"spatial": {"range": 2, "window": [1, 2]}, "crosss": None}, "cache.crosss: Extra inputs are not permitted"),
    ({"policy": "teacache", "treshold": 0.1}, "cache.treshold: Extra inputs are not permitted"),
    ({"policy": "tea"}, "cache.policy: Input should be 'teacache', 'magcache' or 'fixed'"),
    ("Paper!", "cache: String should match pattern"),
    (5, "cache: must be a preset name, an object of PAB rules or a step-reuse policy, or null"),
])
def test_a_cache_value_is_judged_as_the_form_it_was_meant_as(cache, said):
    """An object with `policy` is a step-reuse policy, any other object PAB rules, a string a preset: only that
    form's errors are reported (a misspelt rule name was "policy: Field required", from the form nobody meant)."""
    with pytest.raises(ValidationError) as e:
        VideoSettings(cache=cache)
    assert describe(e.value).startswith(said), describe(e.value)
    assert all(field_path(err["loc"]).startswith("cache") for err in e.value.errors())
    assert len(e.value.errors()) == 1, e.value.errors()


def test_a_window_written_as_a_fraction_of_the_schedule_is_refused_with_the_scale():
    """[0.45, 0.93] was taken and broadcast nothing: timesteps are on the 0-1000 scale."""
    with pytest.raises(ValidationError) as e:
        VideoSettings(cache={"spatial": {"range": 2, "window": [0.45, 0.93]}})
    assert "cache.spatial.window: window [0.45, 0.93] is on the 0-1000 timestep scale" in describe(e.value)
    assert "write [450, 930]" in describe(e.value)
