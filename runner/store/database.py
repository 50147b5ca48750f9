"""Opening a store: the URL, the engine, SQLite's settings, lock retries, the schema and transactions.

Default ``sqlite:///results.db`` in the working directory; ``--db URL|PATH`` or ``RUNNER_DB``
choose another, e.g. ``postgresql+psycopg://user@host:5432/runs`` (the ``postgres`` extra). Run
artefacts (checkpoints) live beside an SQLite file in ``runs/<run id>/``, so two stores never share
artefacts. Rows record those paths relative to that ``runs/`` directory, so a store moved or copied
with its ``runs/`` finds its own files, never the original's. A server store has no place of its
own for them, so runs written to one need ``--artifacts DIR`` (or ``RUNNER_ARTIFACTS``), a directory
every worker can reach; their rows hold absolute paths.

A URL is shown to people only through :func:`mask_url` (``Store.location``): its password never
appears in a message, a report or a log.

A store whose file or directory this process cannot write is opened read-only for the commands that
only read (SQLite's ``mode=ro``, and ``immutable=1`` where not even its ``-shm`` file can be made).
Every database error reaches the caller as one :class:`StoreError` line naming the store and the cause.
"""

from __future__ import annotations

import os
import random
import re
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, NoSuchModuleError, OperationalError

from runner.errors import StoreError
from runner.store import schema
from runner.store.manage import RunManagement
from runner.store.migrations import MIGRATIONS, SCHEMA_VERSION
from runner.store.queries import RunQueries
from runner.store.queue import RunQueue
from runner.store.runs import RunWriter, new_id

DEFAULT_DB = "results.db"
DB_ENV = "RUNNER_DB"
ARTIFACTS_ENV = "RUNNER_ARTIFACTS"
READ_ONLY_HINT = ": check the permissions of the file and its directory"
# one advisory lock key for creating and migrating a PostgreSQL store ("runn" in ASCII)
SCHEMA_LOCK = 0x72756E6E
# errors after which a write is tried again: SQLite's lock, and a server's deadlock or serialisation victim
TRANSIENT = ("locked", "busy", "already exists", "deadlock detected", "could not serialize")

T = TypeVar("T")

# the schema version a store holds (a row of its meta table)
_SELECT_VERSION = sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")

# inside Store.write (per thread): a database error then says the store could not be written, else read
_writing: ContextVar[bool] = ContextVar("runner_store_writing", default=False)


def resolve_url(db: str | os.PathLike[str] | None) -> str:
    """``--db`` value, else ``RUNNER_DB``, else ``results.db``; plain paths become SQLite URLs.

    ``postgresql://`` (and ``postgres://``) name psycopg 3, the driver the ``postgres`` extra installs.
    """
    value = str(db) if db is not None else os.environ.get(DB_ENV) or DEFAULT_DB
    if "://" in value:
        scheme, rest = value.split("://", 1)
        return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def mask_url(url: str) -> str:
    """The URL as it may be shown: its password replaced by ``***``."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy reads: hide whatever stands between ':' and '@'
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _hide_password(message: str, url: str) -> str:
    """``message`` with the URL's password (should a driver quote it) replaced by ``***``."""
    try:
        password = sa.engine.make_url(url).password
    except ArgumentError:
        return message
    return message.replace(str(password), "***") if password else message


def artifacts_required(url: str, artifacts: str | os.PathLike[str] | None) -> str | None:
    """Why runs written to the store at ``url`` cannot go ahead, or None: a server store has no
    directory of its own, so it needs ``--artifacts`` (or ``RUNNER_ARTIFACTS``). Checked before any work."""
    if artifacts is not None or os.environ.get(ARTIFACTS_ENV) or url.startswith("sqlite"):
        return None
    return (f"the store {mask_url(url)} is not a local file, so run artefacts (checkpoints) need a directory every "
            f"worker can reach: give --artifacts DIR (or set {ARTIFACTS_ENV})")


def missing_artifacts(run_id: str, directory: Path) -> str:
    """The line for a run whose artefact directory is not on this machine."""
    return f"run {run_id}: its artefact directory {directory} does not exist here (is the shared artefact directory mounted on this machine?)"


def _engine_options(url: str) -> dict[str, Any]:
    """Engine settings per database: a server that does not answer fails in seconds, not minutes."""
    if url.startswith("postgresql") and "connect_timeout" not in url:
        return {"connect_args": {"connect_timeout": 10}}
    return {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # the busy timeout first: switching a new file to WAL must wait for, not fail on, another process
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers and one writer work at once; NORMAL is durable across application crashes
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_read_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # a read-only connection cannot switch the journal mode; it only waits for writers elsewhere
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _transient(exc: BaseException) -> bool:
    """SQLite found the database locked (another writer), or a server chose this transaction as a
    deadlock's victim: worth trying again."""
    return any(word in str(exc) for word in TRANSIENT)


def _retrying(action: Callable[[], T], attempts: int = 8) -> T:
    """Retry a write or the opening of a store that met a transient conflict (:func:`_transient`), with jittered exponential back-off."""
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError as exc:
            if not _transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def cause_of(exc: BaseException) -> str:
    """A database error's cause in one line, without SQLAlchemy's SQL and parameters."""
    original = getattr(exc, "orig", None) or getattr(exc, "original_exception", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__


def _writable(path: Path) -> bool:
    """Whether this process may write the SQLite file and create its ``-wal``/``-shm`` files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _read_only_url(path: Path) -> str:
    """SQLite's read-only URI. Reading a WAL store needs its ``-wal`` and ``-shm`` files, made when
    missing; where they are missing and cannot be made (a read-only directory) the file alone is
    read as ``immutable``, which is all it is then."""
    wal_files = all(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm"))
    options = "mode=ro" if wal_files or os.access(path.parent, os.W_OK) else "mode=ro&immutable=1"
    return f"sqlite:///file:{quote(str(path))}?{options}&uri=true"


def _one_line_error(location: str, read_only: bool, url: str) -> Callable[[Any], None]:
    """The engine's error handler: every database error but a lock (which :func:`_retrying` waits
    out) becomes one :class:`StoreError` line naming the store."""

    def handle(context: Any) -> None:
        if _transient(context.original_exception):
            return
        writing = _writing.get()
        hint = f" (the store is read-only here{READ_ONLY_HINT})" if read_only and writing else ""
        raise StoreError(f"cannot {'write to' if writing else 'read'} the store {location}: "
                         f"{_hide_password(cause_of(context.original_exception), url)}{hint}")

    return handle


class Store:
    """A results store at one database URL; see the module docstring.

    ``store.runs`` writes runs (:class:`~runner.store.runs.RunWriter`), ``store.query`` reads them
    (:class:`~runner.store.queries.RunQueries`), ``store.manage`` tags and deletes them
    (:class:`~runner.store.manage.RunManagement`) and ``store.queue`` holds sweeps and their queued
    runs (:class:`~runner.store.queue.RunQueue`). This package never imports torch.
    """

    def __init__(self, db: str | os.PathLike[str] | None = None, artifacts: str | os.PathLike[str] | None = None, create: bool = True) -> None:
        self.url = resolve_url(db)
        self.is_sqlite = self.url.startswith("sqlite")
        self.path = Path(self.url.split("///", 1)[1]) if self.is_sqlite and "///" in self.url else None
        # where relative artefact paths point: runs/ beside the file, wherever the store now is
        self.relative_root = self.path.parent / "runs" if self.path is not None else None
        artifacts = artifacts if artifacts is not None else os.environ.get(ARTIFACTS_ENV) or None
        # None: a server store without --artifacts; it can be read, but new runs are refused (run_dir)
        self.artifacts_root: Path | None = (
            Path(artifacts).expanduser().resolve() if artifacts is not None
            else self.relative_root or (Path.cwd() / "runs" if self.is_sqlite else None)
        )
        if self.path is not None and not create and not self.path.exists():
            raise StoreError(f"no results store at {self.path} (run an experiment first, or pass --db)")
        if self.path is not None and not self.path.parent.is_dir():
            raise StoreError(f"cannot create the store {self.path}: directory {self.path.parent} does not exist")
        # a store this process cannot write is opened read-only for the commands that may only read
        # (create=False); the others are refused before they do any work
        self.read_only = self.path is not None and self.path.exists() and not _writable(self.path)
        if self.read_only and create:
            raise StoreError(f"cannot use the store {self.location}: it is read-only here{READ_ONLY_HINT}")
        self.engine = self._engine()
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_read_pragmas if self.read_only else _sqlite_pragmas)
        self._prepare()
        # a function of the store's name only: a bound method here would keep the store, its engine and
        # their open SQLite connection alive until exit, after the exit hook froze them (a -wal left)
        event.listen(self.engine, "handle_error", _one_line_error(self.location, self.read_only, self.url))
        self.runs = RunWriter(self)
        self.query = RunQueries(self)
        self.manage = RunManagement(self)
        self.queue = RunQueue(self)

    @property
    def location(self) -> str:
        """The store as messages name it: its file, else its URL with the password masked."""
        return str(self.path or mask_url(self.url))

    def _engine(self) -> sa.Engine:
        """The engine, or one line saying why there is none (a driver not installed, not a URL)."""
        url = _read_only_url(self.path) if self.read_only and self.path is not None else self.url
        try:
            return sa.create_engine(url, future=True, **_engine_options(url))
        except ModuleNotFoundError as exc:
            extra = " (pip install 'runner-dl[postgres]')" if self.url.startswith("postgresql") else ""
            raise StoreError(f"cannot use the store {self.location}: its driver {exc.name} is not installed{extra}") from None
        except (ArgumentError, NoSuchModuleError) as exc:
            raise StoreError(f"cannot use the store {self.location}: {_hide_password(str(exc), self.url)}") from None

    # ---- schema -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        try:
            # all of it retried while SQLite is locked: connecting (switching a file to WAL) and the
            # unlocked read can meet the lock too when many processes open an old store at once
            _retrying(self._open_schema)
        except DBAPIError as exc:  # a file that is not a database; a server that refuses, a wrong password, no such database
            raise StoreError(f"cannot use the store {self.location}: {_hide_password(cause_of(exc), self.url)}") from None

    def _open_schema(self) -> None:
        if self._current_version() == SCHEMA_VERSION:
            return  # the usual case: one read, no write lock, no schema inspection
        if self.read_only:
            self._check_schema_read_only()
        else:
            self._create_or_check_schema()

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.location} has schema version {version}, newer than this runner "
                f"understands ({SCHEMA_VERSION}); upgrade runner-dl"
            )

    def _check_schema_read_only(self) -> None:
        """A store this process cannot write is read as it is: it must already have the current schema."""
        with self.engine.connect() as conn:
            has_meta = sa.inspect(conn).has_table(schema.meta.name)
            version = conn.execute(_SELECT_VERSION).scalar() if has_meta else None
        if version is None:
            raise StoreError(f"{self.location} is not a runner results store")
        self._check_version(int(version))
        if int(version) < SCHEMA_VERSION:
            raise StoreError(f"the store {self.location} is read-only here and has schema version {version}: open it once "
                             f"with write access so that this runner can upgrade it to version {SCHEMA_VERSION}")

    @contextmanager
    def _schema_transaction(self) -> Iterator[sa.Connection]:
        """A transaction holding SQLite's write lock from its first statement.

        Several processes may open a new or old store at once: each checks the schema version and
        creates or migrates only under the lock, so exactly one of them does the work. A server
        database takes an advisory lock held to the end of the transaction instead (its DDL is
        transactional, so a second process sees the finished schema or none of it).
        """
        with self.engine.begin() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
            yield conn

    def _current_version(self) -> int | None:
        """The stored schema version read without locking; None when that read fails (new, old or foreign file).

        Anything but the current version goes the locked way, which creates, migrates or explains. A
        store that cannot be reached at all fails here (a server refusing, a wrong password).
        """
        with self.engine.connect() as conn:
            try:
                version = conn.execute(_SELECT_VERSION).scalar()
            except DatabaseError:  # no meta table (yet), or not a store
                return None
        return int(version) if version is not None and version.isdigit() else None

    def _create_or_check_schema(self) -> None:
        with self._schema_transaction() as conn:
            has_meta = sa.inspect(conn).has_table(schema.meta.name)
            version = conn.execute(_SELECT_VERSION).scalar() if has_meta else None
            if version is None:
                if sa.inspect(conn).get_table_names():
                    raise StoreError(f"{self.location} holds tables but is not a runner results store")
                schema.metadata.create_all(conn)
                conn.execute(sa.insert(schema.meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(version)
        self._check_version(version)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            self._migrate_to(number)

    def _migrate_to(self, number: int) -> None:
        with self._schema_transaction() as conn:
            current = int(conn.execute(_SELECT_VERSION).scalar_one())
            if current >= number:  # another process got there first
                return
            MIGRATIONS[number - 1](conn)
            conn.execute(sa.update(schema.meta).where(schema.meta.c.key == "schema_version").values(value=str(number)))

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_SELECT_VERSION).scalar_one())

    # ---- transactions ---------------------------------------------------------------------------
    def write(self, action: Callable[[sa.Connection], T], exclusive: bool = False) -> T:
        """Run ``action`` on a connection in one write transaction, retried while SQLite is locked.

        ``action`` may run more than once: it must do nothing outside the transaction. ``exclusive``
        takes SQLite's write lock at the first statement (BEGIN IMMEDIATE), for transactions that
        read and then write what they read (a queue claim): no other writer can come in between.
        Elsewhere such transactions lock the rows they select (``FOR UPDATE``).
        """
        def attempt() -> T:
            writing = _writing.set(True)
            try:
                with self.engine.begin() as conn:
                    if exclusive and self.is_sqlite:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    return action(conn)
            finally:
                _writing.reset(writing)

        try:
            return _retrying(attempt)
        except DBAPIError as exc:  # still locked after every retry
            raise StoreError(f"cannot write to the store {self.location}: {cause_of(exc)}") from None

    # ---- runs and their artefacts -----------------------------------------------------------------
    def new_run_id(self) -> str:
        return new_id()

    def run_dir(self, run_id: str) -> Path:
        """Where a new run's artefacts go; a server store without an artefact directory refuses (see :func:`artifacts_required`)."""
        if self.artifacts_root is None:
            raise StoreError(artifacts_required(self.url, None) or "no artefact directory")
        return self.artifacts_root / run_id

    def artifact_path(self, stored: str | os.PathLike[str]) -> Path:
        """Where an artefact path read from a row (a checkpoint's ``path``, a run's ``artifacts_dir``) is.

        Every artefact path the store hands out comes through here. A relative path is resolved
        against ``runs/`` beside this store's file, wherever the store is now; an absolute one (a
        store written before paths were relative, or an ``--artifacts`` directory elsewhere) is
        used as it is.
        """
        path = Path(stored)
        base = self.relative_root or self.artifacts_root
        return path if path.is_absolute() or base is None else base / path

    def stored_path(self, path: str | os.PathLike[str]) -> str:
        """An artefact path as a row holds it (the inverse of :meth:`artifact_path`): relative to
        ``runs/`` beside the store's file when it lies there, so that the store can move; else absolute."""
        absolute = Path(path).absolute()
        if self.relative_root is not None and absolute.is_relative_to(self.relative_root):
            return absolute.relative_to(self.relative_root).as_posix()
        return str(absolute)

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies inside this store's own artefact root: the only files it may delete.

        Symbolic links and ``..`` are resolved first, so no row can point a deletion elsewhere.
        """
        if self.artifacts_root is None:
            return False
        root = self.artifacts_root.resolve()
        resolved = Path(path).resolve()
        return resolved != root and resolved.is_relative_to(root)

    def artifacts_dir(self, row: dict[str, Any], must_exist: bool = False) -> Path:
        """A run's artefact directory, from its row (``run_row``): the stored one, else :meth:`run_dir`.

        ``must_exist``: the run wrote artefacts there, so a missing directory (a shared directory not
        mounted on this machine) is one line naming it, never a run that quietly starts over.
        """
        directory = self.artifact_path(row["artifacts_dir"]) if row["artifacts_dir"] else self.run_dir(row["id"])
        if must_exist and not directory.is_dir():
            raise StoreError(missing_artifacts(row["id"], directory))
        return directory


__all__ = ["Store", "resolve_url", "mask_url", "artifacts_required", "missing_artifacts", "DEFAULT_DB", "DB_ENV", "ARTIFACTS_ENV"]
