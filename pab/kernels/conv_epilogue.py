"""What follows a VAE convolution, in one pass each (Triton): a bias added in the residual sum, and a subpixel
upsampler's phases interleaved.

PyTorch adds a convolution's bias in an elementwise pass of its own after cuDNN's kernel, and a ResNet block then
reads that output again to add the residual (diffusers' ResnetBlock2D also divides by its output scale, 1 in
the VAEs: a third pass). `bias_residual(x, residual, biases, scale)` computes (residual + x + sum(biases)) *
scale, the biases per channel, reading x and the residual once and writing once, in float32 rounded once, for x
(N, C, *spatial) in NCHW or channels-last (`group_norm.flat_strides`); the residual must have x's shape and
strides. `pab.vae_kernels` uses it at the end of each ResnetBlock2D of a VAE decoder, where conv2 (and a 1x1
shortcut conv) leave their biases to it.

`subpixel_interleave(y, bias, out)` writes a nearest-2x upsampler's output from the 2x2 convolution that computes
its four phases at low resolution (`pab.vae_kernels.SubpixelUpsampleHook`): one read of each phase with the bias
added, one write: 11 ms of Open-Sora's 480p decode on an H100, where PyTorch's four strided adds were among ~30 ms of
elementwise passes (`bench.vae --profile`).
"""

from __future__ import annotations

import torch

from pab.kernels.group_norm import MAX_CHANNELS, flat_strides, pixel_block

try:
    import triton
    import triton.language as tl

    from pab.kernels.group_norm import pixel_tile
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None


def takes(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether `bias_residual` takes this pair: same shape, dtype and strides, a layout `flat_strides` reads, at
    most MAX_CHANNELS channels and < 2^31 elements."""
    return (
        triton is not None and x.ndim >= 3 and x.shape == residual.shape and x.dtype == residual.dtype
        and x.stride() == residual.stride() and x.device == residual.device and x.shape[1] <= MAX_CHANNELS
        and x.numel() < 2**31 and flat_strides(x) is not None
    )  # fmt: skip


def bias_residual(
    x: torch.Tensor, residual: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = (), scale: float = 1.0
) -> torch.Tensor:  # fmt: skip
    """(residual + x + sum of the (C,) `biases`) * scale, in x's layout. ValueError for what it does not `take`."""
    if not takes(x, residual):
        raise ValueError(
            f"bias_residual takes two tensors of one shape, dtype and layout with at most {MAX_CHANNELS} channels; "
            f"got {tuple(x.shape)} {x.stride()} {x.dtype} and {tuple(residual.shape)} {residual.stride()} "
            f"{residual.dtype}"
        )
    C = x.shape[1]
    biases = tuple(b for b in biases if b is not None)
    for b in biases:
        if b.shape != (C,) or not b.is_contiguous():
            raise ValueError(f"biases must be contiguous ({C},) tensors; got {tuple(b.shape)}")
    if len(biases) > 2:
        raise ValueError(f"bias_residual adds at most two biases; got {len(biases)}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    N, P = x.shape[0], x[0, 0].numel()
    b0 = biases[0] if biases else x  # placeholder pointers where there is no bias
    b1 = biases[1] if len(biases) > 1 else x
    block_c = triton.next_power_of_2(C)
    block_p = pixel_block(P, block_c)
    _bias_residual_kernel[(triton.cdiv(P, block_p), N)](
        x, residual, out, b0, b1, P, C, *flat_strides(x), float(scale), NB=len(biases), BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=4 if block_p * block_c <= 4096 else 8,
    )  # fmt: skip
    return out


def subpixel_interleave(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Fill `out` (N, C, 2H, 2W), dense in NCHW or channels-last, with out[:, c, 2i + a, 2j + b] =
    y[:, (2a + b) C + c, i + a, j + b] + bias[c] from y (N, 4C, >= H + 1, >= W + 1) in any strides, in float32
    rounded once. ValueError for shapes it does not take."""
    n, c, h2, w2 = out.shape if out.ndim == 4 else (0, 0, 0, 0)
    if (y.ndim != 4 or out.ndim != 4 or y.shape[0] != n or y.shape[1] != 4 * c or h2 % 2 or w2 % 2
            or y.shape[2] < h2 // 2 + 1 or y.shape[3] < w2 // 2 + 1 or flat_strides(out) is None
            or y.dtype != out.dtype or y.device != out.device or c > MAX_CHANNELS or out.numel() >= 2**31
            or y.numel() >= 2**31):  # fmt: skip
        raise ValueError(
            f"subpixel_interleave takes y (N, 4C, H + 1, W + 1) and a dense out (N, C, 2H, 2W) of one dtype, at most "
            f"{MAX_CHANNELS} channels; got y {tuple(y.shape)} {y.dtype}, out {tuple(out.shape)} {out.stride()} "
            f"{out.dtype}"
        )
    if bias is not None and (bias.shape != (c,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({c},) tensor; got {tuple(bias.shape)}")
    if out.numel() == 0:
        return
    P = h2 * w2
    block_c = triton.next_power_of_2(c)
    block_p = pixel_block(P, block_c)
    _interleave_kernel[(triton.cdiv(P, block_p), n)](
        y, bias if bias is not None else out, out, P, c, w2, *y.stride(), *flat_strides(out), HAS_B=bias is not None,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_p * block_c <= 4096 else 8,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _bias_residual_kernel(
        x_ptr, r_ptr, y_ptr, b0_ptr, b1_ptr, P, C, s_n, s_p, s_c, scale, NB: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, ps, cs, cmask, m = pixel_tile(P, C, BLOCK_P, BLOCK_C)
        offs = n * s_n + ps[:, None] * s_p + cs[None, :] * s_c
        y = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(x_ptr + offs, mask=m, other=0.0).to(
            tl.float32
        )
        if NB > 0:
            b = tl.load(b0_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
            if NB > 1:
                b += tl.load(b1_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
            y += b[None, :]
        tl.store(y_ptr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _interleave_kernel(
        y_ptr, b_ptr, o_ptr, P, C, W2, y_n, y_c, y_h, y_w, o_n, o_p, o_c, HAS_B: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, ps, cs, cmask, m = pixel_tile(P, C, BLOCK_P, BLOCK_C)
        oy = ps // W2
        ox = ps % W2
        a = oy % 2
        b = ox % 2
        # Output pixel (2i + a, 2j + b) is phase 2a + b's value at low-resolution pixel (i + a, j + b).
        src = n * y_n + ((2 * a + b) * C)[:, None] * y_c + cs[None, :] * y_c + (oy // 2 + a)[:, None] * y_h \
            + (ox // 2 + b)[:, None] * y_w  # fmt: skip
        v = tl.load(y_ptr + src, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            v += tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + n * o_n + ps[:, None] * o_p + cs[None, :] * o_c, v.to(o_ptr.dtype.element_ty), mask=m)
