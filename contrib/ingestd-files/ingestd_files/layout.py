"""Where a day's files are: the path pattern, the days a window touches, readiness markers, and
the fingerprint of a set of files. Pure file-system code, no DuckDB and no asyncio.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import os
import string
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

DEFAULT_DAY_FORMAT = "%Y-%m-%d"
GLOB_CHARS = frozenset("*?[")

FORMATS_BY_SUFFIX = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}
COMPRESSION_SUFFIXES = (".gz", ".zst")


class LayoutError(ValueError):
    """A pattern that cannot describe a day's files."""


@dataclass(frozen=True)
class FileStat:
    """One data file of a day: its path, and what `os.stat` said when it was listed."""

    path: str
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Pattern:
    """A path pattern with `{day:STRFTIME}` fields (several allowed, `{day}` is `{day:%Y-%m-%d}`),
    an optional leading `{root}`, and glob wildcards (`*`, `?`, `[...]`, `**` for any depth).
    A pattern that does not start with `{root}` (or an absolute path) is relative to the root."""

    text: str
    root: Path

    def __post_init__(self) -> None:
        try:
            parts = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise LayoutError(f"{exc} (write a literal brace as {{{{ or }}}})") from None
        days = 0
        for i, (_, field, spec, conversion) in enumerate(parts):
            if field is None:
                continue
            if field not in ("day", "root"):
                raise LayoutError(f"unknown field {{{field}}}: only {{day:FORMAT}} and {{root}} are known")
            if conversion:
                raise LayoutError(f"{{{field}!{conversion}}}: conversions are not supported")
            if field == "root" and (i != 0 or parts[0][0] or spec):
                raise LayoutError("{root} may only start the pattern")
            if field == "day":
                days += 1
                if spec and not any(c in spec for c in "%"):
                    raise LayoutError(f"{{day:{spec}}}: the format needs strftime codes such as %Y-%m-%d")
        if days == 0:
            raise LayoutError("the pattern has no {day} field, so every day would read the same files")

    def glob_for(self, day: dt.date) -> str:
        """The glob that matches the files of `day` (an absolute path; day and root escaped)."""
        out = []
        for literal, field, spec, _ in string.Formatter().parse(self.text):
            out.append(literal)
            if field == "day":
                out.append(glob.escape(day.strftime(spec or DEFAULT_DAY_FORMAT)))
            elif field == "root":
                out.append(glob.escape(str(self.root)))
        text = "".join(out)
        return text if os.path.isabs(text) else os.path.join(glob.escape(str(self.root)), text)

    def files(self, day: dt.date) -> list[str]:
        """The day's data files, sorted. Names starting with `_` or `.` (`_SUCCESS`, Spark's
        `_temporary`, in-progress `.part` files) are skipped, folders too."""
        found = []
        for path in glob.glob(self.glob_for(day), recursive=True):
            if os.path.basename(path).startswith(("_", ".")) or not os.path.isfile(path):
                continue
            found.append(path)
        return sorted(found)

    def exists(self, day: dt.date) -> bool:
        """Whether anything matches the pattern for `day` (for readiness markers)."""
        return any(True for _ in glob.iglob(self.glob_for(day), recursive=True))

    def suffix_format(self) -> str | None:
        """`parquet` or `jsonl` from the pattern's file extension, or None."""
        name = self.text.rsplit("/", 1)[-1].lower()
        for comp in COMPRESSION_SUFFIXES:
            if name.endswith(comp):
                name = name[: -len(comp)]
        for suffix, fmt in FORMATS_BY_SUFFIX.items():
            if name.endswith(suffix):
                return fmt
        return None


def layout_days(day: dt.date, start: dt.datetime, end: dt.datetime, window_tz: str, layout_tz: str) -> list[dt.date]:
    """The folder dates holding the rows of a source day whose window is [start, end) (naive
    UTC). With no layout time zone, or the source's own, that is the day itself; otherwise every
    layout date the window touches (usually two: the query's own filter then keeps the day)."""
    if not layout_tz or layout_tz == window_tz:
        return [day]
    zone = ZoneInfo(layout_tz)
    first = start.replace(tzinfo=dt.UTC).astimezone(zone).date()
    last = (end - dt.timedelta(microseconds=1)).replace(tzinfo=dt.UTC).astimezone(zone).date()
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def stat_files(paths: list[str]) -> list[FileStat]:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append(FileStat(path, st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def fingerprint(files: list[FileStat], root: Path, mode: str) -> str:
    """A fingerprint of a day's files, 32 hex digits.

    `stat`: each file's path (relative to the root), size, modification time (ns) and inode;
    no file is opened. A file replaced by write-then-rename always changes it (new inode); a
    file rewritten in place changes it unless size and mtime both stay equal, which only happens
    within the file system's timestamp granularity.

    `content`: each file's path and the SHA-256 of its bytes; every byte is read (nothing is
    parsed). Exact, and blind to `touch` and to copies that keep the bytes.
    """
    digest = hashlib.sha256(mode.encode())
    for f in sorted(files, key=lambda f: f.path):
        rel = os.path.relpath(f.path, root)
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if mode == "content":
            digest.update(_sha256_file(f.path) + b"\n")
        else:
            digest.update(f"{f.size}:{f.mtime_ns}:{f.inode}\n".encode())
    return digest.hexdigest()[:32]


def _sha256_file(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def has_glob_chars(path: str) -> bool:
    return any(c in GLOB_CHARS for c in path)
