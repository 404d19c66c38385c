"""DSP communication primitives: frame layouts, the uneven all-to-all switch, split and gather along T.

Vocabulary: "dim" is a tensor dimension; T is the number of latent frames of the whole video; N is the
sequence-parallel group size; rank r holds the frames `[start_r, start_r + count_r)`.

Uneven splits, not padding to a multiple of N, carry the real frames: `count_r = T // N + (r < T % N)`,
the same sizes as `torch.tensor_split`. Only a rank that would get no frame at all (T < N) carries one
*pad* frame (a copy of frame T-1) so every module sees a non-empty input. Pad frames are never sent by
the switch and never gathered, and every operation outside temporal attention is frame-local, so they
cannot change the result.

All functions are inference-only (no autograd through the collectives).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
import torch.distributed as dist

from pab.parallel.context import CommStats


@dataclass(frozen=True)
class FrameLayout:
    """How `num_frames` frames are spread over `size` ranks (the frame bookkeeping of one forward)."""

    num_frames: int
    size: int

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"a video needs at least one frame, got num_frames={self.num_frames}")
        if self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """Real frames held by each rank."""
        return tuple(even_sizes(self.num_frames, self.size))

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Global index of each rank's first frame."""
        out, s = [], 0
        for c in self.counts:
            out.append(s)
            s += c
        return tuple(out)

    def local_len(self, rank: int) -> int:
        """Frames rank `rank` holds locally, including its pad frame if it has no real frame."""
        return max(self.counts[rank], 1)

    def local_range(self, rank: int) -> tuple[int, int]:
        """(first frame, frames) that `rank` holds locally: its real frames, or the last frame as its pad frame."""
        if self.counts[rank] > 0:
            return self.starts[rank], self.counts[rank]
        return self.num_frames - 1, 1


def even_frames(layout: FrameLayout) -> bool:
    """Whether every rank holds the same (non-zero) number of frames: frame blocks apply."""
    return layout.num_frames % layout.size == 0


def even_sizes(total: int, parts: int) -> list[int]:
    """`torch.tensor_split`-style chunk sizes of `total` over `parts` (the first `total % parts` get one more)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _start_all_to_all(
    send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], shard: FrameShard,
    recv: torch.Tensor | None = None, count: bool = True,
) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """Start sending `send`'s consecutive pieces of `send_sizes` elements to ranks 0..N-1.

    Returns the flat receive buffer (`recv`, or a new one), which will hold what rank j sent in its j-th
    piece of `recv_sizes`, and the collective's work handle: wait on it before reading the buffer. NCCL and
    gloo both take uneven sizes and empty pieces. `count`: add one to `stats.all_to_all_done` (a switch
    run in chunks counts once); bytes are always added.
    """
    recv = send.new_empty(sum(recv_sizes)) if recv is None else recv.view(-1)
    work = dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                                  group=shard.group, async_op=True)  # fmt: skip
    if shard.stats is not None:
        shard.stats.all_to_all_done += int(count)
        shard.stats.all_to_all_bytes += (send.numel() - send_sizes[shard.rank]) * send.element_size()
    return recv, work


# Each switch touches the local tensor as few times as the layouts allow (at 720p on 2 GPUs it is ~250 MB,
# 56 switches a step): the forward switch sends straight from its input (no copy unless a pad frame must
# be left out) and interleaves the frames it receives in one copy; the backward switch packs its send
# buffer in one copy and returns the receive buffer itself, which is already in the local layout.
#
# With `blocks=True` (every rank holding the same number of frames), the forward switch skips its copy too:
# it returns the receive buffer as frame blocks, (R_rank, N, T/N, *rest) = a transposed view of the
# (N, R_rank, T/N, *rest) buffer, block j holding rank j's frames. An attention that reads that layout
# (STDiT3's and Latte's attention, `accepts_frame_blocks`) answers in it, and the backward switch sends the
# answer as it lies: a switch pair then copies nothing.
#
# Each switch comes in two halves: `start_*` launches the all-to-all and returns a function that waits for
# it (on GPUs the wait is the compute stream waiting for NCCL's, not the host) and assembles the result.
# Between the two, the caller can run other work: `pab.parallel.dsp` overlaps one chunk's all-to-all
# with the previous chunk's attention.


@dataclass(frozen=True)
class FrameShard:
    """One rank's part of a `FrameLayout` and how it trades frames with the rest of its group.

    `group` is the sequence-parallel process group (None: the default group); `stats`, when given, counts
    the bytes and collectives. Splitting needs no communication; `gather` and the switches are collectives
    that every rank of the group must enter with the same layout.
    """

    layout: FrameLayout
    rank: int
    group: dist.ProcessGroup | None = None
    stats: CommStats | None = None

    @property
    def count(self) -> int:
        """Real frames this rank holds (0 when it holds only a pad frame)."""
        return self.layout.counts[self.rank]

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's frames of `x` along `dim` (no communication)."""
        layout = self.layout
        if x.size(dim) != layout.num_frames:
            raise ValueError(f"expected {layout.num_frames} frames along dim {dim}, got shape {tuple(x.shape)}")
        # A narrow, also for a pad frame: no index tensor to copy to the GPU, which a CUDA graph could not capture.
        return x.narrow(dim, *layout.local_range(self.rank))

    def split_flat(self, x: torch.Tensor, dim: int, batch: int) -> torch.Tensor:
        """Like `split` for a dim that folds (batch, frames) sample-major, e.g. rows b*T + t."""
        frames = self.layout.num_frames
        if x.size(dim) != batch * frames:
            raise ValueError(f"expected dim {dim} of size batch*frames = {batch}*{frames}, got shape {tuple(x.shape)}")
        shape = list(x.shape)
        local = self.split(x.reshape(shape[:dim] + [batch, frames] + shape[dim + 1:]), dim + 1)
        return local.reshape(shape[:dim] + [-1] + shape[dim + 1:])

    def gather(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's real frames along `dim`; every rank receives the whole video.

        `all_gather` needs equal shapes, so each rank pads its part to the longest local length; the pads
        (and pad frames) are dropped after the gather.
        """
        layout, rank = self.layout, self.rank
        if layout.size == 1:
            return local
        if local.size(dim) != layout.local_len(rank):
            raise ValueError(f"rank {rank} should hold {layout.local_len(rank)} frames along dim {dim}, got shape "
                             f"{tuple(local.shape)}")  # fmt: skip
        longest = max(layout.local_len(r) for r in range(layout.size))
        if local.size(dim) < longest:
            pad_shape = list(local.shape)
            pad_shape[dim] = longest - local.size(dim)
            local = torch.cat([local, local.new_zeros(pad_shape)], dim=dim)
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(layout.size)]
        dist.all_gather(parts, local, group=self.group)
        if self.stats is not None:
            self.stats.gather_bytes += local.numel() * local.element_size() * (layout.size - 1)
        return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, layout.counts)], dim=dim)

    def to_full(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T_local, *rest) split on frames -> (R_rank, T, *rest) split on rows (dim 0). One all-to-all.

        Rows are spread with `even_sizes(R, N)`; only real frames are sent (pad frames stay behind).
        """
        return self.start_to_full(x)()

    def start_to_full(self, x: torch.Tensor, count: bool = True, blocks: bool = False) -> Callable[[], torch.Tensor]:
        """`to_full`, started: returns the function that finishes it. `blocks`: finish with frame blocks
        (R_rank, N, T/N, *rest) instead of (R_rank, T, *rest) when every rank holds T/N frames."""
        layout, rank = self.layout, self.rank
        rows = even_sizes(x.size(0), layout.size)
        rest = tuple(x.shape[2:])
        inner = int(torch.Size(rest).numel())
        # (R, count_r, *rest) split on dim 0 is consecutive ranges of the flat tensor: a view when x is contiguous
        send = x.narrow(1, 0, self.count).reshape(-1)
        send_sizes = [r * self.count * inner for r in rows]
        recv_sizes = [rows[rank] * c * inner for c in layout.counts]
        recv, work = _start_all_to_all(send, send_sizes, recv_sizes, self, count=count)

        def finish() -> torch.Tensor:
            work.wait()
            if blocks and even_frames(layout):
                return recv.view(layout.size, rows[rank], layout.counts[0], *rest).transpose(0, 1)
            received = [chunk.view(rows[rank], c, *rest) for chunk, c in zip(recv.split(recv_sizes), layout.counts)]
            return torch.cat(received, dim=1)

        return finish

    def to_local(self, y: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Inverse of `to_full`: (R_rank, T, *rest) -> (R, T_local, *rest). One all-to-all.

        `num_rows` is R, the row count before the forward switch. A rank without real frames gets zeros
        in its pad frame.
        """
        return self.start_to_local(y, num_rows)()

    def start_to_local(
        self, y: torch.Tensor, num_rows: int, out: torch.Tensor | None = None, count: bool = True,
        blocks: bool = False,
    ) -> Callable[[], torch.Tensor]:  # fmt: skip
        """`to_local`, started: returns the function that finishes it. `out`, a contiguous (num_rows, T_local,
        *rest) tensor, receives the result in place (when this rank has real frames). `blocks`: `y` is frame
        blocks (R_rank, N, T/N, *rest), as `start_to_full(blocks=True)` returned them; if it is a transposed
        view of a contiguous (N, R_rank, T/N, *rest), it is sent as it lies."""
        layout, rank = self.layout, self.rank
        rows = even_sizes(num_rows, layout.size)
        blocked = blocks and even_frames(layout)
        lead = (rows[rank], layout.size, layout.counts[0]) if blocked else (rows[rank], layout.num_frames)
        if tuple(y.shape[: len(lead)]) != lead:
            raise ValueError(f"rank {rank} expected {'frame blocks ' if blocked else ''}({', '.join(map(str, lead))}, "
                             f"...) after temporal attention, got {tuple(y.shape)}")
        rest = tuple(y.shape[len(lead):])
        inner = int(torch.Size(rest).numel())
        send_sizes = [rows[rank] * c * inner for c in layout.counts]
        if blocked and y.transpose(0, 1).is_contiguous():
            send = y.transpose(0, 1).reshape(-1)  # a view: block j is rank j's frames of all our rows
        elif blocked:
            send = y.new_empty(y.numel())
            send.view(layout.size, rows[rank], layout.counts[0], *rest).copy_(y.transpose(0, 1))
        else:
            send = y.new_empty(y.numel())
            for piece, slot in zip(y.split(list(layout.counts), dim=1), send.split(send_sizes)):
                slot.view(piece.shape).copy_(piece)  # frames of rank j, all rows: one strided copy each
        recv_sizes = [r * self.count * inner for r in rows]
        if self.count == 0:
            out = None  # nothing arrives; the result is a zero pad frame
        recv, work = _start_all_to_all(send, send_sizes, recv_sizes, self, recv=out, count=count)

        def finish() -> torch.Tensor:
            work.wait()
            if self.count == 0:
                return y.new_zeros((num_rows, 1, *rest))
            # rank j sent rows [sum(rows[:j]), +rows[j]) of our frames, in order: the buffer is (R, count_r, *rest)
            return recv.view(num_rows, self.count, *rest)

        return finish
