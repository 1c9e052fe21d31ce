"""Cron windows across DST, with real croniter and zoneinfo (no mocks).

Our rule: each local wall-clock time a cron expression names runs once. An ambiguous time
(fall back) runs at its first occurrence; a time in the spring-forward gap runs moved forward by
the gap. So on the fall-back day an hourly schedule runs 01:00 once (PDT), not again at 01:00 PST.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from ingestd.core.scheduler import CronWindows, local_today, validate_cron, validate_timezone

UTC = dt.UTC
LA = "America/Los_Angeles"


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


# -- fall back: 2026-11-01 in Los Angeles, 02:00 PDT -> 01:00 PST, so 01:00-01:59 happens twice --

def test_daily_on_fall_back_day_runs_once_at_first_occurrence():
    w = CronWindows(["30 1 * * *"], LA)
    got = w.between(utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))
    assert got == [utc(2026, 11, 1, 8, 30), utc(2026, 11, 2, 9, 30)]  # 01:30 PDT, then 01:30 PST
    assert w.next_after(utc(2026, 11, 1, 8, 0)) == utc(2026, 11, 1, 8, 30)
    assert w.next_after(utc(2026, 11, 1, 8, 30)) == utc(2026, 11, 2, 9, 30)  # not 09:30 the same day
    assert w.local_date(got[0]) == dt.date(2026, 11, 1)


def test_hourly_across_fall_back_runs_each_wall_clock_hour_once():
    w = CronWindows(["0 * * * *"], LA)
    got = w.between(utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 11, 30))
    # 00:00 PDT, 01:00 PDT, (01:00 PST skipped: the wall-clock 01:00 already ran), 02:00 PST, 03:00 PST
    assert got == [utc(2026, 11, 1, 7), utc(2026, 11, 1, 8), utc(2026, 11, 1, 10), utc(2026, 11, 1, 11)]
    local = [x.astimezone(ZoneInfo(LA)).strftime("%H:%M %Z") for x in got]
    assert local == ["00:00 PDT", "01:00 PDT", "02:00 PST", "03:00 PST"]
    # Asked from inside the repeated hour, the next window is 02:00 PST.
    assert w.next_after(utc(2026, 11, 1, 8, 0)) == utc(2026, 11, 1, 10)
    assert w.next_after(utc(2026, 11, 1, 9, 15)) == utc(2026, 11, 1, 10)
    assert w.last_at_or_before(utc(2026, 11, 1, 9, 59)) == utc(2026, 11, 1, 8)


# -- spring forward: 2026-03-08 in Los Angeles, 02:00 PST -> 03:00 PDT, so 02:00-02:59 never is --

def test_daily_in_spring_forward_gap_moves_forward_and_runs_once():
    w = CronWindows(["30 2 * * *"], LA)
    got = w.between(utc(2026, 3, 7, 0), utc(2026, 3, 10, 0))
    assert got == [utc(2026, 3, 7, 10, 30), utc(2026, 3, 8, 10, 30), utc(2026, 3, 9, 9, 30)]
    # 2026-03-08: 02:30 does not exist; it runs at 03:30 PDT = 10:30 UTC. Next day 02:30 PDT.
    assert got[1].astimezone(ZoneInfo(LA)).strftime("%Y-%m-%d %H:%M %Z") == "2026-03-08 03:30 PDT"
    assert got[2].astimezone(ZoneInfo(LA)).strftime("%Y-%m-%d %H:%M %Z") == "2026-03-09 02:30 PDT"
    assert [w.local_date(x) for x in got] == [dt.date(2026, 3, 7), dt.date(2026, 3, 8), dt.date(2026, 3, 9)]
    # next_after from just before and just inside the shifted window.
    assert w.next_after(utc(2026, 3, 8, 9, 59)) == utc(2026, 3, 8, 10, 30)
    assert w.next_after(utc(2026, 3, 8, 10, 5)) == utc(2026, 3, 8, 10, 30)  # 03:05 PDT: still to come
    assert w.next_after(utc(2026, 3, 8, 10, 30)) == utc(2026, 3, 9, 9, 30)
    assert w.last_at_or_before(utc(2026, 3, 8, 10, 29)) == utc(2026, 3, 7, 10, 30)
    assert w.last_at_or_before(utc(2026, 3, 8, 10, 30)) == utc(2026, 3, 8, 10, 30)


def test_hourly_across_spring_forward_has_no_duplicates():
    w = CronWindows(["0 * * * *"], LA)
    got = w.between(utc(2026, 3, 8, 8, 30), utc(2026, 3, 8, 11, 30))
    # 01:00 PST, then 02:00 (gap) -> 03:00 PDT, which is also 03:00's own window: one run.
    assert got == [utc(2026, 3, 8, 9), utc(2026, 3, 8, 10), utc(2026, 3, 8, 11)]


@pytest.mark.parametrize("zone", [LA, "Europe/Berlin"])
@pytest.mark.parametrize("expr", ["30 2 * * *", "30 1 * * *", "0 0 * * *", "59 23 * * *", "0 3 * * *"])
def test_every_local_date_in_a_year_runs_a_daily_window_once(zone, expr):
    w = CronWindows([expr], zone)
    first = dt.date(2026, 1, 1)
    days = [first + dt.timedelta(days=i) for i in range(365)]
    tz = ZoneInfo(zone)
    start = dt.datetime.combine(days[0], dt.time(0), tz) - dt.timedelta(seconds=1)
    end = dt.datetime.combine(days[-1] + dt.timedelta(days=1), dt.time(0), tz) - dt.timedelta(seconds=1)
    got = w.between(start, end)
    assert [w.local_date(x) for x in got] == days
    assert got == sorted(set(got))
    # Walking with next_after gives the same windows.
    t, walked = start, []
    for _ in days:
        t = w.next_after(t)
        walked.append(t)
    assert walked == got


def test_fixed_offset_zone_stays_on_pst_all_year():
    w = CronWindows(["0 2 * * *"], "Etc/GMT+8")  # POSIX sign: GMT+8 is UTC-8
    got = w.between(utc(2026, 1, 1), utc(2027, 1, 1))
    assert len(got) == 365
    assert {x.astimezone(ZoneInfo("Etc/GMT+8")).utcoffset() for x in got} == {dt.timedelta(hours=-8)}
    assert {(x.hour, x.minute) for x in got} == {(10, 0)}
    # Across both LA transition days nothing moves.
    assert w.next_after(utc(2026, 3, 8, 0)) == utc(2026, 3, 8, 10)
    assert w.next_after(utc(2026, 11, 1, 0)) == utc(2026, 11, 1, 10)


def test_several_expressions_merged_and_deduplicated():
    w = CronWindows(["0 6 * * *", "0 */6 * * *", "30 6 * * 1-5", "0 6 * * *"], "UTC")
    got = w.between(utc(2026, 1, 2, 0), utc(2026, 1, 3, 23, 59))  # Friday, Saturday
    assert got == [
        utc(2026, 1, 2, 6), utc(2026, 1, 2, 6, 30), utc(2026, 1, 2, 12), utc(2026, 1, 2, 18),
        utc(2026, 1, 3, 0), utc(2026, 1, 3, 6), utc(2026, 1, 3, 12), utc(2026, 1, 3, 18),
    ]
    assert w.next_after(utc(2026, 1, 2, 6)) == utc(2026, 1, 2, 6, 30)
    assert w.next_after(utc(2026, 1, 3, 6)) == utc(2026, 1, 3, 12)  # Saturday: no 06:30


def test_gap_times_of_two_expressions_landing_on_one_instant_run_once():
    # On 2026-03-08 in LA, 02:30 moves to 03:30 PDT, where the second expression already runs.
    w = CronWindows(["30 2 * * *", "30 3 * * *"], LA)
    got = w.between(utc(2026, 3, 8, 0), utc(2026, 3, 9, 0))
    assert got == [utc(2026, 3, 8, 10, 30)]


def test_between_bounds_and_order():
    w = CronWindows(["0 * * * *"], "Europe/Berlin")
    start, end = utc(2026, 5, 1, 0), utc(2026, 5, 1, 3)
    # start excluded, end included
    assert w.between(start, end) == [utc(2026, 5, 1, 1), utc(2026, 5, 1, 2), utc(2026, 5, 1, 3)]
    assert w.between(end, start) == []
    assert w.between(start, start) == []
    assert all(x.tzinfo is not None and x.utcoffset() == dt.timedelta(0) for x in w.between(start, end))
    many = CronWindows(["* * * * *"]).between(utc(2026, 1, 1), utc(2026, 2, 1))
    assert len(many) == 10_000 and many[0] == utc(2026, 1, 1, 0, 1) and many == sorted(many)
    assert CronWindows(["* * * * *"]).between(utc(2026, 1, 1), utc(2026, 2, 1), limit=3) == [
        utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 2), utc(2026, 1, 1, 0, 3)]


def test_last_at_or_before():
    w = CronWindows(["0 4 * * *", "0 16 * * *"], LA)
    assert w.last_at_or_before(utc(2026, 6, 10, 11, 0)) == utc(2026, 6, 10, 11, 0)  # 04:00 PDT, inclusive
    assert w.last_at_or_before(utc(2026, 6, 10, 10, 59)) == utc(2026, 6, 9, 23, 0)  # 16:00 PDT the day before
    assert w.last_at_or_before(utc(2026, 6, 10, 10, 59, 59, 999)) == utc(2026, 6, 9, 23, 0)
    yearly = CronWindows(["0 0 1 1 *"])
    assert yearly.last_at_or_before(utc(2026, 6, 1)) == utc(2026, 1, 1)
    leap = CronWindows(["0 0 29 2 *"])  # Feb 29: last one 2024, more than 400 days back
    assert leap.last_at_or_before(utc(2026, 6, 1)) is None
    assert leap.next_after(utc(2026, 6, 1)) == utc(2028, 2, 29)


def test_aware_inputs_required_and_local_dates():
    w = CronWindows(["0 0 * * *"], LA)
    with pytest.raises(ValueError, match="timezone-aware"):
        w.next_after(dt.datetime(2026, 1, 1))
    non_utc = dt.datetime(2026, 1, 1, 9, tzinfo=ZoneInfo("Europe/Berlin"))  # 08:00 UTC = 00:00 PST
    assert w.next_after(non_utc) == utc(2026, 1, 2, 8)
    assert w.last_at_or_before(non_utc) == utc(2026, 1, 1, 8)
    assert w.local_date(utc(2026, 1, 1, 7, 59)) == dt.date(2025, 12, 31)
    assert local_today(utc(2026, 1, 1, 7, 59), LA) == dt.date(2025, 12, 31)
    assert local_today(utc(2026, 1, 1, 7, 59), "Asia/Tokyo") == dt.date(2026, 1, 1)


# -- brute force: every minute of a few days around each transition, matched by croniter itself --

def _reference(expr: str, zone: str, first: dt.date, days: int) -> list[dt.datetime]:
    """Every wall-clock minute of `days` local dates that `expr` names (croniter expands the
    fields; the expressions used here leave the day fields '*'), placed with fold=0."""
    (minutes, hours, *rest), _ = croniter.expand(expr)
    assert rest == [["*"], ["*"], ["*"]]
    hours = range(24) if hours == ["*"] else hours
    minutes = range(60) if minutes == ["*"] else minutes
    tz, out = ZoneInfo(zone), set()
    for d in range(days):
        day = first + dt.timedelta(days=d)
        for h in hours:
            for m in minutes:
                naive = dt.datetime.combine(day, dt.time(h, m))
                out.add(naive.replace(tzinfo=tz, fold=0).astimezone(UTC))
    return sorted(out)


@pytest.mark.parametrize("zone,first", [
    (LA, dt.date(2026, 3, 7)), (LA, dt.date(2026, 10, 31)),
    ("Europe/Berlin", dt.date(2026, 3, 28)), ("Europe/Berlin", dt.date(2026, 10, 24)),
    ("Australia/Lord_Howe", dt.date(2026, 4, 4)), ("Australia/Lord_Howe", dt.date(2026, 10, 3)),  # 30-minute DST
])
@pytest.mark.parametrize("expr", ["*/20 * * * *", "10,40 * * * *", "45 1-3 * * *", "15 2 * * *"])
def test_matches_minute_by_minute_reference(zone, first, expr):
    ref = _reference(expr, zone, first, 3)
    w = CronWindows([expr], zone)
    lo = dt.datetime.combine(first, dt.time(0), ZoneInfo(zone)).astimezone(UTC)
    inner = [x for x in ref if lo + dt.timedelta(hours=12) <= x <= lo + dt.timedelta(hours=60)]
    assert w.between(inner[0] - dt.timedelta(seconds=1), inner[-1]) == inner
    probe = inner[0]
    while probe < inner[-1]:
        assert w.next_after(probe) == min(x for x in ref if x > probe), probe
        assert w.last_at_or_before(probe) == max(x for x in ref if x <= probe), probe
        probe += dt.timedelta(minutes=11)


# -- validation --

@pytest.mark.parametrize("expr,fragment", [
    ("61 * * * *", "minute 61 is out of range 0-59"),
    ("banana", "expected 5 fields"),
    ("* * * *", "expected 5 fields"),
    ("0 0 * * * *", "expected 5 fields"),         # croniter's seconds field
    ("@daily", "nicknames are not supported"),
    ("0 0 L * *", "'L' is not a number"),
    ("0 0 * * 1#2", "only numbers, names"),
    ("H * * * *", "'H' is not a number"),
    ("*/0 * * * *", "a step must be at least 1"),
    ("0 0 30 2 *", "never matches a date"),
    ("0 25 * * *", "hour 25 is out of range 0-23"),
])
def test_validate_cron_rejects(expr, fragment):
    msg = validate_cron(expr)
    assert msg is not None and msg.startswith(f"not a cron expression: {expr!r}") and fragment in msg, msg
    with pytest.raises(ValueError, match="not a cron expression"):
        CronWindows(["0 0 * * *", expr])


def test_validate_cron_messages_exact():
    assert validate_cron("61 * * * *") == "not a cron expression: '61 * * * *' (minute 61 is out of range 0-59)"
    assert validate_cron("banana").startswith("not a cron expression: 'banana' (expected 5 fields")
    assert validate_cron("* * * *").startswith("not a cron expression: '* * * *' (expected 5 fields")


@pytest.mark.parametrize("expr", ["0 3 * * *", "*/15 * * * *", "0 6,18 * * mon-fri", "30 2 1 jan,jul *",
                                  "0 0 * * 7", "5-55/10 1-23/2 * * *"])
def test_validate_cron_accepts(expr):
    assert validate_cron(expr) is None


def test_validate_timezone():
    assert validate_timezone("America/Los_Angeles") is None
    assert validate_timezone("Etc/GMT+8") is None
    assert validate_timezone("UTC") is None
    for bad in ["Mars/Base", "America", "", "../etc", "localtime"]:
        assert validate_timezone(bad).startswith(f"unknown time zone: {bad!r}")
    assert validate_timezone("Mars/Base").startswith("unknown time zone: 'Mars/Base'")
    with pytest.raises(ValueError, match="unknown time zone: 'Mars/Base'"):
        CronWindows(["0 0 * * *"], "Mars/Base")
    with pytest.raises(ValueError):
        CronWindows([])
