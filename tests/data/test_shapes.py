"""The synthetic text-video data: deterministic, captions that parse back, held-out prompts never drawn."""

import pytest
import torch

from pab.data import shapes
from pab.data.shapes import ObjectSpec, Scene, held_out_scenes, parse_caption, render, sample_scenes


def test_same_seed_same_clips_and_captions():
    a = sample_scenes(16, torch.Generator().manual_seed(3))
    b = sample_scenes(16, torch.Generator().manual_seed(3))
    assert a == b
    va, vb = render(a, seed=7), render(b, seed=7)
    assert torch.equal(va, vb) and va.shape == (16, 3, 17, 64, 64)
    assert va.min() >= -1 and va.max() <= 1
    assert not torch.equal(va, render(a, seed=8))  # positions and sizes come from the seed


def test_captions_parse_back_and_cover_the_vocabulary():
    scenes = sample_scenes(2000, torch.Generator().manual_seed(0))
    assert all(parse_caption(s.caption()) == s for s in scenes)
    seen = {(o.shape, o.colour, o.motion) for s in scenes for o in s.objects}
    assert {x[0] for x in seen} == set(shapes.SHAPES) and {x[1] for x in seen} == set(shapes.COLOURS)
    assert {x[2] for x in seen} == set(shapes.MOTIONS)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)
    assert any(len(s.objects) == 2 for s in scenes) and any(len(s.objects) == 1 for s in scenes)
    words = set(shapes.caption_words())
    assert all(set(s.caption().split()) <= words for s in scenes)
    assert "an orange" in " ".join(s.caption() for s in scenes)  # the article agrees


def test_held_out_prompts_are_fixed_varied_and_never_drawn():
    held = held_out_scenes()
    assert len(held) == 64 == len(set(held)) and held == held_out_scenes()
    assert {s.objects[0].shape for s in held} == set(shapes.SHAPES)
    assert {s.objects[0].colour for s in held} == set(shapes.COLOURS)
    assert {s.background for s in held} == set(shapes.BACKGROUNDS)
    assert {s.objects[0].motion for s in held} == set(shapes.MOTIONS)
    drawn = set(sample_scenes(20000, torch.Generator().manual_seed(1), two_object_prob=0.0))
    assert not drawn & set(held)  # the combination is never seen in training
    assert set(sample_scenes(20000, torch.Generator().manual_seed(1), 0.0, include_held_out=True)) & set(held)


def test_motion_is_drawn_as_captioned():
    scenes = [Scene((ObjectSpec("circle", "red", "right", "quickly"),), "black"),
              Scene((ObjectSpec("square", "blue", "growing"),), "white"),
              Scene((ObjectSpec("triangle", "green", "up", "slowly"),), "gray")]  # fmt: skip
    video, tracks = render(scenes, seed=0, return_tracks=True)
    assert float(tracks[0][0].x[-1] - tracks[0][0].x[0]) == pytest.approx(32.0)  # 2 px/frame over 16 steps
    assert float(tracks[1][0].size[-1] / tracks[1][0].size[0]) == pytest.approx(shapes.GROWTH)
    assert float(tracks[2][0].y[-1] - tracks[2][0].y[0]) == pytest.approx(-16.0)  # up: y decreases
    red = (video[0, 0] > 0.5) & (video[0, 1] < 0)  # (F, H, W) red pixels
    cols = [float(torch.nonzero(f)[:, 1].float().mean()) for f in red]
    assert cols[-1] - cols[0] == pytest.approx(32.0, abs=1.0)
    for t in tracks:  # every object stays inside the frame
        for tr in t:
            assert float(tr.x.min() - tr.size.max()) > 0 and float(tr.x.max() + tr.size.max()) < 64


@pytest.mark.parametrize("text", ["a cat surfing", "a red circle moving sideways on a black background",
                                  "a pink circle staying still on a black background"])
def test_text_outside_the_vocabulary_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError, match="speed"):
        ObjectSpec("circle", "red", "left")
    with pytest.raises(ValueError, match="different colours"):
        Scene((ObjectSpec("circle", "red", "still"), ObjectSpec("square", "red", "still")), "black")
