"""A toy spatial-temporal DiT with the same DSP seams as the real models, for fast equivalence tests.

It is small on purpose but position-sensitive in every way DSP could get wrong: temporal attention
adds sinusoids of the position *it sees* to its queries and keys (like STDiT3's RoPE), the model adds
a 1-D temporal table through `temp_pos_embed` (like Latte), a per-frame mask selects a different
conditioning per frame (like STDiT3's x_mask), and the timestep is per sample (so CFG halves differ).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pab.parallel import DSPPlan


def sincos(length: int, dim: int, device=None) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # (length, dim)


class Attention(nn.Module):
    """Self-attention over dim 1 of (N, L, C); `positional` adds sinusoids of 0..L-1 to q and k."""

    def __init__(self, dim: int, heads: int, positional: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.positional = positional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.positional:
            table = sincos(L, C, x.device)
            q, k = q + table, k + table
        q, k, v = (t.reshape(N, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(N, L, C))


class TemporalTable(nn.Module):
    """x + table[frame_offset : frame_offset + T] on (B·S, T, C) tokens (the Latte `temp_pos_embed` seam).

    Like Latte, a one-frame clip gets no table; the decision uses the clip length `num_frames`.
    """

    def __init__(self, max_frames: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sincos(max_frames, dim) * 0.5, persistent=False)

    def forward(self, x: torch.Tensor, frame_offset: int = 0, num_frames: int | None = None) -> torch.Tensor:
        num_frames = frame_offset + x.shape[1] if num_frames is None else num_frames
        if num_frames == 1:
            return x
        return x + self.table[frame_offset : frame_offset + x.shape[1]]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads, positional=False)
        self.norm2 = nn.LayerNorm(dim)
        self.temporal = Attention(dim, heads, positional=True)
        self.cross = nn.Linear(dim, dim)  # token-local "cross" stand-in conditioned on text
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class ToySTDiT(nn.Module):
    """forward(x (B, C, T, H, W), timestep (B,), text (B, L, D), frame_mask (B, T) | None) -> (B, 2C, T, H, W)."""

    def __init__(self, channels: int = 3, dim: int = 16, heads: int = 2, depth: int = 2, max_frames: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.embed = nn.Linear(channels, dim)
        self.t_embed = nn.Linear(1, dim)
        self.t0_embed = nn.Linear(1, dim)
        self.temp_pos_embed = TemporalTable(max_frames, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, 2 * channels)

    def broadcast_targets(self) -> dict[str, list[nn.Module]]:
        return {
            "spatial": [b.spatial for b in self.blocks],
            "temporal": [b.temporal for b in self.blocks],
            "cross": [b.cross for b in self.blocks],
            "mlp": [b.mlp for b in self.blocks],
        }

    def forward(self, x, timestep, text, frame_mask=None):
        B, C, T, H, W = x.shape
        S = H * W
        h = self.embed(x.permute(0, 2, 3, 4, 1).reshape(B, T, S, C))  # (B, T, S, D)
        D = h.shape[-1]
        t = self.t_embed(timestep.reshape(B, 1).float())[:, None, None]  # (B, 1, 1, D)
        if frame_mask is not None:
            t0 = self.t0_embed(torch.zeros(B, 1))[:, None, None]
            t = torch.where(frame_mask[:, :, None, None], t, t0)  # (B, T, 1, D)
        h = h + t
        ctx = text.mean(dim=1)[:, None, None]  # (B, 1, 1, D)
        for i, blk in enumerate(self.blocks):
            h = h + blk.spatial(blk.norm1(h).reshape(B * T, S, D)).view(B, T, S, D)
            ht = blk.norm2(h).transpose(1, 2).reshape(B * S, T, D)  # (B·S, T, D)
            if i == 0:
                ht = self.temp_pos_embed(ht)
            h = h + blk.temporal(ht).view(B, S, T, D).transpose(1, 2)
            h = h + blk.cross(h * ctx)
            h = h + blk.mlp(blk.norm3(h))
        out = self.out(h)  # (B, T, S, 2C)
        return out.view(B, T, H, W, 2 * C).permute(0, 4, 1, 2, 3)


TOY_PLAN = DSPPlan(
    video_input="x",
    frame_dim=2,
    frame_inputs={"frame_mask": 1},
    position_modules=("temp_pos_embed",),
)


def cfg_call(ctx, model, *args, **kwargs):
    """Call `model` as a CFG-parallel pipeline does: this sub-group's half of every batched tensor, then gather."""
    split = [ctx.split_cfg(a) if isinstance(a, torch.Tensor) else a for a in args]
    ksplit = {k: ctx.split_cfg(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return ctx.gather_cfg(model(*split, **ksplit))


def toy_inputs(batch: int, frames: int, height: int, width: int, seed: int = 0, channels: int = 3, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, height, width, generator=g)
    timestep = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, 5, dim, generator=g)
    frame_mask = torch.rand(batch, frames, generator=g) > 0.3
    return dict(x=x, timestep=timestep, text=text, frame_mask=frame_mask)


def toy_model(seed: int = 0, **kwargs) -> ToySTDiT:
    torch.manual_seed(seed)
    return ToySTDiT(**kwargs).eval()
