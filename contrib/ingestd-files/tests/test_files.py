"""What is particular to the files connector: patterns, config errors, layout time zones,
ready markers, skipped files, fingerprints, footer-only probes, bounded memory."""

from __future__ import annotations

import datetime as dt
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from ingestd_files.connector import FilesConfig, FilesConnector
from ingestd_files.layout import LayoutError, Pattern, layout_days
from lake import KIT_SCHEMA, write_rows

from ingestd import DayWindow, IngestdError, PermanentError, TransientError, build_model
from ingestd.testing.connector_suite import kit_day_query

D = dt.date(2026, 11, 20)
QUERY = "SELECT * FROM day_files WHERE ts >= ? AND ts < ?"


def connector_on(root, **table) -> FilesConnector:
    return FilesConnector(build_model(FilesConfig, {"root": str(root), **table}, "connections.lake"), name="lake")


def query_for(connector, day=D, timezone="UTC", where="ts >= {start} AND ts < {end}", columns="*"):
    return kit_day_query(connector, f"SELECT {columns} FROM day_files WHERE {where}", day, timezone)


def rows_of(day: dt.date, n: int, start: int = 0, hour: float = 0.0) -> list[dict]:
    base = dt.datetime(day.year, day.month, day.day) + dt.timedelta(hours=hour)
    return [{"ts": base + dt.timedelta(seconds=i), "user_id": f"u{start + i}", "event": "click", "value": float(i)}
            for i in range(n)]


async def fetched(connector, query, batch_rows=1000) -> list[dict]:
    out = []
    async for batch in connector.fetch(query, batch_rows):
        out += batch.to_pylist()
    return out


# -- patterns and config -------------------------------------------------------------------------

def test_patterns_expand_the_day_and_escape_root_and_day(tmp_path):
    root = tmp_path / "la[k]e"
    assert Pattern("dt={day}/*.parquet", root).glob_for(D) == f"{tmp_path}/la[[]k]e/dt=2026-11-20/*.parquet"
    assert Pattern("{root}/{day:%Y}/{day:%m}/{day:%d}/**/*.jsonl", root).glob_for(D).endswith("/2026/11/20/**/*.jsonl")
    assert Pattern("/abs/{day:%Y%m%d}-*.json", root).glob_for(D) == "/abs/20261120-*.json"
    assert Pattern("x{{y}}/{day}.parquet", root).glob_for(D).endswith("/x{y}/2026-11-20.parquet")


@pytest.mark.parametrize("pattern, words", [
    ("data/*.parquet", "no {day} field"),
    ("{date}/*.parquet", "unknown field {date}"),
    ("x/{root}/{day}/*.parquet", "{root} may only start"),
    ("{day:Y-m-d}/*.parquet", "strftime codes"),
    ("{day!r}/*.parquet", "conversions"),
    ("{day/*.parquet", "brace"),
])
def test_a_bad_pattern_is_refused(tmp_path, pattern, words):
    with pytest.raises(LayoutError, match=words.replace("{", r"\{").replace("}", r"\}")):
        Pattern(pattern, tmp_path)


def test_config_errors_name_their_key(tmp_path):
    cases = [
        ({}, "connections.lake.root: missing"),
        ({"root": "x", "pattern": "all/*.parquet"}, "connections.lake.pattern: the pattern has no {day} field"),
        ({"root": "x", "pattern": "{day}/*.csv"}, "connections.lake.format: cannot tell the format"),
        ({"root": "x", "layout_timezone": "Mars/Olympus"}, "connections.lake.layout_timezone: unknown IANA"),
        ({"root": "x", "fingerprint": "md5"}, "connections.lake.fingerprint: expected one of 'stat', 'content'"),
        ({"root": "x", "threads": 0}, "connections.lake.threads: must be at least 1"),
        ({"root": "x", "ready_marker": "_SUCCESS"}, "connections.lake.ready_marker: the pattern has no {day}"),
        ({"root": "x", "patern": "{day}/*.parquet"}, "connections.lake.patern: unknown key"),
    ]
    for table, message in cases:
        with pytest.raises(IngestdError) as caught:  # ConfigErrors, not public: its base is
            build_model(FilesConfig, table, "connections.lake")
        assert message in str(caught.value), (table, str(caught.value))
    config = build_model(FilesConfig, {"root": "x", "pattern": "{day}/*.ndjson.gz"}, "connections.lake")
    assert config.file_format == "jsonl" and config.fingerprint == "stat" and config.layout_timezone == ""
    assert build_model(FilesConfig, {"root": "x"}, "c").file_format == "parquet"


def test_layout_days_follow_the_source_window():
    w = DayWindow.of(D, "America/New_York")
    assert layout_days(D, w.start, w.end, w.timezone, "") == [D]
    assert layout_days(D, w.start, w.end, w.timezone, "America/New_York") == [D]
    assert layout_days(D, w.start, w.end, w.timezone, "UTC") == [D, D + dt.timedelta(days=1)]
    u = DayWindow.of(D)
    assert layout_days(D, u.start, u.end, "UTC", "Asia/Tokyo") == [D, D + dt.timedelta(days=1)]
    assert layout_days(D, u.start, u.end, "UTC", "Etc/UTC") == [D]


# -- reading -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_source_day_in_another_zone_reads_every_folder_it_touches(tmp_path):
    root = tmp_path / "lake"
    for day in (D - dt.timedelta(days=1), D, D + dt.timedelta(days=1), D + dt.timedelta(days=2)):
        every_10_minutes = [{"ts": dt.datetime(day.year, day.month, day.day) + dt.timedelta(minutes=10 * i),
                             "user_id": f"{day}-{i}", "event": "e", "value": 1.0} for i in range(24 * 6)]
        write_rows(root / f"dt={day}" / "p.parquet", every_10_minutes, "parquet", KIT_SCHEMA)
    c = connector_on(root, layout_timezone="UTC")
    q = query_for(c, timezone="America/New_York")  # [D 05:00 UTC, D+1 05:00 UTC)
    assert (await c.probe(q)).rows == 24 * 6
    got = await fetched(c, q)
    assert len(got) == 24 * 6
    assert min(r["ts"] for r in got) == dt.datetime(2026, 11, 20, 5, 0)
    # without the layout zone the folder of D is the source's D: 19 hours of it are inside
    c2 = connector_on(root)
    assert (await c2.probe(q)).rows == 19 * 6


@pytest.mark.asyncio
async def test_files_named_like_markers_or_temporaries_are_skipped(tmp_path):
    root = tmp_path / "lake"
    day = root / f"dt={D}"
    write_rows(day / "part-0.parquet", rows_of(D, 10), "parquet", KIT_SCHEMA)
    write_rows(day / "_temporary" / "part-9.parquet", rows_of(D, 5), "parquet", KIT_SCHEMA)
    write_rows(day / "_part-8.parquet", rows_of(D, 5), "parquet", KIT_SCHEMA)
    (day / ".part-7.parquet").write_bytes(b"half a file")
    (day / "_SUCCESS").write_text("")
    c = connector_on(root)
    assert (await c.probe(query_for(c))).rows == 10
    deep = connector_on(root, pattern="dt={day}/**/*.parquet")
    assert (await deep.probe(query_for(deep))).rows == 10 + 5  # `**` descends, `_part-8` stays skipped


@pytest.mark.asyncio
async def test_a_ready_marker_holds_the_day_back_until_it_exists(tmp_path):
    root = tmp_path / "lake"
    write_rows(root / f"dt={D}" / "p.parquet", rows_of(D, 30), "parquet", KIT_SCHEMA)
    c = connector_on(root, ready_marker="dt={day}/_SUCCESS")
    q = query_for(c)
    assert (await c.probe(q)).rows == 0
    with pytest.raises(TransientError, match="ready marker"):
        await fetched(c, q)
    (root / f"dt={D}" / "_SUCCESS").write_text("")
    assert (await c.probe(q)).rows == 30
    assert len(await fetched(c, q)) == 30


@pytest.mark.asyncio
async def test_json_lines_gzip_and_columns_united_by_name(tmp_path):
    root = tmp_path / "lake"
    write_rows(root / f"{D:%Y/%m/%d}" / "a.jsonl.gz", [{"ts": "2026-11-20 01:00:00", "user_id": "a", "n": 1}], "jsonl")
    write_rows(root / f"{D:%Y/%m/%d}" / "b.jsonl.gz", [{"ts": "2026-11-20 02:00:00", "user_id": "b", "extra": "x"}],
               "jsonl")
    c = connector_on(root, pattern="{day:%Y/%m/%d}/*.jsonl.gz")
    got = sorted(await fetched(c, query_for(c)), key=lambda r: r["user_id"])
    assert [(r["user_id"], r["n"], r["extra"]) for r in got] == [("a", 1, None), ("b", None, "x")]
    assert got[0]["ts"] == dt.datetime(2026, 11, 20, 1)


@pytest.mark.asyncio
async def test_batches_are_bounded_and_a_day_without_files_is_empty(tmp_path):
    root = tmp_path / "lake"
    for i in range(3):
        write_rows(root / f"dt={D}" / f"p{i}.parquet", rows_of(D, 1000, start=i * 1000, hour=i), "parquet", KIT_SCHEMA)
    c = connector_on(root)
    sizes = [b.num_rows async for b in c.fetch(query_for(c), 256)]
    assert sum(sizes) == 3000 and max(sizes) <= 256
    other = query_for(c, D - dt.timedelta(days=3))
    assert (await c.probe(other)).rows == 0
    assert [b async for b in c.fetch(other, 256)] == []


# -- probes --------------------------------------------------------------------------------------

def _wipe_data_pages(path: Path) -> None:
    """Zero everything between the leading magic and the footer: only the metadata is left."""
    data = bytearray(path.read_bytes())
    footer = struct.unpack("<I", data[-8:-4])[0]
    data[4: len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(bytes(data))


@pytest.mark.asyncio
async def test_a_probe_of_a_folder_holding_its_day_reads_only_parquet_footers(tmp_path):
    root = tmp_path / "lake"
    path = write_rows(root / f"dt={D}" / "p.parquet", rows_of(D, 5000), "parquet", KIT_SCHEMA)
    c = connector_on(root)
    before = await c.probe(query_for(c))
    _wipe_data_pages(path)
    for q in (query_for(c), query_for(c, columns="ts, user_id"), query_for(c, where="{day} IS NOT NULL")):
        assert (await c.probe(q)).rows == before.rows == 5000  # the data pages are gone: footers answered
    with pytest.raises((TransientError, PermanentError)):  # a fetch needs the pages: it fails as the kernel's error
        await fetched(c, query_for(c))
    with pytest.raises((TransientError, PermanentError)):  # a filter the statistics cannot decide reads pages
        await c.probe(query_for(c, where="ts >= {start} AND ts < CAST({start} AS TIMESTAMP) + INTERVAL 10 MINUTE"))


@pytest.mark.asyncio
async def test_stat_fingerprints_see_file_changes_content_fingerprints_see_byte_changes(tmp_path):
    root = tmp_path / "lake"
    rows = [{"ts": f"2026-11-20 0{i}:00:00", "user_id": f"u{i}", "value": 1.5} for i in range(5)]
    path = write_rows(root / f"dt={D}" / "a.jsonl", rows, "jsonl")
    stat = connector_on(root, pattern="dt={day}/*.jsonl")
    content = connector_on(root, pattern="dt={day}/*.jsonl", fingerprint="content")
    q = query_for(stat)
    s1, c1 = await stat.probe(q), await content.probe(q)
    assert s1.rows == c1.rows == 5
    assert await stat.probe(q) == s1 and await content.probe(q) == c1

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer mtime
    s2, c2 = await stat.probe(q), await content.probe(q)
    assert s2.fingerprint != s1.fingerprint and c2 == c1

    st = path.stat()
    text = path.read_text()
    with open(path, "r+") as fh:  # rewritten in place: same size, a value changed, mtime put back
        fh.write(text.replace('"value": 1.5', '"value": 2.5', 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    s3, c3 = await stat.probe(q), await content.probe(q)
    assert s3 == s2, "stat cannot see an in-place rewrite of equal size and mtime (documented)"
    assert c3.rows == 5 and c3.fingerprint != c2.fingerprint

    write_rows(root / f"dt={D}" / "b.jsonl", rows[:1], "jsonl")  # a late file
    s4, c4 = await stat.probe(q), await content.probe(q)
    assert s4.rows == c4.rows == 6 and s4.fingerprint != s3.fingerprint and c4.fingerprint != c3.fingerprint
    empty = await stat.probe(query_for(stat, D + dt.timedelta(days=1)))
    assert empty.rows == 0 and empty.fingerprint is not None


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_errors_are_sorted_into_the_kernels_classes(tmp_path):
    root = tmp_path / "lake"
    c = connector_on(root)
    with pytest.raises(PermanentError, match="does not exist"):
        await c.check()
    write_rows(root / f"dt={D}" / "p.parquet", rows_of(D, 5), "parquet", KIT_SCHEMA)
    await c.check()
    with pytest.raises(PermanentError, match="column"):
        await c.check(query_for(c, where="no_such_column = {day}"))
    # a day without files is checked against the newest files before it
    with pytest.raises(PermanentError, match="column"):
        await c.check(query_for(c, D + dt.timedelta(days=3), where="no_such_column = {day}"))
    await c.check(query_for(c, D + dt.timedelta(days=3)))
    (root / f"dt={D}" / "torn.parquet").write_bytes(b"PAR1 and no footer")
    with pytest.raises(TransientError, match="being written"):
        await c.probe(query_for(c))
    (root / f"dt={D}" / "torn.parquet").unlink()
    write_rows(root / f"dt={D}" / "p[1].parquet", rows_of(D, 5), "parquet", KIT_SCHEMA)
    with pytest.raises(PermanentError, match="glob"):
        await c.probe(query_for(c))


# -- memory --------------------------------------------------------------------------------------

PEAK = r'''
import asyncio, datetime, resource, sys
from ingestd import build_model
from ingestd.testing.connector_suite import kit_day_query
from ingestd_files.connector import FilesConfig, FilesConnector

async def main():
    c = FilesConnector(build_model(FilesConfig, {"root": sys.argv[1]}, "c"), name="mem")
    q = kit_day_query(c, "SELECT * FROM day_files WHERE ts >= {start} AND ts < {end}", datetime.date(2026, 11, 20))
    rows = 0
    async for batch in c.fetch(q, 10_000):
        rows += batch.num_rows
    print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)

asyncio.run(main())
'''


def _day_of_wide_rows(root: Path, n: int) -> None:
    import duckdb
    folder = root / f"dt={D}"
    folder.mkdir(parents=True)
    with duckdb.connect() as con:
        con.execute(f"""COPY (SELECT TIMESTAMP '2026-11-20' + to_microseconds((i * 86399000000 // {n})::BIGINT) AS ts,
                               'u' || i AS user_id, 'click' AS event,
                               md5(i::VARCHAR) || md5((i + 1)::VARCHAR) || md5((i + 2)::VARCHAR) AS payload,
                               i::DOUBLE AS value
                        FROM range({n}) t(i)) TO '{folder / "day.parquet"}' (FORMAT parquet, ROW_GROUP_SIZE 100000)""")


def test_memory_does_not_grow_with_the_size_of_the_day(tmp_path):
    peaks = {}
    for n in (50_000, 1_500_000):  # ~15 MB and ~450 MB as Arrow arrays
        root = tmp_path / f"lake{n}"
        _day_of_wide_rows(root, n)
        out = subprocess.run([sys.executable, "-c", PEAK, str(root)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        rows, peak_mb = map(int, out.stdout.split())
        assert rows == n
        peaks[n] = peak_mb
    print("peak RSS MB by rows:", peaks)
    assert peaks[1_500_000] - peaks[50_000] < 120, peaks


# -- documentation -------------------------------------------------------------------------------

def _sample(text: str) -> str:
    start = text.index("[connections.NAME]")
    lines = []
    for line in text[start:].splitlines():
        line = line.strip()
        if line.startswith("```") or (not line and lines and lines[-1] == "# threads = 1"):
            break
        lines.append(line)
    return "\n".join(lines).strip()


def test_the_sample_config_is_the_config_model_with_its_defaults():
    import tomllib

    import ingestd_files.connector as module
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sample = _sample(readme)
    assert sample == _sample(module.__doc__), "the README's sample and the module docstring's differ"
    keys = "\n".join(line[2:] if line.startswith("# ") and " = " in line and not line.startswith("# e.g.") else line
                     for line in sample.splitlines())
    table = tomllib.loads(keys)["connections"]["NAME"]
    assert table.pop("type") == "files"
    shown = build_model(FilesConfig, table, "connections.NAME")
    assert shown == FilesConfig(root=Path("/srv/lake/app_events")), "a default in the sample is not the model's"
    import dataclasses
    assert sorted(table) == sorted(f.name for f in dataclasses.fields(FilesConfig)), "a key is missing from the sample"
