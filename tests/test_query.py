import datetime as dt

import pytest

from ingestd.core.query import DayWindow, render


def test_day_window_follows_the_zone():
    w = DayWindow.of(dt.date(2026, 3, 8), "America/Los_Angeles")  # 23-hour day
    assert w.start == dt.datetime(2026, 3, 8, 8, 0)
    assert w.end == dt.datetime(2026, 3, 9, 7, 0)
    assert DayWindow.of(dt.date(2026, 11, 1), "America/Los_Angeles").end - \
        DayWindow.of(dt.date(2026, 11, 1), "America/Los_Angeles").start == dt.timedelta(hours=25)


@pytest.mark.parametrize("style,sql,params", [
    ("qmark", "SELECT * FROM t WHERE ts >= ? AND ts < ? AND d = ?", "list"),
    ("format", "SELECT * FROM t WHERE ts >= %s AND ts < %s AND d = %s", "list"),
    ("pyformat", "SELECT * FROM t WHERE ts >= %(start)s AND ts < %(end)s AND d = %(day)s", "dict"),
    ("at", "SELECT * FROM t WHERE ts >= @start AND ts < @end AND d = @day", "dict"),
    ("numeric", "SELECT * FROM t WHERE ts >= $1 AND ts < $2 AND d = $3", "list"),
])
def test_placeholders_become_bound_parameters(style, sql, params):
    w = DayWindow.of(dt.date(2026, 1, 2))
    q = render("SELECT * FROM t WHERE ts >= {start} AND ts < {end} AND d = {day}", w, style)
    assert q.sql == sql
    values = [w.start, w.end, w.day]
    assert (q.params if params == "list" else [q.params["start"], q.params["end"], q.params["day"]]) == values


def test_values_never_enter_the_sql_text():
    w = DayWindow.of(dt.date(2026, 1, 2))
    q = render("SELECT 1 WHERE x = {day}", w, "qmark")
    assert "2026" not in q.sql


def test_percent_is_escaped_for_format_styles():
    q = render("SELECT * FROM t WHERE name LIKE 'a%' AND d = {day}", DayWindow.of(dt.date(2026, 1, 2)), "format")
    assert q.sql == "SELECT * FROM t WHERE name LIKE 'a%%' AND d = %s"


def test_query_without_placeholders_is_wrapped_on_the_timestamp_column():
    q = render("SELECT * FROM events;", DayWindow.of(dt.date(2026, 1, 2)), "qmark", filter_column="ts")
    assert q.sql == 'SELECT * FROM (SELECT * FROM events) ingestd_q WHERE ingestd_q."ts" >= ? AND ingestd_q."ts" < ?'
    q = render("SELECT * FROM m", DayWindow.of(dt.date(2026, 1, 2)), "at", filter_column="ds", filter_kind="date",
               quote="`")
    assert q.sql == "SELECT * FROM (SELECT * FROM m) ingestd_q WHERE ingestd_q.`ds` = @day"


def test_query_without_placeholder_or_column_is_refused():
    with pytest.raises(ValueError):
        render("SELECT 1", DayWindow.of(dt.date(2026, 1, 2)), "qmark")


def test_the_literal_style_writes_typed_literals_from_date_objects_only():
    import datetime as _dt

    from ingestd.core.query import DayWindow as _W
    from ingestd.core.query import day_queries as _dq
    from ingestd.core.query import limit_query as _limit
    from ingestd.core.query import render as _render
    from ingestd.core.query import sql_literal

    assert sql_literal(_dt.date(2026, 11, 1)) == "DATE '2026-11-01'"
    assert sql_literal(_dt.datetime(2026, 11, 1, 2, 3, 4, 5)) == "TIMESTAMP '2026-11-01 02:03:04.000005'"
    assert sql_literal(1761955200) == "1761955200"
    for bad in ("2026-11-01", True, 1.5, None, _dt.datetime(2026, 11, 1, tzinfo=_dt.UTC)):
        with pytest.raises(TypeError):
            sql_literal(bad)
    window = _W.of(_dt.date(2026, 11, 1), "Europe/Berlin")
    q = _render("SELECT * FROM t WHERE ts >= {start} AND ts < {end} AND d = {day}", window, "literal")
    assert q.params == [] and q.names == ("start", "end", "day")
    assert q.sql == ("SELECT * FROM t WHERE ts >= TIMESTAMP '2026-10-31 23:00:00.000000' AND ts < "
                     "TIMESTAMP '2026-11-01 23:00:00.000000' AND d = DATE '2026-11-01'")
    with pytest.raises(TypeError):
        q.with_values(day="2026-11-01' OR 1=1 --")
    limited = _limit(q, 3)
    assert limited.sql.endswith("LIMIT 3") and limited.template is not None
    assert "DATE '2020-01-01'" in limited.with_values(day=_dt.date(2020, 1, 1)).sql
    by_col = _dq("SELECT * FROM t WHERE ts >= {start} AND ts < {end}", window, _Caps("literal"), slices=2,
                 slice_column="id")
    assert all(s.params == [] and "TIMESTAMP '2026-10-31 23:00:00.000000'" in s.sql for s in by_col)
    half = _W(window.day, window.start, window.start + (window.end - window.start) / 2, window.timezone)
    assert "TIMESTAMP '2026-11-01 11:00:00.000000'" in q.with_window(half).sql


class _Caps:
    def __init__(self, paramstyle):
        self.paramstyle, self.quote = paramstyle, '"'
