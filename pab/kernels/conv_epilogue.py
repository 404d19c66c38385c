"""What follows a VAE convolution, in one pass each (Triton): a bias added in the residual sum, and a subpixel
upsampler's phases interleaved. Either can also write the statistics of its output for the GroupNorm that reads
it next (`group_norm.Partials`), so that norm does not read the tensor a second time.

PyTorch adds a convolution's bias in an elementwise pass of its own after cuDNN's kernel, and a ResNet block then
reads that output again to add the residual (diffusers' ResnetBlock2D also divides by its output scale, 1 in
the VAEs: a third pass). `bias_residual(x, residual, biases, scale)` computes (residual + x + sum(biases)) *
scale, the biases per channel, reading x and the residual once and writing once, in float32 rounded once, for x
(N, C, *spatial) in NCHW or channels-last (`group_norm.flat_strides`); the residual must have x's shape and
strides. `pab.vae_kernels` uses it at the end of each ResnetBlock2D of a VAE decoder, where conv2 (and a 1x1
shortcut conv) leave their biases to it.

`subpixel_interleave(y, bias, out)` writes a nearest-2x upsampler's output from the 2x2 convolution that computes
its four phases at low resolution (`pab.vae_kernels.SubpixelUpsampleHook`): one read of each phase, the bias, one
write, where PyTorch's strided copies took four passes over the output.

With `stats=True` each program covers `group_norm.EPILOGUE_TILES` tiles and writes their per-channel (mean, M2)
of the rounded output: the next resnet's first norm reads these instead of the tensor.
"""

from __future__ import annotations

import torch

from pab.kernels.group_norm import MAX_CHANNELS, Partials, epilogue_chunks, flat_strides

try:
    import triton
    import triton.language as tl

    from pab.kernels.group_norm import shifted_sums, store_partials
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
    x: torch.Tensor, residual: torch.Tensor, biases: tuple[torch.Tensor | None, ...] = (), scale: float = 1.0,
    stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Partials]:  # fmt: skip
    """(residual + x + sum of the (C,) `biases`) * scale, in x's layout; with `stats`, also its `Partials`.
    ValueError for what it does not `take`."""
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
    N, P = x.shape[0], x[0, 0].numel()
    if x.numel() == 0:
        return (out, Partials(x.new_empty((N, 0, 2, C), dtype=torch.float32), 1)) if stats else out
    block_p, block_c, chunk, chunks = epilogue_chunks(P, C, stats)
    part = torch.empty(N, chunks, 2, C, device=x.device, dtype=torch.float32) if stats else x
    b0 = biases[0] if biases else x  # placeholder pointers where there is no bias
    b1 = biases[1] if len(biases) > 1 else x
    _bias_residual_kernel[(chunks, N)](
        x, residual, out, b0, b1, part, P, C, chunk, *flat_strides(x), float(scale), NB=len(biases), STATS=stats,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_p * block_c <= 4096 else 8,
    )  # fmt: skip
    return (out, Partials(part, chunk)) if stats else out


def subpixel_interleave(
    y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, stats: bool = False
) -> Partials | None:  # fmt: skip
    """Fill `out` (N, C, 2H, 2W), dense in NCHW or channels-last, with out[:, c, 2i + a, 2j + b] =
    y[:, (2a + b) C + c, i + a, j + b] + bias[c] from y (N, 4C, >= H + 1, >= W + 1) in any strides; with `stats`,
    return out's `Partials`. ValueError for shapes it does not take."""
    n, c, h2, w2 = out.shape
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
    P = h2 * w2
    if out.numel() == 0:
        return Partials(out.new_empty((n, 0, 2, c), dtype=torch.float32), 1) if stats else None
    block_p, block_c, chunk, chunks = epilogue_chunks(P, c, stats)
    part = torch.empty(n, chunks, 2, c, device=out.device, dtype=torch.float32) if stats else out
    _interleave_kernel[(chunks, n)](
        y, bias if bias is not None else out, out, part, P, c, w2, chunk, *y.stride(), *flat_strides(out),
        HAS_B=bias is not None, STATS=stats, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=4 if block_p * block_c <= 4096 else 8,
    )  # fmt: skip
    return Partials(part, chunk) if stats else None


if triton is not None:

    @triton.jit
    def _bias_residual_kernel(
        x_ptr, r_ptr, y_ptr, b0_ptr, b1_ptr, part_ptr, P, C, CHUNK, s_n, s_p, s_c, scale, NB: tl.constexpr,
        STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        b = tl.zeros([BLOCK_C], tl.float32)
        if NB > 0:
            b += tl.load(b0_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
            if NB > 1:
                b += tl.load(b1_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        start = blk * CHUNK
        here = tl.minimum(P - start, CHUNK)  # pixels in this chunk (>= 1)
        rows = tl.arange(0, BLOCK_P)
        shift = tl.zeros([BLOCK_C], tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for i in range(0, CHUNK, BLOCK_P):
            m = ((i + rows) < here)[:, None] & cmask[None, :]
            offs = n * s_n + (start + i + rows).to(tl.int64)[:, None] * s_p + cs[None, :] * s_c
            r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y = ((r + tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + b[None, :]) * scale).to(
                y_ptr.dtype.element_ty
            )
            tl.store(y_ptr + offs, y, mask=m)
            if STATS:  # of the rounded output, which is what the norm would read
                yf = tl.where(m, y.to(tl.float32), 0.0)
                if i == 0:  # the shift: the first tile's channel means
                    shift = tl.sum(yf, axis=0) / tl.minimum(here, BLOCK_P).to(tl.float32)
                s1, s2 = shifted_sums(yf, m, shift, s1, s2)
        if STATS:
            store_partials(part_ptr, n, blk, tl.num_programs(0), C, cs, cmask, shift, s1, s2, here)

    @triton.jit
    def _interleave_kernel(
        y_ptr, b_ptr, o_ptr, part_ptr, P, C, W2, CHUNK, y_n, y_c, y_h, y_w, o_n, o_p, o_c, HAS_B: tl.constexpr,
        STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        b = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            b += tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        start = blk * CHUNK
        here = tl.minimum(P - start, CHUNK)
        rows = tl.arange(0, BLOCK_P)
        shift = tl.zeros([BLOCK_C], tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for i in range(0, CHUNK, BLOCK_P):
            ps = (start + i + rows).to(tl.int64)
            m = ((i + rows) < here)[:, None] & cmask[None, :]
            oy = ps // W2
            ox = ps % W2
            a = oy % 2
            bb = ox % 2
            # Output pixel (2i + a, 2j + b) is phase 2a + b's value at low-resolution pixel (i + a, j + b).
            src = n * y_n + ((2 * a + bb) * C)[:, None] * y_c + cs[None, :] * y_c + (oy // 2 + a)[:, None] * y_h \
                + (ox // 2 + bb)[:, None] * y_w  # fmt: skip
            v = (tl.load(y_ptr + src, mask=m, other=0.0).to(tl.float32) + b[None, :]).to(o_ptr.dtype.element_ty)
            tl.store(o_ptr + n * o_n + ps[:, None] * o_p + cs[None, :] * o_c, v, mask=m)
            if STATS:
                vf = tl.where(m, v.to(tl.float32), 0.0)
                if i == 0:
                    shift = tl.sum(vf, axis=0) / tl.minimum(here, BLOCK_P).to(tl.float32)
                s1, s2 = shifted_sums(vf, m, shift, s1, s2)
        if STATS:
            store_partials(part_ptr, n, blk, tl.num_programs(0), C, cs, cmask, shift, s1, s2, here)
