"""The text-to-video pipeline on the tiny models: end to end, PAB equivalence and isolation."""

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pab.broadcast import KINDS, BroadcastRule, PABConfig
from pab.engine import EngineOptions
from pab.errors import RequestError
from pab.pipeline import GenerationCancelled, GenerationRequest, Pipeline, resolve_request

TINY = ["opensora-v1.2-tiny", "latte-1-tiny", "opensora-plan-v1.1-tiny"]
# Small enough for 2 CPU cores, long enough that the paper windows hold broadcast steps.
STEPS = {"opensora-v1.2-tiny": 30, "latte-1-tiny": 50, "opensora-plan-v1.1-tiny": 20}


@pytest.fixture(scope="module", params=TINY)
def pipe(request):
    return Pipeline.from_name(request.param, device="cpu", dtype=torch.float32)


def req(pipe: Pipeline, pab="off", **kw) -> GenerationRequest:
    base = dict(model=pipe.name, prompt="a red panda eating bamboo", seed=3, steps=STEPS[pipe.name], pab=pab)
    base.update(kw)
    return GenerationRequest(**base)


def test_generates_the_requested_video(pipe):
    r = req(pipe, height=48, width=80)
    res = pipe.generate(r)
    assert res.frames.shape == (res.request.num_frames, 48, 80, 3) and res.frames.dtype.name == "uint8"
    assert len(res.timesteps) >= res.request.steps
    assert res.random_weights and set(res.timings) >= {"text_s", "denoise_s", "decode_s", "total_s"}
    assert res.latents.shape[:3] == (1, 4, pipe.vae.latent_frames(res.request.num_frames))


def test_a_size_off_the_patch_grid_renders_rounded_down_and_says_so(pipe):
    """#19 item 6: height 100 rendered 96 rows and was scaled back to 100 without a word."""
    r = pipe.resolve(req(pipe, height=100, width=64, num_frames=1 if pipe.name == "latte-1-tiny" else None))
    assert (r.height, r.width) == (100, 64)  # as asked: the model and sampler are conditioned on it
    assert pipe.output_size(r) == (96, 64)
    [notice] = pipe.notices(r)
    assert "height 100 is not a multiple of 16" in notice and "the video is 64x96" in notice
    res = pipe.generate(replace(r, steps=4))
    assert res.frames.shape[1:] == (96, 64, 3)
    assert res.notices == [notice] and (res.sidecar()["height"], res.sidecar()["width"]) == (96, 64)
    assert res.sidecar()["request"]["height"] == 100
    assert pipe.notices(pipe.resolve(req(pipe, height=48, width=80))) == []  # whole patches: nothing to say


def test_pab_off_and_range_one_are_bit_identical_to_the_plain_model(pipe):
    r = req(pipe, steps=6)
    off = pipe.generate(r).latents
    ones = PABConfig(**{k: BroadcastRule(1, (0, 1000)) for k in KINDS}).to_dict()
    assert torch.equal(pipe.generate(req(pipe, steps=6, pab=ones)).latents, off)
    # And with no hooks at all: the hooks themselves change nothing.
    from pab.broadcast import remove_pab

    remove_pab(pipe.transformer)
    pipe._pab_handles.clear()
    from pab.pipeline import PABState  # noqa: F401  (state is internal; the plain model runs without one)

    assert torch.equal(pipe.generate(r).latents, off)


def expected(rule, timesteps, n_modules, blocks):
    computed = broadcast = 0
    for b in blocks if blocks else [None] * n_modules:
        cached = False
        for i, t in enumerate(timesteps):
            reuse = cached and rule is not None and rule.broadcasts(i, t, b)
            computed += not reuse
            broadcast += reuse
            cached = cached or not reuse
    return {"computed": computed, "broadcast": broadcast}


def test_paper_preset_stats_follow_the_rule_and_output_moves_boundedly(pipe):
    off = pipe.generate(req(pipe))
    paper = pipe.generate(req(pipe, pab="paper"))
    config = PABConfig.preset(pipe.name, "paper")
    names = {id(m): n for n, m in pipe.transformer.named_modules()}
    from pab.broadcast import _block_index

    for kind, modules in pipe.transformer.broadcast_targets().items():
        blocks = [_block_index(names[id(m)]) for m in modules]
        assert paper.pab_stats[kind] == expected(config.rule(kind), paper.timesteps, len(modules), blocks), kind
        assert off.pab_stats[kind]["broadcast"] == 0
    attn = lambda s: sum(s[k]["computed"] for k in ("spatial", "temporal", "cross"))  # noqa: E731
    assert attn(paper.pab_stats) < attn(off.pab_stats)
    # Reusing attention moves the result, by a bounded amount: relative L2 change of the final
    # latents under 0.5 with these random tiny weights (measured 0.02-0.2; a broken cache, e.g.
    # one returning another module's output, gives changes of order 1).
    rel = (paper.latents - off.latents).norm() / off.latents.norm()
    assert 0 < rel < 0.5, rel


def test_interleaved_requests_do_not_share_caches(pipe):
    a, b = req(pipe, pab="paper", steps=8), req(pipe, pab="paper", steps=8, prompt="a boat at dawn", seed=9)
    alone_a, alone_b = pipe.generate(a).latents, pipe.generate(b).latents
    # Run b in the middle of a (from a's progress callback): a's caches must survive untouched.
    inner = {}

    def progress(i, n):
        if i == 3:
            inner["b"] = pipe.generate(b).latents

    assert torch.equal(pipe.generate(a, progress=progress).latents, alone_a)
    assert torch.equal(inner["b"], alone_b)


def test_a_prompt_is_encoded_once_and_the_newest_prompts_are_kept(pipe, monkeypatch):
    """#20 item 4: a bulk job's seeds of one prompt, and a row's retries on one group, encode the text once."""
    import pab.pipeline

    calls = []
    encode = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw))
    monkeypatch.setattr(pab.pipeline, "TEXT_CACHE_SIZE", 2)
    pipe.clear_text_cache()
    first = pipe.generate(req(pipe, steps=4, prompt="a kite over a dune"))
    assert len(calls) >= 1
    encoded = len(calls)
    again = pipe.generate(req(pipe, steps=4, prompt="a kite over a dune"))
    other_seed = pipe.generate(req(pipe, steps=4, prompt="a kite over a dune", seed=11))
    assert len(calls) == encoded  # neither the same request nor another seed encodes again
    assert torch.equal(again.latents, first.latents) and not torch.equal(other_seed.latents, first.latents)
    pipe.generate(req(pipe, steps=4, prompt="a kite over a dune", negative_prompt="blurry"))  # another key
    pipe.generate(req(pipe, steps=4, prompt="a heron in reeds"))  # the oldest entry leaves (2 kept)
    assert len(pipe._texts) == 2 and len(calls) == 3 * encoded
    evicted = pipe.generate(req(pipe, steps=4, prompt="a kite over a dune"))
    assert len(calls) == 4 * encoded  # encoded afresh: the same video
    assert torch.equal(evicted.latents, first.latents)
    pipe.clear_text_cache()  # e.g. after loading other weights in place
    pipe.generate(req(pipe, steps=4, prompt="a kite over a dune"))
    assert len(calls) == 5 * encoded


def test_cancel_and_bad_requests(pipe):
    with pytest.raises(GenerationCancelled):
        pipe.generate(req(pipe), should_cancel=lambda: True)
    steps = []
    with pytest.raises(GenerationCancelled, match="during the decode"):  # after the last step: the decode stops
        pipe.generate(req(pipe), progress=lambda i, n: steps.append(i), cancel_decode=lambda: True)
    assert steps and steps[-1] == len(steps)  # every step ran
    asked = []
    video = pipe.generate(req(pipe), cancel_decode=lambda: asked.append(1) or False)
    assert asked and video.frames.shape[0] == video.request.num_frames  # asked, not cancelled: the whole video
    with pytest.raises(ValueError, match="steps: Input should be greater than or equal to 1"):
        pipe.generate(req(pipe, steps=0))
    with pytest.raises(ValueError, match="height: Input should be greater than or equal to 16"):
        pipe.generate(req(pipe, height=8))
    with pytest.raises(ValueError, match="prompt must not be empty"):
        pipe.generate(req(pipe, prompt="  "))
    with pytest.raises(ValueError, match=f"^spatial block 2 does not exist; {pipe.name} has blocks 0-1"):
        pipe.generate(req(pipe, pab={"spatial": {"range": 2, "window": [450, 930], "blocks": [2]}}))


RULE = {"range": 2, "window": [450, 930]}


@pytest.mark.parametrize("model, fields, field, message", [
    ("opensora-plan-v1.1-tiny", {"num_frames": 6}, "num_frames", "the CausalVAE encodes 4k+1 frames"),  # the VAE's
    ("opensora-plan-v1.1-tiny", {"steps": 2}, "steps", "PNDM needs at least 4 steps"),  # the sampler's
    ("opensora-v1.2-tiny", {"num_frames": 5}, "num_frames", "the official timestep transform"),
    ("opensora-v1.2-tiny", {"prompt": "  "}, "prompt", "prompt must not be empty"),
    ("opensora-v1.2-tiny", {"width": 8}, "width", "width: Input should be greater than or equal to 16"),
    ("opensora-v1.2-tiny", {"precision": "fp4"}, "precision", "precision='fp4'; choose one of"),
    ("opensora-v1.2-tiny", {"cache": "nope"}, "cache", "unknown cache 'nope'"),
    ("opensora-v1.2-tiny", {"pab": "nope"}, "cache", "unknown cache 'nope'"),  # one field, its canonical name
    ("opensora-v1.2-tiny", {"cache": "paper", "pab": {"spatial": RULE}}, "cache", "disagree"),
    ("opensora-v1.2-tiny", {"pab": {"spatial": {**RULE, "blocks": [2]}}}, "cache.spatial.blocks",
     "block 2 does not exist"),
    ("opensora-v1.2-tiny", {"cache": {"temporal": {"range": 0, "window": [1, 2]}}}, "cache.temporal.range",
     "cache.temporal.range: Input should be greater than or equal to 1"),
    ("opensora-v1.2-tiny", {"cache": {"policy": "magcache", "threshold": 0.1}}, "cache.ratios",
     "needs the calibrated ratios"),
    ("opensora-v1.2-tiny", {"cache": {"policy": "fixed", "reuse": [5], "reuse_of": 3}}, "cache.reuse",
     "a fixed policy needs reuse_of > 0 steps"),
    ("opensora-v1.2", {"cache": "teacache-fastest"}, "cache", "unknown cache 'teacache-fastest'"),
])  # fmt: skip
def test_a_request_the_model_cannot_take_names_its_field(model, fields, field, message):
    """The checks the HTTP ingress runs before queueing (no weights: a VAE on the meta device) say which field
    is wrong, so the 400 names it; the message is the one the pipeline always gave."""
    from actors.engine import meta_vae

    with pytest.raises(RequestError, match=re.escape(message)) as e:
        resolve_request(GenerationRequest(**{"model": model, "prompt": "a fox", **fields}), meta_vae(model))
    assert e.value.field == field, e.value


def test_a_model_that_is_not_one_is_the_model_field():
    with pytest.raises(RequestError, match="unknown model 'sora-2'") as e:
        resolve_request(GenerationRequest(model="sora-2", prompt="a fox"), vae=None)
    assert e.value.field == "model"


def save_checkpoint(pipe: Pipeline, ckpt: Path) -> None:
    """Write a pipeline's weights in the published layout (README 'Checkpoints')."""
    from safetensors.torch import save_file

    def save(module, folder: str, name: str) -> None:
        (ckpt / folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(ckpt / folder / name))

    save(pipe.transformer, "transformer", "diffusion_pytorch_model.safetensors")
    if hasattr(pipe.vae, "vae"):  # FrameVAE: a diffusers AutoencoderKL folder, as Latte-1 ships it
        pipe.vae.vae.save_pretrained(ckpt / "vae")
    else:  # the video VAEs: their own state dict (the release adds a config.json)
        save(pipe.vae, "vae", "model.safetensors")
    pipe.text_encoder.model.save_pretrained(ckpt / "text_encoder")
    pipe.text_encoder.tokenizer.save_pretrained(ckpt / "tokenizer")


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip_and_missing_keys(tmp_path: Path, name: str):
    """`--checkpoint` loads strictly: saved weights reproduce the video; a missing key is named."""
    from safetensors.torch import load_file, save_file

    from pab.models import CheckpointError

    src = Pipeline.from_name(name, device="cpu")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(src, ckpt)
    loaded = Pipeline.from_name(name, device="cpu", checkpoint=ckpt)
    assert not loaded.random_weights
    r = GenerationRequest(model=name, prompt="x", steps=4, seed=1)
    a, b = loaded.generate(r), src.generate(r)
    assert torch.equal(a.latents, b.latents) and (a.frames == b.frames).all()
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    victim = sorted(sd)[-1]
    sd.pop(victim)
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match=f"missing key.*{victim}"):
        Pipeline.from_name(name, device="cpu", checkpoint=ckpt)


@pytest.mark.parametrize("base", ["opensora-v1.2", "latte-1", "opensora-plan-v1.1"])
@pytest.mark.parametrize("asked", ["{base}", "{base}-tiny", "{other}"])
def test_a_checkpoint_of_another_model_names_the_model_that_fits(base: str, asked: str):
    """The shipped `-small` weights under another size's or family's name are refused before any weights are built,
    naming the fit: the name picks the text encoder and defaults, and Open-Sora failed mid-render with a
    tensor-size error (another family: an error about from_dict meant for Python callers)."""
    from pab.models import CheckpointError, shipped_checkpoint

    other = "latte-1" if base != "latte-1" else "opensora-v1.2"
    with pytest.raises(CheckpointError, match=f"run with --model {re.escape(base)}-small$"):
        Pipeline.from_name(asked.format(base=base, other=other), device="meta",
                           checkpoint=shipped_checkpoint(f"{base}-small"))  # fmt: skip


@pytest.mark.parametrize("model, settings", [
    ("opensora-v1.2-tiny", dict(steps=2)),
    ("latte-1-tiny", dict(steps=2, num_frames=12)),  # past one micro-batch of 8 frames
    ("opensora-plan-v1.1-tiny", dict(steps=4)),
])  # fmt: skip
def test_the_frame_sink_gets_every_frame_in_order_as_it_is_decoded(model, settings):
    from pab.pipeline import GenerationRequest, Pipeline
    from pab.video import to_uint8_frames

    pipe = Pipeline.from_name(model, device="cpu")
    request = GenerationRequest(model=model, prompt="a red fox", seed=1, **settings)
    parts = []
    res = pipe.generate(request, frame_sink=parts.append)
    assert np.array_equal(np.concatenate(parts), res.frames)
    assert np.array_equal(res.frames, pipe.generate(request).frames)  # as without a sink
    z = res.latents.to(pipe.dtype)
    chunks = list(pipe.vae.decode_chunks(z, res.request.num_frames))
    assert torch.equal(torch.cat(chunks, dim=2), pipe.vae.decode(z, res.request.num_frames))
    assert np.array_equal(res.frames, to_uint8_frames(torch.cat(chunks, dim=2)))  # each piece where it belongs
    if model != "opensora-plan-v1.1-tiny":  # the per-frame VAEs decode in micro-batches: frames come in pieces
        assert len(parts) > 1


def test_the_profiler_sees_the_loop_and_the_decode_as_named_ranges():
    """bench.run's --idle and --decode-idle measure the GPU inside "pab.denoise" and "pab.decode": the loop's
    model calls fall in the first, the VAE's norms in the second, after it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pab.pipeline import GenerationRequest, Pipeline

    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cpu")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe.generate(GenerationRequest(model="opensora-v1.2-tiny", prompt="a red fox", seed=1, steps=2))
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    [loop] = [e.time_range for e in events if e.name == "pab.denoise"]
    [decode] = [e.time_range for e in events if e.name == "pab.decode"]
    assert loop.end <= decode.start
    norms = [e.time_range for e in events if e.name == "aten::group_norm"]  # the VAE's (the DiT has none)
    assert norms and all(decode.start <= n.start and n.end <= decode.end for n in norms)


def test_vae_kernels_hook_the_vae_and_leave_the_video_unchanged_where_they_do_not_run():
    """By default (`vae_kernels=True`) every GroupNorm of the VAE is hooked (pab.vae_kernels). On the CPU the hooks
    run PyTorch's GroupNorm, so the video is bit for bit the unhooked pipeline's;
    tests/gpu/test_vae_decode_kernels.py runs the kernels themselves."""
    name = "opensora-v1.2-tiny"
    r = GenerationRequest(model=name, prompt="a lighthouse at night", seed=5, steps=4, height=48, width=64)
    hooked = Pipeline.from_name(name, device="cpu", dtype=torch.float32)
    plain = Pipeline.from_name(name, device="cpu", dtype=torch.float32,
                                 engine=EngineOptions(vae_kernels=False))  # fmt: skip
    norms = [m for m in hooked.vae.modules() if type(m) is torch.nn.GroupNorm]
    assert hooked.vae_kernels.norms == len(norms) > 0 and hooked.vae_kernels.fused > 0
    assert plain.vae_kernels is None
    assert np.array_equal(hooked.generate(r).frames, plain.generate(r).frames)


def test_a_broadcast_attention_skips_the_norm_that_makes_its_input(pipe, monkeypatch):
    """A self-attention or MLP that PAB broadcasts does not read its input, so the block does not compute its
    norm (`output_reused`): the attention's norm runs once per computed attention, and the latents are what
    computing every norm gives, bit for bit."""
    from pab.models import latte, stdit3

    r = req(pipe, pab="paper", steps=12)
    calls, mlp_calls = [], []
    for cls in (stdit3.STDiT3Block, latte.SpatialBlock, latte.TemporalBlock):
        real = cls.attn_in
        monkeypatch.setattr(cls, "attn_in", lambda self, x, mod, real=real: calls.append(1) or real(self, x, mod))
        real_mlp = cls.mlp_in
        monkeypatch.setattr(cls, "mlp_in", lambda self, *a, real=real_mlp: mlp_calls.append(1) or real(self, *a))
    skipping = pipe.generate(r)
    stats = skipping.pab_stats
    assert len(calls) == stats["spatial"]["computed"] + stats["temporal"]["computed"]
    assert len(mlp_calls) == stats["mlp"]["computed"]
    assert stats["spatial"]["broadcast"] + stats["temporal"]["broadcast"] > 0 and stats["mlp"]["broadcast"] > 0
    for module in (stdit3, latte):
        monkeypatch.setattr(module, "output_reused", lambda m: False)
    calls.clear()
    assert torch.equal(pipe.generate(r).latents, skipping.latents)  # the norm computed for every call, as before
    assert len(calls) == sum(stats[k]["computed"] + stats[k]["broadcast"] for k in ("spatial", "temporal"))


def test_a_prompt_longer_than_the_text_encoder_reads_is_a_notice():
    """The small model's text encoder reads 32 tokens: a longer prompt is cut (as the official pipelines cut it),
    and the video says so instead of silently rendering the first 32."""
    pipe = Pipeline.from_name("opensora-v1.2-small", device="cpu")
    long = pipe.resolve(GenerationRequest(model=pipe.name, prompt="a red circle moving left " * 8, seed=1, steps=1,
                                          negative_prompt="blurry, " * 40))  # fmt: skip
    [prompt, negative] = pipe.notices(long)
    n = pipe.text_encoder.token_count(long.prompt + pipe.spec.prompt_suffix)
    assert n > 32 and f"the prompt with {pipe.spec.prompt_suffix.strip()!r} appended is {n} text tokens" in prompt
    assert "reads the first 32" in prompt and negative.startswith("the negative prompt is ")
    assert pipe.notices(pipe.resolve(GenerationRequest(model=pipe.name, prompt="a red circle", seed=1, steps=1))) == []


def test_a_threshold_preset_at_another_step_count_is_a_notice():
    """opensora-v1.2-small's presets were calibrated at 30 steps: a teacache or magcache threshold sums an error
    over the steps, so at 12 it reuses another share of them and the video says so; a fixed schedule is rescaled
    to any count, and at 30 steps nothing is said."""
    pipe = Pipeline.from_name("opensora-v1.2-small", device="cpu")
    steps = pipe.calibration["steps"]

    def notices(cache, n):
        return pipe.notices(pipe.resolve(GenerationRequest(model=pipe.name, prompt="a red circle", seed=1, steps=n,
                                                           cache=cache)))  # fmt: skip

    [said] = notices("teacache-slow", 12)
    assert said.startswith(f"the cache preset 'teacache-slow' was calibrated at {steps} steps; at 12") and (
        "pab calibrate --steps 12" in said)
    assert notices("magcache-fast", 12) and notices("teacache-slow", steps) == []
    assert notices("fixed-fast", 12) == [] and notices("paper", 12) == []


@pytest.mark.parametrize("fields, field, said", [
    (dict(seed=-1), "seed", "greater than or equal to 0"),
    (dict(seed=2**70), "seed", "less than"),
    (dict(height=64.5), "height", "fractional part"),
    (dict(steps=True), "steps", "not true/false"),
    (dict(cache=["paper"]), "cache", "must be a preset name"),
    (dict(cache={"spatial": {"range": 2, "window": [1, 2, 3]}}), "cache.spatial.window", "at most 2 items"),
    (dict(prompt=5), "prompt", "must be a string"),
])
def test_a_request_built_in_python_is_checked_against_the_schema(fields, field, said):
    """The command line and HTTP check the schema at their edge; a GenerationRequest from Python failed deep in
    the sampler ("'<' not supported between 'str' and 'int'", "too many values to unpack")."""
    with pytest.raises(RequestError, match=said) as e:
        resolve_request(GenerationRequest(**{"model": "opensora-v1.2-tiny", "prompt": "a fox", **fields}), vae=None)
    assert e.value.field == field


def test_a_request_built_in_python_takes_numbers_as_the_schema_reads_them():
    from pab.pipeline import checked_fields

    r = checked_fields(GenerationRequest(model="opensora-v1.2-tiny", prompt="a fox", steps="4", height=64.0))
    assert (r.steps, r.height) == (4, 64) and type(r.steps) is int and type(r.height) is int
