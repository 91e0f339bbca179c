"""Calendar months in a store's timezone: `YYYY-MM` parsing and the UTC instants a local month spans.

A report's month is a *local* month: in Pacific/Auckland, 2026-10-31 12:00 UTC is already November 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """`YYYY-MM`, or ValueError naming what was expected."""
        match = _MONTH.fullmatch(text.strip())
        if match is None or int(match[1]) == 0:
            raise ValueError(f"expected a month as YYYY-MM (e.g. 2026-10), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, day: date) -> Month:
        return cls(day.year, day.month)

    @classmethod
    def current(cls, tz: tzinfo) -> Month:
        return cls.of(datetime.now(tz).date())

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def plus(self, months: int) -> Month:
        index = self.year * 12 + self.month - 1 + months
        return Month(index // 12, index % 12 + 1)

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def last_day(self) -> date:
        return self.plus(1).first_day - timedelta(days=1)

    def bounds(self, tz: tzinfo) -> tuple[datetime, datetime]:
        """[start, end) as aware instants: local midnight of the 1st to local midnight of the next month's 1st."""
        return _midnight(self.first_day, tz), _midnight(self.plus(1).first_day, tz)


def _midnight(day: date, tz: tzinfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=tz)


def parse_day_or_month(text: str, *, end: bool) -> date:
    """`YYYY-MM-DD`, or `YYYY-MM` meaning its first day (or, with `end`, its last day)."""
    try:
        month = Month.parse(text)
    except ValueError:
        pass
    else:
        return month.last_day if end else month.first_day
    try:
        if _DAY.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"expected YYYY-MM or YYYY-MM-DD, got {text!r}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `12h`, `30d`, `2w` (or bare seconds) as a positive timedelta; ValueError naming the input."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value[:-1] if value[-1:] in _DURATION_UNITS else value
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"duration {text!r}: use a positive whole number with s, m, h, d or w (e.g. 30d)")
    return timedelta(seconds=int(number) * _DURATION_UNITS[unit])


def parse_iso_week(text: str) -> date:
    """The Monday of ISO week YYYY-Www."""
    try:
        year, week = text.split("-W")
        return date.fromisocalendar(int(year), int(week), 1)
    except ValueError:
        raise ValueError(f"not an ISO week YYYY-Www (e.g. 2026-W05): {text!r}") from None


def iso_week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"
