"""Benchmark results as JSON lists in bench/results: each run adds its records to those already there."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records at `path`; [] for a file not written yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


def write_records(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Write `records` to `path` (its folder made if missing), replacing what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def append_records(path: str | os.PathLike, *records: dict[str, Any]) -> Path:
    """Add `records` after those at `path`; prints and returns where they went."""
    path = write_records(path, read_records(path) + list(records))
    print(f"appended to {path}")
    return path
