"""The code judge of synthetic-shapes clips: right on ground truth, rejects wrong prompts, robust to noise."""

import json
import random

import numpy as np
import pytest
import torch

from pab.data.shapes import (
    COLOURS,
    DIRECTIONS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    ObjectSpec,
    Scene,
    held_out_scenes,
    render,
    sample_scenes,
    to_uint8,
)
from pab.eval.judge import Verdict, judge

NUM_FRAMES, SIZE = 17, 64


def _clips(scenes: list[Scene], seed: int, size: int = SIZE) -> list[np.ndarray]:
    video = render(scenes, NUM_FRAMES, size, size, seed=seed)
    return [to_uint8(v).numpy() for v in video]


def _degrade(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A [1, 2, 1] / 4 blur in x and y, then Gaussian noise of std 10/255: a stand-in for a generator's output."""
    x = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4
    x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4
    x = x + rng.normal(0.0, 10.0, x.shape)
    return np.clip(x.round(), 0, 255).astype(np.uint8)


def _rates(verdicts: list[Verdict]) -> dict[str, float]:
    flags = ("match", "colour", "shape", "motion", "background")
    return {f: round(float(np.mean([getattr(v, f) for v in verdicts])), 4) for f in flags}


def _report(scenes: list[Scene], verdicts: list[Verdict]) -> str:
    one = [v for s, v in zip(scenes, verdicts) if len(s.objects) == 1]
    two = [v for s, v in zip(scenes, verdicts) if len(s.objects) == 2]
    misses = [v.prompt for v in verdicts if not v.match][:5]
    return f"all {len(verdicts)}: {_rates(verdicts)}; one object {len(one)}: {_rates(one)}; " + (
        f"two objects {len(two)}: {_rates(two)}; first misses: {misses}"
    )


@pytest.fixture(scope="module")
def ground_truth():
    """300 random scenes, half of them with two objects, over three batches with different seeds."""
    scenes, clips = [], []
    for seed in range(3):
        batch = sample_scenes(100, torch.Generator().manual_seed(seed), 0.5, include_held_out=True)
        scenes += batch
        clips += _clips(batch, seed=100 + seed)
    return scenes, clips


@pytest.fixture(scope="module")
def clean_verdicts(ground_truth):
    scenes, clips = ground_truth
    return [judge(c, s.caption()) for s, c in zip(scenes, clips)]


def test_ground_truth_is_a_match(ground_truth, clean_verdicts):
    scenes, _ = ground_truth
    rates = _rates(clean_verdicts)
    assert min(rates.values()) >= 0.98, f"judge on ground truth: {_report(scenes, clean_verdicts)}"


def test_wrong_prompts_are_rejected(ground_truth, clean_verdicts):
    """A changed colour, shape or motion of one object turns that object's flag off."""
    scenes, clips = ground_truth
    rng = random.Random(0)
    rejected = {"colour": [], "shape": [], "motion": []}
    cases = [(s, c) for s, c, v in zip(scenes, clips, clean_verdicts) if v.match][:60]  # only right-judged clips
    for scene, clip in cases:
        i = rng.randrange(len(scene.objects))
        o = scene.objects[i]
        colour = rng.choice([c for c in COLOURS if c not in {x.colour for x in scene.objects}])
        shape = rng.choice([s for s in SHAPES if s != o.shape])
        motion = rng.choice([m for m in MOTIONS if m != o.motion])
        speed = (o.speed or rng.choice(list(SPEEDS))) if motion in DIRECTIONS else None
        for flag, wrong in (
            ("colour", ObjectSpec(o.shape, colour, o.motion, o.speed)),
            ("shape", ObjectSpec(shape, o.colour, o.motion, o.speed)),
            ("motion", ObjectSpec(o.shape, o.colour, motion, speed)),
        ):
            objects = list(scene.objects)
            objects[i] = wrong
            verdict = judge(clip, Scene(tuple(objects), scene.background).caption())
            rejected[flag].append(not getattr(verdict.objects[i], flag) and not verdict.match)
    rates = {flag: round(float(np.mean(r)), 4) for flag, r in rejected.items()}
    assert min(rates.values()) >= 0.95, f"wrong prompts rejected over {len(cases)} clips: {rates}"


def test_noisy_blurred_clips(ground_truth):
    scenes, clips = ground_truth
    scenes, clips = scenes[:150], clips[:150]
    rng = np.random.default_rng(0)
    verdicts = [judge(_degrade(c, rng), s.caption()) for s, c in zip(scenes, clips)]
    assert min(_rates(verdicts).values()) >= 0.95, f"judge on blurred, noisy clips: {_report(scenes, verdicts)}"


def test_resized_clips():
    """Frames upscaled to 128 x 128 after rendering at 64: sizes and speeds are judged at the frame's scale."""
    scenes = sample_scenes(24, torch.Generator().manual_seed(10), 0.5, include_held_out=True)
    video = render(scenes, NUM_FRAMES, SIZE, SIZE, seed=11)
    frames = video.transpose(1, 2).flatten(0, 1)  # (B * F, 3, H, W)
    big = torch.nn.functional.interpolate(frames, size=(128, 128), mode="bilinear", align_corners=False)
    big = big.unflatten(0, (len(scenes), NUM_FRAMES)).transpose(1, 2)  # (B, 3, F, 128, 128)
    verdicts = [judge(to_uint8(v).numpy(), s.caption()) for s, v in zip(scenes, big)]
    assert min(_rates(verdicts).values()) >= 0.95, f"judge on clips resized to 128 px: {_report(scenes, verdicts)}"


def test_held_out_scenes_match():
    scenes = held_out_scenes()
    verdicts = [judge(c, s.caption()) for s, c in zip(scenes, _clips(scenes, seed=5))]
    misses = [v.to_dict() for v in verdicts if not v.match]
    assert not misses, f"held-out scenes judged wrong ({len(misses)} of {len(scenes)}): {misses}"


def test_verdict_fields_and_json():
    scene = Scene((ObjectSpec("triangle", "red", "left", "quickly"), ObjectSpec("circle", "cyan", "growing")), "gray")
    verdict = judge(_clips([scene], seed=3)[0], scene.caption())
    assert verdict.match and verdict.background
    red, cyan = verdict.objects
    assert (red.found_shape, red.found_motion, red.speed) == ("triangle", "left", True)
    assert (cyan.found_shape, cyan.found_motion, cyan.speed) == ("circle", "growing", None)
    slow = judge(_clips([scene], seed=3)[0], scene.caption().replace("quickly", "slowly"))
    assert slow.match and slow.objects[0].speed is False  # speed is reported, not part of the match
    on_white = judge(_clips([scene], seed=3)[0], scene.caption().replace("gray", "white"))
    assert on_white.objects[0].match and not on_white.background and not on_white.match
    d = json.loads(json.dumps(verdict.to_dict()))
    assert d["match"] is True and d["objects"][0]["object"]["shape"] == "triangle"


def test_prompt_outside_vocabulary():
    clip = _clips([Scene((ObjectSpec("circle", "red", "still"),), "black")], seed=0)[0]
    with pytest.raises(ValueError, match="hexagon"):
        judge(clip, "a red hexagon moving left slowly on a black background")
    with pytest.raises(ValueError, match="not a caption"):
        judge(clip, "a cat playing piano")
    with pytest.raises(ValueError, match="frames"):
        judge(clip[..., 0], "a red circle staying still on a black background")
