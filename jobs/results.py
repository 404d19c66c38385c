"""The results table of a bulk render: one row per manifest row, written as ``<output>/results.parquet``."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

RESULTS_KEY = "results.parquet"

SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),  # 0-based manifest row
        pa.field("id", pa.string()),  # manifest id (null when the row had none)
        pa.field("status", pa.string(), nullable=False),  # "completed" | "failed"
        pa.field("output_uri", pa.string()),  # the mp4, completed rows only
        pa.field("sidecar_uri", pa.string()),  # its JSON sidecar
        pa.field("seed", pa.int64()),
        pa.field("error", pa.string()),  # why a row failed
        pa.field("render_s", pa.float64()),  # wall time on the GPU group (generation + encode + upload)
        pa.field("timings", pa.map_(pa.string(), pa.float64())),  # the engine's own stage timings
        pa.field("attempts", pa.int32()),  # render attempts in the run that completed the row
        pa.field("resumed", pa.bool_()),  # completed by an earlier run, found through its sidecar
        pa.field("fingerprint", pa.string()),  # hash of the request that made the video
    ]
)


@dataclass
class ResultRow:
    """One line of ``results.parquet``."""

    row: int
    id: str | None
    status: Literal["completed", "failed"]
    output_uri: str | None = None
    sidecar_uri: str | None = None
    seed: int | None = None
    error: str | None = None
    render_s: float | None = None
    timings: dict[str, float] | None = field(default=None)
    attempts: int = 0
    resumed: bool = False
    fingerprint: str | None = None


def to_table(rows: list[ResultRow]) -> pa.Table:
    """Results in manifest order as an Arrow table with `SCHEMA`."""
    records: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: r.row):
        d = asdict(r)
        if d["timings"] is not None:
            d["timings"] = [(k, float(v)) for k, v in d["timings"].items() if isinstance(v, (int, float))]
        records.append(d)
    return pa.Table.from_pylist(records, schema=SCHEMA)


def to_parquet_bytes(rows: list[ResultRow]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf)
    return buf.getvalue()


def read_results(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))  # not a Python file object: see jobs.manifest.read_manifest
