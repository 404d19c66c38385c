"""Open-Sora 1.2 STDiT3, all of it in this single file, as a plain single-device nn.Module.

State-dict names, shapes and order are the official ones (hpcaitech/Open-Sora v1.2.0,
`opensora/models/stdit/stdit3.py` + `opensora/models/layers/blocks.py`), so the released
`hpcai-tech/OpenSora-STDiT-v3` checkpoint loads strictly. Numerics match the official float32 forward
(tests/fixtures/official/stdit3). Attention uses `F.scaled_dot_product_attention`; the text mask of the
cross-attention is an SDPA key mask instead of xformers' packed block-diagonal mask (same math).

Seams for PAB and DSP (docs/design.md): spatial attention sees (B·T, S, C), temporal attention sees
(B·S, T, C) and computes its RoPE from that T; see `STDiT3.broadcast_targets`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


#################################################################################
#                                    Config                                     #
#################################################################################


@dataclass
class STDiT3Config:
    """Field names and defaults of the official `STDiT3Config` (a transformers PretrainedConfig there)."""

    input_size: tuple = (None, None, None)  # placeholder: sizes are dynamic
    input_sq_size: int = 512  # pixel resolution the spatial pos-embed scale is relative to
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    hidden_size: int = 1152
    depth: int = 28  # spatial blocks; as many temporal blocks, interleaved
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # training-time caption dropout; unused at inference
    pred_sigma: bool = True  # out channels = 2 * in_channels
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300  # rows of the learned null caption `y_embedder.y_embedding`
    qk_norm: bool = True
    # Kernel and distributed switches: they do not change the math, so they are accepted and ignored.
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    # Training-only `requires_grad` flags, applied as the official model does.
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False

    # Keys of the official config.json that are bookkeeping, not architecture.
    _BOOKKEEPING = frozenset({"model_type", "architectures", "torch_dtype", "transformers_version", "auto_map"})

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim (hidden_size // num_heads) must be even: RoPE rotates channel pairs")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2D sin/cos pos-embed")
        if self.drop_path != 0.0:
            raise ValueError(
                f"drop_path={self.drop_path}: stochastic depth is a training feature this inference model does not "
                "implement; set drop_path=0.0 (the released config uses 0.0)"
            )
        if self.skip_y_embedder:
            raise ValueError(
                "skip_y_embedder=True (pre-projected text + y_lens as mask) is not supported; "
                "pass T5 features and a keep-mask with skip_y_embedder=False"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STDiT3Config:
        """Build from the official config.json dict; bookkeeping keys are ignored, unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls._BOOKKEEPING and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"unknown STDiT3 config keys {unknown}; known fields are {sorted(names)}. "
                "If these are bookkeeping keys, drop them before calling from_dict."
            )
        return cls(**{k: v for k, v in d.items() if k in names})


SIZES: dict[str, dict[str, Any]] = {
    # hpcai-tech/OpenSora-STDiT-v3 config.json (STDiT3-XL/2).
    "full": dict(
        input_size=(None, None, None), input_sq_size=512, in_channels=4, patch_size=(1, 2, 2),
        hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True,
        drop_path=0.0, caption_channels=4096, model_max_length=300, qk_norm=True,
        enable_flash_attn=False, enable_layernorm_kernel=False, enable_sequence_parallelism=False,
        only_train_temporal=False, freeze_y_embedder=True, skip_y_embedder=False,
    ),  # fmt: skip
}
# Same architecture, small enough for CPU tests; caption_channels is our tiny T5's width.
SIZES["tiny"] = {**SIZES["full"], "depth": 2, "hidden_size": 64, "num_heads": 4, "caption_channels": 64,
                 "model_max_length": 64}  # fmt: skip


#################################################################################
#                         Embedding and Positional Layers                       #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) features of a scalar per sample -> Linear -> SiLU -> Linear (DiT); also embeds fps."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim) float32 [cos, sin] features, the official float32 values, correctly rounded.

        At t ~ 1000 the output is very sensitive to these: one ulp of the highest frequencies moves the
        fixture's output by up to 5e-5. Platform float32 exp/cos/sin differ by an ulp here and there, so
        we evaluate them in float64 on the official float32 arguments and round once: the same float32
        numbers on every machine and device.
        """
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(exponent.double()).float()  # (half,)
        args = (t[:, None].float() * freqs[None]).double()  # float32 product, as the official code
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.sinusoidal(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)  # (B, C)


class Mlp(nn.Module):
    """timm-style Mlp (fc1, tanh-GELU, fc2) so the checkpoint's `fc1`/`fc2` names match."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; holds the learned null caption used as the CFG negative."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # Persistent buffer in the official checkpoint; the eval forward never reads it.
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify; zero-pads T, H, W up to a multiple of the patch size, like the official code."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        x = self.proj(x)  # (B, C, T_p, H_p, W_p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), tokens in (t, h, w) order


def spatial_pos_embed(
    dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device
) -> torch.Tensor:
    """2D sin/cos table (1, h*w, dim): channels [0, dim/2) encode the column, [dim/2, dim) the row."""
    # Same op order as the official PositionEmbedding2D so the float32 table is identical.
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))  # (dim/4,)
    rows = torch.arange(h, device=device) / scale * (base_size / h)
    cols = torch.arange(w, device=device) / scale * (base_size / w)
    col_pos = cols[None, :].expand(h, w).reshape(-1)  # (h*w,), w fastest
    row_pos = rows[:, None].expand(h, w).reshape(-1)

    def sincos(p: torch.Tensor) -> torch.Tensor:
        out = p[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # (h*w, dim/2)

    return torch.cat([sincos(col_pos), sincos(row_pos)], dim=-1)[None]  # (1, h*w, dim)


class RotaryEmbedding(nn.Module):
    """Interleaved-pair RoPE over the sequence axis (rotary_embedding_torch 0.5.3 semantics, theta 10000)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        # A frozen Parameter, not a buffer: that is how the official checkpoint stores `rope.freqs`.
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)  # (dim/2,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., L, D) -> same, pair (x[2i], x[2i+1]) at position p rotated by p * freqs[i]."""
        L = x.shape[-2]
        # At least float32 even for bf16 models: bf16 angles of positions in the hundreds are off by ~1 rad.
        dtype = torch.promote_types(x.dtype, torch.float32)
        pos = torch.arange(L, device=x.device, dtype=dtype)
        angles = (pos[:, None] * self.freqs.to(dtype)[None]).repeat_interleave(2, dim=-1)  # (L, D)
        xf = x.to(dtype)
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # (..., L, D)
        return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


#################################################################################
#                                   Attention                                   #
#################################################################################


class RMSNorm(nn.Module):
    """LlamaRMSNorm over head_dim (eps 1e-6), normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over dim 1 of (N, L, C); q/k RMSNorm, then RoPE if given (temporal)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # Share the model-level `rope` without registering it here, so the checkpoint holds `rope.freqs`
        # once (the official blocks hold a bound method of it for the same reason).
        object.__setattr__(self, "rope", rope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        qkv = self.qkv(x).view(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, L, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:  # after the norm, as the released model was trained
            q, k = self.rope(q), self.rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(N, L, C))


class CrossAttention(nn.Module):
    """Video tokens attend to their own sample's text tokens; `mask` (B, L) keeps tokens, no norm, no gate."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) video tokens; y: (B, L, C) projected text; mask: (B, L) bool keep-mask or None."""
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        kv = self.kv_linear(y).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, L, hd)
        # The official model packs the kept tokens and uses a block-diagonal mask; a key mask is the same softmax.
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


#################################################################################
#                                 Core STDiT3                                   #
#################################################################################


def modulation(table: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None, x_mask: torch.Tensor | None):
    """adaLN-single parameters (B, K, 1, 1, C), or (B, K, T, 1, C) where x_mask picks t or t0 per frame.

    table: (K, C) learned per-block offsets; t, t0: (B, K, C); x_mask: (B, T) bool.
    """
    mod = (table[None] + t)[:, :, None, None]  # (B, K, 1, 1, C)
    if x_mask is None:
        return mod
    mod0 = (table[None] + t0)[:, :, None, None]
    # Selecting the parameters per frame is elementwise-identical to the official "modulate twice, select".
    return torch.where(x_mask[:, None, :, None, None], mod, mod0)  # (B, K, T, 1, C)


def _split6(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(t.shape[0], 6, -1)  # (B, 6C) -> (B, 6, C)


class STDiT3Block(nn.Module):
    """One spatial or temporal block: adaLN-modulated self-attention, plain cross-attention, modulated MLP."""

    def __init__(self, config: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        C = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(C, config.num_heads, config.qk_norm, rope=rope if temporal else None)
        self.cross_attn = CrossAttention(C, config.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(C, int(C * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def forward(self, x, y, mask, t_mod, t0_mod=None, x_mask=None):
        """x: (B, T, S, C); y: (B, L, C); mask: (B, L) bool | None; t_mod/t0_mod: (B, 6C); x_mask: (B, T) bool."""
        B, T, S, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            modulation(self.scale_shift_table, _split6(t_mod), _split6(t0_mod), x_mask).unbind(1)
        )  # each (B, T|1, 1, C), broadcasting over S

        # self-attention; the attention module sees sequence-major tokens (the PAB/DSP seam)
        x_m = self.norm1(x) * (1 + scale_msa) + shift_msa  # (B, T, S, C)
        if self.temporal:
            x_m = x_m.transpose(1, 2).reshape(B * S, T, C)  # (B·S, T, C)
            x_m = self.attn(x_m).view(B, S, T, C).transpose(1, 2)  # (B, T, S, C)
        else:
            x_m = self.attn(x_m.reshape(B * T, S, C)).view(B, T, S, C)  # attn on (B·T, S, C)
        x = x + gate_msa * x_m

        # cross-attention: no norm, no gate
        x = x + self.cross_attn(x.reshape(B, T * S, C), y, mask).view(B, T, S, C)

        # MLP, on (B, T·S, C) like the cross-attention
        x_m = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * self.mlp(x_m.reshape(B, T * S, C)).view(B, T, S, C)
        return x


class FinalLayer(nn.Module):
    """PixArt T2I final layer: LayerNorm, shift/scale from t (t0 on x_mask=False frames), Linear to patches."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, t0=None, x_mask=None):
        """x: (B, T, S, C); t, t0: (B, C) -> (B, T, S, num_patch * out_channels)."""
        # One (B, C) vector offsets both rows of the table (unlike the blocks' 6C split).
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, :, None, None].unbind(1)  # (B, 1, 1, C)
        x = self.norm_final(x) * (1 + scale) + shift
        if x_mask is not None:
            # The official layer normalises the *already modulated* x again for the t0 frames; the released
            # model was trained that way, so we keep it.
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None])[:, :, None, None].unbind(1)
            x = torch.where(x_mask[:, :, None, None], x, self.norm_final(x) * (1 + scale0) + shift0)
        return self.linear(x)


class STDiT3(nn.Module):
    """Open-Sora 1.2 spatial-temporal DiT: interleaved spatial/temporal blocks, adaLN-single, T5 cross-attention."""

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.patch_size = config.patch_size

        # Registration order = official state-dict order (checked against the manifest in tests).
        self.rope = RotaryEmbedding(C // config.num_heads)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C, config.model_max_length)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(config, temporal=False) for _ in range(config.depth)])
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(config, temporal=True, rope=self.rope) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(C, math.prod(config.patch_size), self.out_channels)
        self.initialize_weights()

        if config.only_train_temporal:
            self.requires_grad_(False)
            self.temporal_blocks.requires_grad_(True)
        if config.freeze_y_embedder:
            self.y_embedder.requires_grad_(False)

    def initialize_weights(self):
        """The official init (used only without a checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # fps starts as a no-op addition to the timestep embedding
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[0].bias)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        # Temporal blocks start as identity (Open-Sora trained them on top of a spatial-only model).
        # Note: a freshly built model therefore has inert temporal blocks; load weights for real tests.
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def broadcast_targets(self) -> dict[str, list[nn.Module]]:
        """Modules whose outputs PAB may reuse, by kind: "spatial", "temporal", "cross", "mlp"."""
        blocks = [b for pair in zip(self.spatial_blocks, self.temporal_blocks) for b in pair]  # forward order
        return {
            "spatial": [b.attn for b in self.spatial_blocks],
            "temporal": [b.attn for b in self.temporal_blocks],
            "cross": [b.cross_attn for b in blocks],
            "mlp": [b.mlp for b in blocks],
        }

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        """
        x: (B, in_channels, T, H, W) latents; timestep: (B,) in [0, 1000]; y: (B, 1, L, caption_channels);
        mask: (B, L) text keep-mask; x_mask: (B, T) bool, False = conditioning frame (modulated with t=0);
        fps: (B,) or scalar; height, width: pixel size (only element [0] is used).
        Returns (B, out_channels, T, H, W) float32.
        """
        if fps is None or height is None or width is None:
            raise ValueError("STDiT3 needs fps, height and width (pixels); the Open-Sora pipeline passes fps=24")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        dtype = self.x_embedder.proj.weight.dtype
        B, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)  # patch grid, padded up
        S = H * W
        # Cast inputs to the weight dtype first (timestep too, as the official model does: bf16 rounds it).
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # === timestep (+ fps) conditioning ===
        fps = torch.as_tensor(fps, device=x.device).reshape(-1)
        fps = fps.repeat(B // fps.shape[0]) if fps.shape[0] != B else fps
        fps_emb = self.fps_embedder(fps)  # (B, C)
        t = self.t_embedder(timestep.reshape(-1).expand(B)) + fps_emb  # (B, C)
        t_mod = self.t_block(t)  # (B, 6C), shared by all blocks
        t0 = t0_mod = None
        if x_mask is not None:
            if tuple(x_mask.shape) != (B, T):
                raise ValueError(f"x_mask must be (B, T_patches) = {(B, T)}, got {tuple(x_mask.shape)}")
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep.reshape(-1).expand(B))) + fps_emb
            t0_mod = self.t_block(t0)

        # === text ===
        y, mask = self.encode_text(y, mask, B)  # (B, L, C), (B, L) bool | None

        # === patches + spatial position table (no temporal table: time gets RoPE) ===
        resolution_sq = (_first(height) * _first(width)) ** 0.5
        pos = spatial_pos_embed(self.config.hidden_size, H, W, resolution_sq / self.config.input_sq_size,
                                round(S**0.5), x.device).to(dtype)  # (1, S, C)  # fmt: skip
        x = self.x_embedder(x).view(B, T, S, -1) + pos[:, None]  # (B, T, S, C)

        # === blocks: s0, t0, s1, t1, ... ===
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, mask, t_mod, t0_mod, x_mask)
            x = temporal_block(x, y, mask, t_mod, t0_mod, x_mask)

        x = self.final_layer(x, t, t0, x_mask)  # (B, T, S, pt·ph·pw·out)
        return self.unpatchify(x, (T, H, W), (Tx, Hx, Wx)).float()

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None, B: int):
        """(B, 1, L, caption_channels) T5 features -> (B, L, C); mask -> (B, L) bool keep-mask (or None)."""
        if y.ndim != 4 or y.shape[0] != B or y.shape[1] != 1:
            raise ValueError(f"y must be (B={B}, 1, L, {self.config.caption_channels}), got {tuple(y.shape)}")
        y = self.y_embedder(y).squeeze(1)  # (B, L, C)
        if mask is None:
            return y, None
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != B:  # the official model tiles a mask given for one CFG half
            mask = mask.repeat(B // mask.shape[0], 1)
        if mask.shape != (B, y.shape[1]):
            raise ValueError(f"mask must be (B, L) = {(B, y.shape[1])}, got {tuple(mask.shape)}")
        mask = mask.to(device=y.device) != 0
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every sample's text mask must keep at least one token (T5 always emits EOS)")
        return y, mask

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        """(B, T, S, pt·ph·pw·out) patch tokens -> (B, out, T, H, W), cropping the patch padding."""
        (T, H, W), (Tx, Hx, Wx) = grid, size
        pt, ph, pw = self.patch_size
        B = x.shape[0]
        x = x.reshape(B, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H * ph, W * pw)
        return x[:, :, :Tx, :Hx, :Wx]


def _first(v) -> float:
    """Element [0] of a tensor/sequence, or the number itself, as a float (height/width arguments)."""
    if isinstance(v, torch.Tensor):
        return float(v.reshape(-1)[0].item())
    if isinstance(v, (list, tuple)):
        return float(v[0])
    return float(v)


def build_stdit3(size: str = "full", **overrides) -> STDiT3:
    """STDiT3 from the size registry, e.g. `build_stdit3("tiny")` or `build_stdit3("full", qk_norm=False)`."""
    if size not in SIZES:
        raise ValueError(f"unknown STDiT3 size {size!r}; choose one of {sorted(SIZES)}")
    return STDiT3(STDiT3Config(**{**SIZES[size], **overrides}))
