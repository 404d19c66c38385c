"""Process groups for one video-generation group: sequence parallel (DSP) x CFG parallel.

A group of `world = sp * cfg` processes renders one video. Ranks are laid out CFG-major,

    rank = cfg_rank * sp + sp_rank

so the `sp` ranks that split one video's frames are neighbours (on one host they share NVLink first),
and the two CFG halves are `sp` ranks apart. `init_parallel` builds both kinds of groups and returns a
`ParallelContext`; nothing here is global, so several contexts may coexist in tests.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """Degrees of parallelism for one generation group.

    Args:
        sp (`int`, defaults to 1):
            Sequence-parallel degree: the frames of one video are split over `sp` processes (DSP).
        cfg (`int`, defaults to 1):
            CFG-parallel degree, 1 or 2: with 2, the conditional and unconditional halves of the
            classifier-free-guidance batch run on two sub-groups of `sp` processes each.
        overlap_chunks (`int`, defaults to 1):
            Each temporal attention is switched and computed in this many chunks of rows, so that one
            chunk's all-to-all runs while the previous chunk attends (same result; more, smaller kernels).
    """

    sp: int = 1
    cfg: int = 1
    overlap_chunks: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sp, int) or self.sp < 1:
            raise ValueError(f"sp must be a positive int, got {self.sp!r}")
        if not isinstance(self.overlap_chunks, int) or self.overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be a positive int, got {self.overlap_chunks!r}")
        if self.cfg not in (1, 2):
            raise ValueError(
                f"cfg must be 1 (no CFG parallelism) or 2 (conditional and unconditional halves on two "
                f"sub-groups), got {self.cfg!r}"
            )

    @property
    def world_size(self) -> int:
        """Processes needed: sp * cfg."""
        return self.sp * self.cfg

    def check_world_size(self, world_size: int) -> None:
        """Raise unless `sp * cfg` equals `world_size`."""
        if self.world_size != world_size:
            raise ValueError(
                f"sp({self.sp}) * cfg({self.cfg}) = {self.world_size} != world_size({world_size}); "
                f"choose sp and cfg whose product is the number of processes in the group"
            )


@dataclass
class CommStats:
    """Communication done by one rank, summed until `reset()` (the pipeline resets per generation).

    All-to-alls are the DSP switches around temporal attention (two per computed temporal module).
    A temporal attention that PAB broadcasts is not called, so its two switches are counted as
    skipped; see `pab.parallel.dsp` for how that is detected. Bytes count tensor bytes this rank sent
    to other ranks (its own chunk stays local and is not counted).
    """

    forwards: int = 0
    all_to_all_done: int = 0
    all_to_all_skipped: int = 0
    all_to_all_bytes: int = 0
    gather_bytes: int = 0
    cfg_gather_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        return self.all_to_all_bytes + self.gather_bytes + self.cfg_gather_bytes

    def reset(self) -> None:
        for name in ("forwards", "all_to_all_done", "all_to_all_skipped", "all_to_all_bytes", "gather_bytes",
                     "cfg_gather_bytes"):
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {
            "forwards": self.forwards,
            "all_to_all_done": self.all_to_all_done,
            "all_to_all_skipped": self.all_to_all_skipped,
            "all_to_all_bytes": self.all_to_all_bytes,
            "gather_bytes": self.gather_bytes,
            "cfg_gather_bytes": self.cfg_gather_bytes,
            "bytes_moved": self.bytes_moved,
        }


@dataclass
class ParallelContext:
    """Where this process sits in its generation group, and the groups to talk over.

    `sp_group` / `cfg_group` are `None` when their size is 1 (nothing to communicate), so a
    single-device context needs no `torch.distributed` at all.
    """

    config: ParallelConfig
    rank: int = 0
    world_size: int = 1
    sp_group: dist.ProcessGroup | None = None
    sp_rank: int = 0
    sp_size: int = 1
    cfg_group: dist.ProcessGroup | None = None
    cfg_rank: int = 0
    cfg_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: CommStats = field(default_factory=CommStats)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def split_cfg(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's CFG half of a `[cond, uncond]` batch (dim 0): cfg rank 0 takes cond, rank 1 uncond.

        Identity when `cfg == 1`. A batch of size 1 (shared by both halves, e.g. a broadcast
        timestep) is returned unchanged.
        """
        if self.cfg_size == 1 or batch.size(0) == 1:
            return batch
        if batch.size(0) % self.cfg_size != 0:
            raise ValueError(
                f"CFG parallelism splits the batch into [cond, uncond] halves, but dim 0 has size {batch.size(0)}, "
                f"which is not divisible by cfg={self.cfg_size}; pass the conditional and unconditional inputs "
                f"concatenated along dim 0"
            )
        return batch.chunk(self.cfg_size, dim=0)[self.cfg_rank]

    def gather_cfg(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every CFG rank's `local` output along dim 0 in [cond, uncond] order (all ranks get it)."""
        if self.cfg_size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.cfg_size)]
        dist.all_gather(parts, local, group=self.cfg_group)
        self.stats.cfg_gather_bytes += local.numel() * local.element_size() * (self.cfg_size - 1)
        return torch.cat(parts, dim=0)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(
    config: ParallelConfig,
    backend: str | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Join (or reuse) the default process group and build the sequence- and CFG-parallel groups.

    Args:
        config (`ParallelConfig`): the degrees; `config.sp * config.cfg` must equal the world size.
        backend (`str`, *optional*): `"nccl"` when CUDA is available, else `"gloo"`.
        init_method (`str`, *optional*): e.g. `"tcp://10.0.0.1:29500"`; defaults to `"env://"`
            (`MASTER_ADDR`/`MASTER_PORT`).
        rank, world_size (`int`, *optional*): this process's rank and the group size, when not in the
            environment.
        timeout_s (`float`): collective timeout.

    If `torch.distributed` is already initialised (Ray actors and `launch_local` do it), the existing
    default group is used and `backend`/`init_method` are ignored. A `ParallelConfig()` of world 1 with no
    process group returns a single-device context without initialising anything.

    Every process of the group must call this, in the same order as any other `new_group` calls.

    Example:
        ```python
        ctx = init_parallel(ParallelConfig(sp=2), init_method="tcp://127.0.0.1:29500", rank=r, world_size=2)
        parallelize_model(model, ctx)
        ```
    """
    device = torch.device("cpu")
    if not dist.is_initialized():
        if config.world_size == 1 and init_method is None and (world_size in (None, 1)):
            return ParallelContext(config=config, device=device)
        env = os.environ
        if init_method is None and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise RuntimeError(
                f"init_parallel({config}) needs its process group: run the function under pab.parallel.launch_local "
                "(launch_local(n, fn) spawns n processes on this machine), under torchrun (it sets MASTER_ADDR, "
                "MASTER_PORT, RANK and WORLD_SIZE), or pass init_method='tcp://HOST:PORT' with rank and world_size"
            )
        backend = backend or _default_backend()
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank if rank is not None else int(os.environ.get("RANK", "0")),
            world_size=world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    this_rank, this_world = dist.get_rank(), dist.get_world_size()
    config.check_world_size(this_world)
    if dist.get_backend() == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", this_rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)

    sp, cfg = config.sp, config.cfg
    cfg_rank, sp_rank = divmod(this_rank, sp)
    # The sp groups: one per CFG half, its sp neighbouring ranks; the cfg groups: one per sp rank, the ranks
    # `sp` apart.
    sp_group = _my_group([[c * sp + s for s in range(sp)] for c in range(cfg)], mine=cfg_rank)
    cfg_group = _my_group([[c * sp + s for c in range(cfg)] for s in range(sp)], mine=sp_rank)
    return ParallelContext(config=config, rank=this_rank, world_size=this_world, device=device,
                           sp_group=sp_group, sp_rank=sp_rank, sp_size=sp,
                           cfg_group=cfg_group, cfg_rank=cfg_rank, cfg_size=cfg)  # fmt: skip


def _my_group(groups: list[list[int]], mine: int) -> dist.ProcessGroup | None:
    """Create the process groups of these rank lists and return this rank's, the `mine`-th.

    Every rank must enter `new_group` for every group, in the same order, so all are created here. Groups of
    one rank need no process group (None); a single group holding the whole world is WORLD itself.
    """
    if len(groups[0]) == 1:
        return None
    if len(groups) == 1:
        return dist.group.WORLD
    return [dist.new_group(ranks) for ranks in groups][mine]
