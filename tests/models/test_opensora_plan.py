"""Open-Sora-Plan v1.1.0 LatteT2V: official fixture numerics, checkpoint layout, PAB/DSP seams, shapes, dtypes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pab.models import CheckpointError
from support.fidelity_cases import opensora_plan as fixture_case
from support.seams import TargetCalls, assert_matches_official, assert_replay_exact, randomize_state
from pab.models.latte import SIZES as LATTE_SIZES
from pab.models.latte import LatteConfig, LatteTransformer3DModel
from pab.models.opensora_plan import SIZES, LatteT2V, LatteT2VConfig

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "official"
FIXTURE = OFFICIAL / "osp110"
C = SIZES["tiny"]["num_attention_heads"] * SIZES["tiny"]["attention_head_dim"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> LatteT2V:
    """Tiny LatteT2V with every weight ~ N(0, 0.1²), like the official fixture, so every path carries signal."""
    return randomize_state(LatteT2V(LatteT2VConfig(**{**SIZES["tiny"], **overrides})).eval(), seed)


def tiny_inputs(B=2, F=5, H=8, W=8, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(B, 4, F, H, W, generator=g),
        timestep=torch.tensor([900.0, 300.0, 500.0, 100.0][:B]),
        encoder_hidden_states=torch.randn(B, L, SIZES["tiny"]["caption_channels"], generator=g),
    )


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)[0]


# ---------------------------------------------------------------------------- official fixture


def test_fixture_cases_match_official():
    out = assert_matches_official(fixture_case.run, FIXTURE)
    assert (out["output"] - out["output_no_mask"]).abs().max() > 0.1  # the text mask is exercised


def test_full_size_state_dict_matches_manifest():
    with torch.device("meta"):
        model = LatteT2V(LatteT2VConfig(**SIZES["full"]))
    manifest = json.loads((OFFICIAL / "manifests" / "osp110.json").read_text())
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == [(e["name"], e["shape"]) for e in manifest]  # names, shapes and order
    assert sum(t.numel() for t in model.state_dict().values()) == 1_057_738_400
    assert ("caption_projection.y_embedding", [120, 4096]) in ours  # the persistent null-caption buffer


def test_fixture_runner_loads_strictly(tmp_path):
    broken = tmp_path / "osp110"
    shutil.copytree(FIXTURE, broken)
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    del weights["caption_projection.y_embedding"]  # a buffer, but a persistent one: the checkpoint must hold it
    weights["temp_pos_embed"] = torch.zeros(1, 5, 64)  # the official non-persistent table, never saved
    weights["transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(64, 7)
    save_file(weights, str(broken / "weights.safetensors"))
    with pytest.raises(CheckpointError) as err:
        fixture_case.run(broken)
    msg = str(err.value)
    for key in ("caption_projection.y_embedding", "temp_pos_embed", "transformer_blocks.0.attn2.to_k.weight"):
        assert key in msg


# ---------------------------------------------------------------------------- config and sizes


def test_config_from_official_json_and_errors():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = LatteT2VConfig.from_dict(d)  # _class_name and _diffusers_version are ignored
    assert cfg.sample_size == (16, 16) and cfg.attention_mode == "math" and cfg.model_max_length == 7
    assert cfg.to_dict()["sample_size"] == [16, 16]
    assert LatteT2VConfig.from_dict({**d, "attention_mode": "xformers"}).attention_mode == "xformers"
    for key, value, match in [
        ("bogus", 1, "bogus"),
        ("use_rope", True, "use_rope"),
        ("compress_kv_factor", 2, "compress_kv_factor"),
        ("attention_mode", "sparse", "attention_mode"),
        ("patch_size_t", 2, "patch_size_t"),
        ("sample_size", 16, "sample_size"),
        ("norm_type", "ada_norm_zero", "norm_type"),
        ("cross_attention_dim", 32, "cross_attention_dim"),
    ]:
        with pytest.raises(ValueError, match=match):
            LatteT2VConfig.from_dict({**d, key: value})
    # A key missing from config.json takes the official constructor default (here norm_type "layer_norm").
    with pytest.raises(ValueError, match="layer_norm"):
        LatteT2VConfig.from_dict({k: v for k, v in d.items() if k != "norm_type"})


@pytest.mark.parametrize("video_length,explicit,expected", [(17, None, 1), (16, None, 1), (33, None, 2),
                                                            (32, None, 2), (5, None, 1), (17, 3, 3)])  # fmt: skip
def test_temporal_interpolation_scale(video_length, explicit, expected):
    cfg = LatteT2VConfig(**{**SIZES["tiny"], "video_length": video_length, "interpolation_scale_1d": explicit})
    assert cfg.temporal_interpolation_scale == expected
    module = LatteT2V(cfg).temp_pos_embed
    x = torch.zeros(1, 4, C)
    plain = LatteT2V(LatteT2VConfig(**SIZES["tiny"])).temp_pos_embed  # scale 1
    # positions are divided by the scale: frame 2 at scale 2 is frame 1 at scale 1
    if expected == 2:
        torch.testing.assert_close(module(x)[0, 2], plain(x)[0, 1], atol=0, rtol=0)
    assert module.interpolation_scale == expected


def test_sizes():
    full, tiny = LatteT2VConfig(**SIZES["full"]), LatteT2VConfig(**SIZES["tiny"])
    assert full == LatteT2VConfig()  # the dataclass defaults are the released model
    assert (full.num_layers, full.num_attention_heads, full.attention_head_dim, full.caption_channels) == (
        28, 16, 72, 4096,
    )  # fmt: skip
    assert (full.sample_size, full.video_length, full.model_max_length, full.out_channels) == ((64, 64), 17, 300, 8)
    assert (tiny.num_layers, tiny.num_attention_heads, tiny.attention_head_dim, tiny.video_length) == (2, 4, 16, 17)
    assert (tiny.cross_attention_dim, tiny.caption_channels, tiny.sample_size) == (64, 64, (16, 16))


# ---------------------------------------------------------------------------- same function as Latte


def test_equals_latte_with_the_same_weights():
    """For these settings LatteT2V and diffusers' Latte are one function (the fixture README cross-check)."""
    osp = tiny_model()
    lat = LatteTransformer3DModel(LatteConfig(**{**LATTE_SIZES["tiny"], "video_length": 17}))
    weights = {k: v for k, v in osp.state_dict().items() if k != "caption_projection.y_embedding"}
    lat.load_state_dict(weights, strict=True)
    kw = tiny_inputs(F=4, H=6, W=4)
    torch.testing.assert_close(run(osp, **kw), run(lat.eval(), **kw), atol=0, rtol=0)


# ---------------------------------------------------------------------------- PAB / DSP seams


def test_broadcast_targets_kinds_counts_and_one_call_each():
    model = tiny_model()
    targets = model.broadcast_targets()
    n = SIZES["tiny"]["num_layers"]
    assert {k: len(v) for k, v in targets.items()} == {"spatial": n, "temporal": n, "cross": n, "mlp": 2 * n}
    assert targets["spatial"][1] is model.transformer_blocks[1].attn1
    assert targets["temporal"][1] is model.temporal_transformer_blocks[1].attn1
    assert targets["cross"][0] is model.transformer_blocks[0].attn2
    assert targets["mlp"][n + 1] is model.temporal_transformer_blocks[1].ff

    B, F, H, W = 2, 5, 4, 8
    S = (H // 2) * (W // 2)
    keep = torch.ones(B, 6, dtype=torch.int64)
    keep[0, 3:] = 0
    with TargetCalls(targets) as seen:
        for mask in (None, keep):
            seen.clear()
            run(model, **tiny_inputs(B=B, F=F, H=H, W=W), encoder_attention_mask=mask)
            assert seen.ran_once(), "each target must run exactly once per forward"
    shapes = seen.shapes
    assert shapes["spatial"] == shapes["cross"] == {(B * F, S, C)}  # (B·F, S, C)
    assert shapes["temporal"] == {(B * S, F, C)}  # (B·S, F, C): full F, the DSP seam
    assert shapes["mlp"] == {(B * F, S, C), (B * S, F, C)}


def test_replaying_cached_outputs_reproduces_the_forward():
    """What PAB relies on: a target's output depends only on its inputs, so replaying it is exact."""
    model = tiny_model()
    kw = tiny_inputs(F=3)
    assert_replay_exact(model, lambda: run(model, **kw))


def test_temp_pos_embed_with_offset_equals_slicing_the_full_table():
    module = tiny_model().temp_pos_embed
    x = torch.randn(6, 17, C)  # (B·S, F, C), F = video_length as in the release
    full = module(x)
    torch.testing.assert_close(full, x + module.table(0, 17), atol=0, rtol=0)
    pieces = [module(x[:, a:b], frame_offset=a, num_frames=17) for a, b in [(0, 5), (5, 9), (9, 13), (13, 17)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=0, rtol=0)
    # No single-frame skip in Open-Sora-Plan: a one-frame clip gets row 0 (sin 0 = 0, cos 0 = 1).
    one = module(torch.zeros(2, 1, C))
    assert torch.equal(one[0, 0], torch.cat([torch.zeros(C // 2), torch.ones(C // 2)]))


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("F,H,W", [(5, 8, 12), (3, 6, 10), (1, 4, 4), (20, 4, 2)])
def test_tiny_forward_any_frame_count_and_latent_size(F, H, W):
    """Odd frame counts, non-square latents, one frame, and more frames than video_length (17)."""
    model = tiny_model()
    out = run(model, **tiny_inputs(F=F, H=H, W=W))
    assert out.shape == (2, 8, F, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        run(model, **tiny_inputs(F=2, H=8, W=5))
    with pytest.raises(ValueError, match="use_image_num"):
        run(model, **tiny_inputs(F=2, H=4, W=4), use_image_num=4)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        run(model, **tiny_inputs(F=2, H=4, W=4, L=6), encoder_attention_mask=torch.ones(2, 5))


def test_bfloat16_forward_runs_on_cpu():
    model = tiny_model()
    kw = tiny_inputs(F=3, H=6, W=4)
    ref = run(model, **kw)
    out = run(model.to(torch.bfloat16), **{k: v.to(torch.bfloat16) for k, v in kw.items()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_text_mask_forms_and_added_cond_kwargs():
    """(B, L) keep-mask == (B, 1, L) keep-mask == cutting the text; added_cond_kwargs is ignored."""
    model = tiny_model()
    B, L = 2, 6
    kw = tiny_inputs(B=B, F=3, H=4, W=4, L=L)
    keep = torch.ones(B, L, dtype=torch.int64)
    keep[1, 2:] = 0
    out = run(model, **kw, encoder_attention_mask=keep)
    torch.testing.assert_close(out, run(model, **kw, encoder_attention_mask=keep[:, None]), atol=0, rtol=0)
    torch.testing.assert_close(
        out, run(model, **kw, encoder_attention_mask=keep, added_cond_kwargs={"resolution": None}), atol=0, rtol=0
    )
    second = {k: v[1:] for k, v in kw.items()}
    cut = run(model, **{**second, "encoder_hidden_states": second["encoder_hidden_states"][:, :2]})
    torch.testing.assert_close(out[1:], cut, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], run(model, **kw)[:1], atol=0, rtol=0)  # sample 0 keeps every token
