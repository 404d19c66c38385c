"""bench.mp4: the encoder-tail benchmark runs end to end on a small clip and records what it printed."""

import json

import numpy as np
import pytest

from bench import mp4
from pab.video import DEFAULT_X264


@pytest.mark.parametrize("kind", ["noise", "pan", "moving"])
def test_content_has_the_asked_shape_and_moves(kind):
    frames = mp4.content(kind, 6, 24, 40)
    assert frames.shape == (6, 24, 40, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])  # a video, not a still


def test_a_small_run_writes_every_setting_of_every_content(tmp_path, capsys):
    out = tmp_path / "mp4.json"
    assert mp4.main(["--frames", "6", "--size", "32x48", "--decode-s", "0.05", "--content", "pan,noise",
                     "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert [(r["content"], r["x264"]) for r in record["rows"]] == [(k, s) for k in ("pan", "noise") for s in mp4.SETTINGS]
    for r in record["rows"]:
        assert 0 <= r["tail_s"] <= r["total_s"] and r["mb"] > 0 and 5 < r["psnr_db"] < 99
    noise = [r for r in record["rows"] if r["content"] == "noise"]
    pan = [r for r in record["rows"] if r["content"] == "pan"]
    assert min(r["mb"] for r in noise) > max(r["mb"] for r in pan)  # noise is the costly case for x264
    assert "medium, rc-lookahead 8" in capsys.readouterr().out
    ours = next(r for r in record["rows"] if r["x264"] == "ours")
    assert ours["options"] == DEFAULT_X264  # what the writer ran with by default is recorded


def test_settings_pick_a_subset_and_an_unknown_one_is_named(tmp_path):
    out = tmp_path / "mp4.json"
    args = ["--frames", "4", "--size", "32x48", "--decode-s", "0.01", "--content", "pan", "--out", str(out)]
    assert mp4.main([*args, "--settings", "veryfast, rc-lookahead 8;ours"]) == 0
    assert [r["x264"] for r in json.loads(out.read_text())["rows"]] == ["veryfast, rc-lookahead 8", "ours"]
    with pytest.raises(SystemExit, match="unknown setting 'slow'"):
        mp4.main([*args, "--settings", "slow"])
