"""The results store: the only module that talks to the database (SQLAlchemy 2.x).

Default ``sqlite:///results.db`` in the working directory; ``--db URL|PATH`` or ``RUNNER_DB``
choose another. Run artefacts (checkpoints) live beside an SQLite file in ``runs/<run id>/``, so two
stores never share artefacts. This module never imports torch.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from runner.errors import RunNotFoundError, StoreError

DEFAULT_DB = "results.db"
DB_ENV = "RUNNER_DB"
STATUSES = ("running", "completed", "failed", "interrupted", "lost")
RESUMABLE = ("interrupted", "failed", "lost")
LOST_AFTER_BEATS = 2  # heartbeats a running run may miss before it is shown as lost

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[str] = mapped_column(sa.String)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, index=True)
    status: Mapped[str] = mapped_column(sa.String, index=True)
    spec_yaml: Mapped[str] = mapped_column(sa.Text)
    spec_json: Mapped[str] = mapped_column(sa.Text)
    spec_hash: Mapped[str] = mapped_column(sa.String, index=True)
    model: Mapped[str] = mapped_column(sa.String)
    strategy: Mapped[str] = mapped_column(sa.String)
    dataset: Mapped[str] = mapped_column(sa.String)
    seed: Mapped[int] = mapped_column(sa.Integer)
    device: Mapped[str | None] = mapped_column(sa.String)
    host: Mapped[str | None] = mapped_column(sa.String)
    python_version: Mapped[str | None] = mapped_column(sa.String)
    torch_version: Mapped[str | None] = mapped_column(sa.String)
    torchvision_version: Mapped[str | None] = mapped_column(sa.String)
    runner_version: Mapped[str | None] = mapped_column(sa.String)
    git_commit: Mapped[str | None] = mapped_column(sa.String)
    params_total: Mapped[int | None] = mapped_column(sa.Integer)
    params_trainable: Mapped[int | None] = mapped_column(sa.Integer)
    model_summary: Mapped[str | None] = mapped_column(sa.Text)
    plugins_json: Mapped[str | None] = mapped_column(sa.Text)
    settings_json: Mapped[str | None] = mapped_column(sa.Text)
    class_names_json: Mapped[str | None] = mapped_column(sa.Text)
    confusion_json: Mapped[str | None] = mapped_column(sa.Text)
    weights_source: Mapped[str | None] = mapped_column(sa.String)
    weights_sha256: Mapped[str | None] = mapped_column(sa.String)
    started_at: Mapped[datetime] = mapped_column(sa.DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    duration_s: Mapped[float | None] = mapped_column(sa.Float)
    heartbeat_at: Mapped[datetime | None] = mapped_column(sa.DateTime)
    # a running run not heard from by then died without a word (SIGKILL, out of memory): "lost"
    lost_after: Mapped[datetime | None] = mapped_column(sa.DateTime)
    epochs_run: Mapped[int] = mapped_column(sa.Integer, default=0)
    stop_reason: Mapped[str | None] = mapped_column(sa.String)
    best_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    best_val_accuracy: Mapped[float | None] = mapped_column(sa.Float)
    error: Mapped[str | None] = mapped_column(sa.Text)
    traceback: Mapped[str | None] = mapped_column(sa.Text)
    artifacts_dir: Mapped[str | None] = mapped_column(sa.String)


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[float] = mapped_column(sa.Float)


class Epoch(Base):
    """Per-epoch bookkeeping that is not a metric (timings)."""

    __tablename__ = "epochs"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    duration_s: Mapped[float] = mapped_column(sa.Float)
    finished_at: Mapped[datetime] = mapped_column(sa.DateTime)


class SplitMetric(Base):
    """End-of-training metrics of a split (``test``)."""

    __tablename__ = "split_metrics"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, primary_key=True)
    value: Mapped[float] = mapped_column(sa.Float)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String, primary_key=True)  # best | last
    epoch: Mapped[int] = mapped_column(sa.Integer)
    path: Mapped[str] = mapped_column(sa.String)
    sha256: Mapped[str] = mapped_column(sa.String)
    size_bytes: Mapped[int] = mapped_column(sa.Integer)


class Tag(Base):
    """A user's label on a run (``runner tag``); ``--tag`` filters ``runs`` and ``report``."""

    __tablename__ = "tags"
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(sa.String, primary_key=True, index=True)


class Evaluation(Base):
    """A later evaluation of a run's checkpoint (``runner eval``): on its own split or other data."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime)
    split: Mapped[str] = mapped_column(sa.String)
    checkpoint: Mapped[str] = mapped_column(sa.String)  # best | last
    checkpoint_epoch: Mapped[int | None] = mapped_column(sa.Integer)
    dataset: Mapped[str] = mapped_column(sa.String)
    overrides_json: Mapped[str] = mapped_column(sa.Text)  # the data.* overrides, [] for the run's own data
    device: Mapped[str | None] = mapped_column(sa.String)
    samples: Mapped[int] = mapped_column(sa.Integer)
    loss: Mapped[float] = mapped_column(sa.Float)
    accuracy: Mapped[float] = mapped_column(sa.Float)
    f1_macro: Mapped[float] = mapped_column(sa.Float)


# ------------------------------------------------------------------------------------------
# Schema migrations: ordered functions, each bringing a store from version N-1 to N. A new store is
# created from the models above and stamped with the newest version; an older store runs the
# migrations it lacks, in order, in one transaction each. Never edit a released migration: add one.


def m001_initial(conn: sa.Connection) -> None:
    """Version 1, the first release: created from the models (the fixture tests/data/store_v1.db)."""
    Base.metadata.create_all(conn)


def m002_lost_after(conn: sa.Connection) -> None:
    """Version 2: ``runs.lost_after``, the heartbeat deadline that shows a dead run as ``lost``.

    Runs still ``running`` in an older store were written by a runner without a heartbeat thread:
    their deadline is their last sign of life.
    """
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN lost_after DATETIME"))
    conn.execute(sa.text("UPDATE runs SET lost_after = heartbeat_at WHERE status = 'running'"))


def m003_tags_evaluations(conn: sa.Connection) -> None:
    """Version 3: the ``tags`` and ``evaluations`` tables (``runner tag``, ``runner eval``).

    The tables are spelled out here, not taken from the models, so later model changes cannot
    change what this migration does.
    """
    metadata = sa.MetaData()
    runs = sa.Table("runs", metadata, sa.Column("id", sa.String, primary_key=True))
    tags = sa.Table(
        "tags", metadata,
        sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String, primary_key=True, index=True),
    )
    evaluations = sa.Table(
        "evaluations", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String, sa.ForeignKey(runs.c.id, ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("split", sa.String, nullable=False),
        sa.Column("checkpoint", sa.String, nullable=False),
        sa.Column("checkpoint_epoch", sa.Integer),
        sa.Column("dataset", sa.String, nullable=False),
        sa.Column("overrides_json", sa.Text, nullable=False),
        sa.Column("device", sa.String),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("loss", sa.Float, nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("f1_macro", sa.Float, nullable=False),
    )
    tags.create(conn)
    evaluations.create(conn)


MIGRATIONS: list[Callable[[sa.Connection], None]] = [m001_initial, m002_lost_after, m003_tags_evaluations]
SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> datetime:
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
    return sa.case((sa.and_(Run.status == "running", Run.lost_after < now), "lost"), else_=Run.status)


def resolve_url(db: str | os.PathLike[str] | None) -> str:
    """``--db`` value, else ``RUNNER_DB``, else ``results.db``; plain paths become SQLite URLs."""
    value = str(db) if db is not None else os.environ.get(DB_ENV) or DEFAULT_DB
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # the busy timeout first: switching a new file to WAL must wait for, not fail on, another process
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers and one writer work at once; NORMAL is durable across application crashes
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _retrying(action: Callable[[], T], attempts: int = 8) -> T:
    """Retry an SQLite write that found the database locked, with jittered exponential back-off."""
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError as exc:
            transient = any(word in str(exc) for word in ("locked", "busy", "already exists"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RunFilter:
    """Which runs a report covers; every field narrows the set (all are applied in SQL)."""

    status: str | None = None
    name_glob: str | None = None
    since: datetime | None = None  # naive UTC, like started_at
    where: tuple[tuple[str, Any], ...] = ()  # (dotted resolved-spec key, value) pairs, all must match
    run_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # runs carrying every one of these tags


def has_tags(tags: Sequence[str]) -> Any:
    """The run carries every tag in ``tags`` (an SQL condition over ``runs``)."""
    return sa.and_(sa.true(), *(Run.id.in_(sa.select(Tag.run_id).where(Tag.tag == tag)) for tag in tags))


def spec_json_path(key: str) -> str:
    """``model.name`` → ``$."model"."name"`` (digits index lists: ``data.classes.0``)."""
    parts = []
    for part in key.split("."):
        parts.append(f"[{part}]" if part.isdigit() else '."' + part.replace('"', '\\"') + '"')
    return "$" + "".join(parts)


def _spec_value(key: str) -> Any:
    return sa.func.json_extract(Run.spec_json, spec_json_path(key))


def _spec_equals(key: str, value: Any) -> Any:
    """The stored spec value at ``key`` equals ``value``, compared with JSON types (1 ≠ "1", true ≠ 1)."""
    path = spec_json_path(key)
    kind = sa.func.json_type(Run.spec_json, path)
    stored = sa.func.json_extract(Run.spec_json, path)
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    if isinstance(value, (int, float)):
        return sa.and_(kind.in_(("integer", "real")), stored == value)
    if isinstance(value, (list, dict)):
        # json_extract returns a container as minified JSON in stored (sorted-key) order
        return sa.and_(kind.in_(("array", "object")), stored == json.dumps(value, sort_keys=True, separators=(",", ":")))
    text = str(value)
    try:  # "1e-3" is a string to YAML but a number to the user who typed it
        number = float(text)
    except ValueError:
        return sa.and_(kind == "text", stored == text)
    return sa.or_(sa.and_(kind == "text", stored == text), sa.and_(kind.in_(("integer", "real")), stored == number))


class Store:
    """A results store at one database URL; see the module docstring."""

    def __init__(self, db: str | os.PathLike[str] | None = None, artifacts: str | os.PathLike[str] | None = None, create: bool = True) -> None:
        self.url = resolve_url(db)
        self.is_sqlite = self.url.startswith("sqlite")
        self.path = Path(self.url.split("///", 1)[1]) if self.is_sqlite and "///" in self.url else None
        if artifacts is not None:
            self.artifacts_root = Path(artifacts).expanduser().resolve()
        elif self.path is not None:
            self.artifacts_root = self.path.parent / "runs"
        else:
            self.artifacts_root = Path.cwd() / "runs"
        if self.path is not None and not create and not self.path.exists():
            raise StoreError(f"no results store at {self.path} (run an experiment first, or pass --db)")
        if self.path is not None and not self.path.parent.is_dir():
            raise StoreError(f"cannot create the store {self.path}: directory {self.path.parent} does not exist")
        self.engine = sa.create_engine(self.url, future=True)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._prepare()

    # ---- schema -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        try:
            _retrying(self._create_or_check_schema)
        except DatabaseError as exc:
            message = str(exc.orig) if getattr(exc, "orig", None) else str(exc)
            raise StoreError(f"cannot use the store {self.path or self.url}: {message.splitlines()[0]}") from None

    @contextmanager
    def _schema_transaction(self) -> Iterator[sa.Connection]:
        """A transaction holding SQLite's write lock from its first statement.

        Several processes may open a new or old store at once: each checks the schema version and
        creates or migrates only under the lock, so exactly one of them does the work.
        """
        with self.engine.begin() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    def _create_or_check_schema(self) -> None:
        with self._schema_transaction() as conn:
            has_meta = sa.inspect(conn).has_table(Meta.__tablename__)
            version = conn.execute(sa.select(Meta.value).where(Meta.key == "schema_version")).scalar() if has_meta else None
            if version is None:
                if sa.inspect(conn).get_table_names():
                    raise StoreError(f"{self.path or self.url} holds tables but is not a runner results store")
                Base.metadata.create_all(conn)
                conn.execute(sa.insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(version)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path or self.url} has schema version {version}, newer than this runner "
                f"understands ({SCHEMA_VERSION}); upgrade runner-dl"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            self._migrate_to(number)

    def _migrate_to(self, number: int) -> None:
        with self._schema_transaction() as conn:
            current = int(conn.execute(sa.select(Meta.value).where(Meta.key == "schema_version")).scalar_one())
            if current >= number:  # another process got there first
                return
            MIGRATIONS[number - 1](conn)
            conn.execute(sa.update(Meta).where(Meta.key == "schema_version").values(value=str(number)))

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(Meta.value).where(Meta.key == "schema_version")).scalar_one())

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _write(self, action: Callable[[Session], T]) -> T:
        def attempt() -> T:
            with self._session() as session:
                return action(session)

        return _retrying(attempt)

    # ---- writing runs ---------------------------------------------------------------------------
    def new_run_id(self) -> str:
        return uuid.uuid4().hex[:12]

    def run_dir(self, run_id: str) -> Path:
        return self.artifacts_root / run_id

    def create_run(self, run_id: str, heartbeat_s: float | None = None, **fields: Any) -> str:
        """A new ``running`` run; with ``heartbeat_s`` it shows as lost unless :meth:`heartbeat` keeps up."""
        now = utcnow()
        values = {"status": "running", "started_at": now, "heartbeat_at": now, "epochs_run": 0,
                  "lost_after": deadline(now, heartbeat_s) if heartbeat_s else None,
                  "artifacts_dir": str(self.run_dir(run_id)), **fields}
        self._write(lambda s: s.add(Run(id=run_id, **values)))
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._write(lambda s: s.execute(sa.update(Run).where(Run.id == run_id).values(**fields)))

    def heartbeat(self, run_id: str, heartbeat_s: float | None = None) -> None:
        """The run is alive; with ``heartbeat_s`` its lost deadline moves on by that many intervals."""
        now = utcnow()
        extra = {"lost_after": deadline(now, heartbeat_s)} if heartbeat_s else {}
        self.update_run(run_id, heartbeat_at=now, **extra)

    def claim_for_resume(self, run_id: str, epoch: int, heartbeat_s: float, **run_fields: Any) -> None:
        """Make a resumable run ``running`` again from the end of ``epoch``, in one transaction.

        Rows of later epochs (written before the process stopped, after its last checkpoint) and
        end-of-run results are deleted. The status check is part of the update, so of two
        processes resuming one run at once only one gets it.
        """
        now = utcnow()

        def write(session: Session) -> None:
            claimed = session.execute(
                sa.update(Run)
                .where(Run.id == run_id, status_now(now).in_(RESUMABLE))
                .values(status="running", ended_at=None, duration_s=None, error=None, traceback=None, stop_reason=None,
                        confusion_json=None, heartbeat_at=now, lost_after=deadline(now, heartbeat_s), epochs_run=epoch,
                        **run_fields)
            )
            if claimed.rowcount != 1:
                raise StoreError(f"run {run_id} cannot be resumed: it is no longer {' or '.join(RESUMABLE)}")
            session.execute(sa.delete(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch > epoch))
            session.execute(sa.delete(Epoch).where(Epoch.run_id == run_id, Epoch.epoch > epoch))
            session.execute(sa.delete(SplitMetric).where(SplitMetric.run_id == run_id))

        self._write(write)

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float], duration_s: float, **run_fields: Any) -> None:
        """One transaction per epoch: the metrics, the timing and the run's progress columns."""
        now = utcnow()

        def write(session: Session) -> None:
            session.execute(
                sa.insert(EpochMetric),
                [{"run_id": run_id, "epoch": epoch, "name": k, "value": float(v)} for k, v in metrics.items()],
            )
            session.add(Epoch(run_id=run_id, epoch=epoch, duration_s=duration_s, finished_at=now))
            session.execute(sa.update(Run).where(Run.id == run_id).values(epochs_run=epoch, heartbeat_at=now, **run_fields))

        self._write(write)

    def save_split_metrics(self, run_id: str, split: str, metrics: dict[str, float]) -> None:
        def write(session: Session) -> None:
            session.execute(sa.delete(SplitMetric).where(SplitMetric.run_id == run_id, SplitMetric.split == split))
            session.execute(
                sa.insert(SplitMetric),
                [{"run_id": run_id, "split": split, "name": k, "value": float(v)} for k, v in metrics.items()],
            )

        self._write(write)

    def save_checkpoint(self, run_id: str, kind: str, epoch: int, path: str, sha256: str, size_bytes: int) -> None:
        self._write(lambda s: s.merge(Checkpoint(run_id=run_id, kind=kind, epoch=epoch, path=path, sha256=sha256, size_bytes=size_bytes)))

    def finish_run(self, run_id: str, status: str, **fields: Any) -> None:
        assert status in STATUSES, status
        ended = utcnow()

        def write(session: Session) -> None:
            run = session.get(Run, run_id)
            if run is None:
                raise RunNotFoundError(f"no run {run_id!r}")
            run.status = status
            run.ended_at = ended
            run.duration_s = (ended - run.started_at).total_seconds()
            for key, value in fields.items():
                setattr(run, key, value)

        self._write(write)

    # ---- reading --------------------------------------------------------------------------------
    def resolve_run_id(self, run_id: str) -> str:
        """A full run id from an id or a unique prefix of one."""
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(Run.id).where(Run.id.startswith(run_id, autoescape=True)).limit(2)).scalars().all()
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path or self.url}")
        raise RunNotFoundError(f"run id prefix {run_id!r} is ambiguous; give more characters")

    def run_row(self, run_id: str) -> dict[str, Any]:
        run_id = self.resolve_run_id(run_id)
        with self.engine.connect() as conn:
            row = dict(conn.execute(sa.select(Run).where(Run.id == run_id)).mappings().one())
        row["status"] = live_status(row["status"], row["lost_after"], utcnow())
        return row

    def epoch_metrics(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(EpochMetric.run_id, EpochMetric.epoch, EpochMetric.name, EpochMetric.value)
                .where(EpochMetric.run_id.in_(list(run_ids)))
                .order_by(EpochMetric.run_id, EpochMetric.epoch, EpochMetric.name)
            ).mappings().all()
        return [dict(r) for r in rows]

    def split_metrics(self, run_id: str) -> dict[str, dict[str, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(SplitMetric.split, SplitMetric.name, SplitMetric.value).where(SplitMetric.run_id == run_id)).all()
        out: dict[str, dict[str, float]] = {}
        for split, name, value in rows:
            out.setdefault(split, {})[name] = value
        return out

    def checkpoints(self, run_id: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(Checkpoint).where(Checkpoint.run_id == run_id)).mappings().all()
        return {r["kind"]: dict(r) for r in rows}

    def find_completed_run(self, spec_hash: str) -> str | None:
        """The newest completed run whose resolved spec has this hash."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(Run.id).where(Run.spec_hash == spec_hash, Run.status == "completed").order_by(Run.started_at.desc()).limit(1)
            ).scalar()

    def count_runs(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(Run)).scalar_one())

    def runs_table(self, status: str | None = None, name_glob: str | None = None, limit: int | None = None,
                   tags: Sequence[str] = ()) -> list[dict[str, Any]]:
        """One row per run with the summary columns (no per-run queries)."""
        test_acc = (
            sa.select(SplitMetric.run_id, SplitMetric.value.label("test_accuracy"))
            .where(SplitMetric.split == "test", SplitMetric.name == "accuracy")
            .subquery()
        )
        live = status_now(utcnow())
        query = (
            sa.select(
                Run.id, Run.name, live.label("status"), Run.seed, Run.model, Run.strategy, Run.epochs_run,
                Run.best_val_accuracy, test_acc.c.test_accuracy, Run.duration_s, Run.started_at, Run.heartbeat_at,
            )
            .outerjoin(test_acc, test_acc.c.run_id == Run.id)
            .order_by(Run.started_at.desc())
        )
        if status:
            query = query.where(live == status)
        if name_glob:
            query = query.where(Run.name.op("GLOB")(name_glob)) if self.is_sqlite else query.where(Run.name.like(name_glob.replace("*", "%")))
        if tags:
            query = query.where(has_tags(tags))
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]

    def dataframe(self, query: sa.Select) -> Any:
        """Run a select into a pandas DataFrame (reports are built from set-based queries)."""
        import pandas as pd

        with self.engine.connect() as conn:
            return pd.read_sql(query, conn)

    # ---- reports: one set-based query per table, never one per run --------------------------------
    def _name_matches(self, glob: str) -> Any:
        return Run.name.op("GLOB")(glob) if self.is_sqlite else Run.name.like(glob.replace("*", "%").replace("?", "_"))

    def _filtered(self, query: sa.Select, run_filter: RunFilter) -> sa.Select:
        if run_filter.status:
            query = query.where(status_now(utcnow()) == run_filter.status)
        if run_filter.name_glob:
            query = query.where(self._name_matches(run_filter.name_glob))
        if run_filter.since is not None:
            query = query.where(Run.started_at >= run_filter.since)
        if run_filter.run_ids:
            query = query.where(Run.id.in_(list(run_filter.run_ids)))
        for key, value in run_filter.where:
            query = query.where(_spec_equals(key, value))
        if run_filter.tags:
            query = query.where(has_tags(run_filter.tags))
        return query

    def report_runs(self, run_filter: RunFilter, spec_keys: Sequence[str] = ()) -> Any:
        """DataFrame, one row per run: the report's run columns plus one column per resolved-spec key."""
        query = sa.select(
            Run.id, Run.name, status_now(utcnow()).label("status"), Run.model, Run.weights_source, Run.strategy, Run.seed, Run.epochs_run,
            Run.stop_reason, Run.best_val_accuracy, Run.best_epoch, Run.duration_s, Run.started_at,
            *(_spec_value(key).label(key) for key in spec_keys),
        ).order_by(Run.started_at.desc(), Run.id)
        return self.dataframe(self._filtered(query, run_filter))

    def report_split_metrics(self, run_filter: RunFilter, split: str = "test") -> Any:
        """DataFrame (run_id, name, value) of one split's metrics for the filtered runs (long form)."""
        query = (
            sa.select(SplitMetric.run_id, SplitMetric.name, SplitMetric.value)
            .join(Run, Run.id == SplitMetric.run_id)
            .where(SplitMetric.split == split)
        )
        return self.dataframe(self._filtered(query, run_filter))

    def epoch_metrics_frame(self, run_ids: Sequence[str]) -> Any:
        """DataFrame (run_id, epoch, name, value) of the given runs' per-epoch metrics (long form)."""
        query = (
            sa.select(EpochMetric.run_id, EpochMetric.epoch, EpochMetric.name, EpochMetric.value)
            .where(EpochMetric.run_id.in_(list(run_ids)))
            .order_by(EpochMetric.run_id, EpochMetric.epoch)
        )
        return self.dataframe(query)

    def run_documents(self, run_ids: Sequence[str]) -> Any:
        """DataFrame of the given runs' stored JSON documents: spec, class names, test confusion matrix."""
        query = sa.select(Run.id, Run.name, Run.spec_json, Run.class_names_json, Run.confusion_json).where(Run.id.in_(list(run_ids)))
        return self.dataframe(query)

    def spec_key_exists(self, key: str) -> bool:
        """Whether any run's resolved spec has ``key`` (a dotted path)."""
        query = sa.select(Run.id).where(sa.func.json_type(Run.spec_json, spec_json_path(key)).is_not(None)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    # ---- tags, evaluations, deleting runs, checkpoint retention ----------------------------------
    def add_tags(self, run_id: str, tags: Sequence[str]) -> None:
        def write(session: Session) -> None:
            existing = set(session.execute(sa.select(Tag.tag).where(Tag.run_id == run_id)).scalars())
            session.add_all(Tag(run_id=run_id, tag=tag) for tag in dict.fromkeys(tags) if tag not in existing)

        self._write(write)

    def remove_tags(self, run_id: str, tags: Sequence[str]) -> None:
        self._write(lambda s: s.execute(sa.delete(Tag).where(Tag.run_id == run_id, Tag.tag.in_(list(tags)))))

    def tags(self, run_ids: Sequence[str]) -> dict[str, list[str]]:
        """Each given run's tags, sorted (runs without tags are left out)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(Tag.run_id, Tag.tag).where(Tag.run_id.in_(list(run_ids))).order_by(Tag.run_id, Tag.tag)).all()
        out: dict[str, list[str]] = {}
        for run_id, tag in rows:
            out.setdefault(run_id, []).append(tag)
        return out

    def save_evaluation(self, run_id: str, **fields: Any) -> int:
        def write(session: Session) -> int:
            evaluation = Evaluation(run_id=run_id, created_at=utcnow(), **fields)
            session.add(evaluation)
            session.flush()
            return int(evaluation.id)

        return self._write(write)

    def evaluations(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(Evaluation).where(Evaluation.run_id == run_id).order_by(Evaluation.id)).mappings().all()
        return [dict(r) for r in rows]

    def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Every row of these runs, in every table, in one transaction (artefacts are the caller's)."""
        ids = list(run_ids)

        def write(session: Session) -> None:
            # children first: a database without ON DELETE CASCADE must not refuse the runs
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != Run.__tablename__ and "run_id" in table.c:
                    session.execute(sa.delete(table).where(table.c.run_id.in_(ids)))
            session.execute(sa.delete(Run).where(Run.id.in_(ids)))

        self._write(write)

    def remove_checkpoint(self, run_id: str, kind: str) -> None:
        self._write(lambda s: s.execute(sa.delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.kind == kind)))

    def completed_runs(self, ended_before: datetime | None = None) -> list[str]:
        """Ids of completed runs, oldest first; with ``ended_before``, only those that ended earlier."""
        query = sa.select(Run.id).where(Run.status == "completed").order_by(Run.ended_at, Run.id)
        if ended_before is not None:
            query = query.where(Run.ended_at < ended_before)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
