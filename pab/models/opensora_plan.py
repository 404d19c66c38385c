"""Open-Sora-Plan v1.1.0 `LatteT2V` (PKU-YuanGroup), the 65x512x512 text-to-video transformer.

Architecturally this is Latte: per-frame 2x2 patches, interleaved spatial blocks (self-attention over a frame,
cross-attention to T5 tokens, MLP) and temporal blocks (self-attention over frames, MLP), adaLN-single
conditioning. With the released settings (no RoPE, no KV compression) the official code computes the same
function as diffusers' Latte, so the layers below are imported from `pab.models.latte` where they are identical.
What differs, and lives here:

* the config (Open-Sora-Plan's field names: `sample_size` is [H, W], `attention_mode`, `use_rope`, ...);
* `caption_projection.y_embedding`, a persistent (120, caption_channels) buffer holding the learned null caption
  of training-time caption dropout; it is in the checkpoint and never read at inference;
* the temporal table: positions are divided by `interpolation_scale_1d` (derived from video_length when null)
  and it is added even to a one-frame clip (the official code has no F > 1 check);
* the text mask: a (B, L) keep-mask (1 keep, 0 drop) is turned into a -10000 additive bias per frame.

Seams for PAB and DSP are as in Latte (docs/design.md): `broadcast_targets()` lists every block's `attn1`
(spatial (B*F, S, C), temporal (B*S, F, C)), `attn2` and `ff`; `temp_pos_embed` is the submodule DSP offsets.

Reference: Open-Sora-Plan tag v1.1.0 (commit 2a8b2328), `opensora/models/diffusion/latte/modeling_latte.py`
and `modules.py`; the fixture in tests/fixtures/official/osp110 was produced by that code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from pab.models import latte
from pab.models.latte import LatteLayoutModel, TemporalPosEmbed

#################################################################################
#                                    Config                                     #
#################################################################################

# Constructor defaults of the official LatteT2V: `from_dict` fills keys missing from a config.json with these,
# as diffusers' `from_config` would.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "patch_size_t": 1,
    "attention_head_dim": 88,
    "in_channels": None,
    "out_channels": None,
    "num_layers": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": None,
    "attention_bias": False,
    "sample_size": None,
    "num_vector_embeds": None,
    "patch_size": None,
    "activation_fn": "geglu",
    "num_embeds_ada_norm": None,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "double_self_attention": False,
    "upcast_attention": False,
    "norm_type": "layer_norm",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "attention_type": "default",
    "caption_channels": None,
    "video_length": 16,
    "attention_mode": "flash",
    "use_rope": False,
    "model_max_length": 300,
    "rope_scaling_type": "linear",
    "compress_kv_factor": 1,
    "interpolation_scale_1d": None,
}

# All three official modes make the same scaled_dot_product_attention call; they only pick CUDA kernels. We always
# use plain SDPA and always apply the masks.
_ATTENTION_MODES = ("xformers", "math", "flash")


@dataclass
class LatteT2VConfig(latte.LatteLayoutConfig):
    """Field names of Open-Sora-Plan v1.1.0's LatteT2V config; defaults are the 65x512x512 release."""

    num_attention_heads: int = 16
    patch_size_t: int = 1  # stored by the release; v1.1 has no temporal patching
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8  # None -> in_channels; noise + learned sigma
    num_layers: int = 28  # spatial blocks; as many temporal blocks, interleaved
    dropout: float = 0.0
    norm_num_groups: int = 32  # inherited Transformer2D option; unused with patched input
    cross_attention_dim: int = 1152  # must equal heads * head_dim (caption_projection output width)
    attention_bias: bool = True
    sample_size: tuple[int, int] = (64, 64)  # training latent [H, W]: spatial table base size and scale
    num_vector_embeds: int | None = None
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    use_linear_projection: bool = False  # unused with patched input
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False  # only read by the non-SDPA attention path, which v1.1 never takes
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    attention_type: str = "default"
    caption_channels: int = 4096
    video_length: int = 17  # latent frames of 65-frame clips (CausalVAE 4x); the table adapts to any F
    attention_mode: str = "xformers"  # kernel choice only; see _ATTENTION_MODES
    use_rope: bool = False
    model_max_length: int = 300  # text tokens the pipeline encodes; stored only
    rope_scaling_type: str = "linear"  # only read with use_rope
    compress_kv_factor: int = 1
    interpolation_scale_1d: float | None = None  # None -> derived from video_length (1 for 17)

    _FILE_DEFAULTS: ClassVar[dict[str, Any]] = _OFFICIAL_DEFAULTS
    _WRONG_FILE: ClassVar[str] = (
        "is this an Open-Sora-Plan v1.1 config.json? (diffusers Latte configs go to "
        "pab.models.latte.LatteConfig.from_dict.)"
    )

    def __post_init__(self):
        if isinstance(self.sample_size, (list, tuple)) and len(self.sample_size) == 2:
            self.sample_size = (int(self.sample_size[0]), int(self.sample_size[1]))
        problems = []
        if not isinstance(self.sample_size, tuple):
            problems.append(f"sample_size={self.sample_size!r} must be [H, W] (the training latent size)")
        if self.use_rope:
            problems.append("use_rope=True: the RoPE variant is not implemented (the 65x512x512 release has none)")
        if self.compress_kv_factor != 1:
            problems.append(f"compress_kv_factor={self.compress_kv_factor}: KV compression is not implemented; use 1")
        if self.patch_size_t != 1:
            problems.append(f"patch_size_t={self.patch_size_t}: v1.1 patches frames one by one; use 1")
        if self.attention_mode not in _ATTENTION_MODES:
            problems.append(f"attention_mode={self.attention_mode!r}: use one of {list(_ATTENTION_MODES)}")
        for name in ("only_cross_attention", "double_self_attention"):
            if getattr(self, name):
                problems.append(f"{name}=True changes the block layout and is not implemented; use false")
        if self.num_vector_embeds is not None:
            problems.append("num_vector_embeds is set: discrete (vector-quantised) input is not implemented")
        if self.attention_type != "default":
            problems.append(f"attention_type={self.attention_type!r}: only 'default' is implemented")
        self._check(problems)

    @property
    def temporal_interpolation_scale(self) -> float:
        """Divisor of the temporal positions: the configured value, or the official derivation from video_length."""
        scale = self.interpolation_scale_1d
        if scale is None:  # 16 frames (Latte) is scale 1; 17 (= 16 + the causal VAE's first frame) too
            scale = (self.video_length - 1) // 16 if self.video_length % 2 == 1 else self.video_length // 16
        return max(scale, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_size"] = list(self.sample_size)
        return d


_RELEASE = dict(
    patch_size_t=1, in_channels=4, out_channels=8, dropout=0.0, norm_num_groups=32, attention_bias=True,
    num_vector_embeds=None, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    use_linear_projection=False, only_cross_attention=False, double_self_attention=False, upcast_attention=False,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_type="default",
    use_rope=False, model_max_length=300, rope_scaling_type="linear", compress_kv_factor=1,
    interpolation_scale_1d=None,
)

SIZES: dict[str, dict[str, Any]] = {
    # LatteT2V-XL/122 with the arguments of scripts/text_condition/train_videoae_65x512x512.sh (train_t2v.py).
    "full": dict(
        _RELEASE, num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152,
        sample_size=(64, 64), caption_channels=4096, video_length=17, attention_mode="xformers",
    ),
    # Same architecture at test width; caption_channels 64 is the tiny T5's width (pab/text.py).
    "tiny": dict(
        _RELEASE, num_attention_heads=4, attention_head_dim=16, num_layers=2, cross_attention_dim=64,
        sample_size=(16, 16), caption_channels=64, video_length=17, attention_mode="math",
    ),
    # Open-Sora-Plan-v1.1-small, trained here on the synthetic shapes: 17 frames of 64x64 px through the small
    # CausalVAE (5 x 16 x 16 latents); caption_channels 128 is the small T5's width.
    "small": dict(
        _RELEASE, num_attention_heads=4, attention_head_dim=28, num_layers=2, cross_attention_dim=112,
        sample_size=(16, 16), caption_channels=128, video_length=5, attention_mode="math", model_max_length=32,
    ),
}


#################################################################################
#                               Embedding Layers                                #
#################################################################################


class CaptionProjection(latte.CaptionProjection):
    """Latte's two-layer text projection plus `y_embedding`, the learned null caption of caption dropout.

    The buffer is persistent (it is in the released checkpoint) but inference never reads it: classifier-free
    guidance encodes an empty prompt instead. Its 120 rows are the official default, not model_max_length.
    """

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int = 120):
        super().__init__(in_features, hidden_size)
        self.register_buffer("y_embedding", torch.randn(num_tokens, in_features) / in_features**0.5)


#################################################################################
#                            Core Open-Sora-Plan Model                          #
#################################################################################


class LatteT2V(LatteLayoutModel):
    """Open-Sora-Plan v1.1.0 video DiT: Latte's interleaved spatial/temporal blocks, adaLN-single."""

    def __init__(self, config: LatteT2VConfig):
        # The official code adds the frame table at i == 0 whatever F is, so no single-frame skip here.
        super().__init__(
            config, config.sample_size[0],
            CaptionProjection(config.caption_channels, config.inner_dim),
            TemporalPosEmbed(
                config.inner_dim, interpolation_scale=config.temporal_interpolation_scale, skip_single_frame=False
            ),
        )  # fmt: skip

    @staticmethod
    def _cross_attention_bias(
        mask: torch.Tensor | None, batch: int, frames: int, text_len: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Keep-mask (B, L) or (B, 1, L), 1 keep / 0 drop -> additive bias (B*F, 1, 1, L), rows b*F + f.

        Unlike diffusers' Latte, the official LatteT2V takes keep-masks, never biases: a 3-D mask is its
        "video + images" layout, of which only the video row (use_image_num = 0) is supported here.
        """
        if mask is None:
            return None
        if mask.ndim == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != (batch, text_len):
            raise ValueError(
                f"encoder_attention_mask must be a keep-mask of shape (B, L)=({batch}, {text_len}) or (B, 1, L), "
                f"1 = keep; got {tuple(mask.shape)}"
            )
        bias = (1 - mask.to(dtype)) * -10000.0  # (B, L)
        return bias[:, None, None, :].repeat_interleave(frames, dim=0)  # (B*F, 1, 1, L)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_image_num: int = 0,
        enable_temporal_attentions: bool = True,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """Predict noise and sigma for a latent video: a 1-tuple with (B, out_channels, F, H, W).

        The tensors and return_dict are as in `LatteLayoutModel._forward`.
        added_cond_kwargs: accepted and ignored, as in the official model (no size conditioning in v1.1).
        encoder_attention_mask: (B, L) keep-mask or None (the official pipeline cuts the text instead).
        use_image_num: must be 0; joint image-video batches are a training-only layout.
        """
        if use_image_num:
            raise ValueError(
                f"use_image_num={use_image_num}: joint image-video batches are a training layout the official "
                f"inference path cannot run; pass videos only (use_image_num=0)"
            )
        return self._forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                             enable_temporal_attentions, return_dict)  # fmt: skip
