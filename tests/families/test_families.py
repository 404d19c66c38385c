"""The family adapters: one per model in the registry, found from any size's name, and each one's text
conditioning and transformer call as its official pipeline does them (checked on the tiny models)."""

import pytest
import torch

from pab.families import FAMILIES, get_family
from pab.models import MODEL_SPECS, sized_name, split_name
from pab.pipeline import GenerationRequest, Pipeline


def test_every_model_has_one_adapter_found_from_any_size():
    assert set(FAMILIES) == set(MODEL_SPECS)
    for name, family in FAMILIES.items():
        assert family.spec.name == name
        for size in family.spec.sizes:
            assert get_family(name if size == "full" else f"{name}-{size}") is family
            assert sized_name(name, size) == (name if size == "full" else f"{name}-{size}")
            assert split_name(sized_name(name, size)) == (name, size)
    # The text-to-video models first, the VAEs (which `generate` cannot take) apart after them.
    known = r"known models: latte-1, latte-1-small, latte-1-tiny, [^(]*opensora-v1.2-tiny \(and their VAEs: opensora-plan"
    with pytest.raises(ValueError, match="unknown model 'sora-2'; " + known):
        get_family("sora-2")
    with pytest.raises(ValueError, match="is a VAE, not a text-to-video model"):
        get_family("opensora-vae-v1.2")


@pytest.fixture(scope="module")
def pipes():
    return {n: Pipeline.from_name(f"{n}-tiny", device="cpu") for n in MODEL_SPECS}


def test_opensora_uncond_is_the_learned_null_caption_unless_a_negative_prompt_is_given(pipes):
    pipe = pipes["opensora-v1.2"]
    r = pipe.resolve(GenerationRequest(model=pipe.name, prompt="a red circle", seed=0))
    y, _ = pipe.encode_text(r)
    null = pipe.transformer.y_embedder.y_embedding[: y.shape[1]]
    assert torch.equal(y[1], null.to(y.dtype)) and not torch.equal(y[0], y[1])
    y_neg, _ = pipe.encode_text(pipe.resolve(GenerationRequest(model=pipe.name, prompt="a red circle",
                                                               negative_prompt="blurry", seed=0)))  # fmt: skip
    assert not torch.equal(y_neg[1, : null.shape[0]], null.to(y.dtype)[: y_neg.shape[1]])


@pytest.mark.parametrize("name", ["latte-1", "opensora-plan-v1.1"])
def test_latte_families_cut_the_text_to_the_prompt(pipes, name):
    pipe = pipes[name]
    short = pipe.encode_text(pipe.resolve(GenerationRequest(model=pipe.name, prompt="a cat", seed=0)))
    long = pipe.encode_text(pipe.resolve(GenerationRequest(model=pipe.name, prompt="a cat " * 8, seed=0)))
    assert short[1] is None and long[1] is None and short[0].shape[1] < long[0].shape[1]


# Each model called as its official pipeline calls it (keyword names and extra inputs written out here).
OFFICIAL_CALLS = {
    "opensora-v1.2": lambda m, z, t, y, mask, r: m(z, t, y[:, None], mask=mask, fps=torch.full((2,), float(r.fps)),
                                                    height=float(r.height), width=float(r.width)),
    "latte-1": lambda m, z, t, y, mask, r: m(z, timestep=t, encoder_hidden_states=y, return_dict=False)[0],
    "opensora-plan-v1.1": lambda m, z, t, y, mask, r: m(
        z, timestep=t, encoder_hidden_states=y, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        encoder_attention_mask=mask, return_dict=False)[0],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_the_adapter_calls_the_model_as_its_official_pipeline_does(pipes, name):
    """The pipeline's transformer call (through the adapter) is the official call, cut to the prediction."""
    pipe = pipes[name]
    r = pipe.resolve(GenerationRequest(model=pipe.name, prompt="a cat", seed=0))
    y, mask = pipe.encode_text(r)
    z = torch.randn(2, *pipe.latent_shape(r)[1:])
    out = pipe._forward(z, 500.0, y, mask, r)
    ref = OFFICIAL_CALLS[name](pipe.transformer, z, torch.full((2,), 500.0), y, mask, r)
    assert out.shape == z.shape and torch.equal(out, ref[:, : z.shape[1]])


def test_the_small_open_sora_samples_unshifted_at_its_own_size_and_the_others_as_released():
    fam = get_family("opensora-v1.2-small")
    small = fam.new_sampler("small", 30, height=64, width=64, num_frames=17).timesteps
    assert small == pytest.approx([1000 * (1 - i / 30) for i in range(30)])  # r = 1: no shift at 64x64 x 17
    official = fam.new_sampler("tiny", 30, height=64, width=64, num_frames=17).timesteps
    assert official[1] < small[1] - 50  # r = 0.28 there: the release's shift towards the data end
    assert get_family("latte-1").sampler_options("small") == {}
