"""One grammar for points in time on the command line: ``report --since`` and ``prune --older-than``.

An age back from now: ``45s``, ``90m``, ``12h``, ``7d``, ``2w`` (a bare number is days; decimals
are allowed: ``1.5d``), or a moment: an ISO date or date-time (``2026-01-31``, ``2026-01-31T12:00``),
UTC unless it gives an offset. Either becomes a cutoff as the store keeps timestamps: naive UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from runner.errors import RunnerError

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}
FORMS = "an age such as 30m, 12h, 7d or 2w, or a UTC date such as 2026-01-31 or 2026-01-31T12:00"


class AgeError(RunnerError):
    """A ``--since`` or ``--older-than`` value that is neither an age nor an ISO date."""


def parse_age(text: str) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a bare number of days as a timedelta; None if not an age."""
    match = _AGE.match(text)
    if not match:
        return None
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_moment(text: str) -> datetime | None:
    """An ISO date or date-time as naive UTC (an offset is converted; none means UTC); None if not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not take the Z suffix
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def cutoff(text: str, option: str, now: datetime) -> datetime:
    """The moment ``text`` names: ``now`` less an age, or an ISO date; a one-line error naming ``option``."""
    age = parse_age(text)
    if age is not None:
        return now - age
    moment = parse_moment(text)
    if moment is None:
        raise AgeError(f"{option} {text!r}: give {FORMS}")
    return moment


__all__ = ["AgeError", "cutoff", "parse_age", "parse_moment", "FORMS"]
