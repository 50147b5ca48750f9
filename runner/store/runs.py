"""Writing runs (``store.runs``): the run row, its epochs, test metrics, checkpoints and evaluations.

Each method is one short transaction (retried while SQLite is locked), so several processes can
write one store at once.

A run has one owner at a time: the process that created it, or the one that last claimed it
(resume). The writes of a run's life take that process's ``owner`` token and check, inside their
transaction, that it is still the run's own; when it is not (the run was resumed elsewhere while
this process was paused), they raise :class:`RunTakenOver` and write nothing.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from runner.errors import RunNotFoundError, RunTakenOver, StoreError
from runner.store import schema
from runner.store.status import RESUMABLE, STATUSES, deadline, status_now, utcnow

if TYPE_CHECKING:
    from runner.store.database import Store


def stored_number(value: float | None) -> float | None:
    """A metric as a row holds it: a value that is not a finite number (a diverged loss) is NULL,
    on every database alike (SQLite would keep an infinity but turn a NaN into NULL)."""
    return float(value) if value is not None and math.isfinite(value) else None


def new_id() -> str:
    """A new run or sweep id: 12 hex digits, the first of them a letter.

    Where a user writes an id, ``weights: {run: ...}`` or ``--set model.weights={run: ...}``, YAML reads
    one that starts with a digit as a number about one time in 130: digits only (``257400778786``, an
    int), digits around one ``e`` (``5351e9053013``, a float, here infinite) or ``0b`` and binary digits.
    Every YAML number starts with a digit, a sign or a dot, so an id that starts with a letter stays a string.
    """
    while True:
        candidate = uuid.uuid4().hex[:12]
        if candidate[0] in "abcdef":
            return candidate


def new_owner() -> str:
    """A token naming this process, unique to one claim of one run: ``host:pid:nonce``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def check_owner(conn: sa.Connection, run_id: str, owner: str | None) -> None:
    """Inside a write transaction: ``owner`` (when given) must still be the run's owner.

    The row is locked for the rest of the transaction where the database can (``FOR UPDATE``), so
    no claim can slip in between this check and the write it guards.
    """
    if owner is None:
        return
    current = conn.execute(sa.select(schema.runs.c.owner).where(schema.runs.c.id == run_id).with_for_update()).one_or_none()
    if current is None:  # deleted (a lost run whose process was only paused): its files must not come back either
        raise RunTakenOver(run_id, None, deleted=True)
    if current[0] != owner:
        raise RunTakenOver(run_id, current[0])


def forget_after(conn: sa.Connection, run_id: str, epoch: int) -> None:
    """Inside a write transaction: delete what a run stored after ``epoch`` (the checkpoint training goes on from).

    Per-epoch rows of later epochs and the end-of-run test metrics go; with ``epoch`` 0 the run starts over.
    """
    conn.execute(sa.delete(schema.epoch_metrics).where(schema.epoch_metrics.c.run_id == run_id, schema.epoch_metrics.c.epoch > epoch))
    conn.execute(sa.delete(schema.epochs).where(schema.epochs.c.run_id == run_id, schema.epochs.c.epoch > epoch))
    conn.execute(sa.delete(schema.split_metrics).where(schema.split_metrics.c.run_id == run_id))


class RunWriter:
    """The writes of a run's life: created ``running``, epochs logged, finished with a status.

    ``owner`` (from :func:`new_owner`) fences the writes of a training process: see the module docstring.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def create(self, run_id: str, heartbeat_s: float | None = None, owner: str | None = None, **fields: Any) -> str:
        """A new ``running`` run owned by ``owner``; with ``heartbeat_s`` it shows as lost unless :meth:`heartbeat` keeps up."""
        now = utcnow()
        values = {"status": "running", "started_at": now, "heartbeat_at": now, "epochs_run": 0, "attempts": 1,
                  "lost_after": deadline(now, heartbeat_s) if heartbeat_s else None, "owner": owner,
                  "artifacts_dir": self._store.stored_path(self._store.run_dir(run_id)), **fields}
        self._store.write(lambda conn: conn.execute(sa.insert(schema.runs).values(id=run_id, **values)))
        return run_id

    def update(self, run_id: str, owner: str | None = None, **fields: Any) -> None:
        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            conn.execute(sa.update(schema.runs).where(schema.runs.c.id == run_id).values(**fields))

        self._store.write(write)

    def check_owner(self, run_id: str, owner: str) -> None:
        """Raise :class:`RunTakenOver` unless ``owner`` still owns the run (before a checkpoint file replaces the last one)."""
        self._store.write(lambda conn: check_owner(conn, run_id, owner))

    def heartbeat(self, run_id: str, heartbeat_s: float | None = None, owner: str | None = None) -> None:
        """The run is alive; with ``heartbeat_s`` its lost deadline moves on by that many intervals."""
        now = utcnow()
        extra = {"lost_after": deadline(now, heartbeat_s)} if heartbeat_s else {}
        self.update(run_id, owner=owner, heartbeat_at=now, **extra)

    def claim_for_resume(self, run_id: str, epoch: int, heartbeat_s: float, owner: str | None = None, **run_fields: Any) -> None:
        """Make a resumable run ``running`` again from the end of ``epoch``, in one transaction.

        Rows of later epochs (written before the process stopped, after its last checkpoint) and
        end-of-run results are deleted. The status check is part of the update, so of two
        processes resuming one run at once only one gets it; ``owner`` becomes the run's owner, which
        fences off the process that trained it before (if it still lives).
        """
        now = utcnow()

        def write(conn: sa.Connection) -> None:
            claimed = conn.execute(
                sa.update(schema.runs)
                .where(schema.runs.c.id == run_id, status_now(now).in_(RESUMABLE))
                .values(status="running", ended_at=None, duration_s=None, error=None, traceback=None, stop_reason=None,
                        confusion_json=None, heartbeat_at=now, lost_after=deadline(now, heartbeat_s), epochs_run=epoch,
                        owner=owner, attempts=schema.runs.c.attempts + 1, **run_fields)
            )
            if claimed.rowcount != 1:
                raise StoreError(f"run {run_id} cannot be resumed: it is no longer {' or '.join(RESUMABLE)}")
            forget_after(conn, run_id, epoch)

        self._store.write(write)

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float], duration_s: float, owner: str | None = None,
                  **run_fields: Any) -> None:
        """One transaction per epoch: the metrics, the timing and the run's progress columns."""
        now = utcnow()

        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            conn.execute(
                sa.insert(schema.epoch_metrics),
                [{"run_id": run_id, "epoch": epoch, "name": k, "value": stored_number(v)} for k, v in metrics.items()],
            )
            conn.execute(sa.insert(schema.epochs).values(run_id=run_id, epoch=epoch, duration_s=duration_s, finished_at=now))
            conn.execute(sa.update(schema.runs).where(schema.runs.c.id == run_id).values(epochs_run=epoch, heartbeat_at=now, **run_fields))

        self._store.write(write)

    def save_split_metrics(self, run_id: str, split: str, metrics: dict[str, float], owner: str | None = None) -> None:
        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            conn.execute(sa.delete(schema.split_metrics)
                         .where(schema.split_metrics.c.run_id == run_id, schema.split_metrics.c.split == split))
            conn.execute(
                sa.insert(schema.split_metrics),
                [{"run_id": run_id, "split": split, "name": k, "value": stored_number(v)} for k, v in metrics.items()],
            )

        self._store.write(write)

    def save_checkpoint(self, run_id: str, kind: str, epoch: int, path: str | os.PathLike[str], sha256: str, size_bytes: int,
                        owner: str | None = None) -> None:
        stored = self._store.stored_path(path)

        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            # replaces the run's checkpoint of this kind: the same two statements on every database
            conn.execute(sa.delete(schema.checkpoints).where(schema.checkpoints.c.run_id == run_id, schema.checkpoints.c.kind == kind))
            conn.execute(sa.insert(schema.checkpoints).values(run_id=run_id, kind=kind, epoch=epoch, path=stored, sha256=sha256,
                                                             size_bytes=size_bytes))

        self._store.write(write)

    def finish(self, run_id: str, status: str, owner: str | None = None, **fields: Any) -> None:
        """The run ended with ``status``: its end time and duration, and any other columns given."""
        assert status in STATUSES, status
        ended = utcnow()

        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            started = conn.execute(sa.select(schema.runs.c.started_at).where(schema.runs.c.id == run_id)).scalar()
            if started is None:
                raise RunNotFoundError(f"no run {run_id!r}")
            duration_s = (ended - started).total_seconds()
            conn.execute(sa.update(schema.runs).where(schema.runs.c.id == run_id)
                         .values({"status": status, "ended_at": ended, "duration_s": duration_s, **fields}))

        self._store.write(write)

    def save_evaluation(self, run_id: str, **fields: Any) -> int:
        """A ``runner eval`` result of the run; its id."""
        fields["loss"] = stored_number(fields.get("loss"))

        def write(conn: sa.Connection) -> int:
            inserted = conn.execute(sa.insert(schema.evaluations).values(run_id=run_id, created_at=utcnow(), **fields))
            return int(inserted.inserted_primary_key[0])

        return self._store.write(write)


__all__ = ["RunWriter", "new_owner", "check_owner", "forget_after"]
