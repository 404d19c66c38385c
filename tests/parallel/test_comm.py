"""DSP primitives: frame layouts, the uneven all-to-all switch, gathers, CFG split/gather, launch_local.

Multi-process checks run on gloo with 2 and 3 processes; each launch runs many cases, because
starting processes (importing torch) costs far more than the cases themselves on 2 shared cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pab.parallel import LaunchError, ParallelConfig, init_parallel, launch_local
from pab.parallel.comm import FrameLayout, FrameShard, even_frames, even_sizes
from pab.parallel.context import CommStats

# ------------------------------------------------------------------------------------------------
# Single-process bookkeeping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames,size,counts",
    [(5, 2, (3, 2)), (7, 3, (3, 2, 2)), (6, 3, (2, 2, 2)), (2, 3, (1, 1, 0)), (1, 2, (1, 0)), (4, 1, (4,))],
)
def test_frame_layout_counts_match_tensor_split(frames, size, counts):
    layout = FrameLayout(frames, size)
    assert layout.counts == counts
    assert [len(c) for c in torch.arange(frames).tensor_split(size)] == list(counts)
    assert layout.starts == tuple(sum(counts[:r]) for r in range(size))
    assert all(layout.local_len(r) == max(c, 1) for r, c in enumerate(counts))


def test_split_covers_every_frame_once_and_pads_empty_ranks():
    x = torch.arange(2 * 3 * 5).view(2, 3, 5)
    for size in (1, 2, 3, 4, 7):
        layout = FrameLayout(5, size)
        parts = [FrameShard(layout, r).split(x, 2) for r in range(size)]
        real = torch.cat([p[..., : layout.counts[r]] for r, p in enumerate(parts)], dim=2)
        assert torch.equal(real, x)
        for r, p in enumerate(parts):
            assert p.shape[2] == layout.local_len(r)
            if layout.counts[r] == 0:  # pad frame = copy of the last frame
                assert torch.equal(p[..., 0], x[..., -1])


def test_split_flat_is_split_on_the_unfolded_dim():
    B, T = 2, 5
    bias = torch.randn(B * T, 1, 4)
    layout = FrameLayout(T, 3)
    for r in range(3):
        flat = FrameShard(layout, r).split_flat(bias, 0, B)
        ref = FrameShard(layout, r).split(bias.view(B, T, 1, 4), 1).reshape(-1, 1, 4)
        assert torch.equal(flat, ref)


def test_layout_and_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least one frame"):
        FrameLayout(0, 2)
    with pytest.raises(ValueError, match=r"sp\(2\) \* cfg\(2\) = 4 != world_size\(3\)"):
        ParallelConfig(sp=2, cfg=2).check_world_size(3)
    with pytest.raises(ValueError, match="cfg must be 1"):
        ParallelConfig(sp=1, cfg=3)
    with pytest.raises(ValueError, match="sp must be a positive int"):
        ParallelConfig(sp=0)
    with pytest.raises(ValueError, match="overlap_chunks must be a positive int"):
        ParallelConfig(sp=2, overlap_chunks=0)


def test_single_device_context_needs_no_process_group():
    ctx = init_parallel(ParallelConfig())
    assert not dist.is_initialized()
    assert (ctx.rank, ctx.world_size, ctx.sp_size, ctx.cfg_size) == (0, 1, 1, 1)
    x = torch.randn(4, 3)
    assert ctx.split_cfg(x) is x and ctx.gather_cfg(x) is x


# ------------------------------------------------------------------------------------------------
# Multi-process
# ------------------------------------------------------------------------------------------------

# (rows R = B·S, frames T, channels): uneven rows and frames, fewer rows or frames than ranks, T = 1.
SWITCH_CASES = [(7, 5, 4), (6, 6, 3), (2, 5, 4), (1, 2, 2), (6, 1, 3), (5, 7, 2), (0, 3, 2)]


def _switch_and_gather_worker(rank: int, world: int) -> dict[str, int]:
    ctx = init_parallel(ParallelConfig(sp=world))
    assert (ctx.sp_rank, ctx.sp_size, ctx.cfg_size) == (rank, world, 1)
    stats = CommStats()
    expected_bytes = 0
    for R, T, C in SWITCH_CASES:
        full = torch.arange(R * T * C, dtype=torch.float32).view(R, T, C)
        layout = FrameLayout(T, world)
        shard = FrameShard(layout, rank, ctx.sp_group, stats)
        bare = FrameShard(layout, rank, ctx.sp_group)  # no stats: the calls below are not counted
        local = shard.split(full, 1)
        rows = even_sizes(R, world)
        row0 = sum(rows[:rank])

        switched = shard.to_full(local)
        assert torch.equal(switched, full[row0 : row0 + rows[rank]]), (R, T, C)

        # a position-dependent function of the full sequence, then back to local frames
        y = switched * 2 + torch.arange(T, dtype=torch.float32)[None, :, None]
        back = shard.to_local(y, R)
        ref = full * 2 + torch.arange(T, dtype=torch.float32)[None, :, None]
        assert back.shape == local.shape, (back.shape, local.shape)
        n = layout.counts[rank]
        assert torch.equal(back[:, :n], shard.split(ref, 1)[:, :n]), (R, T, C)

        # bytes this rank sent off-rank: its real frames of the other ranks' rows, then the other ranks' frames
        # of its rows
        expected_bytes += 4 * C * (n * (R - rows[rank]) + rows[rank] * (T - n))

        # The started halves, with other collectives in between and the result written into `out`.
        finish_in = bare.start_to_full(local)
        finish_other = bare.start_to_full(local * 3)
        assert torch.equal(finish_in(), switched) and torch.equal(finish_other(), switched * 3)
        out = torch.full((R, max(n, 1), C), float("nan"))  # ignored by a rank without frames
        got = bare.start_to_local(y, R, out=out)()  # every rank joins
        assert torch.equal(got, back), (R, T, C)
        assert n == 0 or (got.data_ptr() == out.data_ptr() and torch.equal(out, back)), (R, T, C)

        # Frame blocks (T divisible by the group): (rows_r, N, T/N, C) views of the receive buffer, answered
        # either in place of the buffer's layout (sent as it lies) or as a plain tensor (packed by a copy).
        blocks = bare.start_to_full(local, blocks=True)()
        if even_frames(layout):
            assert blocks.shape == (rows[rank], world, T // world, C) and blocks.transpose(0, 1).is_contiguous()
            assert torch.equal(blocks.reshape(rows[rank], T, C), switched), (R, T, C)
            y_blocks = blocks * 2 + torch.arange(T, dtype=torch.float32).view(1, world, T // world, 1)
            for answer in (y_blocks, y_blocks.contiguous()):
                got = bare.start_to_local(answer, R, blocks=True)()
                assert torch.equal(got, back), (R, T, C)
        else:  # uneven frames: the plain layout, and blocks=True on the way back changes nothing
            assert torch.equal(blocks, switched), (R, T, C)
            got = bare.start_to_local(y, R, blocks=True)()
            assert torch.equal(got, back), (R, T, C)

    # Output gather along T of (B, C, T, H, W), uneven and padded.
    for T in (1, 2, 5, 7):
        video = torch.randn(2, 3, T, 3, 5, generator=torch.Generator().manual_seed(T))
        shard = FrameShard(FrameLayout(T, world), rank, ctx.sp_group, stats)
        assert torch.equal(shard.gather(shard.split(video, 2), 2), video)
    assert stats.all_to_all_done == 2 * len(SWITCH_CASES)
    assert stats.all_to_all_bytes == expected_bytes
    return {"bytes": stats.all_to_all_bytes}


@pytest.mark.parametrize("world", [2, 3])
def test_switch_and_gather_are_exact(world):
    out = launch_local(world, _switch_and_gather_worker, backend="gloo")
    assert len(out) == world and all(o["bytes"] > 0 for o in out)


def _cfg_worker(rank: int, world: int) -> None:
    ctx = init_parallel(ParallelConfig(sp=world // 2, cfg=2))
    sp = world // 2
    assert ctx.cfg_rank == rank // sp and ctx.sp_rank == rank % sp
    batch = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)  # [cond0, cond1, uncond0, uncond1]
    half = ctx.split_cfg(batch)
    assert torch.equal(half, batch[2 * ctx.cfg_rank : 2 * ctx.cfg_rank + 2])
    assert torch.equal(ctx.gather_cfg(half * 10), batch * 10)
    assert ctx.split_cfg(batch[:1]) is not None and ctx.split_cfg(batch[:1]).shape == (1, 3)
    with pytest.raises(ValueError, match="not divisible by cfg=2"):
        ctx.split_cfg(batch[:3])
    if sp > 1:  # the sp group holds exactly the ranks of this CFG half
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=ctx.sp_group)
        assert t.item() == sum(range(ctx.cfg_rank * sp, ctx.cfg_rank * sp + sp))
    assert ctx.stats.cfg_gather_bytes == 2 * 3 * 4


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_cfg_split_and_gather_restore_cond_uncond_order(world):
    launch_local(world, _cfg_worker, backend="gloo")


def _tensor_worker(rank: int, world: int) -> dict:
    return {"rank": rank, "t": torch.full((3,), float(rank)), "big": torch.arange(1 << 16) * rank}


def test_launch_local_returns_tensors_after_the_ranks_exit():
    """A tensor put on the queue as-is travelled as a handle to the rank's shared memory, gone once it exited:
    the parent's get failed with "Connection reset by peer"."""
    out = launch_local(2, _tensor_worker, backend="gloo")
    for rank, o in enumerate(out):
        assert o["rank"] == rank and torch.equal(o["t"], torch.full((3,), float(rank)))
        assert torch.equal(o["big"], torch.arange(1 << 16) * rank)


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits for rank 1 forever; the launcher must stop it


def test_launch_local_reports_the_failing_rank_and_stops_the_others():
    with pytest.raises(LaunchError, match="rank 1 failed") as info:
        launch_local(2, _failing_worker, backend="gloo", timeout_s=120)
    assert info.value.rank == 1
    assert "boom on purpose" in str(info.value)


def _world_mismatch_worker(rank: int, world: int) -> None:
    init_parallel(ParallelConfig(sp=world + 1))


def test_init_parallel_rejects_a_config_that_does_not_fill_the_world():
    with pytest.raises(LaunchError, match=r"sp\(3\) \* cfg\(1\) = 3 != world_size\(2\)"):
        launch_local(2, _world_mismatch_worker, backend="gloo", timeout_s=120)


def test_init_parallel_outside_a_launched_group_says_how_to_launch_one(monkeypatch):
    """Called in a plain process, torch's "MASTER_ADDR expected" said nothing of launch_local or torchrun."""
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="needs its process group: run the function under pab.parallel.launch_local"):
        init_parallel(ParallelConfig(sp=2))
    assert not dist.is_initialized()
