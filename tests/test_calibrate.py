"""`pab calibrate` on a checkpoint: it measures, fits, writes presets beside the weights, and they work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pipeline import save_checkpoint

from pab.calibrate import Recorder, main, replay
from pab.pipeline import GenerationRequest, Pipeline
from pab.stepcache import StepReuseConfig


def test_calibrate_writes_presets_that_the_pipeline_reads(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(Pipeline.from_name("opensora-v1.2-tiny", device="cpu"), ckpt)
    assert main(["--model", "opensora-v1.2-tiny", "--checkpoint", str(ckpt), "--count", "3", "--steps", "10",
                 "--device", "cpu", "--plot", str(tmp_path / "cal.png")]) == 0  # fmt: skip
    doc = json.loads((ckpt / "cache.json").read_text())
    assert (tmp_path / "cal.png").stat().st_size > 10_000 and "teacache-slow" in capsys.readouterr().out
    assert doc["steps"] == 10 and len(doc["magcache"]["ratios"]) == 10 and len(doc["teacache"]["coefficients"]) == 5
    assert [len(c) for c in doc["measured"]["indicator_change"]] == [9, 9, 9]
    # the file ships beside the weights: each run's measurements on one line, at 4 significant digits
    text = (ckpt / "cache.json").read_text()
    assert all(float(f"{v:.4g}") == v for run in doc["measured"]["residual_norm"] for v in run)
    ratios = [line.strip() for line in text.splitlines() if '"ratios":' in line and "[]" not in line]
    assert ratios and all(r.rstrip(",").endswith("]") and r.count(",") >= 9 for r in ratios)  # 10 on one line
    for name, target in (("slow", 0.4), ("fast", 0.7)):
        for policy in ("teacache", "magcache"):
            assert doc["reuse_on_calibration"][f"{policy}-{name}"] >= target
    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cpu", checkpoint=ckpt)
    r = pipe.generate(GenerationRequest(model=pipe.name, prompt=doc["prompts"][0], seed=0, steps=10,
                                        cache="teacache-fast"))  # fmt: skip
    # On the run it was measured on, the first reuse decisions are the replayed ones: the trajectory is the
    # full model's until the first reused step.
    replayed = replay(StepReuseConfig.from_dict(doc["presets"]["teacache-fast"]), doc["measured"]["indicator_change"][0], 10)
    assert r.cache_stats["reused_steps"][0] == replayed[0]


def test_an_output_folder_that_is_missing_is_refused_before_the_measurement(tmp_path, capsys, monkeypatch):
    """Minutes of measuring are not lost at the end: a missing --out or --plot folder is exit 2 up front."""
    monkeypatch.setattr("pab.calibrate.calibrate", lambda *a, **k: pytest.fail("measured before checking --out"))
    for flag in ("--out", "--plot"):
        argv = ["--model", "opensora-v1.2-small", "--count", "1", "--device", "cpu", flag, str(tmp_path / "no" / "c.x")]
        assert main(argv) == 2
        assert f"{tmp_path / 'no'} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--steps", "1"], "--steps must be at least 2"),
    (["--steps", "-5"], "--steps must be at least 2"),
    (["--count", "0"], "--count must be at least 1"),
    (["--out", "{tmp}"], "is a folder: give a file path"),
])  # fmt: skip
def test_bad_options_are_refused_before_the_weights_load(extra, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pab.pipeline.Pipeline.from_name", lambda *a, **k: pytest.fail("loaded before checking"))
    extra = [x.format(tmp=tmp_path) for x in extra]
    assert main(["--model", "opensora-v1.2-small", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_presets_short_of_their_target_are_named():
    """With few steps a policy's warm-up leaves too few to reuse: the preset ends at the search's cap, and
    `pab calibrate` says which ones instead of shipping them silently."""
    from pab.calibrate import short_of_target

    doc = {"reuse_on_calibration": {"teacache-fast": 0.667, "teacache-slow": 0.42, "magcache-fast": 0.7,
                                    "fixed-fast": 0.1}}  # fmt: skip
    assert short_of_target(doc) == ["teacache-fast"]


def test_the_recorder_measures_the_residual_the_model_computes():
    pipe = Pipeline.from_name("latte-1-tiny", device="cpu")
    rec = Recorder()
    r = pipe.generate(GenerationRequest(model=pipe.name, prompt="a cat", seed=0, steps=6), step_state=rec)
    assert r.cache_stats["reused"] == 0 and len(rec.residual_norm) == 6 and len(rec.residual_change) == 5
    assert len(rec.changes) == 5 and all(np.isfinite(rec.changes)) and all(c > 0 for c in rec.residual_change)
    off = pipe.generate(GenerationRequest(model=pipe.name, prompt="a cat", seed=0, steps=6))
    assert torch.equal(r.latents, off.latents)  # measuring changes nothing
