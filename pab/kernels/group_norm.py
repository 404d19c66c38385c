"""GroupNorm, optionally followed by SiLU, as Triton kernels that read either memory layout.

The VAE decoders run GroupNorm -> SiLU -> 3x3 conv at every resolution (at Open-Sora 480p, 51 frames of
128 channels at 480x856 in the last stage). PyTorch runs the norm and the SiLU as separate passes, and its
GroupNorm wants NCHW, while Hopper's cuDNN convolutions want channels-last (NHWC): an eager decoder either
keeps NCHW convolutions or pays for layout copies around every norm (`bench.vae`'s channels-last variant was
slower than NCHW). `torch.compile` of the 2D decoder, which fuses these passes, took the decode from 1.45 to
0.90 s on an H200 but compiles for about a minute at each new size.

`group_norm(x, groups, weight, bias, eps, silu=True)` takes x (N, C, *spatial) in NCHW or channels-last (any
layout whose spatial dims flatten to one stride) and writes the output in the same layout, in three launches.
`input_bias` (C,) normalises x + input_bias without that sum being written: PyTorch adds a convolution's bias in
a pass of its own after cuDNN's kernel, so a conv whose output goes only into a norm can leave it to the norm
(`pab.vae_kernels`). A per-channel constant moves each channel's mean and leaves its M2 alone, so it costs two
adds per channel.

1. statistics: each program reduces a chunk of pixels of one sample to per-channel (mean, M2). Every lane
   sums x - K and (x - K)^2 over its pixels, K being the chunk's first tile's channel means, and the lanes are
   reduced once at the end. The shift keeps a large mean from cancelling the variance as E[x^2] - E[x]^2
   would, and there is no cross-warp reduction per tile (a per-tile Welford merge made this kernel ~3x the
   apply kernel's time on an H100);
2. finalize: one program per (sample, group) merges its channels' chunks (Chan's formula) into the group's
   mean and 1/std;
3. apply: normalise, scale and shift per channel, SiLU, one write.

Everything is computed in float32 and rounded once. Half precision on CUDA is the default use (`supported`);
the tests run the same kernels in Triton's CPU interpreter against `F.group_norm`. `pab.vae_kernels` attaches
them (on by default: Open-Sora's 480p decode went from 1.45 to 0.83 s on an H200 with these kernels, and to 0.54 s
on an H100 with the conv folds beside them, `python -m bench.vae`).
"""

from __future__ import annotations

import warnings

import torch

from pab.kernels import no_grad_needed

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

MAX_CHANNELS = 1024  # a tile holds a pixel's channels; wider inputs keep PyTorch's kernel
TILE = 8192  # elements a program holds at once (BLOCK_P x BLOCK_C)
# The statistics kernel keeps two float32 running sums of its tile, so its tile is half as large, over 8 warps (16
# elements of each sum a thread), and it aims for about one wave of programs over the batch: on an H100, Open-Sora's
# 480p decode spent 58 ms in it with 8,192-element tiles and 1,024 programs, 43 ms with these (`bench.vae
# --variants channels-last+gn-kernel+stile8192+sprog1024,channels-last+gn-kernel`); 2,048 programs took 74 ms.
STATS_TILE = 4096
STATS_PROGRAMS = 512
FINALIZE_CHUNKS = 64  # chunks the finalize kernel merges per loop iteration


def flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(sample, pixel, channel) strides of x (N, C, *spatial) seen as (N, P, C), or None when its spatial
    dims do not flatten to one stride (a sliced or permuted view). NCHW gives (C·P, 1, P), channels-last
    (C·P, C, 1)."""
    if x.ndim < 3:
        return None
    dims = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size > 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return x.stride(0), (dims[-1][1] if dims else 1), x.stride(1)


def pixel_block(P: int, block_c: int, tile: int | None = None) -> int:
    """Pixels a program's tile holds: about `tile` (TILE) elements of `block_c` channels each, at most P rounded
    up to a power of two, at least one."""
    return max(1, min((tile or TILE) // block_c, triton.next_power_of_2(P)))


def fits(channels: int, num_groups: int) -> bool:
    """Whether the kernels take this many channels and groups (see MAX_CHANNELS)."""
    return triton is not None and channels <= MAX_CHANNELS and channels % num_groups == 0


def takes(x: torch.Tensor, num_groups: int) -> bool:
    """Whether the kernels can take `x` at all, on any device: channels and groups that `fit`, < 2^31 elements,
    and a layout they read (`flat_strides`)."""
    return x.ndim >= 3 and fits(x.shape[1], num_groups) and x.numel() < 2**31 and flat_strides(x) is not None


def supported(x: torch.Tensor, num_groups: int) -> bool:
    """Whether a GroupNorm on `x` should take the kernels: CUDA, half precision, no autograd, and `takes`."""
    return (
        triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and no_grad_needed(x)
        and takes(x, num_groups)
    )  # fmt: skip


_BUILD_ERROR: Exception | None = None  # set once when the kernels cannot be built on this machine
_CHECKED = False  # they were built and launched once in this process


def available(x: torch.Tensor, num_groups: int) -> bool:
    """`supported`, and (once per process) a tiny launch worked. A failed build (e.g. no C compiler for Triton's
    launcher) warns once and leaves the norms on PyTorch's kernel."""
    global _BUILD_ERROR, _CHECKED
    if _BUILD_ERROR is not None or not supported(x, num_groups):
        return False
    if not _CHECKED:
        try:
            group_norm(torch.ones(1, 2, 3, device=x.device, dtype=x.dtype), 1, None, None, 1e-6, silu=True)
            _CHECKED = True
        except (RuntimeError, ImportError, OSError) as e:
            warnings.warn(f"Triton GroupNorm kernels unavailable ({type(e).__name__}: {e}); using PyTorch",
                          stacklevel=2)  # fmt: skip
            _BUILD_ERROR = e
    return _BUILD_ERROR is None


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    silu: bool = False, input_bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """F.group_norm(x + input_bias[:, None, ...], num_groups, weight, bias, eps), then SiLU if `silu`, for x
    (N, C, *spatial); the output has x's layout. Raises ValueError for shapes the kernels do not take (see
    `supported`)."""
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    if not fits(C, num_groups):
        raise ValueError(f"group_norm kernels take at most {MAX_CHANNELS} channels; got {C}")
    strides = flat_strides(x)
    if strides is None:
        raise ValueError(
            f"group_norm kernels take (N, C, *spatial) with flattenable spatial dims; got "
            f"{tuple(x.shape)}, strides {x.stride()}"
        )
    for name, p in (("weight", weight), ("bias", bias), ("input_bias", input_bias)):
        if p is not None and (p.shape != (C,) or not p.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({C},) tensor; got {tuple(p.shape)}")
    out = torch.empty_like(x)  # same layout: dense inputs keep their strides
    if x.numel() == 0:
        return out
    P = x[0, 0].numel()
    o_strides = flat_strides(out)
    block_c = triton.next_power_of_2(C)
    block_p, stats_p = pixel_block(P, block_c), pixel_block(P, block_c, STATS_TILE)
    # Statistics: chunks of whole tiles, about STATS_PROGRAMS programs over the batch.
    chunks = max(1, min(triton.cdiv(STATS_PROGRAMS, N), triton.cdiv(P, stats_p)))
    chunk = stats_p * triton.cdiv(triton.cdiv(P, chunks), stats_p)
    chunks = triton.cdiv(P, chunk)
    partial = torch.empty(N, chunks, 2, C, device=x.device, dtype=torch.float32)
    warps = 4 if block_p * block_c <= 4096 else 8
    ib = input_bias if input_bias is not None else partial  # a placeholder pointer when there is none
    _stats_kernel[(N, chunks)](
        x, ib, partial, P, C, chunk, *strides, HAS_IB=input_bias is not None, BLOCK_P=stats_p, BLOCK_C=block_c,
        num_warps=8 if stats_p * block_c >= 2048 else 4,
    )  # fmt: skip
    mean = torch.empty(N, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    cpg = C // num_groups
    block_cpg = triton.next_power_of_2(cpg)
    _finalize_kernel[(N, num_groups)](partial, mean, rstd, P, C, cpg, num_groups, chunks, chunk, eps,
                                      BLOCK_B=max(1, min(FINALIZE_CHUNKS, TILE // block_cpg)), BLOCK_CPG=block_cpg,
                                      num_warps=4)  # fmt: skip
    w = weight if weight is not None else mean  # a placeholder pointer when there is no affine part
    b = bias if bias is not None else mean
    # Pixel blocks on the grid's first axis: it takes 2^31 - 1 programs, the others 65,535 (1080p at 512 channels
    # is 130k blocks a frame).
    _apply_kernel[(triton.cdiv(P, block_p), N)](
        x, out, w, b, ib, mean, rstd, P, C, cpg, num_groups, *strides, *o_strides,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_IB=input_bias is not None, SILU=silu,
        BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _stats_kernel(
        x_ptr, ib_ptr, part_ptr, P, C, CHUNK, s_n, s_p, s_c, HAS_IB: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        chunks = tl.num_programs(1)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        start = blk * CHUNK
        here = tl.minimum(P - start, CHUNK)  # pixels in this chunk (>= 1)
        rows = tl.arange(0, BLOCK_P)
        base = x_ptr + n * s_n + cs[None, :] * s_c
        # The shift K: the first tile's channel means (any value near the mean keeps the sums small).
        m = (rows < here)[:, None] & cmask[None, :]
        x = tl.load(base + (start + rows).to(tl.int64)[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
        shift = tl.sum(x, axis=0) / tl.minimum(here, BLOCK_P).to(tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for i in range(0, CHUNK, BLOCK_P):
            m = ((i + rows) < here)[:, None] & cmask[None, :]
            x = tl.load(base + (start + i + rows).to(tl.int64)[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
        cnt = here.to(tl.float32)
        t1 = tl.sum(s1, axis=0)
        mean = shift + t1 / cnt
        if HAS_IB:  # the mean of x + b is the mean of x plus b; M2 does not move
            mean += tl.load(ib_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        m2 = tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / cnt, 0.0)
        out = part_ptr + ((n * chunks + blk) * 2) * C
        tl.store(out + cs, mean, mask=cmask)
        tl.store(out + C + cs, m2, mask=cmask)

    @triton.jit
    def _finalize_kernel(
        part_ptr, mean_ptr, rstd_ptr, P, C, CPG, G, CHUNKS, CHUNK, eps,
        BLOCK_B: tl.constexpr, BLOCK_CPG: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        ks = tl.arange(0, BLOCK_CPG)
        cs = g * CPG + ks  # this group's channels
        cmask = ks < CPG
        total = (P * CPG).to(tl.float32)
        acc = tl.zeros([BLOCK_CPG], tl.float32)
        for b0 in range(0, CHUNKS, BLOCK_B):  # the group's pixel sum, from its channels' chunk means
            bs = b0 + tl.arange(0, BLOCK_B)
            m = (bs < CHUNKS)[:, None] & cmask[None, :]
            cnt = tl.minimum(P - bs * CHUNK, CHUNK).to(tl.float32)
            mu = tl.load(part_ptr + ((n * CHUNKS + bs) * 2)[:, None] * C + cs[None, :], mask=m, other=0.0)
            acc += tl.sum(tl.where(m, cnt[:, None] * mu, 0.0), axis=0)
        mean = tl.sum(acc, axis=0) / total
        acc = tl.zeros([BLOCK_CPG], tl.float32)
        for b0 in range(0, CHUNKS, BLOCK_B):  # M2: each chunk's, plus its mean's distance from the group's
            bs = b0 + tl.arange(0, BLOCK_B)
            m = (bs < CHUNKS)[:, None] & cmask[None, :]
            cnt = tl.minimum(P - bs * CHUNK, CHUNK).to(tl.float32)
            row = ((n * CHUNKS + bs) * 2)[:, None] * C + cs[None, :]
            mu = tl.load(part_ptr + row, mask=m, other=0.0)
            m2 = tl.load(part_ptr + row + C, mask=m, other=0.0)
            d = mu - mean
            acc += tl.sum(tl.where(m, m2 + cnt[:, None] * d * d, 0.0), axis=0)
        var = tl.sum(acc, axis=0) / total
        tl.store(mean_ptr + n * G + g, mean)
        tl.store(rstd_ptr + n * G + g, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def pixel_tile(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of a (pixel blocks, N) grid: sample, pixel and channel indices, and the masks."""
        n = tl.program_id(1).to(tl.int64)
        ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < C
        return n, ps, cs, cmask, (ps < P)[:, None] & cmask[None, :]

    @triton.jit
    def _apply_kernel(
        x_ptr, y_ptr, w_ptr, b_ptr, ib_ptr, mean_ptr, rstd_ptr, P, C, CPG, G, s_n, s_p, s_c, o_n, o_p, o_c,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, ps, cs, cmask, m = pixel_tile(P, C, BLOCK_P, BLOCK_C)
        grp = cs // CPG
        mu = tl.load(mean_ptr + n * G + grp, mask=cmask, other=0.0)
        scale = tl.load(rstd_ptr + n * G + grp, mask=cmask, other=0.0)
        if HAS_W:
            scale = scale * tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        shift = -mu * scale  # (x - mu) * rstd * w + b = x * scale + shift
        if HAS_IB:  # (x + ib) * scale + shift
            shift += tl.load(ib_ptr + cs, mask=cmask, other=0.0).to(tl.float32) * scale
        if HAS_B:
            shift += tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + n * s_n + ps[:, None] * s_p + cs[None, :] * s_c, mask=m, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + n * o_n + ps[:, None] * o_p + cs[None, :] * o_c, y.to(y_ptr.dtype.element_ty), mask=m)
