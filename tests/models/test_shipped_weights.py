"""The shipped `-small` weights: present, within the size budget, exactly what their manifest lists, loaded
by the strict loader with no flag beyond the model name, and good enough that a held-out prompt renders as
asked (this fails if the weights, the sampler or the VAE break)."""

import hashlib
import json

import pytest
from safetensors import safe_open

from pab.models import WEIGHTS_DIR, shipped_checkpoint

NAME = "opensora-v1.2-small"  # the demo's model, held to the quality targets
FOLDER = WEIGHTS_DIR / NAME
SHIPPED = ["opensora-v1.2-small", "latte-1-small", "opensora-plan-v1.1-small"]
BUDGET_MB = 20  # all shipped weights together (#14): every GPU call carries the tracked tree


def test_size_budget():
    assert sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir()) == sorted(SHIPPED)
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total < BUDGET_MB * 1e6, f"{total / 1e6:.2f} MB shipped"


@pytest.mark.parametrize("name", SHIPPED)
def test_layout(name):
    assert shipped_checkpoint(name) == WEIGHTS_DIR / name
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert (WEIGHTS_DIR / name / part).is_dir(), part
    calibration = json.loads((WEIGHTS_DIR / name / "cache.json").read_text())  # `pab calibrate` on these weights
    assert calibration["model"] == name and {"teacache-slow", "magcache-fast"} <= set(calibration["presets"])


@pytest.mark.parametrize("name", SHIPPED)
def test_files_match_their_manifest(name):
    folder = WEIGHTS_DIR / name
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(str(f.relative_to(folder)) for f in folder.glob("*/*.safetensors"))
    assert files == sorted(manifest["files"])
    for file, entry in manifest["files"].items():
        path = folder / file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], file
        with safe_open(str(path), "pt") as st:
            tensors = {k: [list(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()] for k in st.keys()}
        assert tensors == entry["tensors"], file


@pytest.mark.parametrize("name", SHIPPED)
def test_training_record_says_what_the_model_learned_from(name):
    doc = json.loads((WEIGHTS_DIR / name / "training.json").read_text())
    assert doc["model"] == name and "synthetic" in doc["data"]
    assert {"vae", "dit"} <= set(doc["stages"]) and doc["stages"]["dit"]["steps"] > 1000


def test_training_summary_counts_every_run_of_a_continued_model(tmp_path):
    from pab.models import training_summary

    first = {"steps": 100, "device": "H200", "init": None}
    doc = {"data": "shapes", "stages": {"dit": {"steps": 30, "device": "H200", "init": {"path": "x", "dit": first}}}}
    (tmp_path / "training.json").write_text(json.dumps(doc))
    assert training_summary(tmp_path) == "trained on shapes; 130 DiT steps on H200"
    assert "steps" in training_summary(FOLDER) and training_summary(tmp_path / "none").startswith("no training.json")


@pytest.fixture(scope="module")
def pipeline():
    from pab.pipeline import Pipeline

    return Pipeline.from_name(NAME, device="cpu")  # no --checkpoint: the shipped weights, strictly


def test_loads_by_name_alone(pipeline):
    assert not pipeline.random_weights and pipeline.size == "small"


# Held-out prompts (index = seed, as bench.quality renders them): each shape, directions, still and growing. The
# shipped weights render 60 of the 64 as asked (docs/quality.md); these six, and their steered variants below,
# are among them, so a break of the weights, the text encoder, the sampler or the VAE fails here.
RENDERED_RIGHT = [0, 5, 6, 10, 11, 15]
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.mark.parametrize("index", RENDERED_RIGHT)
def test_a_held_out_prompt_renders_as_asked(pipeline, index):
    import dataclasses

    from pab.data.shapes import COLOURS, Scene, held_out_scenes
    from pab.eval.judge import judge
    from pab.pipeline import GenerationRequest

    scene = held_out_scenes()[index]
    r = pipeline.generate(GenerationRequest(model=NAME, prompt=scene.caption(), seed=index))
    assert r.frames.shape == (17, 64, 64, 3)
    verdict = judge(r.frames, scene.caption())
    assert verdict.match, verdict.to_dict()
    # and the words steer it: another colour and the opposite direction, same seed, are rendered as asked
    obj, colours = scene.objects[0], list(COLOURS)
    steered = dataclasses.replace(obj, colour=colours[(colours.index(obj.colour) + 3) % len(colours)],
                                  motion=OPPOSITE.get(obj.motion, obj.motion))  # fmt: skip
    other = Scene((steered,), scene.background).caption()
    verdict = judge(pipeline.generate(GenerationRequest(model=NAME, prompt=other, seed=index)).frames, other)
    assert verdict.match, verdict.to_dict()


# Latte-1 and Open-Sora-Plan small render few held-out prompts right (docs/quality.md: 7 and 5 of 64);
# these are among them, so a break of their weights, T5, DDIM / PNDM sampler or VAE fails here.
OTHERS_RIGHT = {"latte-1-small": [0, 4, 28], "opensora-plan-v1.1-small": [23, 27, 34]}


@pytest.fixture(scope="module")
def others():
    from pab.pipeline import Pipeline

    return {name: Pipeline.from_name(name, device="cpu") for name in OTHERS_RIGHT}


@pytest.mark.parametrize("name, index", [(n, i) for n, right in OTHERS_RIGHT.items() for i in right])
def test_the_other_families_render_a_held_out_prompt(others, name, index):
    from pab.data.shapes import held_out_scenes
    from pab.eval.judge import judge
    from pab.pipeline import GenerationRequest

    scene = held_out_scenes()[index]
    r = others[name].generate(GenerationRequest(model=name, prompt=scene.caption(), seed=index))
    assert not r.random_weights and r.frames.shape[1:] == (64, 64, 3)
    verdict = judge(r.frames, scene.caption())
    assert verdict.match, verdict.to_dict()
