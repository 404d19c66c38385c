"""Open-Sora 1.2 video VAE (`VideoAutoencoderPipeline`), all of it in this single file.

Two stages, as in the official release (hpcaitech/Open-Sora v1.2.0, opensora/models/vae/vae.py and
vae_temporal.py; checkpoint hpcai-tech/OpenSora-VAE-v1.2):

1. `spatial_vae`: the SDXL VAE (a diffusers `AutoencoderKL`) applied to every frame on its own,
   `micro_batch_size` frames at a time, latents scaled by 0.18215. 8x spatial compression.
2. `temporal_vae`: a causal 3D-conv VAE (MAGVIT style) over the 4-channel spatial latents, run on
   chunks of `micro_frame_size` = 17 frames. 4x temporal compression, so 17 frames -> 5 latents and
   51 frames -> 15 latents.

Latents leave `encode` normalised per channel, `(z - shift) / scale`, which is what STDiT3 was trained on.

State-dict names and order are the official ones: `scale`, `shift`, `spatial_vae.module.*` (diffusers
AutoencoderKL names), `temporal_vae.*`. Numerics follow the official code; the only deliberate
differences are listed in `OpenSoraVAE`'s docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from einops import rearrange

from pab.models.vae import VideoVAE

#################################################################################
#                                    Config                                     #
#################################################################################

# Open-Sora hard-codes the SD-1 latent scale for its 2D stage; the SDXL config's own
# `scaling_factor` (0.13025) is never used.
SPATIAL_LATENT_SCALE = 0.18215

PIXART_SDXL_VAE = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"

# Architecture fields of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae/config.json, the 2D VAE
# the release loads by name. Used when a config names that folder instead of embedding `vae_2d_config`.
_PIXART_SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}

# The `VAE_Temporal_SD` factory fixes these arguments of `VAE_Temporal` (only num_groups and
# activation_fn may still be passed through it).
_VAE_TEMPORAL_SD_ARGS: dict[str, Any] = {
    "in_out_channels": 4,
    "latent_embed_dim": 4,
    "embed_dim": 4,
    "filters": 128,
    "num_res_blocks": 4,
    "channel_multipliers": (1, 2, 2, 4),
    "temporal_downsample": (False, True, True),
}


def _known_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of `d` that are fields of dataclass `cls` (drops bookkeeping such as `model_type`)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class VideoAutoencoderKLConfig:
    """The official `vae_2d` sub-config: the per-frame diffusers AutoencoderKL wrapper."""

    type: str = "VideoAutoencoderKL"
    from_pretrained: str | None = PIXART_SDXL_VAE
    """Diffusers folder of the 2D VAE. Only its architecture is used here (weights come from the checkpoint)."""
    subfolder: str | None = "vae"
    micro_batch_size: int | None = 4
    """Frames per AutoencoderKL call; a memory knob with no mathematical effect (None = all frames at once)."""
    local_files_only: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if self.type != "VideoAutoencoderKL":
            raise ValueError(f"vae_2d.type {self.type!r} is not supported; Open-Sora 1.2 uses 'VideoAutoencoderKL'")
        _check_micro_size("vae_2d.micro_batch_size", self.micro_batch_size)


@dataclass
class VAETemporalConfig:
    """The official `vae_temporal` sub-config (`VAE_Temporal` arguments; defaults = the release)."""

    type: str = "VAE_Temporal_SD"
    """'VAE_Temporal_SD' (the released factory, fixed widths) or 'VAE_Temporal' (explicit arguments)."""
    from_pretrained: str | None = None
    in_out_channels: int = 4
    """Channels of the spatial latent the temporal VAE compresses and restores."""
    latent_embed_dim: int = 4
    embed_dim: int = 4
    """Channels of the final latent (what the DiT sees)."""
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Per level transition (len = levels - 1): halve the frame count there. Two Trues -> 4x."""
    num_groups: int = 32
    activation_fn: str = "swish"

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        if self.type not in ("VAE_Temporal", "VAE_Temporal_SD"):
            raise ValueError(
                f"vae_temporal.type {self.type!r} is not supported; use 'VAE_Temporal_SD' (release) or 'VAE_Temporal'"
            )
        if self.type == "VAE_Temporal_SD":
            # The official factory would fail with "got multiple values" on any of these.
            clashes = {k: getattr(self, k) for k, v in _VAE_TEMPORAL_SD_ARGS.items() if getattr(self, k) != v}
            if clashes:
                raise ValueError(
                    f"vae_temporal type 'VAE_Temporal_SD' fixes {sorted(_VAE_TEMPORAL_SD_ARGS)}, but got {clashes}; "
                    "use type 'VAE_Temporal' for other widths"
                )
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"vae_temporal.temporal_downsample needs one entry per level transition "
                f"({len(self.channel_multipliers) - 1} for {len(self.channel_multipliers)} channel_multipliers), "
                f"got {len(self.temporal_downsample)}"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"vae_temporal.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.activation_fn not in ("swish", "relu"):
            raise ValueError(f"vae_temporal.activation_fn must be 'swish' or 'relu', got {self.activation_fn!r}")

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAETemporalConfig:
        d = dict(d)
        if d.get("type") == "VAE_Temporal" and "temporal_downsample" not in d:
            # The official class default differs from the release's (and from ours): time
            # downsampling after the first two levels instead of the last two.
            d["temporal_downsample"] = (True, True, False)
        return cls(**_known_kwargs(cls, d))


@dataclass
class OpenSoraVAEConfig:
    """`VideoAutoencoderPipelineConfig` fields (official names); defaults = hpcai-tech/OpenSora-VAE-v1.2."""

    vae_2d: VideoAutoencoderKLConfig = field(default_factory=VideoAutoencoderKLConfig)
    vae_temporal: VAETemporalConfig = field(default_factory=VAETemporalConfig)
    vae_2d_config: dict[str, Any] = field(default_factory=dict)
    """Diffusers AutoencoderKL constructor arguments. Empty = the SDXL VAE named by vae_2d.from_pretrained."""
    micro_frame_size: int | None = 17
    """Frames per temporal-VAE chunk. Part of the latent layout STDiT3 was trained on, not just a memory knob."""
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    cal_loss: bool = False
    """Training mode of the official class (tuples out, no normalisation); not supported here."""
    freeze_vae_2d: bool = False
    """Training flag; no effect on inference."""
    from_pretrained: str | None = None
    """Checkpoint path of the official class; loading is the caller's job here, so this is informational."""

    def __post_init__(self):
        if isinstance(self.vae_2d, dict):
            self.vae_2d = VideoAutoencoderKLConfig(**_known_kwargs(VideoAutoencoderKLConfig, self.vae_2d))
        if isinstance(self.vae_temporal, dict):
            self.vae_temporal = VAETemporalConfig.from_dict(self.vae_temporal)
        self.vae_2d_config = {k: v for k, v in dict(self.vae_2d_config or {}).items() if not k.startswith("_")}
        if not self.vae_2d_config:
            if self.vae_2d.from_pretrained != PIXART_SDXL_VAE:
                raise ValueError(
                    f"vae_2d.from_pretrained is {self.vae_2d.from_pretrained!r}, whose architecture is unknown here; "
                    "put that folder's AutoencoderKL config.json contents under 'vae_2d_config'"
                )
            self.vae_2d_config = dict(_PIXART_SDXL_VAE_CONFIG)
        n = self.vae_temporal.embed_dim
        if isinstance(self.shift, (int, float)) or isinstance(self.scale, (int, float)):
            # The official class also takes scalars, but then stores 0-d buffers: a different checkpoint layout.
            raise ValueError(
                f"shift and scale must be lists of {n} per-channel values, got {self.shift} and {self.scale}"
            )
        self.shift = tuple(float(v) for v in self.shift)
        self.scale = tuple(float(v) for v in self.scale)
        if len(self.shift) != n or len(self.scale) != n:
            raise ValueError(
                f"shift and scale need {n} values (vae_temporal.embed_dim), got {self.shift} and {self.scale}"
            )
        if self.vae_2d_config.get("latent_channels", 4) != self.vae_temporal.in_out_channels:
            raise ValueError(
                f"vae_2d_config.latent_channels ({self.vae_2d_config.get('latent_channels', 4)}) must equal "
                f"vae_temporal.in_out_channels ({self.vae_temporal.in_out_channels})"
            )
        _check_micro_size("micro_frame_size", self.micro_frame_size)
        if self.cal_loss:
            raise ValueError("cal_loss=True is the official training mode and is not supported; set it to false")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenSoraVAEConfig:
        """Build from an official config.json dict (unknown keys such as `architectures` are ignored)."""
        return cls(**_known_kwargs(cls, d))

    @classmethod
    def from_size(cls, name: str) -> OpenSoraVAEConfig:
        if name not in SIZES:
            raise ValueError(f"unknown OpenSoraVAE size {name!r}; choose one of {sorted(SIZES)}")
        return cls.from_dict(SIZES[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_micro_size(name: str, value: int | None):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


#################################################################################
#                             Temporal VAE layers                               #
#################################################################################


class CausalConv3d(nn.Module):
    """Conv3d that only looks back in time: zero frames in front, none behind; 'same' zero padding in space."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int | tuple[int, int, int], stride_t: int = 1,
                 bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        # With stride s the output frame i must see input frames up to s*i, hence k_t - s zeros in front:
        # 2 for a stride-1 3-tap conv, 1 for the stride-2 downsamplers.
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - stride_t, 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x):  # (B, C, T, H, W)
        return self.conv(F.pad(x, self.padding))  # (B, C', ceil(T / stride_t), H, W)


class ResBlock(nn.Module):
    """GroupNorm -> act -> 3x3x3 conv, twice, plus a 1x1x1-projected residual when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, act: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)  # statistics pool all frames of the chunk
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        self.act = act()

    def forward(self, x):  # (B, C_in, T, H, W)
        h = self.conv1(self.act(self.norm1(x)))  # (B, C_out, T, H, W)
        h = self.conv2(self.act(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def _activation(name: str) -> type[nn.Module]:
    return {"swish": nn.SiLU, "relu": nn.ReLU}[name]


class TemporalEncoder(nn.Module):
    """Spatial latent chunk (B, 4, T, h, w), T a multiple of 4 -> moments features (B, 2*latent, T/4, h, w)."""

    def __init__(self, cfg: VAETemporalConfig):
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        act = _activation(cfg.activation_fn)
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()  # one per level transition; Identity keeps official indices
        prev = cfg.filters
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(prev, width, cfg.num_groups, act))
                prev = width
            self.block_res_blocks.append(blocks)
            if level < len(widths) - 1:
                down = cfg.temporal_downsample[level]
                self.conv_blocks.append(CausalConv3d(prev, width, 3, stride_t=2) if down else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, cfg.num_groups, act) for _ in range(cfg.num_res_blocks))
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)
        self.act = act()

    def forward(self, x):  # (B, 4, T, h, w)
        x = self.conv_in(x)  # (B, filters, T, h, w)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)  # (B, widths[level], T_level, h, w)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)  # T halves where temporal_downsample[level]
        for block in self.res_blocks:
            x = block(x)  # (B, widths[-1], T/4, h, w)
        return self.conv2(self.act(self.norm1(x)))  # (B, 2*latent, T/4, h, w)


class TemporalDecoder(nn.Module):
    """Latent chunk (B, latent, t, h, w) -> spatial latent (B, 4, 4t, h, w), before dropping padding frames."""

    def __init__(self, cfg: VAETemporalConfig):
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        act = _activation(cfg.activation_fn)
        self.temporal_downsample = cfg.temporal_downsample
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, widths[-1], 3)
        self.res_blocks = nn.ModuleList(
            ResBlock(widths[-1], widths[-1], cfg.num_groups, act) for _ in range(cfg.num_res_blocks)
        )
        # Built deepest level first (as the data flows) but stored shallow-first, like the official lists:
        # block_res_blocks[L] is level L; conv_blocks[L - 1] is the upsampler after level L.
        levels, ups = [], []
        prev = widths[-1]
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(prev, widths[level], cfg.num_groups, act))
                prev = widths[level]
            levels.insert(0, blocks)
            if level > 0:
                # Upsampling = conv to 2x channels, then depth-to-space in time (see forward).
                up = cfg.temporal_downsample[level - 1]
                ups.insert(0, CausalConv3d(prev, 2 * prev, 3) if up else nn.Identity())
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)
        self.act = act()

    def forward(self, z):  # (B, latent, t, h, w)
        x = self.conv1(z)  # (B, widths[-1], t, h, w)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)  # (B, widths[level], T_level, h, w)
            if level > 0 and self.temporal_downsample[level - 1]:
                x = self.conv_blocks[level - 1](x)  # (B, 2C, T, h, w)
                # Channel 2c+s becomes channel c at frame 2T+s (the checkpoint's order, not (s, c)).
                x = rearrange(x, "B (C ts) T H W -> B C (T ts) H W", ts=2)  # (B, C, 2T, h, w)
        return self.conv_out(self.act(self.norm1(x)))  # (B, 4, 4t, h, w)


class TemporalVAE(nn.Module):
    """Open-Sora's `VAE_Temporal`: 4x causal compression in time of the 4-channel spatial latents."""

    def __init__(self, cfg: VAETemporalConfig):
        super().__init__()
        self.time_factor = cfg.time_factor
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def latent_frames(self, frames: int) -> int:
        """ceil(frames / 4): the chunk is zero-padded in front to a multiple of 4."""
        return -(-frames // self.time_factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial latent chunk (B, 4, T, h, w) -> moments (B, 2*embed, ceil(T/4), h, w): mean, then logvar."""
        pad = (-x.shape[2]) % self.time_factor
        # Padding goes in FRONT: a 17-frame chunk gets 3 zero frames before frame 0.
        x = F.pad(x, (0, 0, 0, 0, pad, 0))  # (B, 4, T + pad, h, w)
        return self.quant_conv(self.encoder(x)).to(x.dtype)  # (B, 2*embed, (T + pad)/4, h, w)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Latent chunk (B, embed, t, h, w) -> spatial latent (B, 4, num_frames, h, w); t = ceil(num_frames/4)."""
        x = self.decoder(self.post_quant_conv(z))  # (B, 4, 4t, h, w)
        pad = (-num_frames) % self.time_factor
        return x[:, :, pad:]  # the encoder's front padding frames are dropped


#################################################################################
#                               Spatial VAE stage                               #
#################################################################################


class SpatialVAE(nn.Module):
    """Open-Sora's `VideoAutoencoderKL`: a diffusers AutoencoderKL run on every frame, micro-batched."""

    def __init__(self, cfg: VideoAutoencoderKLConfig, vae_2d_config: dict[str, Any]):
        super().__init__()
        self.module = AutoencoderKL(**vae_2d_config)
        self.micro_batch_size = cfg.micro_batch_size

    def _micro_batches(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (frames,) if self.micro_batch_size is None else frames.split(self.micro_batch_size)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """(B, 3, T, H, W) in [-1, 1] -> 0.18215-scaled latents (B, 4, T, H/8, W/8); posterior mean unless sample."""
        B = video.shape[0]
        frames = rearrange(video, "B C T H W -> (B T) C H W")  # batch-major: the official draw order
        out = []
        for chunk in self._micro_batches(frames):  # (mb, 3, H, W)
            dist = self.module.encode(chunk).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean  # (mb, 4, H/8, W/8)
            out.append(z * SPATIAL_LATENT_SCALE)
        return rearrange(torch.cat(out), "(B T) C H W -> B C T H W", B=B)

    def decode(self, x_z: torch.Tensor) -> torch.Tensor:
        """0.18215-scaled latents (B, 4, T, h, w) -> frames (B, 3, T, 8h, 8w)."""
        B = x_z.shape[0]
        frames = rearrange(x_z, "B C T H W -> (B T) C H W")
        out = [self.module.decode(chunk / SPATIAL_LATENT_SCALE).sample for chunk in self._micro_batches(frames)]
        return rearrange(torch.cat(out), "(B T) C H W -> B C T H W", B=B)


#################################################################################
#                                 The full VAE                                  #
#################################################################################


class OpenSoraVAE(VideoVAE):
    """Open-Sora 1.2 `VideoAutoencoderPipeline`: per-frame SDXL VAE, then a causal temporal VAE in 17-frame chunks.

    Memory knobs (no effect on the result beyond float rounding, ~1e-7):
      * `micro_batch_size`: frames per 2D VAE call, in encode and decode (official default 4; None = all).
      The temporal stage always runs one `micro_frame_size` chunk (17 frames / 5 latents) at a time.
      `micro_frame_size` itself is part of the latent layout (51 frames -> 15 latents with chunks of 17, 13
      without), so change it only for a checkpoint trained that way.

    Differences from the official class, all deliberate:
      * `encode` returns the posterior mean unless `sample=True` (the official always samples).
        `sample=True` with `generator=None` draws exactly as the official code does from the global RNG:
        the 2D eps on the model's device (so CUDA runs use the CUDA RNG, as officially), the temporal eps
        on the CPU in float32.
      * `decode` checks that `num_frames` fits the latent count, and `encode` that H and W are multiples
        of 8; the official code silently returns a different number of frames or size.
    """

    def __init__(self, config: OpenSoraVAEConfig | None = None):
        super().__init__()
        self.config = config = config or OpenSoraVAEConfig()
        # Registered first so that the state dict starts with them, as the official one does.
        self.register_buffer("scale", torch.tensor(config.scale)[None, :, None, None, None])  # (1, C, 1, 1, 1)
        self.register_buffer("shift", torch.tensor(config.shift)[None, :, None, None, None])
        self.spatial_vae = SpatialVAE(config.vae_2d, config.vae_2d_config)
        self.temporal_vae = TemporalVAE(config.vae_temporal)
        self.micro_frame_size = config.micro_frame_size
        self.latent_channels = config.vae_temporal.embed_dim
        self.spatial_factor = 2 ** (len(config.vae_2d_config["block_out_channels"]) - 1)
        self.temporal_factor = self.temporal_vae.time_factor

    # ------------------------------------------------------------------ knobs

    @property
    def micro_batch_size(self) -> int | None:
        return self.spatial_vae.micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None):
        _check_micro_size("micro_batch_size", value)
        self.spatial_vae.micro_batch_size = value

    # ------------------------------------------------------------ frame counts

    def _chunk_latents(self) -> int | None:
        """Latents per full temporal chunk (5 for 17 frames), None without chunking."""
        return None if self.micro_frame_size is None else self.temporal_vae.latent_frames(self.micro_frame_size)

    def latent_frames(self, num_frames: int) -> int:
        """5 per full 17-frame chunk plus ceil(rest / 4): 1 -> 1, 17 -> 5, 41 -> 12, 51 -> 15."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(
                f"cannot encode {num_frames!r} frames: valid frame counts are the integers >= 1 "
                f"(e.g. 1 for an image, 17 -> 5 latents, 51 -> 15 latents)"
            )
        if self.micro_frame_size is None:
            return self.temporal_vae.latent_frames(num_frames)
        full, rest = divmod(num_frames, self.micro_frame_size)
        return full * self._chunk_latents() + self.temporal_vae.latent_frames(rest)

    def num_frames(self, latent_frames: int) -> int:
        """The largest frame count with `latent_frames` latents (15 -> 51, 5 -> 17, 1 -> 4).

        Several frame counts share a latent count (1 to 4 frames all give 1 latent); `decode` needs the
        wanted one explicitly, and `frame_range` gives all of them.
        """
        if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
            raise ValueError(f"latent_frames must be an integer >= 1, got {latent_frames!r}")
        if self.micro_frame_size is None:
            return latent_frames * self.temporal_factor
        full, rest = divmod(latent_frames, self._chunk_latents())
        return full * self.micro_frame_size + rest * self.temporal_factor

    def frame_range(self, latent_frames: int) -> tuple[int, int]:
        """(first, last) frame count whose latent count is `latent_frames`, e.g. 14 -> (47, 50)."""
        last = self.num_frames(latent_frames)
        first = 1 if latent_frames == 1 else self.num_frames(latent_frames - 1) + 1
        return first, last

    # ------------------------------------------------------------------ encode

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 4, latent_frames(F), H/8, W/8).

        sample=False: posterior means of both stages (deterministic). sample=True: the official stochastic
        encode; with generator=None it draws from the global RNG in the official order (every 2D micro-batch,
        then every temporal chunk), so `torch.manual_seed(s)` reproduces the official result.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video (B, 3, F, H, W), got shape {tuple(video.shape)}")
        H, W = video.shape[-2:]
        if H % self.spatial_factor or W % self.spatial_factor:
            raise ValueError(
                f"height and width must be multiples of {self.spatial_factor}, got {H}x{W}; resize or crop the video"
            )
        self.latent_frames(video.shape[2])  # validates the frame count
        x_z = self.spatial_vae.encode(video, sample=sample, generator=generator)  # (B, 4, F, h, w)
        z = self.encode_temporal(x_z, sample=sample, generator=generator)  # (B, 4, t, h, w)
        return (z - self.shift) / self.scale

    def encode_temporal(self, x_z: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Spatial latents (B, 4, F, h, w) -> un-normalised latents (B, 4, t, h, w), chunk by chunk."""
        step = x_z.shape[2] if self.micro_frame_size is None else self.micro_frame_size
        zs = []
        for chunk in x_z.split(step, dim=2):  # (B, 4, <=17, h, w); chunks never see each other
            moments = self.temporal_vae.encode(chunk)  # (B, 8, t_c, h, w)
            mean, logvar = moments.chunk(2, dim=1)
            if sample:
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
                # The official temporal posterior draws on the CPU in float32 whatever the model's device.
                eps_device = "cpu" if generator is None else generator.device
                eps = torch.randn(mean.shape, generator=generator, device=eps_device).to(mean)
                mean = mean + std * eps
            zs.append(mean)
        return torch.cat(zs, dim=2)

    # ------------------------------------------------------------------ decode

    def decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents (B, 4, t, h, w) -> video (B, 3, num_frames, 8h, 8w), roughly in [-1, 1]."""
        return torch.cat(list(self.decode_chunks(latents, num_frames)), dim=2)

    def decode_chunks(self, latents: torch.Tensor, num_frames: int):
        """`decode` one spatial micro-batch of frames at a time (after the temporal VAE, 10% of the time)."""
        x_z = self.decode_temporal(latents, num_frames)  # (B, 4, num_frames, h, w)
        step = self.spatial_vae.micro_batch_size
        if x_z.shape[0] != 1 or step is None:  # a batch of videos is micro-batched across them: one piece
            yield self.spatial_vae.decode(x_z)
            return
        for i in range(0, x_z.shape[2], step):  # the very micro-batches `SpatialVAE.decode` would run
            yield self.spatial_vae.decode(x_z[:, :, i : i + step])

    def decode_temporal(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents (B, 4, t, h, w) -> the 0.18215-scaled spatial latents (B, 4, num_frames, h, w)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents (B, {self.latent_channels}, t, h, w), got shape {tuple(latents.shape)}"
            )
        t = latents.shape[2]
        if self.latent_frames(num_frames) != t:
            first, last = self.frame_range(t)
            raise ValueError(
                f"{t} latent frames cannot decode to {num_frames} frames; they decode to {first}..{last} frames "
                f"(and {num_frames} frames need {self.latent_frames(num_frames)} latent frames)"
            )
        z = latents * self.scale.to(latents.dtype) + self.shift.to(latents.dtype)
        if self.micro_frame_size is None:
            return self.temporal_vae.decode(z, num_frames)
        out, remaining = [], num_frames
        for chunk in z.split(self._chunk_latents(), dim=2):  # (B, 4, <=5, h, w)
            frames = min(self.micro_frame_size, remaining)
            out.append(self.temporal_vae.decode(chunk, frames))  # (B, 4, frames, h, w)
            remaining -= frames
        return torch.cat(out, dim=2)


#################################################################################
#                                     Sizes                                     #
#################################################################################

SIZES: dict[str, dict[str, Any]] = {
    # hpcai-tech/OpenSora-VAE-v1.2 config.json (2D VAE: the PixArt SDXL VAE; temporal: VAE_Temporal_SD).
    "full": {
        "micro_frame_size": 17,
        "scale": [3.85, 2.32, 2.33, 3.06],
        "shift": [-0.10, 0.34, 0.27, 0.98],
        "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": PIXART_SDXL_VAE, "subfolder": "vae",
                   "micro_batch_size": 4},
        "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
    },
    # The reference fixture's sizes: same topology (4+4 levels, 17-frame chunks, 4x time), widths of a
    # few channels, ~0.45 M parameters; runs a 51-frame 64x64 round trip on a CPU in seconds.
    "tiny": {
        "micro_frame_size": 17,
        "scale": [3.85, 2.32, 2.33, 3.06],
        "shift": [-0.10, 0.34, 0.27, 0.98],
        "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": None, "subfolder": None, "micro_batch_size": 4},
        "vae_2d_config": {
            **_PIXART_SDXL_VAE_CONFIG, "block_out_channels": [8, 16, 32, 32], "layers_per_block": 1,
            "norm_num_groups": 4, "sample_size": 32, "latents_mean": None, "latents_std": None,
        },  # fmt: skip
        "vae_temporal": {
            "type": "VAE_Temporal",
            "in_out_channels": 4,
            "latent_embed_dim": 4,
            "embed_dim": 4,
            "filters": 6,
            "num_res_blocks": 1,
            "channel_multipliers": [1, 2, 2, 4],
            "temporal_downsample": [False, True, True],
            "num_groups": 3,
            "activation_fn": "swish",
        },
    },
}
# Trained here on synthetic clips (`python -m pab.train --stage vae`, weights in pab/weights/): three 2D levels
# (4x space: 64x64 px -> 16x16 latents), the same 4x causal temporal VAE at 8 filters; 1.3 M parameters.
# shift / scale are placeholders: training measures the latents' statistics and saves them.
SIZES["small"] = {
    **SIZES["tiny"],
    "scale": [1.0, 1.0, 1.0, 1.0],
    "shift": [0.0, 0.0, 0.0, 0.0],
    "vae_2d": {**SIZES["tiny"]["vae_2d"], "micro_batch_size": None},
    "vae_2d_config": {**SIZES["tiny"]["vae_2d_config"], "down_block_types": ["DownEncoderBlock2D"] * 3,
                      "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [32, 64, 64],
                      "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215},
    "vae_temporal": {**SIZES["tiny"]["vae_temporal"], "filters": 8, "num_groups": 4},
}  # fmt: skip
