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
from datetime import datetime, timezone
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


# ------------------------------------------------------------------------------------------
# Schema migrations: ordered functions, each bringing a store from version N-1 to N. A new store is
# created from the models above and stamped with the newest version; an older store runs the
# migrations it lacks, in order, in one transaction each. Never edit a released migration: add one.


def m001_initial(conn: sa.Connection) -> None:
    """Version 1, the first release: created from the models (the fixture tests/data/store_v1.db)."""
    Base.metadata.create_all(conn)


MIGRATIONS: list[Callable[[sa.Connection], None]] = [m001_initial]
SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def resolve_url(db: str | os.PathLike[str] | None) -> str:
    """``--db`` value, else ``RUNNER_DB``, else ``results.db``; plain paths become SQLite URLs."""
    value = str(db) if db is not None else os.environ.get(DB_ENV) or DEFAULT_DB
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers and one writer work at once; NORMAL is durable across application crashes
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
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

    def _create_or_check_schema(self) -> None:
        with self.engine.begin() as conn:
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
        with self.engine.begin() as conn:
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

    def create_run(self, run_id: str, **fields: Any) -> str:
        now = utcnow()
        values = {"status": "running", "started_at": now, "heartbeat_at": now, "epochs_run": 0,
                  "artifacts_dir": str(self.run_dir(run_id)), **fields}
        self._write(lambda s: s.add(Run(id=run_id, **values)))
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        self._write(lambda s: s.execute(sa.update(Run).where(Run.id == run_id).values(**fields)))

    def heartbeat(self, run_id: str) -> None:
        self.update_run(run_id, heartbeat_at=utcnow())

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
            row = conn.execute(sa.select(Run).where(Run.id == run_id)).mappings().one()
        return dict(row)

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

    def runs_table(self, status: str | None = None, name_glob: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """One row per run with the summary columns (no per-run queries)."""
        test_acc = (
            sa.select(SplitMetric.run_id, SplitMetric.value.label("test_accuracy"))
            .where(SplitMetric.split == "test", SplitMetric.name == "accuracy")
            .subquery()
        )
        query = (
            sa.select(
                Run.id, Run.name, Run.status, Run.seed, Run.model, Run.strategy, Run.epochs_run,
                Run.best_val_accuracy, test_acc.c.test_accuracy, Run.duration_s, Run.started_at, Run.heartbeat_at,
            )
            .outerjoin(test_acc, test_acc.c.run_id == Run.id)
            .order_by(Run.started_at.desc())
        )
        if status:
            query = query.where(Run.status == status)
        if name_glob:
            query = query.where(Run.name.op("GLOB")(name_glob)) if self.is_sqlite else query.where(Run.name.like(name_glob.replace("*", "%")))
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]

    def dataframe(self, query: sa.Select) -> Any:
        """Run a select into a pandas DataFrame (reports are built from set-based queries)."""
        import pandas as pd

        with self.engine.connect() as conn:
            return pd.read_sql(query, conn)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
