"""Parquet render manifests: reading, checking, and turning rows into generation requests.

A manifest is a Parquet file with one row per video: ``id`` and ``prompt`` are required, and any of
``negative_prompt, num_frames, height, width, fps, steps, guidance_scale, seed, cache`` (or ``pab``) may override the
job-wide defaults per row (a null cell takes the default).

Two kinds of problems, handled differently:

* a bad *manifest* (not Parquet, no ``id`` or ``prompt`` column, a column name that looks like a typo of
  a known one) raises `ManifestError` before anything renders;
* a bad *row* (missing id, empty prompt, duplicate id, a value of the wrong type) becomes a `RowPlan`
  with ``error`` set; the job reports it in the results table and carries on. What a model can take
  (frame counts, sizes, cache rules) is the engine's own check (`pab.pipeline.resolve_request`), which
  `plan_rows` runs weight-free through `check` where the job gives one (as the HTTP ingress does), so a
  dry run already names the rows the model refuses and no GPU group is asked for them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError, ValidationInfo, field_validator

from pab.request import VideoSettings, describe

REQUIRED_COLUMNS = ("id", "prompt")
ROW_SETTINGS = tuple(VideoSettings.model_fields)
KNOWN_COLUMNS = REQUIRED_COLUMNS + ROW_SETTINGS
PARQUET_MAGIC = b"PAR1"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message says what to fix."""


class RenderSettings(VideoSettings):
    """Per-video settings (`pab.request.VideoSettings`). Job-wide defaults come from the command line; manifest
    columns of the same names override them per row.

    ``None`` means "the model's own default" (see ``pab models``), except for ``seed``: a missing seed is
    derived from the row id, so re-running a manifest reproduces the same videos.
    """

    @field_validator("pab", "cache", mode="before")
    @classmethod
    def _pab_json(cls, v: Any, info: ValidationInfo) -> Any:
        # A manifest cell holds a preset name or a JSON object as text.
        if isinstance(v, str) and v.strip().startswith("{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"{info.field_name} is not valid JSON: {e}") from None
        return v


@dataclass
class RowPlan:
    """One manifest row: what to render (``request``) or why not (``error``)."""

    row: int  # 0-based position in the manifest
    id: str | None
    key: str | None  # storage key stem derived from the id, see `key_for_id`
    request: dict[str, Any] | None = None  # GenerationRequest fields
    error: str | None = None
    fingerprint: str | None = None  # hash of `request`; a sidecar is only trusted if it matches
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_manifest(data: bytes, source: str = "manifest") -> pa.Table:
    """Parse manifest bytes; `ManifestError` if they are not a usable Parquet manifest."""
    if not data:
        raise ManifestError(f"{source} is empty; write the manifest with pyarrow.parquet.write_table")
    if len(data) < 12 or data[:4] != PARQUET_MAGIC or data[-4:] != PARQUET_MAGIC:
        hint = " (it looks like CSV/text)" if data[:1].isascii() and b"\n" in data[:4096] else ""
        raise ManifestError(f"{source} is not a Parquet file{hint}; write it with pyarrow.parquet.write_table")
    try:
        # An Arrow buffer, not a Python file object: reading one leaves work on pyarrow's threads that can abort the
        # interpreter at exit ("terminate called without an active exception", apache/arrow#33975, #34314).
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{source} is not a readable Parquet file: {e}") from None
    check_columns(table.column_names, source)
    return table


def check_columns(columns: list[str], source: str = "manifest") -> None:
    """Required columns present, and no column that looks like a misspelt known one."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{source} has no {' or '.join(repr(c) for c in missing)} column (columns: {columns}); "
            f"a manifest needs {list(REQUIRED_COLUMNS)} and may have {list(ROW_SETTINGS)}"
        )
    for c in columns:
        if c in KNOWN_COLUMNS:
            continue
        close = difflib.get_close_matches(c, KNOWN_COLUMNS, n=1, cutoff=0.8)
        if close:
            raise ManifestError(
                f"{source}: column {c!r} is not a known setting; did you mean {close[0]!r}? "
                f"(known: {list(KNOWN_COLUMNS)}; other columns are ignored)"
            )


# ----------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------


def key_for_id(row_id: str) -> str:
    """Storage key stem for a row id: the id itself when it is a safe file name, else a slug plus a hash.

    Deterministic, so a re-run finds what an earlier run wrote. The hash keeps distinct ids distinct
    after slugging ("a b" and "a_b" differ).
    """
    if _SAFE_KEY.match(row_id) and row_id not in (".", ".."):
        return row_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id).strip("._-")[:60] or "id"
    return f"{slug}-{hashlib.sha256(row_id.encode()).hexdigest()[:12]}"


def seed_for_id(row_id: str) -> int:
    """A stable seed from the row id (31 bits, so every backend's RNG takes it)."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def fingerprint(request: dict[str, Any]) -> str:
    """Hash of everything that decides a video's pixels."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean_id(value: Any) -> str | None:
    """The id (or model name) as text; a binary column's UTF-8 bytes are that text (UnicodeDecodeError if not)."""
    if value is None:
        return None
    if isinstance(value, bytes):  # str(b"a/b") would be "b'a/b'": results that no longer join the manifest
        value = value.decode("utf-8")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def plan_rows(
    table: pa.Table, model: str, defaults: RenderSettings, check: Callable[[dict[str, Any]], str | None] | None = None
) -> list[RowPlan]:
    """One `RowPlan` per manifest row, in order. Never raises for a bad row. `check(request)` says why the model
    cannot take a row's request (None: it can)."""
    settings_cols = [c for c in ROW_SETTINGS if c in table.column_names]
    # A `model` column is not a setting (a job loads one model), but a row naming another must not be rendered
    # with this one as if it had asked for it.
    model_col = ["model"] if "model" in table.column_names else []
    base = defaults.model_dump(exclude_unset=True)
    plans: list[RowPlan] = []
    first_row: dict[str, int] = {}
    key_owner: dict[str, str] = {}
    for i, row in enumerate(table.select(list(REQUIRED_COLUMNS) + settings_cols + model_col).to_pylist()):
        try:
            row_id = _clean_id(row["id"])
        except UnicodeDecodeError:
            plans.append(RowPlan(i, None, None, error=f"id {row['id']!r} is not UTF-8 text"))
            continue
        if row_id is None:
            plans.append(RowPlan(i, None, None, error="missing id"))
            continue
        key = key_for_id(row_id)
        plan = RowPlan(i, row_id, key)
        plans.append(plan)
        if row_id in first_row:
            plan.error = f"duplicate id {row_id!r} (first at row {first_row[row_id]}); this row is not rendered"
            continue
        first_row[row_id] = i
        if key_owner.setdefault(key, row_id) != row_id:
            plan.error = f"id {row_id!r} maps to the same storage key {key!r} as id {key_owner[key]!r}"
            continue
        try:
            asked = _clean_id(row.get("model"))
        except UnicodeDecodeError:
            asked = repr(row.get("model"))
        if asked is not None and asked != model:
            plan.error = (f"the row asks for model {asked!r} and this job renders {model!r} (--model): "
                          "one job per model")
            continue
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            plan.error = "empty prompt" if prompt is None or isinstance(prompt, str) else "prompt is not text"
            continue
        overrides = {c: row[c] for c in settings_cols if row[c] is not None}
        try:
            settings = RenderSettings.model_validate({**base, **overrides})
        except ValidationError as e:
            plan.error = f"bad settings: {describe(e)}"
            continue
        # Unset newer fields stay out, so a video rendered before they existed keeps its fingerprint.
        request = {"model": model, "prompt": prompt, **settings.engine_fields()}
        for newer in ("cache", "precision"):
            if request.get(newer) is None:
                request.pop(newer, None)
        if request["seed"] is None:
            request["seed"] = seed_for_id(row_id)
        refused = check(request) if check is not None else None
        if refused:
            plan.error = f"the model cannot take it: {refused}"
            continue
        plan.request = request
        plan.fingerprint = fingerprint(request)
    return plans
