"""GPU groups on Ray: one STRICT_PACK placement group of N GPU bundles, one rank actor per bundle.

    group = GpuGroup("opensora-v1.2", size=2, checkpoint="s3://ckpt/opensora-v1.2")
    group.start()                                   # actors, rendezvous, process group, model load
    result = group.generate({"prompt": "a red fox", "steps": 30}, on_progress=lambda s, n: print(s, n))
    group.health()                                  # pings every rank; GroupFailed if one is gone
    group.shutdown()

Each rank actor holds a `actors.worker.GenerationWorker` (no Ray in it). Rank 0 picks the rendezvous
address (loopback when the whole group is on one node, as it is under STRICT_PACK) and opens its store there;
every rank then joins one torch.distributed group (NCCL on GPUs, gloo on CPU).

Failure model: a group renders one video at a time. If any rank dies or hangs, the group is *broken*:
`generate` raises `GroupFailed` at once (the surviving ranks would wait in a collective forever), the
actors are killed, and `health()` keeps raising until `rebuild()` (or, under Serve, until the replica
is replaced: its `check_health` calls `health()`). A request the model rejects raises
`GenerationError` on every rank and leaves the group healthy. Storage refusing rank 0's video raises
`pab.storage.StorageUnavailable` and leaves the group healthy too: a new group would not help.

Placement: outside Serve the group makes its own placement group (`placement_group="new"`, removed by
`shutdown`), STRICT_PACK unless `placement_strategy` says otherwise ("PACK" lets a group larger than any node
span several, its all-to-alls then crossing the network). Inside a Serve replica that owns a placement group
(`placement_group_bundles`), pass `placement_group="current"`; `group_bundles()` computes the bundles for the
deployment.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.placement_group import (
    placement_group as make_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.worker import GenerationWorker, VideoOutput
from pab.errors import GenerationCancelled  # raised as is when every rank stopped at the same step
from pab.seeds import draw_seed
from pab.storage import StorageUnavailable

log = logging.getLogger(__name__)


PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")  # Ray's, for the bundles of one group


class GroupError(RuntimeError):
    """Base of the errors a group raises."""


class GroupFailed(GroupError):
    """A rank died, hung or lost its peers: the group is broken and must be rebuilt. Retry elsewhere."""


class GroupUnavailable(GroupError):
    """The group is broken or not started; nothing was attempted, so a retry costs nothing."""


class GenerationError(GroupError):
    """The request failed the same way on every rank (e.g. the model cannot take it); the group is fine."""


def group_bundles(
    size: int,
    gpus_per_rank: float = 1.0,
    cpus_per_rank: float = 1.0,
    first_bundle_extra_cpus: float = 0.0,
    resources: dict[str, float] | None = None,
) -> list[dict[str, float]]:
    """Placement-group bundles for one group: one per rank, the driver's CPUs and any custom `resources`
    added to bundle 0 (a STRICT_PACK group is on one node, so bundle 0 choosing the node places it all).

    Under Serve the replica actor runs in bundle 0 (with `ray_actor_options={"num_cpus":
    first_bundle_extra_cpus, "num_gpus": 0}`), rank i runs in bundle i.

    >>> group_bundles(2, cpus_per_rank=1, first_bundle_extra_cpus=0.5)
    [{'GPU': 1.0, 'CPU': 1.5}, {'GPU': 1.0, 'CPU': 1.0}]
    """
    bundles = []
    for i in range(size):
        b: dict[str, float] = {}
        if gpus_per_rank:
            b["GPU"] = float(gpus_per_rank)
        cpus = cpus_per_rank + (first_bundle_extra_cpus if i == 0 else 0.0)
        if cpus:
            b["CPU"] = float(cpus)
        if i == 0:
            b.update({k: float(v) for k, v in (resources or {}).items()})
        bundles.append(b)
    return bundles


class RankWorker:
    """The Ray actor around one `GenerationWorker`: adds node info, the rendezvous store and error mapping.

    Threaded (`max_concurrency` > 1) so `health`, `progress` and `cancel` answer while `generate`
    runs in another thread.
    """

    def __init__(self, **worker_kwargs: Any) -> None:
        import os

        # One process per GPU: torch's default of one thread per core would oversubscribe the host.
        if "OMP_NUM_THREADS" in os.environ:
            import torch

            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        self.worker = GenerationWorker(**worker_kwargs)
        self._token: str | None = None
        self._cancel_token: str | None = None
        self._events: list[tuple[int, int]] = []

    def node_info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.worker.device}

    def host_store(self, host: str) -> int:
        return self.worker.host_store(host)

    def init_distributed(self, init_method: str | None) -> None:
        self.worker.init_distributed(init_method)

    def load(self) -> dict[str, Any]:
        return self.worker.load()

    def generate(self, request: dict[str, Any], output: dict[str, Any] | None, token: str) -> dict[str, Any]:
        # Progress and cancellation are keyed by the group's generation token, so a late call for an
        # earlier video (or an early one for this video) can never mix two generations up.
        self._token, self._events = token, []
        return self.worker.generate(
            request,
            progress_cb=lambda step, total: self._events.append((step, total)),
            cancel_cb=lambda: self._cancel_token == token,
            output=VideoOutput(**output) if output else None,
        )

    def progress(self, token: str, since: int) -> list[tuple[int, int]]:
        return list(self._events[since:]) if self._token == token else []

    def cancel(self, token: str) -> None:
        self._cancel_token = token

    def health(self) -> dict[str, Any]:
        return self.worker.health()

    def shutdown(self) -> None:
        self.worker.shutdown()


_RankActor = ray.remote(RankWorker)


def pending_reason(pg: PlacementGroup) -> str:
    """Why Ray has not placed `pg` yet, in the operator's terms: what it needs against the largest node."""
    try:
        table = placement_group_table(pg)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception as e:  # noqa: BLE001 - a reason is a courtesy; the wait goes on without one
        return f"placement group pending ({e})"
    return _explain(table, nodes)


def infeasible_groups(name_prefix: str) -> dict[str, str]:
    """Placement groups named `name_prefix...` that no node of the cluster can hold now (Ray: INFEASIBLE): name ->
    why. Serve names a replica's placement group after the replica, `SERVE_REPLICA::<app>#<deployment>#<id>`."""
    tables = placement_group_table()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {t["name"]: _explain(t, nodes) for t in tables.values()
            if (t.get("name") or "").startswith(name_prefix) and _state(t) == "INFEASIBLE"}  # fmt: skip


def _state(table: dict[str, Any]) -> str:
    return (table.get("stats") or {}).get("scheduling_state") or table.get("state", "PENDING")


def _explain(table: dict[str, Any], nodes: list[dict[str, float]]) -> str:
    state = _state(table)
    need: dict[str, float] = {}
    for bundle in (table.get("bundles") or {}).values():
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    want = " and ".join(f"{v:g} {k}" for k, v in sorted(need.items()))
    largest = " and ".join(f"{max((n.get(k, 0.0) for n in nodes), default=0.0):g} {k}" for k in sorted(need))
    packed = table.get("strategy") == "STRICT_PACK"
    where = "on one node" if packed else "in all"
    rule = "STRICT_PACK keeps a group's ranks on one node; " if packed else ""
    if state == "INFEASIBLE":
        return (f"no node of the cluster can hold the group: it needs {want} {where}, the largest node has "
                f"{largest} ({rule}Ray: INFEASIBLE until a larger node joins, e.g. from the autoscaler)")  # fmt: skip
    return f"the group needs {want} {where}, and the nodes that could hold it are busy (Ray: {state})"


class GpuGroup:
    """N rank actors that render one video at a time together (DSP + PAB inside the engine).

    Args:
        model: model name, e.g. "opensora-v1.2" or "latte-1-tiny".
        size: ranks (GPUs) in the group.
        checkpoint: None (random weights), a local folder, "s3://bucket/prefix" or a Hugging Face repo id.
        vae, text_encoder: a part's own source (same forms); None = the checkpoint's.
        device: "auto" (a GPU when the rank actor sees one, else CPU), "cpu" or "cuda".
        dtype: engine dtype name, or None for its default.
        cfg_parallel: split the CFG halves over two halves of the group (even sizes only).
        gpus_per_rank, cpus_per_rank: resources of each rank actor (they fit its bundle).
        placement_group: "new" (make one, of `placement_strategy`), "current" (the caller's, e.g. a Serve
            replica's) or a `PlacementGroup`.
        placement_strategy: of a "new" placement group: "STRICT_PACK" (every rank on one node: DSP's
            all-to-alls stay on the node's links), "PACK" (one node when one can hold the group, else several)
            or "SPREAD". A group that must not cross nodes keeps STRICT_PACK and fails naming it.
        bundle_offset: index of rank 0's bundle in that placement group.
        s3: StorageConfig fields for reaching an S3 checkpoint (endpoint, credentials).
        cache_dir: local checkpoint cache on each node.
        engine_factory: the worker's engine factory ("module:function" or a picklable callable).
        engine_options: keyword arguments the factory gets besides the model's (e.g. {"cuda_graphs": True}).
        name: prefix of the group's name `<name>-<group id>` (default "pab-group"); its rank actors are
            named `<group name>-rank<i>`. A rebuilt group gets a new id, so names never collide.
        start_timeout_s: limit for placement, model load and rendezvous.
        dist_timeout_s: collective timeout inside the group.
        hang_grace_s: after one rank fails with an error, how long the others may take to finish
            before the group is declared broken.
    """

    def __init__(
        self,
        model: str,
        size: int = 1,
        *,
        checkpoint: str | None = None,
        vae: str | None = None,
        text_encoder: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        cfg_parallel: bool = False,
        gpus_per_rank: float = 1.0,
        cpus_per_rank: float = 1.0,
        placement_group: str | PlacementGroup = "new",
        placement_strategy: str = "STRICT_PACK",
        bundle_offset: int = 0,
        s3: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        engine_factory: Callable[..., Any] | str | None = None,
        engine_options: dict[str, Any] | None = None,
        name: str | None = None,
        start_timeout_s: float = 900.0,
        dist_timeout_s: float = 600.0,
        hang_grace_s: float = 30.0,
        poll_s: float = 0.1,
        busy_wait_s: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"a group needs at least one rank, got size={size}")
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}")
        self.model, self.size = model, size
        self.group_id = uuid.uuid4().hex[:8]
        self._prefix = name or "pab-group"
        self.name = f"{self._prefix}-{self.group_id}"
        self._worker_kwargs = dict(
            world_size=size, model=model, checkpoint=checkpoint, vae=vae, text_encoder=text_encoder, device=device,
            dtype=dtype,
            cfg_parallel=cfg_parallel, cache_dir=cache_dir, s3=s3, engine_factory=engine_factory,
            engine_options=engine_options, dist_timeout_s=dist_timeout_s,
        )
        self.gpus_per_rank, self.cpus_per_rank = gpus_per_rank, cpus_per_rank
        self._pg_arg, self.bundle_offset = placement_group, bundle_offset
        self.placement_strategy = placement_strategy
        self.start_timeout_s, self.hang_grace_s, self.poll_s = start_timeout_s, hang_grace_s, poll_s
        self.busy_wait_s = busy_wait_s
        self.pg: PlacementGroup | None = None
        self._own_pg = False
        self.ranks: list[Any] = []
        self.broken: str | None = "not started"
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()  # one video at a time
        self._cancel = threading.Event()
        self._generation = 0

    # ------------------------------------------------------------------ lifecycle

    def _placement_group(self) -> PlacementGroup:
        if isinstance(self._pg_arg, PlacementGroup):
            return self._pg_arg
        if self._pg_arg == "current":
            pg = get_current_placement_group()
            if pg is None:
                raise GroupError("placement_group='current' but this process runs in no placement group")
            return pg
        if self._pg_arg != "new":
            raise ValueError(f"placement_group must be 'new', 'current' or a PlacementGroup, got {self._pg_arg!r}")
        bundles = group_bundles(self.size, self.gpus_per_rank, self.cpus_per_rank)
        pg = make_placement_group(bundles, strategy=self.placement_strategy, name=f"{self.name}-pg")
        deadline, said = time.monotonic() + self.start_timeout_s, ""
        while not pg.wait(timeout_seconds=max(0.0, min(5.0, deadline - time.monotonic()))):
            why = pending_reason(pg)
            if why != said:  # in the log at once (and when it changes), not only after the whole wait
                log.warning("group %s waits for resources: %s", self.name, why)
                said = why
            if time.monotonic() >= deadline:
                remove_placement_group(pg)
                raise GroupError(f"group {self.name} got no resources in {self.start_timeout_s:g}s: {why}; "
                                 "see `ray status`")  # fmt: skip
        self._own_pg = True
        return pg

    def start(self) -> dict[str, Any]:
        """Place the rank actors, join their process group and load the model on every rank."""
        if self.ranks:
            raise GroupError("group already started; call rebuild() to replace it")
        t0 = time.perf_counter()
        self.pg = self.pg or self._placement_group()
        try:
            self.ranks = [
                _RankActor.options(
                    name=f"{self.name}-rank{i}",
                    num_cpus=self.cpus_per_rank,
                    num_gpus=self.gpus_per_rank,
                    max_concurrency=4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=self.bundle_offset + i,
                        placement_group_capture_child_tasks=True,
                    ),
                ).remote(rank=i, **self._worker_kwargs)
                for i in range(self.size)
            ]
            nodes = ray.get([r.node_info.remote() for r in self.ranks], timeout=self.start_timeout_s)
            init_method = None
            if self.size > 1:
                # NCCL and gloo both bind rank 0's TCP store; a group on one node talks over loopback
                # (a node may have several addresses, loopback is always right there).
                one_node = len({n["node_id"] for n in nodes}) == 1
                host = "127.0.0.1" if one_node else nodes[0]["ip"]
                port = ray.get(self.ranks[0].host_store.remote(host), timeout=60)
                init_method = f"tcp://{host}:{port}"
                ray.get([r.init_distributed.remote(init_method) for r in self.ranks], timeout=self.start_timeout_s)
            loads = ray.get([r.load.remote() for r in self.ranks], timeout=self.start_timeout_s)
        except BaseException as e:
            self._kill_ranks()
            self.broken = f"start failed: {e}"
            raise GroupFailed(f"group {self.name} failed to start: {e}") from e
        self.broken = None
        self.info = {"group_id": self.group_id, "name": self.name, "size": self.size, "model": self.model,
                     "namespace": ray.get_runtime_context().namespace,  # of the named rank actors
                     "init_method": init_method, "nodes": nodes, "load": loads,
                     "start_s": time.perf_counter() - t0}
        log.info("group %s up: %d rank(s) of %s in %.1fs", self.name, self.size, self.model, self.info["start_s"])
        return self.info

    def _kill_ranks(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        self.ranks = []

    def _fail(self, reason: str) -> GroupFailed:
        self.broken = reason
        log.error("group %s broken: %s", self.name, reason)
        self._kill_ranks()
        return GroupFailed(f"group {self.name}: {reason}")

    def shutdown(self) -> None:
        """Stop the rank actors (leaving their process group) and remove a placement group we made."""
        if self.ranks:
            try:
                ray.get([r.shutdown.remote() for r in self.ranks], timeout=10)
            except Exception:  # noqa: BLE001 - best effort, the kill follows
                pass
        self._kill_ranks()
        if self._own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg, self._own_pg = None, False
        self.broken = "shut down"

    def rebuild(self) -> dict[str, Any]:
        """Replace every rank actor (same placement group) after a failure.

        Right after a node is lost, the placement group still holds its bundles there until the GCS declares
        the node dead (seconds; 15 s by Ray's defaults) and moves them: new ranks placed in them die before they
        start. Such a start (a rank actor died) is tried again until `start_timeout_s` has passed; any other
        failure (the model does not load, say) is raised at once.
        """
        deadline, delay = time.monotonic() + self.start_timeout_s, 1.0
        while True:
            self._kill_ranks()
            self.group_id = uuid.uuid4().hex[:8]
            self.name = f"{self._prefix}-{self.group_id}"
            try:
                return self.start()
            except GroupFailed as e:
                if not isinstance(e.__cause__, RayActorError) or time.monotonic() + delay > deadline:
                    raise
                log.warning("group %s: a new rank died before it started (%s); its node may be lost and not yet "
                            "declared dead: again in %.0fs", self.name, _first_line(e.__cause__), delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    # ------------------------------------------------------------------ health

    def health(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Ping every rank. Raises GroupFailed (and breaks the group) if any is dead or silent."""
        if self.broken:
            raise GroupFailed(f"group {self.name} is broken: {self.broken}")
        refs = [r.health.remote() for r in self.ranks]
        try:
            reports = ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise self._fail(f"a rank did not answer the health check within {timeout_s}s") from None
        except RayActorError as e:
            raise self._fail(f"a rank died: {e}") from None
        return {"group": self.name, "size": self.size, "ranks": reports}

    # ------------------------------------------------------------------ generation

    def cancel(self) -> None:
        """Stop the running generation at its next denoising step."""
        self._cancel.set()

    def generate(
        self,
        request: dict[str, Any],
        on_progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        output: VideoOutput | dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Render one video on all ranks; rank 0's result (mp4 bytes, or where `output` stored it).

        `on_progress(step, total)` is called once per denoising step, in order, from this thread.
        `should_cancel()` is polled; when it returns True every rank stops at the same next step and
        GenerationCancelled is raised. Raises GroupFailed if a rank dies or the group hangs (past
        `timeout_s`), GroupUnavailable if the group is broken already, GenerationError if the request
        fails on every rank, StorageUnavailable if the video was rendered but storage did not take it.
        """
        if self.broken:
            raise GroupUnavailable(f"group {self.name} is broken: {self.broken}")
        # A video whose call was dropped (cancelled, deleted) stops at its next step, not at once: the next one waits
        # for that rather than being refused and sent round again.
        if not self._lock.acquire(timeout=self.busy_wait_s):
            raise GroupUnavailable(f"group {self.name} is still rendering another video after {self.busy_wait_s:g} s: "
                                   "one at a time")
        try:
            return self._generate(dict(request), on_progress, should_cancel, output, timeout_s)
        finally:
            self._lock.release()

    def _generate(self, request, on_progress, should_cancel, output, timeout_s) -> dict[str, Any]:
        self._cancel.clear()
        self._generation += 1
        if request.get("seed") is None:
            request["seed"] = draw_seed()  # before any rank sees it: every rank must draw the same noise
        if isinstance(output, VideoOutput):
            output = {"storage": output.storage, "video_id": output.video_id, "sidecar": output.sidecar}
        token = f"{self.group_id}:{self._generation}"
        t0 = time.monotonic()
        refs = [r.generate.remote(request, output if i == 0 else None, token) for i, r in enumerate(self.ranks)]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        first_error_at: float | None = None
        seen = 0
        progress_ref = self.ranks[0].progress.remote(token, 0)
        cancel_sent = False
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            for ref in ready:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:
                    if self.broken:  # the health check found a rank silent or dead and stopped the ranks: its why
                        raise GroupFailed(f"group {self.name}: {self.broken}") from None
                    raise self._fail(f"rank {i} died during a generation: {_first_line(e)}") from None
                except RayTaskError as e:
                    errors[i] = e.cause if getattr(e, "cause", None) is not None else e
                    first_error_at = first_error_at or time.monotonic()
            # Progress: rank 0 keeps every (step, total) of this generation; forward new ones in order.
            if ray.wait([progress_ref], timeout=0)[0]:
                seen = self._forward_progress(progress_ref, seen, on_progress)
                progress_ref = self.ranks[0].progress.remote(token, seen)
            if not cancel_sent and (self._cancel.is_set() or (should_cancel is not None and should_cancel())):
                for r in self.ranks:
                    r.cancel.remote(token)  # every rank: they agree on the stop step with an all-reduce
                cancel_sent = True
            if pending and first_error_at is not None and time.monotonic() - first_error_at > self.hang_grace_s:
                i, e = next(iter(errors.items()))
                raise self._fail(f"rank {i} failed ({_first_line(e)}) and the other ranks hung")
            if pending and timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise self._fail(f"generation did not finish within {timeout_s}s")
        if errors:
            outcome = self._judge(errors, self.size)
            if isinstance(outcome, str):
                raise self._fail(outcome)
            raise outcome
        seen = self._forward_progress(progress_ref, seen, on_progress)
        self._forward_progress(self.ranks[0].progress.remote(token, seen), seen, on_progress)
        result = results[0]
        result.setdefault("timings", {})["group_s"] = time.monotonic() - t0
        result["group"] = {**result.get("group", {}), "name": self.name, "size": self.size}
        return result

    @staticmethod
    def _judge(errors: dict[int, BaseException], size: int) -> BaseException | str:
        """What a generation whose ranks all returned, some with `errors`, raises; a str: the group broke, why."""
        if all(isinstance(e, GenerationCancelled) for e in errors.values()) and len(errors) == size:
            return GenerationCancelled(str(errors[0]))  # unwrapped from Ray's RayTaskError
        if list(errors) == [0] and isinstance(errors[0], GenerationCancelled):
            return errors[0]  # every rank denoised in step; rank 0 alone decodes, and stopped there
        if list(errors) == [0] and isinstance(errors[0], StorageUnavailable):
            return errors[0]  # every rank rendered in step; only rank 0's upload failed
        if len(errors) == size:
            return GenerationError(_first_line(errors[0]))
        # Some ranks finished and some raised: their states have diverged, trust none of them.
        i, e = next(iter(errors.items()))
        return f"rank {i} failed alone ({_first_line(e)})"

    def _forward_progress(self, ref, seen: int, on_progress) -> int:
        try:
            events = ray.get(ref, timeout=60)
        except (RayActorError, GetTimeoutError) as e:
            raise self._fail(f"rank 0 stopped answering during a generation: {_first_line(e)}") from None
        if on_progress is not None:
            for step, total in events:
                on_progress(step, total)
        return seen + len(events)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's wrapped errors put the original "Type: message" last.
    return clip(f"{type(e).__name__}: {lines[-1] if lines else text}")


def clip(text: str, limit: int = 500) -> str:
    """`text` in at most `limit` characters, cut between words with an ellipsis (not "or another unex")."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut).rstrip(" ,;:") + "…"
