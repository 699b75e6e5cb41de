"""Time for rules: weekly windows in a time zone, and the local time of an evaluation.

A `Window` is a set of weekdays and hour ranges in a time zone (`mon-fri 08:00-18:00`); a
range whose end is not after its start wraps past midnight (`22:00-06:00`) and belongs to
the day it starts on: `fri 22:00-06:00` holds from Friday 22:00 to Saturday 06:00.

The time of an evaluation is the epoch seconds the caller passes (the service's injected
clock), truncated to whole seconds; local times follow the zone's rules (zoneinfo), so
daylight-saving changes shift the windows with the wall clock.

Two independent ways to answer "is this time inside the window" live here on purpose: the
interpreter uses `Window.contains` on a `datetime` (`Moment`), the generated evaluator looks
the minute of the week up in `Window.week`, a table built from the ranges, with the minute
of the week from a per-minute cached `LocalClock`. Tests prove the two agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY = 1440
WEEK = 7 * DAY
#: "00" .. "23", "mon" .. "sun", "00:00" .. "23:59": the values of the time fields.
HOURS: tuple[str, ...] = tuple(f"{h:02d}" for h in range(24))
TIMES: tuple[str, ...] = tuple(f"{m // 60:02d}:{m % 60:02d}" for m in range(DAY))
DEFAULT_TZ = "UTC"


def get_tz(name: str) -> tzinfo:
    """The time zone of an IANA name; raises ValueError with a readable message."""
    if not isinstance(name, str) or not name:
        raise ValueError("a time zone name is required")
    try:
        return ZoneInfo(name)
    except Exception:
        if name == "UTC":  # no tz database on this system: UTC needs none
            return UTC
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')") from None


def fmt_minute(m: int) -> str:
    """'08:30' for 510; '24:00' for the end of the day."""
    return f"{m // 60:02d}:{m % 60:02d}"


def days_desc(days: tuple[int, ...]) -> str:
    """'mon-fri,sun' for (0, 1, 2, 3, 4, 6)."""
    parts = []
    i = 0
    ds = sorted(set(days))
    while i < len(ds):
        j = i
        while j + 1 < len(ds) and ds[j + 1] == ds[j] + 1:
            j += 1
        parts.append(WEEKDAYS[ds[i]] if i == j else f"{WEEKDAYS[ds[i]]}-{WEEKDAYS[ds[j]]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Window:
    """Weekdays and hour ranges in a time zone."""

    days: frozenset[int]  # weekdays (0 = Monday) on which a range starts
    ranges: tuple[tuple[int, int], ...]  # (start, end) minutes of the day; end <= start wraps
    tz: str
    zone: tzinfo
    week: bytes  # one byte per minute of the week (0 = Monday 00:00): 1 inside, 0 outside

    @classmethod
    def make(cls, days: frozenset[int], ranges: tuple[tuple[int, int], ...], tz: str, zone: tzinfo) -> Window:
        """Build a window and its minute-of-week table (from the ranges, not from `contains`)."""
        week = bytearray(WEEK)
        for day in days:
            for start, end in ranges:
                first = day * DAY + start
                last = day * DAY + (end if end > start else end + DAY)
                week[first:min(last, WEEK)] = b"\1" * (min(last, WEEK) - first)
                if last > WEEK:  # Sunday night runs into Monday morning
                    week[:last - WEEK] = b"\1" * (last - WEEK)
        return cls(days, ranges, tz, zone, bytes(week))

    @property
    def desc(self) -> str:
        """'mon-fri 08:00-18:00 (Europe/Berlin)', 'sat-sun all day (UTC)'."""
        days = "every day" if len(self.days) == 7 else days_desc(tuple(self.days))
        if self.ranges == ((0, DAY),):
            hours = "all day"
        else:
            hours = ",".join(f"{fmt_minute(s)}-{fmt_minute(e)}" for s, e in self.ranges)
        return f"{days} {hours} ({self.tz})"

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether local `weekday` (0 = Monday) at `minute` of the day is inside (the reference)."""
        for start, end in self.ranges:
            if start < end:
                if weekday in self.days and start <= minute < end:
                    return True
            elif (weekday in self.days and minute >= start) or ((weekday - 1) % 7 in self.days and minute < end):
                return True
        return False


class LocalClock:
    """The minute of the week (0 = Monday 00:00) in one zone at an epoch time; for the
    generated evaluator, so cached for the current minute."""

    __slots__ = ("_cache", "zone")

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._cache: tuple[float, int] = (math.nan, 0)

    def __call__(self, now: float) -> int:
        key = now // 60
        cache = self._cache
        if cache[0] == key:
            return cache[1]
        zone = self.zone
        second = math.floor(now)
        dt = datetime.fromtimestamp(second, zone)
        mow = dt.weekday() * DAY + dt.hour * 60 + dt.minute
        # Every second of this UTC minute is in the same local minute when the zone's offset is
        # a whole number of minutes and does not change within the minute: then cache it.
        off = dt.utcoffset()
        start = key * 60
        if (off is not None and off % timedelta(minutes=1) == timedelta(0)
                and datetime.fromtimestamp(start, zone).utcoffset() == off
                and datetime.fromtimestamp(start + 59, zone).utcoffset() == off):
            self._cache = (key, mow)
        return mow


class Moment:
    """The time of one interpreted evaluation: local datetimes per zone (the reference path).

    `now` None means the wall clock, read once when first needed.
    """

    __slots__ = ("_local", "_now")

    def __init__(self, now: float | None) -> None:
        self._now = now
        self._local: dict[str, datetime] = {}

    @property
    def now(self) -> float:
        """The epoch seconds of this evaluation."""
        if self._now is None:
            self._now = time.time()
        return self._now

    def local(self, tz: str, zone: tzinfo) -> datetime:
        """The local date and time (whole seconds) in a zone."""
        dt = self._local.get(tz)
        if dt is None:
            dt = self._local[tz] = datetime.fromtimestamp(math.floor(self.now), zone)
        return dt

    def describe(self, tz: str, zone: tzinfo) -> str:
        """'sat 23:30 Europe/Berlin': the local time, for explanations."""
        dt = self.local(tz, zone)
        return f"{WEEKDAYS[dt.weekday()]} {dt.hour:02d}:{dt.minute:02d} {tz}"

    def inside(self, window: Window) -> bool:
        """Whether this moment is inside a window."""
        dt = self.local(window.tz, window.zone)
        return window.contains(dt.weekday(), dt.hour * 60 + dt.minute)
