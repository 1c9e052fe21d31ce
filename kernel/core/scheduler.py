"""Cron windows per source, in the source's IANA time zone.

The DST rule: **each local wall-clock time a cron expression names runs once.**

croniter iterates naive local wall-clock times (never aware ones: croniter 7 on aware datetimes
yields an ambiguous time twice on the fall-back day). Each naive time is then placed on the time
line with zoneinfo and ``fold=0``:

* fall back (01:30 happens twice): the time maps to its *first* occurrence, daylight time, and
  runs once. An hourly schedule thus runs at 01:00 PDT and next at 02:00 PST; 01:00 PST does not.
* spring forward (02:30 does not exist): the time maps *forward* by the gap, to 03:30 daylight
  time, so a daily window still runs that local date, exactly once.

Several expressions per source are merged in ascending order; windows landing on the same instant
(say 02:30 and 03:30 on the spring-forward day) run once. Every instant returned is aware UTC.

Because gap times move forward, instants are not quite monotone in wall-clock order near a
transition. The searches below therefore reach ``slack`` (the zone's offset change near the
point, zero almost always) past their start and stop, which keeps them exact and cheap.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

SEARCH_BACK_DAYS = 400
MAX_WINDOWS = 10_000

_UTC = dt.UTC
_DAY = dt.timedelta(days=1)
_MINUTE = dt.timedelta(minutes=1)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names mapped to numbers)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {n: i for i, n in enumerate(_MONTHS, 1)}),
    ("day-of-week", 0, 7, {n: i for i, n in enumerate(_DAYS)}),
)
_ITEM = re.compile(r"(?:\*|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?")


@functools.lru_cache(maxsize=1024)
def validate_cron(expr: object) -> str | None:
    """None if `expr` is a standard 5-field cron expression (minute hour day-of-month month
    day-of-week; numbers, '*', ',', '-', '/', and jan-dec / sun-sat names), else a message.
    croniter's extensions (seconds, '@daily', L, W, #, ?, H, R) are refused."""
    if not isinstance(expr, str):
        return f"not a cron expression: {expr!r} (expected a string)"
    bad = f"not a cron expression: {expr!r}"
    fields = expr.split()
    if len(fields) != 5:
        if expr.strip().startswith("@"):
            return f"{bad} (nicknames are not supported; write 5 fields, e.g. '0 0 * * *' for daily)"
        return f"{bad} (expected 5 fields: minute hour day-of-month month day-of-week; got {len(fields)})"
    for text, (name, lo, hi, names) in zip(fields, _FIELDS, strict=True):
        for item in text.split(","):
            m = _ITEM.fullmatch(item.lower())
            if m is None:
                return f"{bad} ({name} field {text!r}: only numbers, names, '*', ',', '-' and '/' are allowed)"
            first, last, step = m.groups()
            for tok, raw in zip((first, last), re.split(r"[-/]", item), strict=False):
                if tok is None:
                    continue
                value = int(tok) if tok.isdigit() else names.get(tok)
                if value is None:
                    kind = {"month": "a number or jan-dec", "day-of-week": "a number or sun-sat"}.get(name, "a number")
                    return f"{bad} ({name} field: {raw!r} is not {kind})"
                if not lo <= value <= hi:
                    return f"{bad} ({name} {value} is out of range {lo}-{hi})"
            if step is not None and int(step) == 0:
                return f"{bad} ({name} field {text!r}: a step must be at least 1)"
    try:
        croniter(expr, dt.datetime(2026, 1, 1)).get_next(dt.datetime)
    except CroniterError as exc:  # e.g. '0 0 30 2 *' never matches
        return f"{bad} (it never matches a date: {exc})"
    return None


def validate_timezone(name: str) -> str | None:
    """None if `name` is an IANA time zone zoneinfo knows, else a message."""
    try:
        if name == "localtime":  # a host's file, not an IANA name
            raise ZoneInfoNotFoundError(name)
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        return f"unknown time zone: {name!r} (expected an IANA name such as 'UTC' or 'America/Los_Angeles')"
    return None


class CronWindows:
    """The windows of one source: the merge of its cron expressions, in its time zone."""

    def __init__(self, exprs: list[str], timezone: str = "UTC"):
        if not exprs:
            raise ValueError("give at least one cron expression")
        for expr in exprs:
            if (msg := validate_cron(expr)):
                raise ValueError(msg)
        if (msg := validate_timezone(timezone)):
            raise ValueError(msg)
        self.exprs = tuple(dict.fromkeys(exprs))
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)

    def __repr__(self) -> str:
        return f"CronWindows({list(self.exprs)!r}, {self.timezone!r})"

    # -- the two conversions -------------------------------------------------------------------

    def _instant(self, naive: dt.datetime) -> dt.datetime:
        """Local wall-clock time -> aware UTC. fold=0 takes the first occurrence of an ambiguous
        time, and reads a time in the gap with the offset before the change (moving it forward)."""
        return naive.replace(tzinfo=self.tz, fold=0).astimezone(_UTC)

    def _wall(self, t: dt.datetime) -> dt.datetime:
        """Aware instant -> naive local wall-clock time, floored to the minute."""
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(f"expected a timezone-aware datetime, got {t!r}")
        return t.astimezone(self.tz).replace(tzinfo=None, fold=0, second=0, microsecond=0)

    def _slack(self, t: dt.datetime) -> dt.timedelta:
        """How far the zone's UTC offset moves within a day of `t`: zero except near a transition."""
        offsets: list[dt.timedelta] = []
        for d in (-_DAY, dt.timedelta(0), _DAY):
            offset = (t + d).astimezone(self.tz).utcoffset()
            assert offset is not None  # aware in a ZoneInfo zone: always has an offset
            offsets.append(offset)
        return max(offsets) - min(offsets)

    # -- queries -------------------------------------------------------------------------------

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first window strictly after `after` (aware), as aware UTC."""
        return min(self._next_after(expr, after) for expr in self.exprs)

    def _next_after(self, expr: str, after: dt.datetime) -> dt.datetime:
        it = croniter(expr, self._wall(after) - self._slack(after) - _MINUTE)
        while (best := self._instant(naive := it.get_next(dt.datetime))) <= after:
            pass
        # A gap time maps forward, so a slightly later wall-clock time may be an earlier instant.
        if (slack := self._slack(best)):
            stop = naive + slack
            while (later := it.get_next(dt.datetime)) < stop:
                if after < (w := self._instant(later)) < best:
                    best = w
        return best

    def between(self, start: dt.datetime, end: dt.datetime, limit: int = MAX_WINDOWS) -> list[dt.datetime]:
        """Windows w with start < w <= end, ascending, aware UTC; at most the first `limit`."""
        if end <= start or limit < 1:
            return []
        found: set[dt.datetime] = set()
        last_wall = self._wall(end) + self._slack(end)
        for expr in self.exprs:
            it = croniter(expr, self._wall(start) - self._slack(start) - _MINUTE)
            stop, hits = last_wall, 0
            while (naive := it.get_next(dt.datetime)) <= stop:
                w = self._instant(naive)
                if start < w <= end:
                    found.add(w)
                    hits += 1
                    if hits == limit:  # enough from this expression: finish the slack and stop
                        stop = min(stop, naive + self._slack(w))
        return sorted(found)[:limit]

    def last_at_or_before(self, t: dt.datetime) -> dt.datetime | None:
        """The latest window at or before `t` (aware), as aware UTC; None if there is none within
        the last SEARCH_BACK_DAYS days."""
        floor = t - dt.timedelta(days=SEARCH_BACK_DAYS)
        found = [w for expr in self.exprs if (w := self._last_at_or_before(expr, t, floor)) is not None]
        return max(found, default=None)

    def _last_at_or_before(self, expr: str, t: dt.datetime, floor: dt.datetime) -> dt.datetime | None:
        it = croniter(expr, self._wall(t) + self._slack(t) + _MINUTE)
        try:
            while (best := self._instant(naive := it.get_prev(dt.datetime))) > t:
                pass
        except CroniterError:  # nothing earlier that croniter can find
            return None
        if best < floor:
            return None
        # Mirror of next_after: a slightly earlier wall-clock time may be a later instant.
        if (slack := self._slack(best)):
            stop = naive - slack
            while (earlier := it.get_prev(dt.datetime)) > stop:
                if best < (w := self._instant(earlier)) <= t:
                    best = w
        return best

    def local_date(self, w: dt.datetime) -> dt.date:
        """The calendar date of instant `w` in the zone."""
        if w.tzinfo is None or w.utcoffset() is None:
            raise ValueError(f"expected a timezone-aware datetime, got {w!r}")
        return w.astimezone(self.tz).date()


def local_today(now: dt.datetime, timezone: str) -> dt.date:
    """Today's date at instant `now` (aware) in `timezone`."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {now!r}")
    return now.astimezone(ZoneInfo(timezone)).date()
