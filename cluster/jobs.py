"""Durable job records in the object store: nothing about a job lives only in a replica's memory.

Layout under the storage root. Each object has one writer at a time, except where a job changes hands: an
ingress replica taking a job over (or dispatching it again) and a group claiming it write the record only if it is
still the version they read (`JobStore.save(..., if_unchanged=True)`), so of two that act on one job at once
exactly one goes on (`RecordChanged` tells the other to leave it). The group's later writes (progress, outcome) are
conditional on the version it wrote last, so a group whose job left it stops instead of writing over its successor.

    jobs/records/<id>.json   the job (`JobRecord`). The ingress writes it when it creates and
                             (re)dispatches the job; the group running it writes it while it runs.
    jobs/active/<id>         present while the job is not finished (cheap to list on restart).
    jobs/cancel/<id>         a cancel request (written by POST .../cancel and DELETE; the group stops at
                             the next step).
    jobs/deleted/<id>.json   a deleted job's tombstone {"at"}: a render that was finishing as the job was
                             deleted may write its record or video after; the ingress sweeps them away
                             while the tombstone lasts (`JobStore.sweep_deleted`).
    jobs/idempotency/<h>.json  {"job_id", "request", "at"}: the job a POST with an `Idempotency-Key` created; h
                             is a hash of the key and the API key that sent it. Bound by a conditional write,
                             so of two replicas given the same POST at once, one creates the job.
    jobs/leases/<id>.json    {"owner", "at"}: refreshed by whoever holds the job (the ingress while it
                             queues it, the group while it renders). A stale lease means nobody
                             holds it any more, so a restarted ingress takes it over. An ingress
                             replica Serve stops marks its queued jobs' leases "released": another
                             replica takes those over a heartbeat later instead.
    jobs/probes/<owner>      written and removed to learn whether storage takes writes again.
    videos/<id>.mp4, .json   the result and its sidecar (`pab.storage.Storage.put_video`).
    videos/<id>.thumbnail.jpg, .spritesheet.jpg   its still images (`GET .../content?variant=`).

Ids are time-ordered (`video_<13 hex ms><12 hex random>`), so key order is creation order.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any, Callable, TypeVar

from pydantic import PrivateAttr

from cluster.api import TERMINAL, Video
from pab.storage import (
    IMAGE_VARIANTS, NotFound, ObjectChanged, Storage, StorageUnavailable, image_key, storage_errors, video_keys,
)  # fmt: skip

RECORDS, ACTIVE, CANCEL, LEASES = "jobs/records/", "jobs/active/", "jobs/cancel/", "jobs/leases/"
PROBES, DELETED, IDEMPOTENCY = "jobs/probes/", "jobs/deleted/", "jobs/idempotency/"
ID_RE = re.compile(r"^video_[0-9a-f]{25}$")
T = TypeVar("T")
log = logging.getLogger("ray.serve")


class RecordChanged(RuntimeError):
    """The job's record changed since it was read: another replica or a group acts on the job; leave it to them."""


def new_job_id() -> str:
    return f"video_{int(time.time() * 1000):013x}{secrets.token_hex(6)}"


def valid_id(job_id: str) -> bool:
    return bool(ID_RE.match(job_id))


class JobRecord(Video):
    """The stored job: the public `Video` plus what the system needs to run and retry it."""

    pool: str  # deployment name of the group pool that runs it
    dispatch: int = 0  # fencing token: bumped at every (re)dispatch; a group runs only the latest
    max_attempts: int = 3
    last_error: str | None = None
    storage_failures: int = 0  # attempts lost because the result (or the record) could not be stored
    updated_at: float = 0.0
    video_key: str | None = None
    # The record keeps fractions of a second (queue and run times come from them); `public` shows whole seconds.
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    _version: str | None = PrivateAttr(None)  # the stored version this copy was read at (`JobStore.get`)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> Video:
        data = self.model_dump(include=set(Video.model_fields))
        for name in _TIMES:
            data[name] = None if data[name] is None else int(data[name])
        return Video(**data)


_TIMES = ("created_at", "started_at", "completed_at")


def _landed(storage: Storage, key: str, data: Any) -> str | None:
    """After a conditional write was refused: the stored version if the object holds exactly what was written (the
    write landed, and a retry of it, botocore's after a timeout, was what the store refused), else None.

    Sound only because `data` is this writer's alone (a record's `updated_at`, a key's `at`). That is why it lives
    here and not in `Storage.put_if`: two writers of the same bytes from one version, such as counters, would both
    read back "their" bytes and both count as the winner (tests/cluster/test_storage.py's increments lose some)."""
    try:
        stored, version = storage.get_json_versioned(key)
    except NotFound:
        return None
    return version if stored == data else None


class JobStore:
    """Job records, cancel requests and leases on a `Storage` backend (blocking calls).

    A backend failure (unreachable, read-only, full, refused) comes out as `StorageUnavailable` naming the
    operation and what to check. `failure` keeps the latest one until a write succeeds: /healthz shows it.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.failure: StorageUnavailable | None = None
        self.failing_since: float | None = None

    def _io(self, what: str, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        try:
            with storage_errors(self.storage.config, what):
                out = fn(*args)
        except StorageUnavailable as e:
            self.failed(e)
            raise
        if write:  # a read alone proves little: a read-only folder still reads
            self.recovered()
        return out

    def failed(self, err: StorageUnavailable) -> None:
        """Note a storage failure (also one a group reported)."""
        if self.failure is None:
            self.failing_since = time.time()
            log.warning("%s", err)
        self.failure = err

    def recovered(self) -> None:
        if self.failure is not None:
            log.info("storage takes writes again, after %.0f s", time.time() - (self.failing_since or time.time()))
        self.failure = self.failing_since = None

    def probe(self, owner: str) -> None:
        """Write and remove one small object: StorageUnavailable unless storage takes writes now."""
        key = f"{PROBES}{owner.replace(':', '-')}"

        def write() -> None:
            self.storage.put_bytes(key, b"")
            self.storage.delete(key)

        self._io("write a probe object", write, write=True)

    # ------------------------------------------------------------------ records

    def create(self, rec: JobRecord) -> None:
        """Write a new job, its active marker first: a failure in between leaves no record that nobody drives."""
        rec.updated_at = time.time()

        def write() -> None:
            self.storage.put_bytes(f"{ACTIVE}{rec.id}", b"")
            try:
                self.storage.put_json(f"{RECORDS}{rec.id}.json", rec.model_dump(mode="json"))
            except BaseException:
                try:
                    self.storage.delete(f"{ACTIVE}{rec.id}")
                except Exception:  # noqa: BLE001 - a marker without a record is skipped by the reconciler
                    pass
                raise

        self._io(f"save the new record of {rec.id}", write, write=True)

    def get(self, job_id: str) -> JobRecord:
        """The stored record, with the version it was read at (what `save(..., if_unchanged=True)` compares)."""
        if not valid_id(job_id):
            raise NotFound(job_id)
        data, version = self._io(f"read the record of {job_id}", self.storage.get_json_versioned,
                                 f"{RECORDS}{job_id}.json")  # fmt: skip
        rec = JobRecord(**data)
        rec._version = version
        return rec

    def save(self, rec: JobRecord, *, if_unchanged: bool = False) -> None:
        """Write the record; a finished job leaves the active set and drops its lease. `if_unchanged`: only if the
        stored record is still the version `rec` was read at (`get`), else RecordChanged and nothing written."""
        rec.updated_at = time.time()
        key = f"{RECORDS}{rec.id}.json"
        if if_unchanged and rec._version is None:
            raise ValueError(f"save(if_unchanged=True) needs a record read by JobStore.get; {rec.id}'s was not")

        def write() -> None:
            if if_unchanged:
                data = rec.model_dump(mode="json")
                try:
                    rec._version = self.storage.put_json_if(key, data, rec._version)
                except ObjectChanged:
                    rec._version = _landed(self.storage, key, data)
                    if rec._version is None:
                        raise RecordChanged(f"the record of {rec.id} changed since it was read") from None
            else:
                self.storage.put_json(key, rec.model_dump(mode="json"))
            if rec.terminal:
                self.storage.delete(f"{ACTIVE}{rec.id}")
                self.storage.delete(f"{LEASES}{rec.id}.json")

        self._io(f"save the record of {rec.id}", write, write=True)

    def retire(self, job_id: str) -> None:
        """Drop a finished job's active marker and lease, which the save that finished it failed to remove."""

        def write() -> None:
            self.storage.delete(f"{ACTIVE}{job_id}")
            self.storage.delete(f"{LEASES}{job_id}.json")

        self._io(f"retire finished {job_id}", write, write=True)

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[JobRecord], bool]:
        """A page of jobs, newest first (desc) or oldest first (asc), strictly after the id `after`."""
        return self._io("list the videos", self._list, limit, after, order)

    def _list(self, limit: int, after: str | None, order: str) -> tuple[list[JobRecord], bool]:
        if order == "asc":
            keys = self.storage.list(RECORDS, start_after=f"{RECORDS}{after}.json" if after else None, limit=limit + 1)
        else:
            keys = self.storage.list(RECORDS)[::-1]
            if after:
                keys = [k for k in keys if k < f"{RECORDS}{after}.json"]
            keys = keys[: limit + 1]
        records = []
        for k in keys[:limit]:
            try:
                records.append(JobRecord(**self.storage.get_json(k)))
            except NotFound:  # deleted between list and get
                continue
        return records, len(keys) > limit

    def active_ids(self) -> list[str]:
        return [k[len(ACTIVE):] for k in self._io("list the unfinished videos", self.storage.list, ACTIVE)]

    # ------------------------------------------------------------------ cancel and leases

    def request_cancel(self, job_id: str) -> None:
        self._io(f"save the cancellation of {job_id}", self.storage.put_bytes, f"{CANCEL}{job_id}", b"", write=True)

    def cancel_requested(self, job_id: str) -> bool:
        return self._io(f"read whether {job_id} is cancelled", self.storage.exists, f"{CANCEL}{job_id}")

    def touch(self, job_id: str, owner: str) -> None:
        lease = {"owner": owner, "at": time.time()}
        self._io(f"refresh the lease of {job_id}", self.storage.put_json, f"{LEASES}{job_id}.json", lease, write=True)

    def release(self, job_id: str, owner: str, version: str) -> bool:
        """Give the job up, if its lease is still the version read (`lease_versioned`): whoever reconciles next may
        take it over (see `VideoAPI._reconcile`). False, and nothing written, if someone touched it since (a group
        that claimed the job keeps it)."""
        lease = {"owner": owner, "at": time.time(), "released": True}
        try:
            self._io(f"release the lease of {job_id}", self.storage.put_json_if, f"{LEASES}{job_id}.json", lease,
                     version, write=True)  # fmt: skip
        except ObjectChanged:
            return False
        return True

    # ------------------------------------------------------------------ deletion and idempotency keys

    @staticmethod
    def _files(job_id: str) -> list[str]:
        """The video, its sidecar and its still images."""
        return [*video_keys(job_id), *(image_key(job_id, v) for v in IMAGE_VARIANTS)]

    def _outputs(self, job_id: str) -> list[str]:
        return [f"{RECORDS}{job_id}.json", f"{ACTIVE}{job_id}", f"{LEASES}{job_id}.json", *self._files(job_id)]

    def delete(self, job_id: str) -> None:
        """Remove the job, its video, sidecar and images. The tombstone goes first (a sweep finishes a delete
        that failed halfway) and the cancel marker stays, so a render still going stops at its next step."""

        def write() -> None:
            self.storage.put_json(f"{DELETED}{job_id}.json", {"at": time.time()})
            self.storage.put_bytes(f"{CANCEL}{job_id}", b"")
            for key in self._outputs(job_id):
                self.storage.delete(key)

        self._io(f"delete {job_id}", write, write=True)

    def discard_outputs(self, job_id: str) -> None:
        """Remove the video, sidecar and images a render stored before its job was cancelled: a cancelled
        video has no content (GET .../content answers 409), so nothing of it is left to pay for."""

        def write() -> None:
            for key in self._files(job_id):
                self.storage.delete(key)

        self._io(f"remove the outputs of cancelled {job_id}", write, write=True)

    def deleted(self, job_id: str) -> bool:
        """Whether the job was deleted (its tombstone is kept a while after; see `sweep_deleted`)."""
        return self._io(f"check whether {job_id} was deleted", self.storage.exists, f"{DELETED}{job_id}.json")

    def sweep_deleted(self, keep_s: float) -> int:
        """Remove what renders finishing after their job's deletion wrote; tombstones older than `keep_s` go
        (with their cancel marker). Returns how many objects were removed."""

        def sweep() -> int:
            removed = 0
            for key in self.storage.list(DELETED):
                job_id = key[len(DELETED):].removesuffix(".json")
                try:
                    at = float(self.storage.get_json(key).get("at", 0))
                except (NotFound, ValueError, AttributeError):
                    at = 0.0
                for k in self._outputs(job_id):
                    if self.storage.exists(k):
                        self.storage.delete(k)
                        removed += 1
                if time.time() - at > keep_s:
                    self.storage.delete(f"{CANCEL}{job_id}")
                    self.storage.delete(key)
            return removed

        return self._io("sweep deleted videos", sweep, write=True)

    def idempotent_job(self, digest: str) -> tuple[dict[str, Any] | None, str | None]:
        """What an idempotency key (its digest) created, {"job_id", "request", "at"}, and the version of that entry;
        (None, None) for a key never seen."""
        try:
            return self._io("read an idempotency key", self.storage.get_json_versioned, f"{IDEMPOTENCY}{digest}.json")
        except NotFound:
            return None, None

    def remember_idempotent(self, digest: str, job_id: str, request_hash: str, version: str | None) -> None:
        """Bind the key to `job_id`, only if its entry is still `version` (None: only if there is none): of two
        requests with one key on two replicas, one creates the video and the other gets RecordChanged."""
        entry, key = {"job_id": job_id, "request": request_hash, "at": time.time()}, f"{IDEMPOTENCY}{digest}.json"
        try:
            self._io("save an idempotency key", self.storage.put_json_if, key, entry, version, write=True)
        except ObjectChanged:
            if self._io("read an idempotency key", _landed, self.storage, key, entry) is None:
                raise RecordChanged("another request with this Idempotency-Key took it meanwhile") from None

    def forget_idempotent(self, digest: str) -> None:
        """Unbind a key whose video could not be created (best effort: storage is failing then)."""
        try:
            self._io("free an idempotency key", self.storage.delete, f"{IDEMPOTENCY}{digest}.json")
        except StorageUnavailable:
            pass  # the key frees itself once it is older than a creation takes

    def lease(self, job_id: str) -> dict[str, Any] | None:
        return self.lease_versioned(job_id)[0]

    def lease_versioned(self, job_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The job's lease and its version; (None, None) if it has none."""
        try:
            return self._io(f"read the lease of {job_id}", self.storage.get_json_versioned, f"{LEASES}{job_id}.json")
        except NotFound:
            return None, None
