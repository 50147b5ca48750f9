"""The queue of sweeps (``store.queue``): sweeps, their queued runs, claims and requeues.

A sweep's runs are rows of ``runs``, created ``queued`` with their resolved specs before any
training. A worker takes the next one with :meth:`RunQueue.claim`, one transaction that first puts
back runs whose worker died (``lost``, with attempts left) and then switches the next queued run to
``running`` under the worker's owner token, counting the attempt. The database is the only
coordinator: on SQLite the claim holds the write lock from its first statement (BEGIN IMMEDIATE),
so claims are serialised; its select is written ``FOR UPDATE SKIP LOCKED``, which SQLite ignores
and a server database uses, so that workers claim at once without waiting on one another.

Statuses: ``queued`` → ``running`` → ``completed | failed | interrupted | lost``. A worker that dies
leaves its run ``running`` until the heartbeat deadline passes (``lost``, see
:mod:`runner.store.status`); only the claim pass and :meth:`RunQueue.requeue` make it ``queued`` again.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

import sqlalchemy as sa

from runner.errors import RunnerError, StoreError
from runner.store import schema
from runner.store.queries import json_value
from runner.store.runs import check_owner, forget_after, new_id
from runner.store.status import deadline, live_status, status_is, status_now, utcnow

if TYPE_CHECKING:
    from runner.store.database import Store


class SweepNotFoundError(RunnerError, KeyError):
    """No sweep has the given id, id prefix or name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SweepRecord:
    """A sweep as stored: found again by ``name`` and ``spec_hash`` (the hash of its expanded runs)."""

    name: str
    spec_hash: str
    spec_json: str  # the sweep as given (base spec, sweep section, seeds)
    spec_dir: str  # where the spec's relative paths point
    keys: tuple[str, ...]  # the swept spec keys, in order
    max_attempts: int


@dataclass(frozen=True)
class QueuedRun:
    """One run of a sweep's expansion, as queued: its resolved spec and its place in the sweep."""

    index: int
    name: str
    spec_yaml: str
    spec_json: str
    spec_hash: str
    model: str
    strategy: str
    dataset: str
    seed: int
    combination: dict[str, Any]  # swept key → value (the seed is the run's own column)


@dataclass(frozen=True)
class Claim:
    """A run a worker has taken: ``running``, owned by ``owner``, on its ``attempts``-th start."""

    run_id: str
    sweep_id: str
    owner: str
    attempts: int
    spec_dir: str
    resume: bool  # the store holds a last checkpoint of the run: training goes on from it


# Columns that describe how a run ended; a run that starts again has none of them.
_ENDED = {"ended_at": None, "duration_s": None, "error": None, "traceback": None, "stop_reason": None, "confusion_json": None}


def _attempts_left() -> Any:
    """SQL condition over ``runs``: the run's sweep allows it another start."""
    limit = sa.select(schema.sweeps.c.max_attempts).where(schema.sweeps.c.id == schema.runs.c.sweep_id).scalar_subquery()
    return schema.runs.c.attempts < limit


def _in_sweep(sweep_id: str | None) -> Any:
    return schema.runs.c.sweep_id == sweep_id if sweep_id is not None else schema.runs.c.sweep_id.is_not(None)


def requeue_lost(conn: sa.Connection, now: datetime, sweep_id: str | None = None) -> list[str]:
    """Inside a write transaction: sweep runs whose worker stopped beating become ``queued`` again,
    while they have attempts left. They keep their rows and checkpoints: the next start resumes them.
    The owner is cleared, so a worker that was only paused finds its run taken when it wakes."""
    lost = list(conn.execute(
        sa.select(schema.runs.c.id).where(_in_sweep(sweep_id), status_is("lost", now), _attempts_left())
        .with_for_update(skip_locked=True)
    ).scalars())
    if lost:
        conn.execute(sa.update(schema.runs).where(schema.runs.c.id.in_(lost)).values(status="queued", owner=None, lost_after=None))
    return lost


def _start_over(conn: sa.Connection, run_ids: list[str]) -> None:
    """Inside a write transaction: the runs keep nothing of their earlier attempt (a failed run is trained again)."""
    forgotten = [schema.epoch_metrics, schema.epochs, schema.split_metrics, schema.checkpoints]
    for table in forgotten:
        conn.execute(sa.delete(table).where(table.c.run_id.in_(run_ids)))
    conn.execute(sa.update(schema.runs).where(schema.runs.c.id.in_(run_ids)).values(epochs_run=0, best_epoch=None, best_val_accuracy=None))


class RunQueue:
    """Sweeps and their queued runs (``store.queue``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # ---- writes -----------------------------------------------------------------------------------
    def enqueue(self, sweep: SweepRecord, runs: Sequence[QueuedRun]) -> tuple[str, bool]:
        """The sweep's id and whether it is new: the sweep of this name and hash if one is stored
        (with ``max_attempts`` updated), else a new sweep with every run ``queued``, in one
        transaction (nothing half queued)."""
        def write(conn: sa.Connection) -> tuple[str, bool]:
            found = conn.execute(
                sa.select(schema.sweeps.c.id).where(schema.sweeps.c.name == sweep.name, schema.sweeps.c.spec_hash == sweep.spec_hash)
            ).scalar()
            if found is not None:  # the same sweep again; its attempt limit is the one asked for now
                conn.execute(sa.update(schema.sweeps).where(schema.sweeps.c.id == found).values(max_attempts=sweep.max_attempts))
                return found, False
            now = utcnow()
            sweep_id = new_id()
            conn.execute(sa.insert(schema.sweeps).values(  # the sweep before the runs that refer to it
                id=sweep_id, name=sweep.name, spec_hash=sweep.spec_hash, spec_json=sweep.spec_json, spec_dir=sweep.spec_dir,
                keys_json=json.dumps(list(sweep.keys)), max_attempts=sweep.max_attempts, created_at=now))
            rows = []
            for run in runs:
                run_id = self._store.new_run_id()
                rows.append({
                    "id": run_id, "status": "queued", "sweep_id": sweep_id, "sweep_index": run.index,
                    "combination_json": json.dumps(run.combination), "name": run.name, "spec_yaml": run.spec_yaml,
                    "spec_json": run.spec_json, "spec_hash": run.spec_hash, "model": run.model, "strategy": run.strategy,
                    "dataset": run.dataset, "seed": run.seed, "started_at": now, "epochs_run": 0, "attempts": 0,
                    "artifacts_dir": self._store.stored_path(self._store.run_dir(run_id)),
                })
            if rows:
                conn.execute(sa.insert(schema.runs), rows)
            return sweep_id, True

        return self._store.write(write, exclusive=True)

    def requeue(self, sweep_id: str) -> dict[str, list[str]]:
        """Put back the sweep's runs that stopped without completing; status → the ids requeued.

        Interrupted runs (someone stopped them) always come back and resume; lost runs come back and
        resume while they have attempts left; failed runs come back while they have attempts left
        and start over (their epochs, test metrics and checkpoint rows are deleted).
        """
        now = utcnow()

        def write(conn: sa.Connection) -> dict[str, list[str]]:
            def ids(*conditions: Any) -> list[str]:
                return list(conn.execute(sa.select(schema.runs.c.id).where(schema.runs.c.sweep_id == sweep_id, *conditions)).scalars())

            interrupted = ids(schema.runs.c.status == "interrupted")
            failed = ids(schema.runs.c.status == "failed", _attempts_left())
            lost = requeue_lost(conn, now, sweep_id)
            if failed:
                _start_over(conn, failed)
            if interrupted or failed:
                conn.execute(sa.update(schema.runs).where(schema.runs.c.id.in_(interrupted + failed))
                             .values(status="queued", owner=None, **_ENDED))
            return {"interrupted": interrupted, "failed": failed, "lost": lost}

        return self._store.write(write, exclusive=True)

    def requeue_stopped(self, sweep_id: str, pid: int, host: str | None = None) -> list[str]:
        """Put back the sweep's runs that the worker process ``pid`` on ``host`` (default: this one)
        left ``interrupted``: a launcher stopped it (a preempted Slurm job), and the next worker
        resumes them from their checkpoints. The ids requeued."""
        prefix = f"{host or socket.gethostname()}:{pid}:"

        def write(conn: sa.Connection) -> list[str]:
            stopped = list(conn.execute(
                sa.select(schema.runs.c.id)
                .where(schema.runs.c.sweep_id == sweep_id, schema.runs.c.status == "interrupted",
                       schema.runs.c.owner.startswith(prefix, autoescape=True))
                .with_for_update()
            ).scalars())
            if stopped:
                conn.execute(sa.update(schema.runs).where(schema.runs.c.id.in_(stopped)).values(status="queued", owner=None, **_ENDED))
            return stopped

        return self._store.write(write, exclusive=True)

    def claim(self, owner: str, heartbeat_s: float, sweep_id: str | None = None) -> Claim | None:
        """Take the next queued run (of one sweep, or of any, oldest sweep first), or None when none is left.

        One transaction: lost runs are requeued first, then the next queued run in sweep order
        becomes ``running``, owned by ``owner``, with a heartbeat deadline and one more attempt.
        """
        def write(conn: sa.Connection) -> Claim | None:
            now = utcnow()
            requeue_lost(conn, now, sweep_id)
            has_last_checkpoint = sa.exists().where(schema.checkpoints.c.run_id == schema.runs.c.id, schema.checkpoints.c.kind == "last")
            candidate = conn.execute(
                sa.select(*schema.runs.c["id", "sweep_id", "attempts"], schema.sweeps.c.spec_dir, has_last_checkpoint.label("resume"))
                .join(schema.sweeps, schema.sweeps.c.id == schema.runs.c.sweep_id)
                .where(schema.runs.c.status == "queued", _in_sweep(sweep_id))
                .order_by(schema.sweeps.c.created_at, schema.sweeps.c.id, schema.runs.c.sweep_index)
                .limit(1)
                .with_for_update(skip_locked=True, of=schema.runs)
            ).first()
            if candidate is None:
                return None
            claimed = conn.execute(
                sa.update(schema.runs).where(schema.runs.c.id == candidate.id, schema.runs.c.status == "queued")
                .values(status="running", owner=owner, attempts=schema.runs.c.attempts + 1, started_at=now, heartbeat_at=now,
                        lost_after=deadline(now, heartbeat_s), **_ENDED)
            )
            if claimed.rowcount != 1:  # the lock above makes this impossible; never run a run twice
                raise StoreError(f"run {candidate.id} was claimed by another worker at the same time")
            return Claim(candidate.id, candidate.sweep_id, owner, int(candidate.attempts) + 1, candidate.spec_dir, bool(candidate.resume))

        return self._store.write(write, exclusive=True)

    def start(self, run_id: str, owner: str, epoch: int, heartbeat_s: float, **columns: Any) -> None:
        """A claimed run gets its plan's columns (settings, device, versions...) as training begins.

        Rows of epochs after ``epoch`` (where training goes on from; 0 for a new start) are deleted.
        """
        now = utcnow()

        def write(conn: sa.Connection) -> None:
            check_owner(conn, run_id, owner)
            conn.execute(sa.update(schema.runs).where(schema.runs.c.id == run_id).values(
                epochs_run=epoch, heartbeat_at=now, lost_after=deadline(now, heartbeat_s), **columns))
            forget_after(conn, run_id, epoch)

        self._store.write(write)

    # ---- reads ------------------------------------------------------------------------------------
    def sweep_row(self, ref: str) -> dict[str, Any]:
        """A sweep by id, unique id prefix or name (the newest sweep of that name)."""
        with self._store.engine.connect() as conn:
            newest_of_name = (sa.select(schema.sweeps).where(schema.sweeps.c.name == ref)
                              .order_by(schema.sweeps.c.created_at.desc()).limit(1))
            by_name = conn.execute(newest_of_name).mappings().first()
            if by_name is not None:
                return dict(by_name)
            by_prefix = sa.select(schema.sweeps).where(schema.sweeps.c.id.startswith(ref, autoescape=True)).limit(2)
            found = conn.execute(by_prefix).mappings().all()
        if len(found) == 1:
            return dict(found[0])
        if not found:
            raise SweepNotFoundError(f"no sweep {ref!r} (an id, id prefix or name) in {self._store.location}")
        raise SweepNotFoundError(f"sweep id prefix {ref!r} is ambiguous; give more characters")

    def latest_sweep(self) -> dict[str, Any]:
        with self._store.engine.connect() as conn:
            row = conn.execute(sa.select(schema.sweeps).order_by(schema.sweeps.c.created_at.desc()).limit(1)).mappings().first()
        if row is None:
            raise SweepNotFoundError(f"no sweep in {self._store.location}")
        return dict(row)

    def sweeps(self) -> list[dict[str, Any]]:
        """Every sweep, newest first, with the count of its runs per (live) status."""
        status = status_now(utcnow())
        with self._store.engine.connect() as conn:
            sweeps = [dict(r) for r in conn.execute(sa.select(schema.sweeps).order_by(schema.sweeps.c.created_at.desc())).mappings()]
            counts = conn.execute(  # grouped by the expression: on PostgreSQL a bare "status" would mean the column
                sa.select(schema.runs.c.sweep_id, status.label("status"), sa.func.count())
                .where(schema.runs.c.sweep_id.is_not(None)).group_by(schema.runs.c.sweep_id, status)
            ).all()
        by_sweep: dict[str, dict[str, int]] = {}
        for sweep_id, status, count in counts:
            by_sweep.setdefault(sweep_id, {})[status] = int(count)
        return [{**sweep, "counts": by_sweep.get(sweep["id"], {})} for sweep in sweeps]

    def sweep_runs(self, sweep_id: str) -> list[dict[str, Any]]:
        """The sweep's runs in sweep order: status as a reader sees it, combination, attempts, epochs
        run of the epochs planned, the error of a failed run and its test accuracy."""
        now = utcnow()
        test_accuracy = (
            sa.select(schema.split_metrics.c.value)
            .where(schema.split_metrics.c.run_id == schema.runs.c.id, schema.split_metrics.c.split == "test",
                   schema.split_metrics.c.name == "accuracy")
            .scalar_subquery()
        )
        query = (
            sa.select(*schema.runs.c["id", "sweep_index", "status", "lost_after", "seed", "combination_json", "attempts", "epochs_run"],
                      json_value(schema.runs.c.spec_json, "training.epochs", self._store.engine.dialect.name).label("epochs"),
                      schema.runs.c.error, test_accuracy.label("test_accuracy"), *schema.runs.c["started_at", "ended_at"])
            .where(schema.runs.c.sweep_id == sweep_id).order_by(schema.runs.c.sweep_index)
        )
        with self._store.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["status"] = live_status(row["status"], row.pop("lost_after"), now)
            row["combination"] = json.loads(row.pop("combination_json") or "{}")
        return rows


__all__ = ["RunQueue", "SweepRecord", "QueuedRun", "Claim", "SweepNotFoundError", "requeue_lost"]
