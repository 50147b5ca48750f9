"""Opening a store: the URL, the engine, SQLite's settings, lock retries, the schema and transactions.

Default ``sqlite:///results.db`` in the working directory; ``--db URL|PATH`` or ``RUNNER_DB``
choose another. Run artefacts (checkpoints) live beside an SQLite file in ``runs/<run id>/``, so two
stores never share artefacts.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from runner.errors import StoreError
from runner.store.manage import RunManagement
from runner.store.migrations import MIGRATIONS, SCHEMA_VERSION
from runner.store.queries import RunQueries
from runner.store.runs import RunWriter
from runner.store.schema import Base, Meta

DEFAULT_DB = "results.db"
DB_ENV = "RUNNER_DB"

T = TypeVar("T")


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


class Store:
    """A results store at one database URL; see the module docstring.

    ``store.runs`` writes runs (:class:`~runner.store.runs.RunWriter`), ``store.query`` reads them
    (:class:`~runner.store.queries.RunQueries`) and ``store.manage`` tags and deletes them
    (:class:`~runner.store.manage.RunManagement`). This package never imports torch.
    """

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
        self.runs = RunWriter(self)
        self.query = RunQueries(self)
        self.manage = RunManagement(self)

    @property
    def location(self) -> str:
        """The store as messages name it: its file, else its URL."""
        return str(self.path or self.url)

    # ---- schema -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self._current_version() == SCHEMA_VERSION:
            return  # the usual case: one read, no write lock, no schema inspection
        try:
            _retrying(self._create_or_check_schema)
        except DatabaseError as exc:
            message = str(exc.orig) if getattr(exc, "orig", None) else str(exc)
            raise StoreError(f"cannot use the store {self.location}: {message.splitlines()[0]}") from None

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

    def _current_version(self) -> int | None:
        """The stored schema version read without locking; None when that read fails (new, old or foreign file).

        Anything but the current version goes the locked way, which creates, migrates or explains.
        """
        try:
            with self.engine.connect() as conn:
                version = conn.execute(sa.select(Meta.value).where(Meta.key == "schema_version")).scalar()
        except DatabaseError:
            return None
        return int(version) if version is not None and version.isdigit() else None

    def _create_or_check_schema(self) -> None:
        with self._schema_transaction() as conn:
            has_meta = sa.inspect(conn).has_table(Meta.__tablename__)
            version = conn.execute(sa.select(Meta.value).where(Meta.key == "schema_version")).scalar() if has_meta else None
            if version is None:
                if sa.inspect(conn).get_table_names():
                    raise StoreError(f"{self.location} holds tables but is not a runner results store")
                Base.metadata.create_all(conn)
                conn.execute(sa.insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(version)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.location} has schema version {version}, newer than this runner "
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

    # ---- transactions ---------------------------------------------------------------------------
    def write(self, action: Callable[[Session], T]) -> T:
        """Run ``action`` in one write transaction (a session), retried while SQLite is locked.

        ``action`` may run more than once: it must do nothing outside the session.
        """
        def attempt() -> T:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return action(session)

        return _retrying(attempt)

    # ---- runs and their artefacts -----------------------------------------------------------------
    def new_run_id(self) -> str:
        return uuid.uuid4().hex[:12]

    def run_dir(self, run_id: str) -> Path:
        """Where a new run's artefacts go."""
        return self.artifacts_root / run_id

    def artifact_path(self, stored: str | os.PathLike[str]) -> Path:
        """Where an artefact path read from a row (a checkpoint's ``path``, a run's ``artifacts_dir``) is.

        Every artefact path the store hands out comes through here. Rows hold absolute paths today;
        relative ones would be resolved against ``artifacts_root`` here.
        """
        return Path(stored)

    def stored_path(self, path: str | os.PathLike[str]) -> str:
        """An artefact path as a row holds it (the inverse of :meth:`artifact_path`)."""
        return str(path)

    def artifacts_dir(self, row: dict[str, Any]) -> Path:
        """A run's artefact directory, from its row (``run_row``): the stored one, else :meth:`run_dir`."""
        return self.artifact_path(row["artifacts_dir"]) if row["artifacts_dir"] else self.run_dir(row["id"])


__all__ = ["Store", "resolve_url", "DEFAULT_DB", "DB_ENV"]
