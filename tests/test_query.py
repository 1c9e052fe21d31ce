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
