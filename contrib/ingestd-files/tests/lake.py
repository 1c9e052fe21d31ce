"""Test helpers: a producer that lays out day folders of Parquet or JSON Lines files, and the
conformance kit's table (`KitTable`) on top of it."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

EXT = {"parquet": "parquet", "jsonl": "jsonl"}


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str, schema: pa.Schema | None = None) -> Path:
    """Write `rows` as one file, atomically (a temporary name, then a rename), as producers
    should."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    else:
        text = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode()
        tmp.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    os.replace(tmp, path)
    return path


def read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


KIT_SCHEMA = pa.schema([("ts", pa.timestamp("us")), ("user_id", pa.string()), ("event", pa.string()),
                        ("value", pa.float64())])


class FilesKitTable:
    """The kit's table as day folders: each `insert` adds one file per day it touches (the day of
    the row's UTC timestamp), `update_value` rewrites the files holding the user."""

    name = "day_files"

    def __init__(self, root: Path, fmt: str, folder: str = "dt=%Y-%m-%d"):
        self.root = root
        self.fmt = fmt
        self.folder = folder
        self.files = 0

    def _files(self) -> list[Path]:
        return sorted(self.root.rglob(f"*.{EXT[self.fmt]}"))

    async def insert(self, rows: list[tuple[dt.datetime, str, str, float]]) -> None:
        by_day: dict[dt.date, list[dict]] = defaultdict(list)
        for ts, user, event, value in rows:
            by_day[ts.date()].append({"ts": ts, "user_id": user, "event": event, "value": value})
        for day, day_rows in sorted(by_day.items()):
            self.files += 1
            path = self.root / day.strftime(self.folder) / f"part-{self.files:05d}.{EXT[self.fmt]}"
            write_rows(path, day_rows, self.fmt, KIT_SCHEMA)

    async def update_value(self, user_id: str, value: float) -> None:
        for path in self._files():
            rows = read_rows(path, self.fmt)
            if any(r["user_id"] == user_id for r in rows):
                for r in rows:
                    if r["user_id"] == user_id:
                        r["value"] = value
                if self.fmt == "jsonl":
                    for r in rows:
                        r["ts"] = dt.datetime.fromisoformat(r["ts"])
                write_rows(path, rows, self.fmt, KIT_SCHEMA)
