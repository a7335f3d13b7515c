"""The timestamp format of the contract (section 1), shared by the parser and the HTTP API."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from enum import Enum


class TimestampError(ValueError):
    """A string that is not an RFC 3339 / ISO 8601 date-time the lake accepts."""


# 'T', 't' or ' ' between date and time; seconds optional; any number of fractional digits (kept to the
# microsecond, the rest truncated); 'Z', an offset, or none (= UTC).
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?"
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_US_PER_DAY = 86_400_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The instants that Python, Spark and DuckDB timestamps all hold.
MIN_US = (date(1, 1, 1).toordinal() - _EPOCH_ORDINAL) * _US_PER_DAY
MAX_US = (date(9999, 12, 31).toordinal() - _EPOCH_ORDINAL + 1) * _US_PER_DAY - 1


# The form nearly every reading has (2024-07-30T12:00:00.123456Z: ASCII digits, up to 6 fractional, 'Z') is read by
# `datetime.fromisoformat` in C: the same instant as the general path below gives (a differential test in
# tests/test_parse.py), 2.4x quicker. Any other form, or a value fromisoformat refuses, takes the general path.
_CANONICAL = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z", re.ASCII)
_ONE_US = timedelta(microseconds=1)


def parse_timestamp_us(text: str) -> int:
    """Microseconds since the epoch, UTC, of an RFC 3339 / ISO 8601 date-time string."""
    if _CANONICAL.fullmatch(text):
        try:
            return (datetime.fromisoformat(text) - EPOCH) // _ONE_US
        except ValueError:
            pass  # a day, hour, minute or second out of range: the general path says which
    return parse_general_us(text)


def parse_general_us(text: str) -> int:
    """`parse_timestamp_us` for every form the contract accepts (the definition of its rules)."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise TimestampError(f"timestamp {text[:64]!r} is not an ISO 8601 date-time such as 2024-07-30T12:00:00Z")
    year, month, day, hour, minute, second, fraction, _zulu, sign, off_h, off_m = match.groups()
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError as exc:
        raise TimestampError(f"timestamp {text[:64]!r}: {exc}") from None
    h, m, s = int(hour), int(minute), int(second or 0)
    if h > 23 or m > 59 or s > 59:
        raise TimestampError(f"timestamp {text[:64]!r} has a time of day out of range")
    micros = int((fraction or "")[:6].ljust(6, "0"))
    total = days * _US_PER_DAY + ((h * 60 + m) * 60 + s) * 1_000_000 + micros
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            raise TimestampError(f"timestamp {text[:64]!r} has an offset out of range")
        offset = (oh * 60 + om) * 60_000_000
        total += -offset if sign == "+" else offset
    if not MIN_US <= total <= MAX_US:
        raise TimestampError(f"timestamp {text[:64]!r} is outside years 0001-9999 in UTC")
    return total


def from_us(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def format_utc(moment: datetime) -> str:
    """2024-07-30T12:00:00Z, with fractional seconds only when there are any."""
    moment = moment.astimezone(UTC)
    text = moment.replace(tzinfo=None).isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text + "Z"


class Grain(str, Enum):
    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def micros(self) -> int:
        return {"second": 1_000_000, "minute": 60_000_000, "hour": 3_600_000_000, "day": _US_PER_DAY}[self.value]

    def bucket_start_us(self, micros: int) -> int:
        return micros - micros % self.micros
