"""What a bulk render has already finished, read back from the output storage itself.

There is no separate job database: the output folder/bucket is the record. Each row's files live under
a key derived from its id (``videos/<key>.mp4`` and ``videos/<key>.json``), and the JSON sidecar is
the row's state:

1. just before a row is dispatched, its sidecar is written with ``"state": "rendering"`` and the
   request's fingerprint (the *intent*);
2. the worker writes the mp4, then replaces the sidecar with the full ``"state": "completed"`` record
   (`pab.storage.Storage.put_video` writes the sidecar last).

Each write is a single object PUT (S3) or an atomic rename (local folder), so after a crash at any
moment a re-run sees one of: no sidecar or an intent without a video (render it), an intent *with* a
video (the crash fell between the two writes: the video is complete, so adopt it and write the
completed sidecar, without rendering again), or a completed sidecar (skip). A sidecar whose
fingerprint differs from the manifest's current request (the prompt or settings changed) is rendered
again. Failed rows leave no completed sidecar, so a re-run retries them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pab.storage import IMAGE_VARIANTS, VIDEO_PREFIX, NotFound, Storage, image_key, video_keys
from jobs.manifest import RowPlan

log = logging.getLogger(__name__)

STATE_RENDERING = "rendering"
STATE_COMPLETED = "completed"


@dataclass
class Found:
    """What storage says about one planned row."""

    action: Literal["render", "skip", "adopt"]
    sidecar: dict[str, Any] | None = None
    reason: str = ""


class Ledger:
    """Reads and writes per-row state in the output storage (see the module docstring)."""

    def __init__(self, store: Storage) -> None:
        self.store = store

    # ------------------------------------------------------------------ reading

    def scan(self, plans: list[RowPlan], threads: int = 16) -> dict[int, Found]:
        """For each renderable plan (by row), what to do.

        One listing, then one GET (and one HEAD) per existing sidecar, in parallel: resuming a large
        job is bound by request latency, not bandwidth.
        """
        present = set(self.store.list(VIDEO_PREFIX))

        def judge(plan: RowPlan) -> Found:
            mp4, side = video_keys(plan.key)
            return self._judge(plan, mp4 in present, self._sidecar(side) if side in present else None)

        todo = [p for p in plans if p.ok]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return {p.row: found for p, found in zip(todo, pool.map(judge, todo))}

    def _sidecar(self, key: str) -> dict[str, Any] | None:
        try:
            value = self.store.get_json(key)
        except NotFound:
            return None
        except ValueError:  # not JSON: a foreign or damaged file, never trusted
            log.warning("sidecar %s is not JSON; rendering the row again", key)
            return None
        return value if isinstance(value, dict) else None

    def _judge(self, plan: RowPlan, has_video: bool, sidecar: dict[str, Any] | None) -> Found:
        if sidecar is None:
            return Found("render")
        if sidecar.get("fingerprint") != plan.fingerprint:
            return Found("render", reason="the row's prompt or settings changed since it was rendered")
        state = sidecar.get("state")
        mp4 = video_keys(plan.key)[0]
        if state == STATE_COMPLETED:
            if has_video and self.store.size(mp4) == sidecar.get("size_bytes"):
                return Found("skip", sidecar)
            return Found("render", reason="its sidecar says completed but the video is missing or truncated")
        if state == STATE_RENDERING and has_video:
            return Found("adopt", sidecar, reason="a run stopped after writing the video, before its sidecar")
        return Found("render")

    # ------------------------------------------------------------------ writing

    def mark_rendering(self, plan: RowPlan, run_id: str) -> None:
        """Write the intent sidecar just before the row is dispatched."""
        _, side = video_keys(plan.key)
        self.store.put_json(side, intent(plan, run_id))

    def adopt(self, plan: RowPlan, sidecar: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Complete a row whose video an interrupted run wrote, without rendering it again: the still images
        the run did not get to are made from the mp4, then the sidecar is written (last, as `put_video` does)."""
        mp4, side = video_keys(plan.key)
        images = {v: image_key(plan.key, v) for v in IMAGE_VARIANTS}
        missing = tuple(v for v, key in images.items() if not self.store.exists(key))
        if missing:
            from pab.video import still_images

            video = self.store.local_path(mp4) or self.store.get_bytes(mp4)  # a local file is read where it is
            try:
                made = still_images(video, missing)
            except Exception as e:  # noqa: BLE001 - PyAV's errors vary; the video itself is still complete
                log.warning("row %d id=%r: no %s from its mp4 (%s: %s)", plan.row, plan.id, " or ".join(missing),
                            type(e).__name__, e)
                made = {}
            for v, jpeg in made.items():
                self.store.put_bytes(images[v], jpeg, "image/jpeg")
            images = {v: key for v, key in images.items() if v not in missing or v in made}
        record = {
            **sidecar,
            "state": STATE_COMPLETED,
            "video_key": mp4,
            "size_bytes": self.store.size(mp4),
            "image_keys": images,
            "adopted_by_run": run_id,
            "completed_at": time.time(),
        }
        self.store.put_json(side, record)
        return record


def intent(plan: RowPlan, run_id: str) -> dict[str, Any]:
    """The sidecar content that marks a row as being rendered."""
    return {
        "state": STATE_RENDERING,
        "manifest_id": plan.id,
        "manifest_row": plan.row,
        "fingerprint": plan.fingerprint,
        "seed": plan.request["seed"],
        "request": plan.request,
        "run_id": run_id,
        "started_at": time.time(),
    }
