"""bench/quality.py: each fp8 mode is its own row, compared with the same setting in bf16."""

import pytest

from bench.quality import evaluate, main
from pab.pipeline import Pipeline


def test_each_fp8_mode_is_a_row_against_its_setting_in_bf16():
    pipe = Pipeline.from_name("latte-1-tiny", device="cpu")
    own = pipe.fp8_config
    res = evaluate(pipe, {"off": "off"}, prompts=1, steps=4, precisions=("bf16", "fp8+nogroups", "fp8"))
    assert list(res) == ["off", "off@fp8+nogroups", "off@fp8"]
    assert res["off"]["psnr_db"] is None  # the reference itself
    assert res["off@fp8"]["precision"] == "fp8" and res["off@fp8+nogroups"]["precision"] == "fp8+nogroups"
    # Latte's own config runs q, k, v in fp8 too: one more rounding, so another video than without them
    assert res["off@fp8"]["psnr_db"] != res["off@fp8+nogroups"]["psnr_db"]
    assert pipe.fp8_config is own


def test_a_misspelt_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "latte-1-tiny", "--precision", "fp8+grups", "--prompts", "1"])
    assert "fp8+groups" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--prompts", "0"], "--prompts must be 1 to 64"),  # was an UnboundLocalError after loading the model
    (["--prompts", "65"], "--prompts must be 1 to 64"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_counts_out_of_range_are_refused_before_any_work(capsys, args, said):
    with pytest.raises(SystemExit) as e:
        main(["--model", "latte-1-tiny", "--settings", "off", *args])
    assert e.value.code == 2 and said in capsys.readouterr().err
