"""Latte-1: official fixture numerics, checkpoint layout, PAB/DSP seams, shapes, dtypes and position tables."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pab.compile import apply_compile, remove_compile
from pab.kernels import kernel_options
from pab.models import CheckpointError, latte
from support.fidelity_cases import latte as fixture_case
from support.seams import TargetCalls, assert_matches_official, assert_replay_exact, randomize_state
from pab.models.latte import (
    SIZES,
    LatteConfig,
    LatteTransformer3DModel,
    TemporalPosEmbed,
    spatial_pos_table,
    temporal_pos_table,
)

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "official"
FIXTURE = OFFICIAL / "latte"
C = SIZES["tiny"]["num_attention_heads"] * SIZES["tiny"]["attention_head_dim"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> LatteTransformer3DModel:
    """Tiny Latte with every weight ~ N(0, 0.1²), like the official fixture, so every path carries signal."""
    return randomize_state(LatteTransformer3DModel(LatteConfig(**{**SIZES["tiny"], **overrides})).eval(), seed)


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
    # The mask must matter (the fixture's probe moves the output by 0.45), or the masked case tests nothing.
    assert (out["output"] - out["output_masked"]).abs().max() > 0.1


def test_full_size_state_dict_matches_manifest():
    with torch.device("meta"):
        model = LatteTransformer3DModel(LatteConfig(**SIZES["full"]))
    manifest = json.loads((OFFICIAL / "manifests" / "latte.json").read_text())
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == [(e["name"], e["shape"]) for e in manifest]  # names, shapes and order
    assert sum(t.numel() for t in model.state_dict().values()) == 1_057_246_880


def test_fixture_runner_loads_strictly(tmp_path):
    broken = tmp_path / "latte"
    shutil.copytree(FIXTURE, broken)
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    del weights["temporal_transformer_blocks.1.attn1.to_k.bias"]
    weights["pos_embed.pos_embed"] = torch.zeros(1, 64, 64)  # diffusers' non-persistent table, never saved
    weights["proj_out.bias"] = torch.zeros(7)
    save_file(weights, str(broken / "weights.safetensors"))
    with pytest.raises(CheckpointError) as err:
        fixture_case.run(broken)
    msg = str(err.value)
    for key in ("temporal_transformer_blocks.1.attn1.to_k.bias", "pos_embed.pos_embed", "proj_out.bias"):
        assert key in msg


# ---------------------------------------------------------------------------- config and sizes


def test_config_from_official_json_and_errors():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = LatteConfig.from_dict(d)  # _class_name and _diffusers_version are ignored
    assert (cfg.caption_channels, cfg.video_length, cfg.sample_size, cfg.norm_eps) == (32, 5, 16, 1e-6)
    with pytest.raises(ValueError, match="bogus"):
        LatteConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="norm_type"):
        LatteConfig.from_dict({**d, "norm_type": "ada_norm_zero"})
    with pytest.raises(ValueError, match="activation_fn"):
        LatteConfig.from_dict({**d, "activation_fn": "geglu"})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        LatteConfig.from_dict({**d, "cross_attention_dim": 32})
    # A key missing from config.json takes diffusers' default, not Latte-1's: here norm_type "layer_norm".
    with pytest.raises(ValueError, match="layer_norm"):
        LatteConfig.from_dict({k: v for k, v in d.items() if k != "norm_type"})
    assert LatteConfig.from_dict({k: v for k, v in d.items() if k != "video_length"}).video_length == 16


def test_sizes():
    full, tiny = LatteConfig(**SIZES["full"]), LatteConfig(**SIZES["tiny"])
    assert full == LatteConfig()  # the dataclass defaults are the released model
    assert (full.num_layers, full.num_attention_heads, full.attention_head_dim, full.caption_channels) == (
        28, 16, 72, 4096,
    )  # fmt: skip
    assert (full.sample_size, full.video_length, full.out_channels) == (64, 16, 8)
    assert (tiny.num_layers, tiny.num_attention_heads, tiny.attention_head_dim) == (2, 4, 16)
    assert (tiny.cross_attention_dim, tiny.caption_channels, tiny.sample_size, tiny.video_length) == (64, 64, 16, 16)
    different = {"num_layers", "num_attention_heads", "attention_head_dim", "cross_attention_dim",
                 "caption_channels", "sample_size"}  # fmt: skip
    assert {k: v for k, v in SIZES["full"].items() if k not in different} == {
        k: v for k, v in SIZES["tiny"].items() if k not in different
    }


# ---------------------------------------------------------------------------- PAB / DSP seams


def test_broadcast_targets_kinds_counts_and_one_call_each():
    model = tiny_model()
    targets = model.broadcast_targets()
    n = SIZES["tiny"]["num_layers"]
    assert {k: len(v) for k, v in targets.items()} == {"spatial": n, "temporal": n, "cross": n, "mlp": 2 * n}
    assert targets["spatial"][1] is model.transformer_blocks[1].attn1
    assert targets["temporal"][0] is model.temporal_transformer_blocks[0].attn1
    assert targets["cross"][1] is model.transformer_blocks[1].attn2
    assert targets["mlp"][0] is model.transformer_blocks[0].ff
    assert targets["mlp"][n] is model.temporal_transformer_blocks[0].ff
    assert all(m.is_cross_attention for m in targets["cross"])
    assert not any(m.is_cross_attention for m in targets["spatial"] + targets["temporal"])

    B, F, H, W = 2, 3, 6, 10
    S = (H // 2) * (W // 2)
    with TargetCalls(targets) as seen:
        run(model, **tiny_inputs(B=B, F=F, H=H, W=W))
        assert seen.ran_once(), "each target must run exactly once per forward"
        seen.clear()
        run(model, **tiny_inputs(B=B, F=F, H=H, W=W), enable_temporal_attentions=False)
        assert seen.ran_once(targets["spatial"] + targets["cross"] + targets["mlp"][:n])
        assert not any(id(m) in seen.calls for m in targets["temporal"] + targets["mlp"][n:])
    shapes = seen.shapes
    assert shapes["spatial"] == shapes["cross"] == {(B * F, S, C)}  # (B·F, S, C)
    assert shapes["temporal"] == {(B * S, F, C)}  # (B·S, F, C): full F, the DSP seam
    assert shapes["mlp"] == {(B * F, S, C), (B * S, F, C)}


def test_replaying_cached_outputs_reproduces_the_forward():
    """What PAB relies on: a target's output depends only on its inputs, so replaying it is exact."""
    model = tiny_model()
    kw = tiny_inputs(F=3)
    ref = assert_replay_exact(model, lambda: run(model, **kw))
    # And the targets do carry the signal: zeroing one temporal attention output changes the result.
    h = model.broadcast_targets()["temporal"][1].register_forward_hook(lambda mod, a, out: torch.zeros_like(out))
    changed = run(model, **kw)
    h.remove()
    assert (changed - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------- fast paths


def test_compiled_targets_and_regions_match_eager(inductor):
    """pab.compile: compiled targets plus the blocks' regions (the temporal ones write and read the (B·S, F, C)
    layout in their own pass) equal eager within 1e-5 in float32, without graph breaks."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    kw = tiny_inputs(F=3, H=4, W=6)
    cases = [kw, {**kw, "enable_temporal_attentions": False}]
    refs = [run(model, **c) for c in cases]
    counters.clear()
    handle = apply_compile(model, kinds=("spatial", "temporal", "cross", "mlp"))
    try:
        n = SIZES["tiny"]["num_layers"]
        # both kinds' regions, and the temporal blocks' attention residual + MLP norm in one
        assert latte.TemporalBlock.compile_regions == (*latte.SpatialBlock.compile_regions, "attn_out_mlp_in")
        assert handle.regions == {**{name: 2 * n for name in latte.SpatialBlock.compile_regions}, "attn_out_mlp_in": n}
        for c, ref in zip(cases, refs):
            torch.testing.assert_close(run(model, **c), ref, atol=1e-5, rtol=1e-5)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        remove_compile(model)
    assert torch.equal(run(model, **kw), refs[0])  # the eager model again, bit for bit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused GELU epilogue is CUDA-only")
@pytest.mark.parametrize("activation_fn", ["gelu-approximate", "gelu"])
def test_fused_gelu_mlp_equals_the_plain_mlp_on_cuda(activation_fn):
    """The fused GELU epilogue (tanh GELU only) computes fc1 -> GELU -> fc2; "gelu" keeps the exact erf GELU."""
    ff = latte.FeedForward(C, activation_fn).cuda()
    x = torch.randn(3, 10, C, device="cuda")
    act, _, out = ff.net
    assert ff.kernels.fused_gelu  # the default
    with torch.no_grad():
        ref = out(torch.nn.functional.gelu(act.proj(x), approximate=latte.SUPPORTED_ACTIVATIONS[activation_fn]))
        torch.testing.assert_close(ff(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the short-sequence attention kernel is CUDA-only")
@pytest.mark.parametrize("F", [5, 16])
def test_short_attention_kernel_in_bf16_on_cuda(F, monkeypatch):
    """In bf16 on CUDA self-attention over at most 32 tokens runs the Triton kernel (the temporal attentions; in
    this tiny model the 16-token frames too), and the forward is as close to float32 as with SDPA."""
    from pab.kernels import short_attention as short_attn

    model32 = tiny_model().cuda()
    kw = {k: v.cuda() for k, v in tiny_inputs(F=F).items()}
    ref = run(model32, **kw)
    model = tiny_model().cuda().to(torch.bfloat16)
    kw16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    calls = []
    real = short_attn.try_short_attention

    def spy(qkv, heads, **kw):
        calls.append(qkv.shape)
        return real(qkv, heads, **kw)

    monkeypatch.setattr(short_attn, "try_short_attention", spy)
    out = run(model, **kw16).float()
    # (sequences, tokens) of each call: spatial over a frame's 16 patches, temporal over F frames, two blocks each
    assert [tuple(shape[:2]) for shape in calls] == [(2 * F, 16), (2 * 16, F)] * 2, calls
    with kernel_options(model, short_attention=False):
        sdpa = run(model, **kw16).float()

    def rel(a):
        return ((a - ref).norm() / ref.norm()).item()

    assert rel(out) < 1.5 * rel(sdpa) + 2e-3, (rel(out), rel(sdpa))


@pytest.mark.parametrize("nb,lb", [(1, 5), (2, 4), (3, 2)])
def test_self_attention_on_frame_blocks_matches_sequences(nb, lb):
    """(N, nb, lb, C) frame blocks, as DSP hands them over (a transposed view of (nb, N, lb, C)), give the
    (N, L, C) result in the same layout; a strided 4D input never reaches the cross-attention path."""
    torch.manual_seed(0)
    attn = latte.Attention(32, heads=2, dim_head=16, bias=True).eval()
    n, L = 3, nb * lb
    x = torch.randn(n, L, 32)
    blocks = x.view(n, nb, lb, 32).transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad():
        ref, out = attn(x), attn(blocks)
    assert out.shape == (n, nb, lb, 32)
    torch.testing.assert_close(out.reshape(n, L, 32), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("F,H,W", [(5, 8, 12), (3, 6, 10), (1, 4, 4), (18, 4, 6)])
def test_tiny_forward_any_frame_count_and_latent_size(F, H, W):
    """Odd frame counts, non-square latents, one frame, and more frames than video_length (16)."""
    model = tiny_model()
    out = run(model, **tiny_inputs(F=F, H=H, W=W))
    assert out.shape == (2, 8, F, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_frames_are_independent_per_sample_and_ordered():
    """Batching does not mix samples: sample 1 alone equals sample 1 of a batch of two."""
    model = tiny_model()
    kw = tiny_inputs(B=2, F=3, H=4, W=6)
    both = run(model, **kw)
    one = run(model, **{k: v[1:] for k, v in kw.items()})
    torch.testing.assert_close(both[1:], one, atol=1e-6, rtol=1e-5)


def test_latent_not_divisible_by_patch_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        run(model, **tiny_inputs(F=2, H=7, W=8))


def test_bfloat16_forward_runs_on_cpu():
    model = tiny_model()
    kw = tiny_inputs(F=3, H=6, W=4)
    ref = run(model, **kw)
    out = run(model.to(torch.bfloat16), **{k: v.to(torch.bfloat16) for k, v in kw.items()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_text_mask_forms_agree():
    """(B, L) keep-mask == (B·F, 1, L) bias (what diffusers takes) == (B, 1, L) bias; the mask changes the output."""
    model = tiny_model()
    B, F, L = 2, 3, 6
    kw = tiny_inputs(B=B, F=F, H=4, W=4, L=L)
    keep = torch.ones(B, L, dtype=torch.int64)
    keep[0, 4:] = 0
    keep[1, 2:] = 0
    bias = (1 - keep.float()) * -10000.0  # (B, L)
    out_keep = run(model, **kw, encoder_attention_mask=keep)
    out_bias = run(model, **kw, encoder_attention_mask=bias[:, None].repeat_interleave(F, dim=0))
    out_bias_b = run(model, **kw, encoder_attention_mask=bias[:, None])
    torch.testing.assert_close(out_keep, out_bias, atol=0, rtol=0)
    torch.testing.assert_close(out_keep, out_bias_b, atol=0, rtol=0)
    assert (out_keep - run(model, **kw)).abs().max() > 1e-3
    # Masking equals cutting the text to its kept tokens (how the Latte pipeline avoids masks).
    second = {k: v[1:] for k, v in kw.items()}
    cut = run(model, **{**second, "encoder_hidden_states": second["encoder_hidden_states"][:, :2]})
    torch.testing.assert_close(out_keep[1:], cut, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        run(model, **kw, encoder_attention_mask=keep[:, None, None])


def test_scalar_timestep_is_broadcast():
    model = tiny_model()
    kw = tiny_inputs(F=2, H=4, W=4)
    out = run(model, **{**kw, "timestep": torch.tensor(500.0)})
    torch.testing.assert_close(out, run(model, **{**kw, "timestep": torch.tensor([500.0, 500.0])}), atol=0, rtol=0)
    with pytest.raises(ValueError, match="timestep"):
        run(model, **{**kw, "timestep": torch.tensor([1.0, 2.0, 3.0])})


# ---------------------------------------------------------------------------- position tables


def test_temp_pos_embed_with_offset_equals_slicing_the_full_table():
    module = TemporalPosEmbed(C)
    x = torch.randn(6, 7, C)  # (B·S, F, C)
    full = module(x)
    torch.testing.assert_close(full, x + module.table(0, 7), atol=0, rtol=0)
    # DSP: each rank adds the rows of its own frames; the pieces reassemble the single-device result.
    pieces = [module(x[:, a:b], frame_offset=a, num_frames=7) for a, b in [(0, 3), (3, 5), (5, 7)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=0, rtol=0)
    # A rank holding one frame of a longer clip still adds its row; a one-frame clip gets none (diffusers).
    torch.testing.assert_close(module(x[:, 4:5], frame_offset=4, num_frames=7), full[:, 4:5], atol=0, rtol=0)
    assert torch.equal(module(x[:, :1]), x[:, :1])
    with pytest.raises(ValueError, match="do not fit"):
        module(x[:, :3], frame_offset=5, num_frames=7)


def test_temporal_table_matches_diffusers_and_extends_past_video_length():
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    official = get_1d_sincos_pos_embed_from_grid(1152, torch.arange(0, 16).unsqueeze(1)).float()  # Latte-1's buffer
    torch.testing.assert_close(temporal_pos_table(1152, 0, 16), official, atol=0, rtol=0)
    longer = temporal_pos_table(1152, 0, 24)
    torch.testing.assert_close(longer[:16], official, atol=0, rtol=0)  # same formula, more rows
    torch.testing.assert_close(temporal_pos_table(1152, 10, 24), longer[10:], atol=0, rtol=0)


@pytest.mark.parametrize("grid", [(32, 32), (24, 40), (8, 8), (5, 3)])
def test_spatial_table_matches_diffusers_patch_embed_formula(grid):
    """Full size: base_size 32 (sample_size 64 / patch 2), interpolation scale 1; any grid on the fly."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    dim = 1152 if grid == (32, 32) else 64
    base = 32 if dim == 1152 else 8
    official = get_2d_sincos_pos_embed(dim, grid, base_size=base, interpolation_scale=1).float()
    torch.testing.assert_close(spatial_pos_table(dim, *grid, base, 1)[0], official, atol=0, rtol=0)
