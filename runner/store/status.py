"""Run statuses, timestamps and the heartbeat rule that shows a dead run as ``lost``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from runner.store import schema

STATUSES = ("running", "completed", "failed", "interrupted", "lost", "queued")  # queued: a sweep's run, not started yet
RESUMABLE = ("interrupted", "failed", "lost")
LOST_AFTER_BEATS = 2  # heartbeats a running run may miss before it is shown as lost


def utcnow() -> datetime:
    """Now, as the store keeps timestamps: naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def deadline(now: datetime, heartbeat_s: float) -> datetime:
    """When a run that beat at ``now`` counts as lost if it has not beaten again."""
    return now + timedelta(seconds=LOST_AFTER_BEATS * heartbeat_s)


def live_status(status: str, lost_after: datetime | None, now: datetime) -> str:
    """The status a reader should see: a ``running`` run past its heartbeat deadline is ``lost``.

    Derived when read, never written: a run that was only slow becomes ``running`` again with its
    next heartbeat. :func:`status_now` is the same rule as an SQL expression.
    """
    return "lost" if status == "running" and lost_after is not None and lost_after < now else status


def status_now(now: datetime) -> Any:
    """:func:`live_status` as an SQL expression over ``runs``."""
    return sa.case((sa.and_(schema.runs.c.status == "running", schema.runs.c.lost_after < now), "lost"), else_=schema.runs.c.status)


def status_is(status: str, now: datetime) -> Any:
    """``status_now(now) == status`` spelled on the stored columns, so that an index on ``runs.status``
    serves it (a CASE hides the column from the planner): only ``running`` and ``lost`` look at the deadline."""
    runs = schema.runs.c
    if status == "lost":
        return sa.or_(runs.status == "lost", sa.and_(runs.status == "running", runs.lost_after < now))
    if status == "running":
        return sa.and_(runs.status == "running", sa.or_(runs.lost_after.is_(None), runs.lost_after >= now))
    return runs.status == status


__all__ = ["STATUSES", "RESUMABLE", "LOST_AFTER_BEATS", "utcnow", "deadline", "live_status", "status_now", "status_is"]
