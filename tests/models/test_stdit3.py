"""STDiT3: official fixture numerics, checkpoint layout, PAB/DSP seams, shapes and dtypes."""

import json
from pathlib import Path

import pytest
import torch

from pab.models import CheckpointError, load_state_dict_strict
from support.fidelity_cases import stdit3 as fixture_case
from support.seams import TargetCalls, assert_matches_official, assert_replay_exact, randomize_state
from pab.models.stdit3 import SIZES, STDiT3, STDiT3Config, build_stdit3

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "official"
FIXTURE = OFFICIAL / "stdit3"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> STDiT3:
    """Tiny STDiT3 with every weight ~ N(0, 0.1²) (norm scales ~1), like the official fixture.

    The official init zeroes the temporal blocks' output projections, which would make the temporal
    path invisible to these tests.
    """
    return randomize_state(build_stdit3("tiny", **overrides).eval(), seed, skip=["rope.freqs"], norms_at_one=True)


def tiny_inputs(B=2, T=5, H=8, W=8, L=6, seed=1, x_mask=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[0, L // 2 :] = 0
    kw = dict(
        x=torch.randn(B, 4, T, H, W, generator=g),
        timestep=torch.tensor([900.0, 300.0][:B] + [500.0] * max(0, B - 2)),
        y=torch.randn(B, 1, L, SIZES["tiny"]["caption_channels"], generator=g),
        mask=mask,
        fps=torch.full((B,), 24.0),
        height=torch.full((B,), 8.0 * H),
        width=torch.full((B,), 8.0 * W),
    )
    if x_mask:
        xm = torch.ones(B, T, dtype=torch.bool)
        xm[0, 0] = False
        kw["x_mask"] = xm
    return kw


# ---------------------------------------------------------------------------- official fixture


def test_fixture_cases_match_official():
    assert_matches_official(fixture_case.run, FIXTURE)


def test_full_size_state_dict_matches_manifest():
    with torch.device("meta"):
        model = build_stdit3("full")
    manifest = json.loads((OFFICIAL / "manifests" / "stdit3.json").read_text())
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == [(e["name"], e["shape"]) for e in manifest]  # names, shapes and order


def test_strict_load_names_missing_unexpected_and_mismatched_keys():
    model = build_stdit3("tiny")
    sd = model.state_dict()
    bad = dict(sd)
    del bad["temporal_blocks.1.attn.q_norm.weight"]
    bad["pos_embed.inv_freq"] = torch.zeros(16)
    bad["final_layer.linear.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, bad)
    msg = str(err.value)
    assert "temporal_blocks.1.attn.q_norm.weight" in msg and "pos_embed.inv_freq" in msg
    assert "final_layer.linear.bias" in msg
    load_state_dict_strict(model, sd)  # the model's own state dict loads


# ---------------------------------------------------------------------------- config and sizes


def test_config_from_official_json_and_errors():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = STDiT3Config.from_dict(d)
    assert cfg.patch_size == (1, 2, 2) and cfg.caption_channels == 32 and cfg.model_max_length == 7
    with pytest.raises(ValueError, match="bogus"):
        STDiT3Config.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="drop_path"):
        STDiT3Config.from_dict({**d, "drop_path": 0.1})
    with pytest.raises(ValueError, match="skip_y_embedder"):
        STDiT3Config.from_dict({**d, "skip_y_embedder": True})
    tiny = STDiT3Config(**SIZES["tiny"])
    assert (tiny.depth, tiny.hidden_size, tiny.num_heads, tiny.caption_channels, tiny.model_max_length) == (
        2, 64, 4, 64, 64,
    )  # fmt: skip
    assert {k: v for k, v in SIZES["tiny"].items() if k not in ("depth", "hidden_size", "num_heads",
            "caption_channels", "model_max_length")} == {k: v for k, v in SIZES["full"].items() if k not in (
            "depth", "hidden_size", "num_heads", "caption_channels", "model_max_length")}  # fmt: skip


# ---------------------------------------------------------------------------- PAB / DSP seams


def test_broadcast_targets_kinds_counts_and_one_call_each():
    model = tiny_model()
    targets = model.broadcast_targets()
    depth = SIZES["tiny"]["depth"]
    assert {k: len(v) for k, v in targets.items()} == {"spatial": depth, "temporal": depth,
                                                       "cross": 2 * depth, "mlp": 2 * depth}  # fmt: skip

    B, T, H, W = 2, 3, 6, 10
    S = (H // 2) * (W // 2)
    with TargetCalls(targets) as seen, torch.no_grad():
        for with_x_mask in (True, False):
            seen.clear()
            model(**tiny_inputs(B=B, T=T, H=H, W=W, x_mask=with_x_mask))
            assert seen.ran_once(), "each target must run exactly once per forward"
    shapes = seen.shapes
    assert shapes["spatial"] == {(B * T, S, 64)}  # (B·T, S, C)
    assert shapes["temporal"] == {(B * S, T, 64)}  # (B·S, T, C): full T, the DSP seam
    assert shapes["cross"] == shapes["mlp"] == {(B, T * S, 64)}


def test_replaying_cached_outputs_reproduces_the_forward():
    """What PAB relies on: a target's output depends only on its inputs, so replaying it is exact."""
    model = tiny_model()
    kw = tiny_inputs(T=3)
    assert_replay_exact(model, lambda: model(**kw))


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("T,H,W", [(5, 8, 12), (3, 7, 9), (1, 6, 6), (4, 5, 14)])
def test_tiny_forward_any_T_and_latent_size(T, H, W):
    model = tiny_model()
    with torch.no_grad():
        out = model(**tiny_inputs(T=T, H=H, W=W))
    assert out.shape == (2, 8, T, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_odd_latent_is_zero_padded_like_the_official_patch_embed():
    """Odd H/W: the official model zero-pads to the patch grid and crops the output; we do the same."""
    model = tiny_model()
    kw = tiny_inputs(T=3, H=7, W=9)
    padded = dict(kw, x=torch.nn.functional.pad(kw["x"], (0, 1, 0, 1)))  # same pixel height/width args
    with torch.no_grad():
        out, out_padded = model(**kw), model(**padded)
    torch.testing.assert_close(out, out_padded[..., :7, :9], atol=0, rtol=0)


def test_all_true_x_mask_equals_no_x_mask():
    model = tiny_model()
    kw = tiny_inputs(T=4, x_mask=False)
    with torch.no_grad():
        plain = model(**kw)
        all_true = model(**kw, x_mask=torch.ones(2, 4, dtype=torch.bool))
        some_false = model(**kw, x_mask=torch.tensor([[False, True, True, True]] * 2))
    assert torch.equal(plain, all_true)
    assert not torch.allclose(plain, some_false)


def test_text_mask_equals_dropping_the_masked_tokens():
    """The official model packs the kept tokens; masking must equal simply cutting the text."""
    model = tiny_model()
    kw = tiny_inputs(B=1, T=3, x_mask=False)
    kw["mask"] = torch.tensor([[1, 1, 0, 1, 0, 0]])
    cut = dict(kw, y=kw["y"][:, :, [0, 1, 3]], mask=None)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw), model(**cut), atol=1e-6, rtol=1e-5)


def test_temporal_attention_sees_frame_order():
    """RoPE makes temporal attention position-aware: reversing the frames must not just reverse the output."""
    model = tiny_model()
    kw = tiny_inputs(B=1, T=4, x_mask=False)
    rev = dict(kw, x=kw["x"].flip(2))
    with torch.no_grad():
        out, out_rev = model(**kw), model(**rev)
    assert not torch.allclose(out, out_rev.flip(2), atol=1e-4)


def test_bf16_forward_runs_on_cpu():
    model = tiny_model()
    kw = tiny_inputs(T=3, H=6, W=6)
    with torch.no_grad():
        ref = model(**kw)
        out = model.to(torch.bfloat16)(**kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    kw = tiny_inputs(T=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="fps"):
            model(**dict(kw, fps=None))
        with pytest.raises(ValueError, match="x_mask"):
            model(**dict(kw, x_mask=torch.ones(2, 5, dtype=torch.bool)))
        with pytest.raises(ValueError, match="at least one token"):
            model(**dict(kw, mask=torch.tensor([[0] * 6, [1] * 6])))
