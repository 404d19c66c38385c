"""Open-Sora-Plan v1.1.0 CausalVAE ("CausalVAEModel_4x8x8"), all of it in this single file.

A video VAE with 4x temporal and 8x spatial compression and 4 latent channels. State-dict names are
the official ones (PKU-YuanGroup/Open-Sora-Plan, tag v1.1.0,
`opensora/models/ae/videobase/causal_vae/modeling_causalvae.py` and `modules/*.py`), so the released
`LanguageBind/Open-Sora-Plan-v1.1.0` `vae/` weights load unchanged.

Things that are easy to get wrong (all checked by the official fixture, see
`../shared/fidelity/vae/README.md`):

* Causal 3D convolutions pad in time by *repeating the first frame* k_t - 1 times, never with zeros.
* GroupNorm (32 groups, eps 1e-6) on 5-D tensors pools all frames, so the model is not causal as a
  whole and temporal tiling changes every latent, even in the first window.
* The mid-block attention is per frame over H*W positions (`AttnBlock3DFix`), single head.
* The temporal down/upsamplers mix two branches with alpha = sigmoid(mix_factor).
* Tiling (off by default; the official sampling scripts turn it on) blends tiles *in place*, so a
  tile is blended with neighbours that were already blended themselves.

`CausalVAE` implements the project's `VideoVAE` interface: `encode` returns DiT latents (posterior
mode, or a sample, times 0.18215, as the official `CausalVAEModelWrapper` does) and `decode` undoes
the scale. `encode_moments` / `decode_latents` are the unscaled official `encode` / `decode`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pab.models import load_state_dict_strict
from pab.models.vae import VideoVAE

logger = logging.getLogger(__name__)

# The DiT (LatteT2V) was trained on posterior samples times this constant; there is no shift.
SCALING_FACTOR = 0.18215

#################################################################################
#                                    Config                                     #
#################################################################################

# Keys of the official config.json that only matter for training or bookkeeping.
_TRAINING_ONLY_KEYS = ("lr", "loss_type", "loss_params")
# Present in the released config.json but not constructor arguments of the v1.1.0 class, which
# always uses RGB in and out (it ignores them with a warning).
_FIXED_RGB_KEYS = ("in_channels", "out_channels")

# Module names this implementation builds, per config field. The official code resolves these
# strings to classes; we only accept the ones the v1.1.0 release uses (plus the 2D/3D res-block
# choice and "" for "none"), and say so instead of silently building something else.
_SUPPORTED = {
    "q_conv": ("CausalConv3d",),
    "encoder_conv_in": ("Conv2d", "CausalConv3d"),
    "encoder_conv_out": ("CausalConv3d",),
    "encoder_attention": ("AttnBlock3DFix",),
    "encoder_resnet_blocks": ("ResnetBlock2D", "ResnetBlock3D"),
    "encoder_spatial_downsample": ("Downsample", ""),
    "encoder_temporal_downsample": ("TimeDownsampleRes2x", ""),
    "encoder_mid_resnet": ("ResnetBlock3D",),
    "decoder_conv_in": ("CausalConv3d",),
    "decoder_conv_out": ("CausalConv3d",),
    "decoder_attention": ("AttnBlock3DFix",),
    "decoder_resnet_blocks": ("ResnetBlock3D",),
    "decoder_spatial_upsample": ("SpatialUpsample2x", ""),
    "decoder_temporal_upsample": ("TimeUpsampleRes2x", ""),
    "decoder_mid_resnet": ("ResnetBlock3D",),
}
_GROUPS = 32  # hard-coded in the official modules/normalize.py; CausalVAEConfig.norm_num_groups


@dataclass(frozen=True)
class CausalVAEConfig:
    """Constructor arguments of the official `CausalVAEModel` (defaults = the released v1.1.0 VAE)."""

    hidden_size: int = 128
    """Base width; level widths are hidden_size * hidden_size_mult. The encoder conv_in outputs hidden_size."""
    z_channels: int = 4
    """Latent channels of the encoder/decoder (the encoder outputs 2 * z_channels: mean and logvar)."""
    hidden_size_mult: tuple[int, ...] = (1, 2, 4, 4)
    attn_resolutions: tuple[int, ...] = ()
    """Attention inside the levels; empty in the release (only the mid-blocks attend)."""
    dropout: float = 0.0
    resolution: int = 256
    """Only decides where attn_resolutions apply; no effect when those are empty."""
    double_z: bool = True
    embed_dim: int = 4
    """Channels of the posterior after quant_conv; these are the DiT's latent channels."""
    num_res_blocks: int = 2
    """Res-blocks per encoder level; decoder levels have num_res_blocks + 1."""
    q_conv: str = "CausalConv3d"
    encoder_conv_in: str = "Conv2d"
    encoder_conv_out: str = "CausalConv3d"
    encoder_attention: str = "AttnBlock3DFix"
    encoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D")
    encoder_spatial_downsample: tuple[str, ...] = ("Downsample", "Downsample", "Downsample", "")
    encoder_temporal_downsample: tuple[str, ...] = ("", "TimeDownsampleRes2x", "TimeDownsampleRes2x", "")
    encoder_mid_resnet: str = "ResnetBlock3D"
    decoder_conv_in: str = "CausalConv3d"
    decoder_conv_out: str = "CausalConv3d"
    decoder_attention: str = "AttnBlock3DFix"
    decoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock3D",) * 4
    decoder_spatial_upsample: tuple[str, ...] = ("", "SpatialUpsample2x", "SpatialUpsample2x", "SpatialUpsample2x")
    decoder_temporal_upsample: tuple[str, ...] = ("", "", "TimeUpsampleRes2x", "TimeUpsampleRes2x")
    decoder_mid_resnet: str = "ResnetBlock3D"
    # Not in the release's config.json (the defaults are what it does); the `-small` size trained here sets them.
    norm_num_groups: int = 32
    """Groups of every GroupNorm (hard-coded 32 in the official modules/normalize.py)."""
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    """Per-channel statistics of the posterior: when set, DiT latents are (z - mean) / std instead of
    z * 0.18215 (diffusers' convention; a small VAE's channels differ in scale too much for one constant)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON gives lists; tuples keep the frozen config hashable
                object.__setattr__(self, f.name, tuple(value))
        levels = len(self.hidden_size_mult)
        for name, allowed in _SUPPORTED.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(
                    f"{name} has {len(value)} entries but hidden_size_mult has {levels} levels; "
                    "give one entry per level"
                )
            bad = sorted({v for v in values if v not in allowed})
            if bad:
                raise ValueError(
                    f"{name}={value!r}: {bad} not implemented here; supported: {list(allowed)} "
                    "(the Open-Sora-Plan v1.1.0 CausalVAE; older v1.0.0 configs use other modules)"
                )
        widths = [self.hidden_size] + [self.hidden_size * m for m in self.hidden_size_mult]
        g = self.norm_num_groups
        if g < 1 or any(w <= 0 or w % g for w in widths):
            raise ValueError(
                f"channel widths {widths} (hidden_size * hidden_size_mult) must be positive multiples of "
                f"{g} (norm_num_groups): every GroupNorm uses {g} groups"
            )
        stats = [v for v in (self.latents_mean, self.latents_std) if v is not None]
        if len(stats) == 1 or any(len(v) != self.embed_dim for v in stats):
            raise ValueError(f"latents_mean and latents_std go together, {self.embed_dim} values each")
        if self.attn_resolutions:
            raise ValueError(
                f"attn_resolutions={self.attn_resolutions!r}: attention inside the levels is not implemented "
                "(the v1.1.0 release has none); use attn_resolutions=[]"
            )
        if not self.double_z:
            raise ValueError("double_z=False is not supported: quant_conv expects mean and logvar (2 * z_channels)")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.encoder_spatial_downsample[-1] or self.encoder_temporal_downsample[-1]:
            raise ValueError(
                "the last encoder level must not downsample: the official mid-block reads the last "
                "res-block's output and would silently skip it"
            )
        if self.spatial_downsamples != sum(bool(m) for m in self.decoder_spatial_upsample):
            raise ValueError("the decoder must upsample in space as often as the encoder downsamples")
        if self.temporal_downsamples != sum(bool(m) for m in self.decoder_temporal_upsample):
            raise ValueError("the decoder must upsample in time as often as the encoder downsamples")

    @property
    def spatial_downsamples(self) -> int:
        return sum(bool(m) for m in self.encoder_spatial_downsample)

    @property
    def temporal_downsamples(self) -> int:
        return sum(bool(m) for m in self.encoder_temporal_downsample)

    @classmethod
    def from_dict(cls, config: dict) -> CausalVAEConfig:
        """Build from the official config.json (diffusers ConfigMixin JSON).

        Bookkeeping keys (`_class_name`, `_diffusers_version`, `_name_or_path`, ...) and training-only
        keys (lr, loss_type, loss_params) are ignored; any other unknown key is an error, so a typo
        or an unsupported option never goes unnoticed.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in config.items():
            if key in known:
                kwargs[key] = value
            elif key in _FIXED_RGB_KEYS:
                if value != 3:
                    raise ValueError(f"{key}={value}: the CausalVAE is RGB only (3 channels)")
            elif not (key.startswith("_") or key in _TRAINING_ONLY_KEYS):
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"unknown CausalVAE config keys {sorted(unknown)}; known: {sorted(known)} "
                f"(ignored: keys starting with '_', {list(_TRAINING_ONLY_KEYS + _FIXED_RGB_KEYS)})"
            )
        return cls(**kwargs)


@dataclass(frozen=True)
class TilingConfig:
    """Tile sizes for tiled encode/decode, with the official attribute names (defaults = release).

    Tiling starts only when a size exceeds its tile: encode when H or W > tile_sample_min_size or
    F > tile_sample_min_size_t; decode when h or w > tile_latent_min_size or t > tile_latent_min_size_t.
    Then both the temporal and the spatial tiling run, exactly as in the official code.
    """

    tile_sample_min_size: int = 256
    """Pixel tile edge; tiles start every int(size * (1 - overlap)) px."""
    tile_sample_min_size_t: int = 65
    """Frames per temporal encode window; windows start every size - 1 frames and share one frame."""
    tile_latent_min_size: int = 32
    """Latent tile edge for decode (official: tile_sample_min_size / 8)."""
    tile_latent_min_size_t: int = 17
    """Latents per temporal decode window (official: (tile_sample_min_size_t - 1) / 4 + 1)."""
    tile_overlap_factor: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError(f"tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor}")
        for name in ("tile_sample_min_size", "tile_latent_min_size"):
            size = getattr(self, name)
            if int(size * (1 - self.tile_overlap_factor)) < 1:
                raise ValueError(
                    f"{name}={size} is too small for overlap {self.tile_overlap_factor}: tiles would not advance"
                )
        for name in ("tile_sample_min_size_t", "tile_latent_min_size_t"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (windows advance by size - 1), got {getattr(self, name)}")

    def check(self, spatial_factor: int, temporal_factor: int) -> None:
        """Raise unless tiles stitch back to the untiled size (the official code would silently not)."""
        f, o = spatial_factor, self.tile_overlap_factor
        sample, latent = self.tile_sample_min_size, self.tile_latent_min_size
        encode_step, encode_keep = int(sample * (1 - o)), (latent - int(latent * o)) * f
        decode_step, decode_keep = int(latent * (1 - o)) * f, sample - int(sample * o)
        if encode_step != encode_keep or decode_step != decode_keep:
            raise ValueError(
                f"tile sizes do not stitch: pixel tiles advance {encode_step} px but keep {encode_keep} px of "
                f"latents, latent tiles advance {decode_step} px but keep {decode_keep} px. Use "
                f"tile_latent_min_size = tile_sample_min_size / {f} with a whole-number overlap at both sizes "
                f"(e.g. 256 / 32 px or 32 / 4 px with overlap 0.25)"
            )
        if (self.tile_sample_min_size_t - 1) % temporal_factor:
            raise ValueError(
                f"tile_sample_min_size_t={self.tile_sample_min_size_t} must be {temporal_factor}k+1 so that "
                "windows sharing one frame also share one latent"
            )

    def exceeded_by(self, x: torch.Tensor, latent: bool) -> bool:
        """Whether `x` (..., F, H, W), pixels or latents, exceeds its tile in any dim: then both tilings run."""
        edge, frames = ((self.tile_latent_min_size, self.tile_latent_min_size_t) if latent
                        else (self.tile_sample_min_size, self.tile_sample_min_size_t))  # fmt: skip
        return max(x.shape[-2:]) > edge or x.shape[-3] > frames

    @classmethod
    def for_model(cls, config: CausalVAEConfig, tile_sample_min_size: int = 256, tile_sample_min_size_t: int = 65,
                  tile_overlap_factor: float = 0.25) -> TilingConfig:
        """Latent tile sizes derived from the pixel ones the way `CausalVAEModel.__init__` does."""
        return cls(
            tile_sample_min_size=tile_sample_min_size,
            tile_sample_min_size_t=tile_sample_min_size_t,
            tile_latent_min_size=int(tile_sample_min_size / 2 ** (len(config.hidden_size_mult) - 1)),
            tile_latent_min_size_t=int((tile_sample_min_size_t - 1) / 2 ** config.temporal_downsamples) + 1,
            tile_overlap_factor=tile_overlap_factor,
        )


_RELEASE = CausalVAEConfig()
SIZES = {
    # LanguageBind/Open-Sora-Plan-v1.1.0 vae/config.json (v1.1.0 docs/Train_And_Eval_CausalVideoVAE.md).
    "full": {f.name: getattr(_RELEASE, f.name) for f in dataclasses.fields(CausalVAEConfig)},
    # Same topology at width 32 (the GroupNorm minimum) with one res-block per level: 1.5 M parameters.
    # Width 64 at level 1 keeps every channel-changing shortcut of the release (2D and 3D nin_shortcut
    # in the encoder, 3D in the decoder); it is the official fixture's topology.
    "tiny": {
        **{f.name: getattr(_RELEASE, f.name) for f in dataclasses.fields(CausalVAEConfig)},
        "hidden_size": 32,
        "hidden_size_mult": (1, 2, 1, 1),
        "num_res_blocks": 1,
    },
    # Open-Sora-Plan-v1.1-small's VAE, trained here (`python -m pab.train --model opensora-plan-v1.1-small`):
    # three levels of width 16 (GroupNorm in 8 groups), 4x in time as released but 4x in space, so a
    # 17 x 64 x 64 clip is 5 x 16 x 16 latents; 0.22 M parameters. Latents normalised per channel (set by training).
    "small": {
        **{f.name: getattr(_RELEASE, f.name) for f in dataclasses.fields(CausalVAEConfig)},
        "hidden_size": 16,
        "hidden_size_mult": (1, 1, 1),
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "encoder_resnet_blocks": ("ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"),
        "encoder_spatial_downsample": ("Downsample", "Downsample", ""),
        "encoder_temporal_downsample": ("TimeDownsampleRes2x", "TimeDownsampleRes2x", ""),
        "decoder_resnet_blocks": ("ResnetBlock3D",) * 3,
        "decoder_spatial_upsample": ("", "SpatialUpsample2x", "SpatialUpsample2x"),
        "decoder_temporal_upsample": ("", "TimeUpsampleRes2x", "TimeUpsampleRes2x"),
    },
}

#################################################################################
#                                 Building blocks                               #
#################################################################################


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int, groups: int = _GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D (N, C, H, W) function to every frame of a (B, C, T, H, W) video."""
    b, _, t, _, _ = x.shape
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C', H', W'), batch-major like the official rearrange
    return y.unflatten(0, (b, t)).transpose(1, 2)  # (B, C', T, H', W')


def _repeat_first_frame(x: torch.Tensor, n: int) -> torch.Tensor:
    """Causal temporal padding: n copies of frame 0 in front, (B, C, T, H, W) -> (B, C, n + T, H, W)."""
    if n == 0:
        return x
    return torch.cat([x[:, :, :1].expand(-1, -1, n, -1, -1), x], dim=2)


class CausalConv3d(nn.Module):
    """3D conv that pads time by repeating the first frame (k_t - 1 copies) and space with zeros."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int | tuple[int, int, int], padding: int = 0):
        super().__init__()
        kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.time_pad = kernel_size[0] - 1
        # Temporal padding is done by hand in forward, so the conv only pads H and W.
        self.conv = nn.Conv3d(chan_in, chan_out, kernel_size, padding=(0, padding, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_repeat_first_frame(x, self.time_pad))  # (B, C, T, H, W) -> (B, C', T, H', W')


class FrameConv2d(nn.Conv2d):
    """A Conv2d applied to every frame of a video (the official `Conv2d` with `video_to_image`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(super().forward, x)


class ResnetBlock2D(nn.Module):
    """Per-frame res-block: GroupNorm statistics are per frame here (unlike ResnetBlock3D)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int = _GROUPS):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C', H, W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(self._forward_2d, x)  # (B, C, T, H, W) -> (B, C', T, H, W)


class ResnetBlock3D(nn.Module):
    """Res-block with causal 3x3x3 convs; GroupNorm pools all frames."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int = _GROUPS):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C', T, H, W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock3DFix(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, plus the input."""

    def __init__(self, channels: int, groups: int = _GROUPS):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hn = self.norm(x)  # statistics over all frames

        def tokens(y: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B*T, 1, H*W, C)
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)

        # SDPA instead of the official explicit bmm/softmax: same math (scale C^-0.5), without
        # materialising the (B*T, HW, HW) matrix at large resolutions.
        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Per-frame 2x spatial downsampling: zero pad right/bottom by 1, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, T, ~H/2, ~W/2)
        return _per_frame(lambda y: self.conv(F.pad(y, (0, 1, 0, 1))), x)


class TimeDownsampleRes2x(nn.Module):
    """2x temporal downsampling: alpha * avg-pool + (1 - alpha) * strided conv, alpha = sigmoid(mix_factor)."""

    def __init__(self, channels: int, mix_factor: float = 2.0):
        super().__init__()
        self.avg_pool = nn.AvgPool3d((3, 1, 1), stride=(2, 1, 1))
        self.conv = nn.Conv3d(channels, channels, 3, stride=(2, 1, 1), padding=(0, 1, 1))
        self.mix_factor = nn.Parameter(torch.tensor([mix_factor]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, (T-1)//2 + 1, H, W)
        alpha = torch.sigmoid(self.mix_factor)
        x = _repeat_first_frame(x, 2)  # (B, C, T + 2, H, W)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            # avg_pool3d has no CPU kernel for 16-bit floats; pool in float32 (an average of 3 values).
            pooled = self.avg_pool(x.float()).to(x.dtype)
        else:
            pooled = self.avg_pool(x)
        return alpha * pooled + (1 - alpha) * self.conv(x)


class SpatialUpsample2x(nn.Module):
    """Nearest 2x upsampling in H and W, then a (1, 3, 3) conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, T, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class TimeUpsampleRes2x(nn.Module):
    """2x temporal upsampling of frames 1.. (frame 0 kept), mixed with a causal conv of the result."""

    def __init__(self, channels: int, mix_factor: float = 2.0):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, padding=1)
        self.mix_factor = nn.Parameter(torch.tensor([mix_factor]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, 1 + 2(T-1), H, W)
        alpha = torch.sigmoid(self.mix_factor)
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode="trilinear")  # (B, C, 2(T-1), H, W)
            x = torch.cat([x[:, :, :1], rest], dim=2)
        return alpha * x + (1 - alpha) * self.conv(x)


class MidBlock(nn.Module):
    """Res-block, per-frame attention, res-block (names block_1, attn_1, block_2)."""

    def __init__(self, channels: int, dropout: float, groups: int = _GROUPS):
        super().__init__()
        self.block_1 = ResnetBlock3D(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock3DFix(channels, groups)
        self.block_2 = ResnetBlock3D(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: res-blocks, then optional spatial and temporal resampling.

    `attn` is always empty (no attn_resolutions in v1.1.0) but kept so the module tree matches.
    """

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "time_downsample", "upsample", "time_upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


def _resnet(kind: str, in_channels: int, out_channels: int, cfg: CausalVAEConfig) -> nn.Module:
    block = {"ResnetBlock2D": ResnetBlock2D, "ResnetBlock3D": ResnetBlock3D}[kind]
    return block(in_channels, out_channels, cfg.dropout, cfg.norm_num_groups)


#################################################################################
#                               Encoder / Decoder                               #
#################################################################################


class Encoder(nn.Module):
    """Video (B, 3, F, H, W) -> moments before quant_conv (B, 2*z, (F-1)/4 + 1, H/8, W/8)."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        if cfg.encoder_conv_in == "Conv2d":
            self.conv_in = FrameConv2d(3, cfg.hidden_size, 3, padding=1)
        else:
            self.conv_in = CausalConv3d(3, cfg.hidden_size, 3, padding=1)
        self.down = nn.ModuleList()
        width = cfg.hidden_size
        for i, mult in enumerate(cfg.hidden_size_mult):
            out = cfg.hidden_size * mult
            level = Level([
                _resnet(cfg.encoder_resnet_blocks[i], width if j == 0 else out, out, cfg)
                for j in range(cfg.num_res_blocks)
            ])
            width = out
            if cfg.encoder_spatial_downsample[i]:
                level.downsample = Downsample(width)
            if cfg.encoder_temporal_downsample[i]:
                level.time_downsample = TimeDownsampleRes2x(width)
            self.down.append(level)
        self.mid = MidBlock(width, cfg.dropout, cfg.norm_num_groups)
        self.norm_out = _norm(width, cfg.norm_num_groups)
        self.conv_out = CausalConv3d(width, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, hidden, F, H, W)
        for level in self.down:
            h = level(h)  # levels 1 and 2 halve T; levels 0-2 halve H, W
        h = self.mid(h)  # (B, C, t, H/8, W/8)
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 2*z, t, H/8, W/8)


class Decoder(nn.Module):
    """Latents after post_quant_conv (B, z, t, h, w) -> video (B, 3, 1 + 4(t-1), 8h, 8w)."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.hidden_size_mult[-1]
        self.conv_in = CausalConv3d(cfg.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, cfg.dropout, cfg.norm_num_groups)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.hidden_size_mult))):
            out = cfg.hidden_size * cfg.hidden_size_mult[i]
            level = Level([
                _resnet(cfg.decoder_resnet_blocks[i], width if j == 0 else out, out, cfg)
                for j in range(cfg.num_res_blocks + 1)
            ])
            width = out
            if cfg.decoder_spatial_upsample[i]:
                level.upsample = SpatialUpsample2x(width)
            if cfg.decoder_temporal_upsample[i]:
                level.time_upsample = TimeUpsampleRes2x(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is level i; they run from the last level to level 0
        self.norm_out = _norm(width, cfg.norm_num_groups)
        self.conv_out = CausalConv3d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C, t, h, w)
        for level in reversed(self.up):
            h = level(h)  # levels 3 and 2 double T; levels 3-1 double H, W
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 3, F, 8h, 8w)


#################################################################################
#                                    Tiling                                     #
#################################################################################


def _temporal_windows(length: int, window: int) -> list[tuple[int, int]]:
    """Official temporal windows: start every window - 1, each reaches one past the next start."""
    starts = list(range(0, length, window - 1))
    if len(starts) == 1:
        return [(0, length)]
    spans = [(starts[i], starts[i + 1] + 1) for i in range(len(starts) - 1)]
    if spans[-1][1] > length:
        spans[-1] = (spans[-1][0], length)
    elif spans[-1][1] < length:
        spans.append((starts[-1], length))
    return spans


def _blend_rows(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade from the end of tile `a` into the start of tile `b` along `dim` (3: rows, 4: columns)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = extent
    # Same weights as the official per-row loop: b[y] = a[-e + y] * (1 - y/e) + b[y] * (y/e).
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(b.dtype).to(b.device).view(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tile_2d(x: torch.Tensor, fn, tile: int, stride: int, blend: int, keep: int) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of (B, C, T, H, W) and stitch the results.

    Tiles start every `stride` px; each output tile is blended with the (already blended) tile above
    and to its left over `blend` rows/columns, then cropped to `keep` rows and columns. This mirrors
    the official in-place blending, where the neighbour a tile blends with has itself been blended.
    """
    grid = [
        [fn(x[:, :, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[4], stride)]
        for i in range(0, x.shape[3], stride)
    ]
    rows = []
    for i, row in enumerate(grid):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend_rows(grid[i - 1][j], row[j], blend, dim=3)
            if j > 0:
                row[j] = _blend_rows(row[j - 1], row[j], blend, dim=4)
        rows.append(torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4))
    return torch.cat(rows, dim=3)


def _tile_3d(x: torch.Tensor, fn, tile: int, out_tile: int, window: int, overlap: float) -> torch.Tensor:
    """The official tiled encode and decode: `fn` on temporal windows of `window` frames, each cut into
    spatial tiles of `tile` px (`out_tile` px once through `fn`) that overlap by `overlap` of their size.

    Windows share one frame; every window after the first drops its output for that frame (one latent
    when encoding, one frame when decoding).
    """
    blend = int(out_tile * overlap)
    parts = []
    for n, (start, end) in enumerate(_temporal_windows(x.shape[2], window)):
        part = _tile_2d(
            x[:, :, start:end], fn, tile=tile, stride=int(tile * (1 - overlap)), blend=blend, keep=out_tile - blend
        )
        parts.append(part if n == 0 else part[:, :, 1:])
    return torch.cat(parts, dim=2)


#################################################################################
#                                     Model                                     #
#################################################################################


class CausalVAE(VideoVAE):
    """Open-Sora-Plan v1.1.0 CausalVAEModel: video (B, 3, F, H, W) <-> latents (B, 4, (F-1)/4 + 1, H/8, W/8)."""

    def __init__(self, config: CausalVAEConfig | None = None):
        super().__init__()
        self.config = config or CausalVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = CausalConv3d(2 * self.config.z_channels, 2 * self.config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(self.config.embed_dim, self.config.z_channels, 1)
        self.latent_channels = self.config.embed_dim
        self.spatial_factor = 2 ** self.config.spatial_downsamples
        self.temporal_factor = 2 ** self.config.temporal_downsamples
        self.tiling: TilingConfig | None = None  # off by default, as in the official class

    # ---- frame counts ----

    def latent_frames(self, num_frames: int) -> int:
        k = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % k:
            lo = (max(num_frames, 1) - 1) // k * k + 1
            raise ValueError(
                f"the CausalVAE encodes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ...); got {num_frames}, "
                f"use {lo} or {lo + k}"
            )
        return (num_frames - 1) // k + 1

    def num_frames(self, latent_frames: int) -> int:
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return (latent_frames - 1) * self.temporal_factor + 1

    # ---- tiling ----

    def enable_tiling(self, tiling: TilingConfig | None = None, **sizes) -> TilingConfig:
        """Turn on tiled encode/decode (memory bounded by the tile size, not the video size).

        Without arguments, uses the release tile sizes (256 px, 65 frames, overlap 0.25, latent sizes
        derived as in `CausalVAEModel.__init__`). Keyword arguments override `TilingConfig` fields; the
        latent sizes follow overridden pixel sizes unless given too. Tiled results differ from untiled
        ones (GroupNorm statistics are per tile), as in the official model; the official sampling
        scripts always encode and decode with tiling on.
        """
        if tiling is None:
            pixel = ("tile_sample_min_size", "tile_sample_min_size_t", "tile_overlap_factor")
            tiling = TilingConfig.for_model(self.config, **{k: sizes.pop(k) for k in pixel if k in sizes})
        tiling = dataclasses.replace(tiling, **sizes)
        tiling.check(self.spatial_factor, self.temporal_factor)
        self.tiling = tiling
        return tiling

    def disable_tiling(self) -> None:
        self.tiling = None

    @property
    def use_tiling(self) -> bool:
        return self.tiling is not None

    # ---- official-level encode/decode (unscaled) ----

    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """Official `encode(x).parameters`: (B, 3, F, H, W) -> (B, 2*embed_dim, t, h, w), mean then raw logvar."""
        tiles = self.tiling
        if tiles is not None and tiles.exceeded_by(video, latent=False):
            return self._tiled_encode(video, tiles)
        return self.quant_conv(self.encoder(video))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Official `decode(z)`: unscaled latents (B, embed_dim, t, h, w) -> video (B, 3, 1 + 4(t-1), 8h, 8w)."""
        tiles = self.tiling
        if tiles is not None and tiles.exceeded_by(z, latent=True):
            return self._tiled_decode(z, tiles)
        return self.decoder(self.post_quant_conv(z))

    def _tiled_encode(self, video: torch.Tensor, tiles: TilingConfig) -> torch.Tensor:
        return _tile_3d(
            video, lambda x: self.quant_conv(self.encoder(x)), tiles.tile_sample_min_size,
            tiles.tile_latent_min_size, tiles.tile_sample_min_size_t, tiles.tile_overlap_factor,
        )  # fmt: skip

    def _tiled_decode(self, z: torch.Tensor, tiles: TilingConfig) -> torch.Tensor:
        return _tile_3d(
            z, lambda x: self.decoder(self.post_quant_conv(x)), tiles.tile_latent_min_size,
            tiles.tile_sample_min_size, tiles.tile_latent_min_size_t, tiles.tile_overlap_factor,
        )  # fmt: skip

    # ---- VideoVAE interface (DiT-scaled) ----

    def encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> DiT latents (B, 4, (F-1)/4 + 1, H/8, W/8).

        Returns the posterior mode times 0.18215; with `sample=True`, a posterior sample instead, as
        the official wrapper does: eps = randn(mean.shape) drawn on the generator's device (CPU, the
        global generator, when `generator` is None) in float32, then mean + exp(0.5 * logvar) * eps.
        That order reproduces the official samples for the same seed.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video (B, 3, F, H, W), got shape {tuple(video.shape)}")
        self.latent_frames(video.shape[2])  # raises for frame counts that do not round-trip
        f = self.spatial_factor
        if video.shape[3] % f or video.shape[4] % f:
            raise ValueError(f"height and width must be multiples of {f}, got {tuple(video.shape[3:])}")
        moments = self.encode_moments(video)
        mean, logvar = moments.chunk(2, dim=1)  # (B, 4, t, h, w) each
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            device = generator.device if generator is not None else torch.device("cpu")
            eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
            mean = mean + std * eps.to(mean)
        return self._to_dit(mean)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        c = self.config
        if c.latents_std is None:
            return None
        shape = (1, -1, 1, 1, 1)
        return (torch.tensor(c.latents_mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(c.latents_std, device=like.device, dtype=like.dtype).view(shape))  # fmt: skip

    def _to_dit(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._stats(z)
        return z * SCALING_FACTOR if stats is None else (z - stats[0]) / stats[1]

    def _from_dit(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._stats(z)
        return z / SCALING_FACTOR if stats is None else z * stats[1] + stats[0]

    def decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """DiT latents (B, 4, t, h, w) -> video (B, 3, num_frames, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, t, h, w), got shape {tuple(latents.shape)}"
            )
        expected = self.num_frames(latents.shape[2])
        if num_frames != expected:
            raise ValueError(
                f"{latents.shape[2]} latent frames decode to {expected} frames, not {num_frames}; pass "
                f"num_frames={expected}, or latents with latent_frames({num_frames}) frames"
            )
        return self.decode_latents(self._from_dit(latents))

    # ---- checkpoints ----

    def load_checkpoint(self, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
        """Strictly load an official CausalVAEModel state dict, ignoring its training-loss entries.

        The released file stores the LPIPS/discriminator training loss (`loss.*`, 56 entries, 19.4 M
        elements) because the official class registers it as a submodule; inference never uses it.
        Every other key must match by name and shape, or `pab.models.CheckpointError` names the difference.
        """
        loss_keys = [k for k in state_dict if k.startswith("loss.")]
        if loss_keys:
            logger.info(
                "CausalVAE%s: ignored %d 'loss.*' checkpoint entries (the official training loss, "
                "LPIPS + 3D PatchGAN discriminator, stored because CausalVAEModel registers it as a "
                "submodule; encoding and decoding never use it)",
                f" ({source})" if source else "", len(loss_keys),
            )
        load_state_dict_strict(self, state_dict, ignore_prefixes=("loss.",), source=source)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> CausalVAE:
        """Load a diffusers-style folder (config.json + diffusion_pytorch_model.safetensors), e.g. the
        release's `vae/` subfolder."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}/config.json not found; pass the VAE folder (the release's 'vae/' subfolder)"
            )
        weights = sorted(path.glob("*.safetensors"))
        if len(weights) != 1:
            raise FileNotFoundError(
                f"expected exactly one *.safetensors in {path}, found {[w.name for w in weights]}"
            )
        config = CausalVAEConfig.from_dict(json.loads((path / "config.json").read_text()))
        with torch.device("meta"):  # no random init of 250 M parameters; loading assigns real tensors
            model = cls(config)
        model.load_checkpoint(load_file(weights[0], device=str(device)), source=str(weights[0]))
        return model.to(dtype).eval()
