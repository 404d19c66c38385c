"""Latte-1 (Vchitect/Latte, diffusers `LatteTransformer3DModel` layout), all of it in this single file.

A latent video (B, 4, F, H, W) is cut into 2x2 patches per frame and run through interleaved spatial and
temporal transformer blocks: spatial block i attends over the S = H/2 * W/2 patches of each frame and
cross-attends to the projected T5 tokens; temporal block i attends over the F frames at each patch position.
Conditioning is PixArt's adaLN-single: one shared 6C modulation vector from the timestep plus a learned
`scale_shift_table` per block.

State-dict names and order are the diffusers ones, so `maxin-cn/Latte-1/transformer` loads as is.

Seams for PAB and DSP (docs/design.md): every block's `attn1` (spatial: (B*F, S, C), temporal: (B*S, F, C)),
`attn2` (cross) and `ff` are plain modules whose output depends only on their inputs; gates, norms and
modulation stay in the blocks. `broadcast_targets()` lists them. The temporal position table is the submodule
`temp_pos_embed`, so DSP can add the slice of a local frame range.

Performance (as in pab.models.stdit3; the float32 CPU path is the fixture path):
* the hidden state stays one contiguous (B, F, S, C) tensor; the temporal block writes its (B*S, F, C) attention
  and MLP inputs and reads their outputs back in its elementwise passes, so there are no transpose copies;
* norm + modulate, residual + norm + modulate and gate + residual are one pass each (`pab.kernels.norms` in
  half precision on CUDA, `torch.addcmul` elsewhere), and a gated residual and the norm after it are one pass
  too: inside the temporal block, and from each block's MLP to the next block's attention (`pab.models.handoff`);
  the blocks' `compile_regions` name these passes for `pab.compile.apply_compile`;
* self-attention computes q, k, v in one GEMM (cross-attention: k, v in one), from the concatenated weights of
  the diffusers-named to_q/to_k/to_v, so checkpoints load unchanged and the modules keep no derived state; the
  pipeline lays those weights end to end (`pab.models.packing`, the groups are `Attention.joint_linears`), so the
  GEMM reads a view of them instead of a copy made every call;
* the MLP's bias + tanh-GELU run in the fc1 GEMM epilogue on CUDA (`KernelOptions.fused_gelu`);
* temporal self-attention runs as one Triton kernel on CUDA in half precision (`KernelOptions.short_attention`);
* which kernels run is the model's `KernelOptions` (`pab.kernels.set_kernel_options`), defaults: all.

References:
- Latte paper: https://arxiv.org/abs/2401.03048
- diffusers `models/transformers/latte_transformer_3d.py` (v0.30.3 produced tests/fixtures/official/latte)
- PixArt-alpha adaLN-single: https://arxiv.org/abs/2310.00426
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self

import torch
import torch.nn as nn
import torch.nn.functional as F

from pab.kernels import flash_attention as flash
from pab.kernels import short_attention as short_attn
from pab.kernels import DEFAULT_KERNELS, KernelOptions, no_grad_needed, norms
from pab.kernels.fp8 import DelayedScale, delayed_reference, fp8_input, fp8_output
from pab.hooks.registry import output_reused
from pab.models.handoff import Handoff
from pab.models.packing import end_to_end

#################################################################################
#                                    Config                                     #
#################################################################################

SUPPORTED_ACTIVATIONS = {"gelu-approximate": "tanh", "gelu": "none"}

# Constructor defaults of diffusers' LatteTransformer3DModel: `from_dict` fills keys missing from a config.json
# with these, exactly as diffusers' `from_config` would (a missing key must not silently become Latte-1's value).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 88,
    "in_channels": None,
    "out_channels": None,
    "num_layers": 1,
    "dropout": 0.0,
    "cross_attention_dim": None,
    "attention_bias": False,
    "sample_size": 64,
    "patch_size": None,
    "activation_fn": "geglu",
    "num_embeds_ada_norm": None,
    "norm_type": "layer_norm",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "caption_channels": None,
    "video_length": 16,
}


class LatteLayoutConfig:
    """What the configs of LatteLayoutModel's two models share (their fields differ): the width of the shared
    layers, the checks those layers need, and loading an official config.json."""

    _FILE_DEFAULTS: ClassVar[dict[str, Any]]  # the official constructor's defaults, for keys a file lacks
    _WRONG_FILE: ClassVar[str]  # what an unknown key suggests the file is

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Build from an official config.json dict, as the official `from_config` would: missing keys take the
        constructor defaults, `_`-prefixed bookkeeping keys are ignored, any other unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {unknown}; {cls._WRONG_FILE}")
        return cls(**{**cls._FILE_DEFAULTS, **{k: v for k, v in d.items() if k in known}})

    def _check(self, problems: list[str]) -> None:
        """Raise one ValueError listing `problems` (the subclass's own) and what the shared layers cannot build."""
        if self.norm_type != "ada_norm_single":
            problems.append(f"norm_type={self.norm_type!r}: only 'ada_norm_single' (the releases) is implemented")
        if self.norm_elementwise_affine:
            problems.append("norm_elementwise_affine=True: the releases use LayerNorms without weights; set false")
        if self.activation_fn not in SUPPORTED_ACTIVATIONS:
            problems.append(f"activation_fn={self.activation_fn!r}: use one of {sorted(SUPPORTED_ACTIVATIONS)}")
        for name in ("in_channels", "patch_size", "caption_channels"):
            if getattr(self, name) is None:
                problems.append(f"{name} is None: a patched latent model needs it set")
        if self.cross_attention_dim != self.inner_dim:
            problems.append(
                f"cross_attention_dim={self.cross_attention_dim} must equal num_attention_heads * attention_head_dim "
                f"= {self.inner_dim}, because caption_projection maps the text to that width"
            )
        if problems:
            raise ValueError(f"Unsupported {type(self).__name__}: " + "; ".join(problems))


@dataclass
class LatteConfig(LatteLayoutConfig):
    """Field names of diffusers' LatteTransformer3DModel config; defaults are the released Latte-1 values."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8  # None -> in_channels; Latte-1 predicts noise + learned variance
    num_layers: int = 28  # spatial blocks; there are as many temporal blocks, interleaved
    dropout: float = 0.0
    cross_attention_dim: int = 1152  # width of the projected text tokens; must equal heads * head_dim
    attention_bias: bool = True  # bias on to_q/to_k/to_v (to_out always has one)
    sample_size: int = 64  # training latent size: sets the spatial table's base_size and interpolation scale
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000  # a flag in this architecture (number of training steps)
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096  # T5-XXL width before caption_projection
    video_length: int = 16  # training frame count; the temporal table is computed for any F (see TemporalPosEmbed)

    _FILE_DEFAULTS: ClassVar[dict[str, Any]] = _DIFFUSERS_DEFAULTS
    _WRONG_FILE: ClassVar[str] = (
        "is this a Latte config.json? (Open-Sora-Plan's LatteT2V configs go to "
        "pab.models.opensora_plan.LatteT2VConfig.from_dict.)"
    )

    def __post_init__(self):
        problems = []
        if not isinstance(self.sample_size, int):
            problems.append(f"sample_size={self.sample_size!r} must be one int (a square training latent)")
        self._check(problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES: dict[str, dict[str, Any]] = {
    # maxin-cn/Latte-1 transformer/config.json (video_length is absent there, so diffusers' default 16 applies).
    "full": dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
        cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, video_length=16,
    ),
    # Same architecture at test width; caption_channels 64 is the tiny T5's width (pab/text.py).
    "tiny": dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, dropout=0.0,
        cross_attention_dim=64, attention_bias=True, sample_size=16, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=64, video_length=16,
    ),
    # Latte-1-small, trained here on the synthetic shapes (`python -m pab.train --model latte-1-small`): 16 frames
    # of 64x64 px through a 4x VAE (16x16 latents, 64 tokens a frame); caption_channels 128 is the small T5's width.
    "small": dict(
        num_attention_heads=4, attention_head_dim=28, in_channels=4, out_channels=8, num_layers=2, dropout=0.0,
        cross_attention_dim=112, attention_bias=True, sample_size=16, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=128, video_length=16,
    ),
}


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# The official code builds these tables in float64 (numpy) from float32 positions and stores them as float32;
# we do the same so the tables agree to the last float32 bit. They are cheap but not free at full size
# (1024 x 1152 for a 64x64 latent), hence the small caches of these pure functions. They always build on the CPU
# (never under an ambient `torch.device(...)` context) and callers move the result.


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) float64 table: [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin/cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


@functools.lru_cache(maxsize=16)
def spatial_pos_table(
    embed_dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float
) -> torch.Tensor:
    """PixArt 2-D table for a grid_h x grid_w patch grid: (1, grid_h * grid_w, D) float32 on CPU.

    Channels [0, D/2) encode the column, [D/2, D) the row; positions are rescaled so every grid spans
    `base_size` units (p = index / (grid / base_size) / interpolation_scale), as in diffusers' PatchEmbed.
    Do not modify the returned tensor in place: it is cached.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin/cos embedding width must be a multiple of 4, got {embed_dim}")
    # float32 positions, divided in float32, exactly like the official numpy code.
    pos_h = torch.arange(grid_h, dtype=torch.float32, device="cpu") / (grid_h / base_size) / interpolation_scale
    pos_w = torch.arange(grid_w, dtype=torch.float32, device="cpu") / (grid_w / base_size) / interpolation_scale
    col = pos_w[None, :].expand(grid_h, grid_w)  # (Hp, Wp), w fastest in token order
    row = pos_h[:, None].expand(grid_h, grid_w)  # (Hp, Wp)
    table = torch.cat([sincos_1d(embed_dim // 2, col), sincos_1d(embed_dim // 2, row)], dim=1)  # (Hp*Wp, D)
    return table.float().unsqueeze(0)  # (1, Hp*Wp, D)


@functools.lru_cache(maxsize=16)
def temporal_pos_table(embed_dim: int, start: int, stop: int, interpolation_scale: float = 1) -> torch.Tensor:
    """1-D table for frames [start, stop): (stop - start, D) float32 on CPU. Row f is the same for any start.

    Positions are frame / interpolation_scale, computed in float32 as Open-Sora-Plan does (exact for Latte's 1).
    Do not modify the returned tensor in place: it is cached.
    """
    positions = torch.arange(start, stop, dtype=torch.float32, device="cpu") / interpolation_scale  # (F,)
    return sincos_1d(embed_dim, positions).float()  # (F, D)


def _on_device(cache: dict, key: tuple, device: torch.device, build) -> torch.Tensor:
    """A CPU table copied to `device` once per key and kept in the module's `cache` (a few entries): copying a
    pageable CPU tensor to a GPU waits for the GPU's queue to drain, which must not happen once per forward."""
    key = (*key, torch.device(device))
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = build().to(device)
    return cache[key]


#################################################################################
#                               Embedding Layers                                #
#################################################################################


class PatchEmbed(nn.Module):
    """Per-frame 2-D patch embedding plus the fixed 2-D sin/cos table for the grid it sees."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, base_size: int, interpolation_scale: float):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.base_size = base_size  # training grid side (sample_size // patch_size)
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self._tables: dict[tuple, torch.Tensor] = {}  # derived, not state (see _on_device)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, H/p * W/p, D) with the spatial table added."""
        grid_h, grid_w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)  # (N, S, D)
        table = _on_device(self._tables, (grid_h, grid_w), x.device, lambda: spatial_pos_table(
            self.embed_dim, grid_h, grid_w, self.base_size, self.interpolation_scale))  # fmt: skip
        # The official code adds the float32 table and casts back, so low-precision runs round the sum once.
        # Table first: the sum then takes the table's contiguous (S, D) layout instead of the conv's (D, S).
        return (table + x).to(x.dtype)  # (N, S, D)


class TemporalPosEmbed(nn.Module):
    """Adds the fixed 1-D sin/cos frame table to tokens in the (B*S, F, C) layout; no parameters.

    The official models keep a table of exactly `video_length` rows and add it unsliced, so they only run with
    F == video_length. Here the rows are computed for whatever frames are seen: frames beyond video_length use
    the same formula (positions video_length, video_length + 1, ...), which is what the official table would
    hold had it been built longer.

    `forward(x, frame_offset=0, num_frames=None)`: `x` holds frames [frame_offset, frame_offset + F) of a clip of
    `num_frames` frames (default: x is the whole clip). Sequence parallelism passes its local frame range so each
    rank adds the rows of its own frames. With `skip_single_frame` (Latte), a one-frame clip gets no table, as in
    diffusers; the decision uses the clip length, not the local F, so a rank holding one frame still adds its row.
    """

    def __init__(self, embed_dim: int, interpolation_scale: float = 1, skip_single_frame: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.interpolation_scale = interpolation_scale
        self.skip_single_frame = skip_single_frame
        self._tables: dict[tuple, torch.Tensor] = {}  # derived, not state (see _on_device)

    def table(self, start: int, stop: int) -> torch.Tensor:
        """Rows for frames [start, stop): (stop - start, C) float32 on CPU."""
        return temporal_pos_table(self.embed_dim, start, stop, self.interpolation_scale)

    def forward(self, x: torch.Tensor, frame_offset: int = 0, num_frames: int | None = None) -> torch.Tensor:
        frames = x.shape[1]
        num_frames = frame_offset + frames if num_frames is None else num_frames
        if frame_offset < 0 or frame_offset + frames > num_frames:
            raise ValueError(
                f"frames [{frame_offset}, {frame_offset + frames}) do not fit in a clip of {num_frames} frames"
            )
        if self.skip_single_frame and num_frames == 1:
            return x
        rows = _on_device(self._tables, (frame_offset, frames), x.device,
                          lambda: self.table(frame_offset, frame_offset + frames))  # (F, C) float32
        return x + rows.to(x.dtype)  # (B*S, F, C)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, interpolation_scale={self.interpolation_scale}"


def timestep_features(timesteps: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32 [cos, sin] features (diffusers Timesteps, flip_sin_to_cos, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    # The official code takes a float32 exp here. Float32 exp differs by an ulp between CPU builds and GPUs, and
    # at t = 999 one ulp of a frequency near 1 moves the features by 1e-4 and the output by ~1e-5, so we round a
    # float64 exp once: the same float32 quantity, identical on every platform. The product and sin/cos stay in
    # float32 like the official code (computing them in float64 moves the output just as much).
    freqs = torch.exp(exponent.double()).float()  # (dim/2,)
    args = timesteps[:, None].float() * freqs[None, :]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features (diffusers TimestepEmbedding)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CombinedTimestepEmbedding(nn.Module):
    """PixArt's timestep embedder without the resolution/aspect-ratio conditions (unused by Latte)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embed_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_features(timestep).to(dtype))  # (B, D)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: one 6D modulation vector per sample, shared by all blocks (each adds its own table)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(embed_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embed_dim, 6 * embed_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -> block modulation (B, 6D) and the embedded timestep (B, D) for the output head."""
        embedded = self.emb(timestep, dtype)  # (B, D)
        return self.linear(self.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """Two-layer MLP from text-encoder width to model width (PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))  # (B, L, D)


#################################################################################
#                          Attention, MLP and Blocks                            #
#################################################################################


def _linear_cat(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """Several Linears on the same input as one GEMM; outputs concatenated along the last dim.

    The GEMM reads the weights as one view where they lie end to end (`pab.models.packing.pack_joint_linears`,
    which the pipeline runs), else concatenated for this call (~8 MB at full size): never cached, so the module
    stays plain. A transform that runs the group itself gives the first linear a `run_group(x, layers)`
    (pab.precision's fp8: one GEMM on its own weights; None: not this call). A linear that carries a hook
    (pab.hooks) is called itself, so the hook sees its input.
    """
    run_group = getattr(layers[0], "run_group", None)
    if run_group is not None:
        out = run_group(x, layers)
        if out is not None:
            return out
    if any("forward" in layer.__dict__ for layer in layers):
        return torch.cat([layer(x) for layer in layers], dim=-1)
    return F.linear(x, _joined([layer.weight for layer in layers]),
                    None if layers[0].bias is None else _joined([layer.bias for layer in layers]))  # fmt: skip


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    # The compiler traces the concatenation (and fuses or folds it); a view found by pointer is for eager.
    view = None if torch.compiler.is_compiling() else end_to_end(tensors)
    return torch.cat(tensors) if view is None else view


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (diffusers `Attention` names), via SDPA.

    Self-attention when `encoder_hidden_states` is None. `attention_bias` is additive and must broadcast to
    (N, heads, L_q, L_kv). Stateless: the output depends only on the arguments (PAB relies on this).
    The projections that share an input run as one GEMM (q, k, v; or k, v of the context), see `_linear_cat`.
    """

    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        spatial: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.spatial = spatial  # a spatial block's self-attention: KernelOptions.spatial_attention picks its kernel
        self.is_cross_attention = cross_attention_dim is not None
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=True), nn.Dropout(dropout)])

    # Sequence parallelism (pab.parallel.dsp) may pass the temporal self-attention its sequences in frame
    # blocks, (N, nb, lb, C) with token t = b·lb + i of sequence n at [n, b, i]: a transposed view of the buffer
    # the frames arrived in from nb ranks. The projections are token-wise and the short-sequence kernel reads
    # and writes that layout, so the switches need no reordering copies (as STDiT3's SelfAttention).
    accepts_frame_blocks = True

    def joint_linears(self) -> list[tuple[nn.Linear, ...]]:
        """The projections `forward` runs as one GEMM (`_linear_cat`): q, k, v; a cross-attention's k, v."""
        return [(self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)]

    def linear_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The projections run as one GEMM on their shared input (`_linear_cat`): a self-attention's q, k, v.
        (A cross-attention's k, v read the few text tokens: not worth a transform's while.)"""
        return [] if self.is_cross_attention else [(self.to_q, self.to_k, self.to_v)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        d = fp8_output(self.to_out[0])  # asked once a call: it counts the request's calls (pab.precision)
        if hidden_states.ndim == 4 and encoder_hidden_states is None:  # frame blocks -> the same layout
            qkv = _linear_cat(hidden_states.transpose(0, 1), self.to_q, self.to_k, self.to_v)  # (nb, N, lb, 3hd)
            return self._self_attention(qkv, attention_bias, d).transpose(0, 1)
        if encoder_hidden_states is None:
            return self._self_attention(_linear_cat(hidden_states, self.to_q, self.to_k, self.to_v), attention_bias,
                                        d)  # fmt: skip
        n, length, _ = hidden_states.shape  # (N, L_q, C)
        q = self.to_q(hidden_states).view(n, length, self.heads, self.dim_head).transpose(1, 2)  # (N, h, L_q, d)
        kv = _linear_cat(encoder_hidden_states, self.to_k, self.to_v)  # (N, L_kv, 2*h*d)
        kv = kv.view(n, encoder_hidden_states.shape[1], 2, self.heads, self.dim_head)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, L_kv, d) each
        return self._sdpa_out(q, k, v, attention_bias, d)

    def attention_output_linears(self) -> list[nn.Linear]:
        """The attention's output reaches `to_out[0]` alone (to_out[1] is a dropout), and the kernels can write it
        in e4m3 (pab.precision)."""
        return [self.to_out[0]]

    def quantized_input_linears(self) -> list[nn.Linear]:
        """A cross-attention's q reads the residual stream, which the block's gate + residual kernel can write in
        e4m3 too (pab.precision's `produced_inputs`; each family's config decides whether it runs in fp8)."""
        return [self.to_q] if self.is_cross_attention else []

    def _self_attention(
        self, qkv: torch.Tensor, attention_bias: torch.Tensor | None, d: DelayedScale | None = None
    ) -> torch.Tensor:  # fmt: skip
        """(N, L, 3·h·d) -> (N, L, C), or frame blocks (nb, N, lb, 3·h·d) -> (nb, N, lb, C)."""
        # Temporal attention (sequences of <= 32 frames) on CUDA in half precision through one Triton kernel
        # instead of flash attention's one mostly-empty CTA per (sequence, head).
        if self.kernels.short_attention and attention_bias is None and short_attn.supported(qkv, self.heads):
            out = short_attn.try_short_attention(qkv, self.heads, delayed=d)  # temporal: F <= 32 tokens a sequence
            if out is not None:
                return self.to_out[1](self.to_out[0](out))
        if qkv.ndim == 4:  # any other path: reorder the blocks into (N, L, 3hd) sequences first
            nb, n, lb, c3 = qkv.shape
            out = self._self_attention(qkv.transpose(0, 1).reshape(n, nb * lb, c3), attention_bias, d)
            return out.view(n, nb, lb, out.shape[-1]).transpose(0, 1)
        n, length, _ = qkv.shape
        # explicit sizes, no -1: a DSP rank can get no sequences of a chunk (n = 0)
        q, k, v = qkv.view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, L, d)
        return self._sdpa_out(q, k, v, attention_bias, d)

    def _sdpa_out(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, d: DelayedScale | None
    ) -> torch.Tensor:  # fmt: skip
        """SDPA over (N, h, L, d) q and (N, h, L_kv, d) k, v, then the output projection: (N, L, C)."""
        n, _, length, _ = q.shape
        if bias is None and (self.spatial or self.is_cross_attention):  # KernelOptions picks these two's kernel
            impl = self.kernels.cross_attention if self.is_cross_attention else self.kernels.spatial_attention
            out = flash.attention(q, k, v, impl, delayed=d)  # (N, L_q, h, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
            out = out.transpose(1, 2)  # (N, L_q, h, d), scale 1/sqrt(d)
            if d is not None:  # the kernels' arithmetic in PyTorch
                out = delayed_reference(out, d, width=self.heads * self.dim_head)
        out = out.reshape(n, length, self.heads * self.dim_head)  # (N, L_q, h*d)
        return self.to_out[1](self.to_out[0](out))  # (N, L_q, C)


class GELUProjection(nn.Module):
    """Linear then GELU (diffusers `GELU` activation module, hence the `proj` name)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """4x MLP; `net` = [GELU projection, dropout, linear] to keep diffusers' `ff.net.0.proj` / `ff.net.2` names."""

    kernels: KernelOptions = DEFAULT_KERNELS

    def __init__(self, dim: int, activation_fn: str, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        hidden = dim * mult
        act = GELUProjection(dim, hidden, SUPPORTED_ACTIVATIONS[activation_fn])
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(hidden, dim)])

    def gelu_linears(self) -> tuple[nn.Linear, str, nn.Linear]:
        """(fc1, its GELU's approximation, fc2): what a transform that replaces the MLP's math needs (pab.precision).
        Dropout sits between them; it is the identity in inference, the only use of such a transform."""
        return self.net[0].proj, self.net[0].approximate, self.net[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, drop, proj_out = self.net
        if self.kernels.fused_gelu and x.is_cuda and no_grad_needed(x) and act.approximate == "tanh":
            # cuBLASLt applies bias + tanh-GELU in fc1's epilogue: the 4C-wide hidden is written once instead of
            # written, read and written again. CUDA only: the CPU kernel of this op uses the exact (erf) GELU.
            # The epilogue is the tanh GELU, so "gelu" (erf) stays on the plain path.
            h = torch._addmm_activation(act.proj.bias, x.reshape(-1, x.shape[-1]), act.proj.weight.t(), use_gelu=True)
            h = h.view(*x.shape[:-1], h.shape[-1])
        else:
            h = act(x)
        return proj_out(drop(h))


def _modulation(table: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Per-block table (6, C) + shared (B, 6C) -> (B, 6, 1, 1, C): shift/scale/gate of the attention, then of the
    MLP, each broadcasting over the (B, F, S, C) hidden state."""
    return (table[None] + temb.reshape(temb.shape[0], 6, -1))[:, :, None, None]


def _norm_modulate_frame_major(
    norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, kernel: bool, fp8: str | None = None
) -> torch.Tensor:
    """shift + norm(x) * (1 + scale) for (B, F, S, C) x, returned in temporal attention's (B*S, F, C) layout;
    `kernel`: the norm kernels may run (KernelOptions.norms); `fp8`: their e4m3 rows too, or alone (`fp8_input`)."""
    B, F_, S, C = x.shape
    if kernel and norms.available(x):  # one kernel: norm, modulate and the frame-major write
        return norms.ln_modulate(x, shift, scale, norm.eps, frame_major=True, fp8=fp8).view(B * S, F_, C)
    x_n = norm(x)
    # The compiler fuses the transpose into the same kernel itself; autograd (training) cannot take out=.
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.addcmul(shift, x_n, 1 + scale).transpose(1, 2).reshape(B * S, F_, C)
    # Write straight into the (B, S, F, C) layout: one pass instead of modulate + transpose copy.
    out = x_n.new_empty(B, S, F_, C)
    torch.addcmul(shift, x_n, 1 + scale, out=out.transpose(1, 2))
    return out.view(B * S, F_, C)


def _gated_residual_frame_major(x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, kernel: bool) -> torch.Tensor:
    """x + gate * a for (B, F, S, C) x, with `a` read back from temporal attention's (B*S, F, C) layout."""
    B, F_, S, C = x.shape
    if kernel and norms.available(x):
        return norms.gated_residual(x, gate, a, frame_major=True)
    return torch.addcmul(x, gate, a.view(B, S, F_, C).transpose(1, 2))


class LatteBlock(nn.Module):
    """The layers of both block kinds (diffusers' BasicTransformerBlock with adaLN-single), in checkpoint order;
    the cross-attention `attn2` only where `cross_attention_dim` is given (the spatial blocks)."""

    # The elementwise steps between the PAB targets: pure functions of their arguments (no state, no hooks),
    # which pab.compile.apply_compile may replace per instance with compiled versions.
    compile_regions = ("attn_in", "attn_in_after", "attn_out", "mlp_in", "mlp_out")
    kernels: KernelOptions = DEFAULT_KERNELS
    frame_major: ClassVar[bool] = False  # whether attn1 and ff read and write the (B*S, F, C) layout (temporal)

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        attention_bias: bool,
        activation_fn: str,
        norm_eps: float,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, dropout=dropout,
                               spatial=cross_attention_dim is not None)  # fmt: skip
        if cross_attention_dim is not None:
            self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim, bias=attention_bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.ff = FeedForward(dim, activation_fn, dropout)

    def _norms(self, x: torch.Tensor) -> bool:
        return self.kernels.norms and norms.available(x)

    def _attn_input(self, x: torch.Tensor, temb: torch.Tensor, handoff: Handoff | None):
        """(this block's adaLN parameters, its attention input): both as the block before handed them over, else
        computed here; the input is None where PAB reuses the attention's output (it reads no input: no norm)."""
        given = handoff.take(self, x) if handoff is not None else None
        mod = _modulation(self.scale_shift_table, temb) if given is None else given.mod  # (B, 6, 1, 1, C)
        if output_reused(self.attn1):
            return mod, None
        return mod, self.attn_in(x, mod) if given is None else given.attn_input

    def _mlp_out_handing_on(self, x, m, mod, temb, handoff: Handoff | None) -> torch.Tensor:
        """x + gate * m; with the next block's attention input in the same pass, handed over to it, unless PAB
        reuses that attention's output (pab.models.handoff)."""
        after = handoff.after(self) if handoff is not None else None
        if after is None or output_reused(after.attn1):
            return self.mlp_out(x, m, mod)
        after_mod = _modulation(after.scale_shift_table, temb)
        x, after_in = after.attn_in_after(x, mod[:, 5], m, after_mod, self.frame_major)
        handoff.put(after, x, after_in, after_mod)
        return x

    def attn_in_after(
        self, x: torch.Tensor, gate: torch.Tensor, m: torch.Tensor, mod: torch.Tensor, m_frame_major: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block before this one's MLP residual, x + gate * m (m laid out (B*S, F, C) if `m_frame_major`), then
        this block's `attn_in` of that sum: (sum, attention input), in one pass on the kernel path."""
        B, F_, S, C = x.shape
        if self._norms(x):
            x, out = norms.gated_ln_modulate(x, gate, m, mod[:, 0], mod[:, 1], self.norm1.eps,
                                             frame_major=self.frame_major, fp8=fp8_input(self.attn1),
                                             a_frame_major=m_frame_major)  # fmt: skip
            return x, out.view(B * S, F_, C) if self.frame_major else out.view(B * F_, S, C)
        x = torch.addcmul(x, gate, m.view(B, S, F_, C).transpose(1, 2) if m_frame_major else m.view(x.shape))
        return x, self.attn_in(x, mod)


class SpatialBlock(LatteBlock):
    """Spatial block: modulated self-attention over a frame's patches, cross-attention to text, modulated MLP.

    As in PixArt with adaLN-single, cross-attention has no norm and no gate. Built with `cross_attention_dim`.
    """

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        context_bias: torch.Tensor | None = None,
        handoff: Handoff | None = None,
    ) -> torch.Tensor:
        """x (B, F, S, C), temb (B, 6C), context (B*F, L, C), context_bias None or (B*F, 1, 1, L) -> (B, F, S, C);
        handoff: the model's (pab.models.handoff).

        attn1, attn2 and ff see (B*F, S, C).
        """
        B, F_, S, C = x.shape
        mod, a_in = self._attn_input(x, temb, handoff)
        # Where the cross-attention's q runs in fp8 (Open-Sora-Plan's family; not Latte's), the gate + residual pass
        # writes its e4m3 rows too.
        x = self.attn_out(x, self.attn1(a_in), mod,
                          fp8=None if output_reused(self.attn2) else fp8_input(self.attn2.to_q))
        c = self.attn2(x.view(B * F_, S, C), context, context_bias)
        if output_reused(self.ff):  # a broadcast MLP does not read its input: the residual alone, no norm
            x, m = x + c.view(x.shape), self.ff(None)
        else:
            x, h = self.mlp_in(x, c, mod)
            m = self.ff(h)
        return self._mlp_out_handing_on(x, m, mod, temb, handoff)

    def modulated_input(self, x, temb, context=None, context_bias=None, handoff=None) -> torch.Tensor:
        """norm1(x) shifted and scaled by the timestep modulation, (B, F, S, C): step reuse's indicator."""
        mod = _modulation(self.scale_shift_table, temb)
        return torch.addcmul(mod[:, 0], self.norm1(x), 1 + mod[:, 1])

    def attn_in(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """norm1 + modulate -> (B*F, S, C) self-attention input."""
        B, F_, S, C = x.shape
        if self._norms(x):
            return norms.ln_modulate(x, mod[:, 0], mod[:, 1], self.norm1.eps,
                                     fp8=fp8_input(self.attn1)).view(B * F_, S, C)  # fmt: skip
        return torch.addcmul(mod[:, 0], self.norm1(x), 1 + mod[:, 1]).view(B * F_, S, C)

    def attn_out(self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor, fp8: str | None = None) -> torch.Tensor:
        """x + gate * self-attention output (with its e4m3 rows where `fp8`, for the cross-attention's q)."""
        if self._norms(x):
            return norms.gated_residual(x, mod[:, 2], a, fp8=fp8)
        return torch.addcmul(x, mod[:, 2], a.view(x.shape))

    def mlp_in(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention residual (no gate), then norm2 + modulate: (x, MLP input (B*F, S, C))."""
        B, F_, S, C = x.shape
        if self._norms(x):
            x, out = norms.add_ln_modulate(x, c.view(x.shape), mod[:, 3], mod[:, 4], self.norm2.eps,
                                           fp8=fp8_input(self.ff))  # fmt: skip
            return x, out.view(B * F_, S, C)
        x = x + c.view(x.shape)
        return x, torch.addcmul(mod[:, 3], self.norm2(x), 1 + mod[:, 4]).view(B * F_, S, C)

    def mlp_out(self, x: torch.Tensor, m: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        if self._norms(x):
            return norms.gated_residual(x, mod[:, 5], m)
        return torch.addcmul(x, mod[:, 5], m.view(x.shape))


class TemporalBlock(LatteBlock):
    """Temporal block: modulated self-attention over the frames at one patch position, then modulated MLP."""

    frame_major = True
    compile_regions = (*LatteBlock.compile_regions, "attn_out_mlp_in")

    def forward(self, x: torch.Tensor, temb: torch.Tensor, handoff: Handoff | None = None) -> torch.Tensor:
        """x (B, F, S, C), temb (B, 6C) -> (B, F, S, C); handoff: the model's (pab.models.handoff). attn1 and ff
        see the frame-major (B*S, F, C)."""
        mod, a_in = self._attn_input(x, temb, handoff)
        a = self.attn1(a_in)
        if output_reused(self.ff):  # a broadcast MLP does not read its input: no norm
            x, h = self.attn_out(x, a, mod), None
        else:
            x, h = self.attn_out_mlp_in(x, a, mod)
        return self._mlp_out_handing_on(x, self.ff(h), mod, temb, handoff)

    def attn_in(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """norm1 + modulate, written as the (B*S, F, C) attention input."""
        fp8 = fp8_input(self.attn1)
        return _norm_modulate_frame_major(self.norm1, x, mod[:, 0], mod[:, 1], self.kernels.norms, fp8)

    def attn_out(self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x + gate * attention output, read back from its (B*S, F, C) layout in the same pass."""
        return _gated_residual_frame_major(x, mod[:, 2], a, self.kernels.norms)

    def mlp_in(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """norm2 + modulate, written as the (B*S, F, C) MLP input."""
        return _norm_modulate_frame_major(self.norm2, x, mod[:, 3], mod[:, 4], self.kernels.norms, fp8_input(self.ff))

    def attn_out_mlp_in(
        self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attn_out` then `mlp_in` of its sum: (x, MLP input (B*S, F, C)), in one pass on the kernel path."""
        B, F_, S, C = x.shape
        if self._norms(x):
            x, out = norms.gated_ln_modulate(x, mod[:, 2], a, mod[:, 3], mod[:, 4], self.norm2.eps, frame_major=True,
                                             fp8=fp8_input(self.ff), a_frame_major=True)  # fmt: skip
            return x, out.view(B * S, F_, C)
        x = self.attn_out(x, a, mod)
        return x, self.mlp_in(x, mod)

    def mlp_out(self, x: torch.Tensor, m: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return _gated_residual_frame_major(x, mod[:, 5], m, self.kernels.norms)


#################################################################################
#                          Shared input/output helpers                          #
#################################################################################


def check_latent_size(hidden_states: torch.Tensor, patch_size: int) -> None:
    """Raise a ValueError that says what to change when the latent cannot be patched."""
    if hidden_states.ndim != 5:
        raise ValueError(f"hidden_states must be (B, C, F, H, W), got shape {tuple(hidden_states.shape)}")
    h, w = hidden_states.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"latent height and width must be multiples of patch_size={patch_size}, got {h}x{w}; "
            f"pick a pixel size that is a multiple of {8 * patch_size} for an 8x VAE"
        )


def batch_timesteps(timestep: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Accept (B,), (1,) or a scalar; return (B,) so every sample gets its own modulation."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0 or timestep.shape == (1,):
        return timestep.reshape(1).expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must be a scalar, (1,) or (B,)=({batch},), got shape {tuple(timestep.shape)}")
    return timestep


def final_modulate_and_unpatchify(
    x: torch.Tensor,
    embedded_timestep: torch.Tensor,
    scale_shift_table: torch.Tensor,
    norm_out: nn.Module,
    proj_out: nn.Module,
    batch: int,
    frames: int,
    grid: tuple[int, int],
    patch_size: int,
) -> torch.Tensor:
    """Output head: (B*F, S, C) tokens -> (B, C_out, F, H, W) latent."""
    grid_h, grid_w = grid
    emb = embedded_timestep.repeat_interleave(frames, dim=0)  # (B*F, C), sample-major like the tokens
    shift, scale = (scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B*F, 1, C) each
    x = proj_out(norm_out(x) * (1 + scale) + shift)  # (B*F, S, p*p*C_out)
    x = x.reshape(batch * frames, grid_h, grid_w, patch_size, patch_size, -1)  # (B*F, Hp, Wp, p, p, C_out)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B*F, C_out, Hp, p, Wp, p)
    x = x.reshape(batch, frames, -1, grid_h * patch_size, grid_w * patch_size)  # (B, F, C_out, H, W)
    return x.permute(0, 2, 1, 3, 4)  # (B, C_out, F, H, W)


#################################################################################
#                                Core Latte Model                               #
#################################################################################


class LatteLayoutModel(nn.Module):
    """The layers, forward pass and PAB seams that Latte-1 and Open-Sora-Plan's LatteT2V share.

    The two differ only in their caption projection and temporal table, which a subclass passes in, and in
    their `forward` signature and text mask (`_cross_attention_bias`), which it defines; `sample_size` is the
    (square) latent size the spatial table was trained at.
    """

    kernels: KernelOptions = DEFAULT_KERNELS  # what pab.kernels.set_kernel_options last gave its modules

    def __init__(self, config: Any, sample_size: int, caption_projection: nn.Module, temp_pos_embed: nn.Module):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.out_channels = config.in_channels if config.out_channels is None else config.out_channels

        # Registration order fixes the state-dict order; it follows the official modules (own parameters first).
        self.pos_embed = PatchEmbed(
            config.patch_size, config.in_channels, dim,
            base_size=sample_size // config.patch_size,
            interpolation_scale=max(sample_size // 64, 1),  # 64 latent = 512 px is PixArt's scale 1
        )  # fmt: skip
        block = dict(
            dim=dim, heads=config.num_attention_heads, head_dim=config.attention_head_dim,
            attention_bias=config.attention_bias, activation_fn=config.activation_fn, norm_eps=config.norm_eps,
            dropout=config.dropout,
        )  # fmt: skip
        self.transformer_blocks = nn.ModuleList(
            [SpatialBlock(cross_attention_dim=config.cross_attention_dim, **block) for _ in range(config.num_layers)]
        )
        self.temporal_transformer_blocks = nn.ModuleList([TemporalBlock(**block) for _ in range(config.num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim)
        self.caption_projection = caption_projection
        self.temp_pos_embed = temp_pos_embed

    def broadcast_targets(self) -> dict[str, list[nn.Module]]:
        """Modules whose outputs PAB may reuse, by kind: "spatial", "temporal", "cross", "mlp" (the spatial
        blocks' `ff` first, then the temporal)."""
        return {
            "spatial": [block.attn1 for block in self.transformer_blocks],
            "temporal": [block.attn1 for block in self.temporal_transformer_blocks],
            "cross": [block.attn2 for block in self.transformer_blocks],
            "mlp": [block.ff for block in self.transformer_blocks]
            + [block.ff for block in self.temporal_transformer_blocks],
        }

    def block_order(self) -> list[LatteBlock]:
        """The blocks in forward order: spatial 0, temporal 0, spatial 1, ..."""
        return [b for pair in zip(self.transformer_blocks, self.temporal_transformer_blocks) for b in pair]

    def step_cache_targets(self) -> dict[str, Any]:
        """The block stack in forward order (all keep x as (B, F, S, C)) and the module that reads its output (the
        output head's norm, on the (B*F, S, C) view)."""
        return {"blocks": self.block_order(), "head": self.norm_out}

    def _cross_attention_bias(
        self, mask: torch.Tensor | None, batch: int, frames: int, text_len: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The subclass's text mask -> additive bias (B*F, 1, 1, L) for the cross-attention, or None."""
        raise NotImplementedError

    def _forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        enable_temporal_attentions: bool,
        return_dict: bool,
    ) -> tuple[torch.Tensor]:
        """The forward of both models, called by each one's `forward` with its own arguments checked.

        hidden_states: (B, C_in, F, H, W) latents, any F >= 1, H and W multiples of patch_size.
        timestep: (B,) diffusion steps (a scalar or (1,) is broadcast).
        encoder_hidden_states: (B, L, caption_channels) text features.
        encoder_attention_mask: the model's text mask (see its `_cross_attention_bias`).
        Returns a 1-tuple with (B, out_channels, F, H, W); `return_dict=True` is not supported (no diffusers
        output classes here).

        (Open-Sora-Plan's spatial attention also receives an all-zero bias for the all-kept video tokens; adding
        zeros changes nothing, so it is left out.)
        """
        if return_dict:
            raise ValueError("return_dict=True is not supported; call with return_dict=False and take [0]")
        check_latent_size(hidden_states, self.config.patch_size)
        b, c_in, f, h, w = hidden_states.shape
        p = self.config.patch_size
        grid = (h // p, w // p)
        s = grid[0] * grid[1]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states must be (B, L, {self.config.caption_channels}) with B={b}, "
                f"got {tuple(encoder_hidden_states.shape)}"
            )

        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c_in, h, w)  # (B*F, C_in, H, W)
        # The hidden state stays (B, F, S, C), contiguous; the temporal blocks read and write it in that layout.
        x = self.pos_embed(x).reshape(b, f, s, -1).contiguous()  # (B, F, S, C); contiguous already (a guard)
        temb, embedded_timestep = self.adaln_single(batch_timesteps(timestep, b, x.device), x.dtype)  # (B, 6C), (B, C)

        context = self.caption_projection(encoder_hidden_states)  # (B, L, C)
        context = context.repeat_interleave(f, dim=0)  # (B*F, L, C), row b*F + f
        context_bias = self._cross_attention_bias(encoder_attention_mask, b, f, context.shape[1], x.dtype)

        # Each block ends with the next one's first norm (pab.models.handoff), except the first spatial block: the
        # frame table is added after it.
        if enable_temporal_attentions:
            handoff = Handoff(self.block_order()[1:])
        else:
            handoff = Handoff(self.transformer_blocks)
        for i, (spatial_block, temporal_block) in enumerate(
            zip(self.transformer_blocks, self.temporal_transformer_blocks)
        ):
            x = spatial_block(x, temb, context, context_bias, handoff=handoff)  # (B, F, S, C)
            if enable_temporal_attentions:
                if i == 0:
                    # Frame table, added once before the first block. The module (which DSP hooks to pick this
                    # rank's rows) adds its rows to what it is given: given zeros it returns the rows alone
                    # (exactly), which are then added in the (B, F, S, C) layout without transposing the hidden
                    # state.
                    rows = self.temp_pos_embed(x.new_zeros(1, f, x.shape[-1]))  # (1, F, C)
                    x = x + rows[:, :, None]  # (B, F, S, C)
                x = temporal_block(x, temb, handoff=handoff)  # (B, F, S, C)

        out = final_modulate_and_unpatchify(
            x.view(b * f, s, -1), embedded_timestep, self.scale_shift_table, self.norm_out, self.proj_out,
            b, f, grid, p,
        )  # (B, C_out, F, H, W)
        return (out,)


class LatteTransformer3DModel(LatteLayoutModel):
    """Latte-1 video DiT: interleaved spatial and temporal blocks with adaLN-single conditioning."""

    def __init__(self, config: LatteConfig):
        super().__init__(
            config, config.sample_size,
            CaptionProjection(config.caption_channels, config.inner_dim),
            TemporalPosEmbed(config.inner_dim, skip_single_frame=True),
        )  # fmt: skip

    def _cross_attention_bias(
        self, mask: torch.Tensor | None, batch: int, frames: int, text_len: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Text mask -> additive bias (B*F, 1, 1, L) for the cross-attention, or None.

        Accepts what diffusers' Latte accepts, an additive bias (B*F, 1, L) with rows in b*F + f order (0 keep,
        -10000 drop), plus two forms diffusers rejects: a (B, 1, L) bias shared by all frames and a (B, L)
        keep-mask (1 keep, 0 drop), converted as (1 - m) * -10000 like Open-Sora-Plan does.
        """
        if mask is None:
            return None
        if mask.ndim == 2 and mask.shape == (batch, text_len):
            bias = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)  # (B, 1, L)
            return bias.repeat_interleave(frames, dim=0).unsqueeze(1)  # (B*F, 1, 1, L)
        if mask.ndim == 3 and mask.shape[1:] == (1, text_len):
            if mask.shape[0] == batch * frames:
                return mask.to(dtype).unsqueeze(1)  # (B*F, 1, 1, L)
            if mask.shape[0] == batch:
                return mask.to(dtype).repeat_interleave(frames, dim=0).unsqueeze(1)  # (B*F, 1, 1, L)
        raise ValueError(
            f"encoder_attention_mask must be a (B, L)=({batch}, {text_len}) keep-mask or an additive bias of shape "
            f"(B*F, 1, L)=({batch * frames}, 1, {text_len}) or (B, 1, L); got {tuple(mask.shape)}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        enable_temporal_attentions: bool = True,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """Predict noise and variance for a latent video: a 1-tuple with (B, out_channels, F, H, W).

        The tensors and return_dict are as in `LatteLayoutModel._forward`; encoder_attention_mask: see
        `_cross_attention_bias` (the Latte pipeline passes None).
        """
        return self._forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                             enable_temporal_attentions, return_dict)  # fmt: skip
