"""Per-frame image VAE (diffusers `AutoencoderKL`) behind the `VideoVAE` interface: Latte-1's VAE.

Latte-1 diffuses in the latent space of the Stable-Diffusion VAE (`maxin-cn/Latte-1/vae/`: 4 latent
channels, 8x spatial downsampling, scaling factor 0.18215) applied to every frame on its own, so
there is no temporal compression: F video frames <-> F latent frames, for any F >= 1.

Frames are pushed through the VAE `micro_batch_size` at a time (all videos of the batch flattened
to one list of frames), which bounds activation memory: a 512x512 SD-VAE decode needs ~1-2 GB per
frame in half precision, and a 16-frame video at once would need the lot.

Note: VideoSys' Latte pipeline decodes with SVD's `AutoencoderKLTemporalDecoder`
(`vae_temporal_decoder/`) by default; `enable_vae_temporal_decoder=False` there gives this per-frame
decode. Encoding is the same in both (the temporal decoder shares the SD encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from einops import rearrange

from pab.models.vae import VideoVAE

SD_SCALING_FACTOR = 0.18215


def _autoencoder_config(
    block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int,
    scaling_factor: float,
) -> dict:
    """An `AutoencoderKL` config of the SD layout: RGB in and out, 4 latent channels, one down and one up
    block per entry of `block_out_channels` (each but the last halves H and W)."""
    levels = len(block_out_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
        latent_channels=4, sample_size=sample_size, scaling_factor=scaling_factor,
    )  # fmt: skip


# Same architecture family as the SD VAE (4 down/up blocks -> 8x), just 32 channels wide with one
# resnet per block: ~0.37 M parameters, runs on a CPU in well under a second per small frame.
TINY_CONFIG = _autoencoder_config(
    (32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=SD_SCALING_FACTOR
)

# Latte-1-small's VAE (trained here, `python -m pab.train --model latte-1-small`): 4x instead of 8x, so a
# 64x64 frame keeps a 16x16 latent; ~0.29 M parameters. Its latents are normalised per channel
# (`latents_mean` / `latents_std`, written by training) rather than by one scaling factor.
SMALL_CONFIG = _autoencoder_config(
    (32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0
)

# The Stable-Diffusion VAE architecture (SD 1.x `vae/config.json`, as in maxin-cn/Latte-1/vae):
# 83,653,863 parameters. `FrameVAE.random()` builds it with random weights for benchmarks.
SD_CONFIG = _autoencoder_config(
    (128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=SD_SCALING_FACTOR
)


RANDOM_CONFIGS = {"full": SD_CONFIG, "tiny": TINY_CONFIG, "small": SMALL_CONFIG}


def _seeded_autoencoder(config: dict, seed: int, device, dtype: torch.dtype) -> AutoencoderKL:
    """Random AutoencoderKL drawn on the CPU from `seed` (same weights on every machine), then moved.

    device "meta" builds it without memory (shape/parameter checks).
    """
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return AutoencoderKL(**config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config)
    if dtype != torch.float32:
        vae = vae.to(dtype=dtype)
    return vae.to(device)


class FrameVAE(VideoVAE):
    """`AutoencoderKL` applied frame by frame; latents are scaled for the DiT ((z - shift) * scale)."""

    def __init__(self, vae: AutoencoderKL, micro_batch_size: int = 8) -> None:
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.micro_batch_size = int(micro_batch_size)
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        # each down block but the last halves H and W
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if cfg.shift_factor is not None else 0.0
        # Per-channel statistics (diffusers' `latents_mean` / `latents_std`): DiT latents are then
        # (z - mean) * scaling_factor / std, as diffusers' pipelines read them.
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if (mean is None) != (std is None):
            raise ValueError("the VAE config has only one of latents_mean / latents_std; give both or neither")
        if mean is not None:
            self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.shift_factor = 0.0

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        micro_batch_size: int = 8,
    ) -> FrameVAE:
        """Load a local diffusers AutoencoderKL folder (config.json + weights). Never downloads.

        `path` is the VAE folder itself, or a diffusers pipeline folder with a `vae/` subfolder
        (e.g. a local copy of maxin-cn/Latte-1).
        """
        path = Path(path)
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers AutoencoderKL folder (no config.json)")
        # low_cpu_mem_usage=False: the meta-device path needs `accelerate`, which we don't ship.
        vae = AutoencoderKL.from_pretrained(
            str(path), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
        return cls(vae.to(device), micro_batch_size=micro_batch_size)

    @classmethod
    def random(
        cls,
        size: str = "full",
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        micro_batch_size: int = 8,
    ) -> FrameVAE:
        """A random AutoencoderKL of `size` (`RANDOM_CONFIGS`); the same weights for the same seed.

        "full" is the SD VAE's architecture (benchmarks without a checkpoint), "tiny" a small one with its 8x
        factor (tests), "small" Latte-1-small's 4x one (training starts there)."""
        if size not in RANDOM_CONFIGS:
            raise ValueError(f"no FrameVAE size {size!r}; sizes: {sorted(RANDOM_CONFIGS)}")
        return cls(_seeded_autoencoder(RANDOM_CONFIGS[size], seed, device, dtype), micro_batch_size=micro_batch_size)

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        """Normalise latents per channel from now on, and record it in the config `save_pretrained` writes."""
        self.vae.register_to_config(latents_mean=list(mean), latents_std=list(std), shift_factor=None)
        device = next(self.vae.parameters()).device
        self.register_buffer("latents_mean", torch.tensor(mean, device=device).view(1, -1, 1, 1), False)
        self.register_buffer("latents_std", torch.tensor(std, device=device).view(1, -1, 1, 1), False)
        self.shift_factor = 0.0

    # ------------------------------------------------------------------ VideoVAE interface

    def latent_frames(self, num_frames: int) -> int:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (any count works: one latent per frame), got {num_frames}")
        return int(num_frames)

    def num_frames(self, latent_frames: int) -> int:
        return self.latent_frames(latent_frames)

    @property
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.vae.parameters())
        return p.device, p.dtype

    def _chunks(self, x: torch.Tensor):
        return x.split(self.micro_batch_size, dim=0)

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> DiT latents (B, C, F, H/8, W/8).

        Uses the posterior mean by default (deterministic); `sample=True` draws from it with
        `generator` (what training does).
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, F, H, W), got shape {tuple(video.shape)}")
        b, _, f, h, w = video.shape
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"height and width must be multiples of {self.spatial_factor}, got {h}x{w}")
        self.latent_frames(f)
        device, dtype = self._device_dtype
        frames = rearrange(video, "b c f h w -> (b f) c h w").to(device=device, dtype=dtype)
        out = []
        for chunk in self._chunks(frames):
            dist = self.vae.encode(chunk).latent_dist
            out.append(dist.sample(generator) if sample else dist.mode())
        z = torch.cat(out)
        if hasattr(self, "latents_mean"):
            z = (z - self.latents_mean.to(z)) / self.latents_std.to(z)
        z = (z - self.shift_factor) * self.scaling_factor
        return rearrange(z, "(b f) c h w -> b c f h w", b=b, f=f)

    def decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """DiT latents (B, C, F, h, w) -> video (B, 3, F, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return torch.cat(list(self.decode_chunks(latents, num_frames)), dim=2)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, num_frames: int):
        """`decode` one micro-batch of frames at a time (one video; a batch of videos comes in one piece)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, F, h, w), got shape {tuple(latents.shape)}"
            )
        b, _, f, _, _ = latents.shape
        if self.latent_frames(num_frames) != f:
            raise ValueError(f"{f} latent frames decode to {f} frames, not num_frames={num_frames}")
        device, dtype = self._device_dtype
        z = rearrange(latents, "b c f h w -> (b f) c h w").to(device=device, dtype=dtype)
        z = z / self.scaling_factor + self.shift_factor
        if hasattr(self, "latents_mean"):
            z = z * self.latents_std.to(z) + self.latents_mean.to(z)
        if b != 1:
            frames = torch.cat([self.vae.decode(chunk).sample for chunk in self._chunks(z)])
            yield rearrange(frames, "(b f) c h w -> b c f h w", b=b, f=f)
            return
        for chunk in self._chunks(z):
            yield rearrange(self.vae.decode(chunk).sample, "f c h w -> 1 c f h w")


__all__ = ["FrameVAE", "TINY_CONFIG", "SMALL_CONFIG", "SD_CONFIG", "SD_SCALING_FACTOR"]
