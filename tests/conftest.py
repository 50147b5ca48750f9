"""Shared fixtures: a CLI invoker, a tiny spec, one tiny trained run per test session, and stores on
SQLite and on a throwaway PostgreSQL server (``store_db``)."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"
TINY_SPEC = SPECS / "tiny.yaml"


@functools.lru_cache(maxsize=1)
def builtin_registries() -> Any:
    """The built-in plugins only, loaded once: tests must not depend on which other plugins are installed."""
    from runner.registries import load_registries

    previous = os.environ.get("RUNNER_DISABLE_PLUGINS")
    os.environ["RUNNER_DISABLE_PLUGINS"] = "1"
    try:
        return load_registries()
    finally:
        if previous is None:
            os.environ.pop("RUNNER_DISABLE_PLUGINS", None)
        else:
            os.environ["RUNNER_DISABLE_PLUGINS"] = previous


def plan_and_build(spec: Any, registries: Any = None, **plan_options: Any) -> tuple[Any, Any]:
    """A spec's plan and the parts a run trains with (seeded as a run is), for tests of what lies between."""
    from runner.execute import setup
    from runner.plan import plan

    registries = registries or builtin_registries()
    run_plan = plan(spec, registries, **plan_options)
    return run_plan, setup(run_plan, registries)


@dataclass
class CliResult:
    exit_code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch results.db in the repository or a user's TORCH_HOME."""
    monkeypatch.delenv("RUNNER_DB", raising=False)
    monkeypatch.delenv("RUNNER_ARTIFACTS", raising=False)
    monkeypatch.delenv("RUNNER_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("RUNNER_BLOCK_PLUGINS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``runner ARGS…`` in-process (torch is imported once per session, not per call)."""
    from runner.cli import main

    def invoke(*args: Any) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def tiny_spec() -> Path:
    return TINY_SPEC


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


@contextmanager
def torch_home_at(directory: Path) -> Iterator[None]:
    """TORCH_HOME pointed at ``directory`` for session-scoped fixtures (monkeypatch is per test)."""
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(directory / "torch_home")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = previous


def copy_store(source: Path, target: Path) -> Path:
    """A private copy of an SQLite store (its checkpoints stay where they are), e.g. for commands that write."""
    import sqlite3

    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Runs compared bit for bit must use the same number of CPU threads (subprocesses get 1 too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class TrainedRun:
    db: Path
    run_id: str


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One completed tiny run, shared by tests that only read it. Do not modify it."""
    from runner.execute import run_experiment
    from runner.store import Store

    directory = tmp_path_factory.mktemp("trained")
    with torch_home_at(directory):
        outcome = run_experiment(TINY_SPEC, store=Store(directory / "results.db"), registries=builtin_registries())
    return TrainedRun(directory / "results.db", outcome.run_id)


# ------------------------------------------------------------------------------------------
# PostgreSQL: one throwaway server per session, a new database per test

PG_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
PG_PASSWORD_USER = ("runner_secret", "s3cret-pw")  # the one role that must give a password (scram), for the bad-password tests


@dataclass
class PostgresServer:
    """A PostgreSQL server on 127.0.0.1:``port``; ``postgres`` connects without a password (trust)."""

    port: int
    bin_dir: Path
    directory: Path

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None, host: str = "127.0.0.1",
            port: int | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql+psycopg://{auth}@{host}:{port or self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Statements outside a transaction (CREATE DATABASE cannot run in one)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def databases(self) -> set[str]:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url())
        try:
            with engine.connect() as conn:
                return set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())
        finally:
            engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (initdb + pg_ctl on a free port, data under a
    temporary directory, fsync off), stopped and removed at the end; skipped where the binaries are absent."""
    if not PG_BIN_DIRS:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin; apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    bin_dir = Path(PG_BIN_DIRS[-1])
    directory = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    directory.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", _free_port()
    run = functools.partial(subprocess.run, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]))
        user = PG_PASSWORD_USER[0]
        (data / "pg_hba.conf").write_text(f"local all all trust\nhost all {user} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n")
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start"]))
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}") from None
    server = PostgresServer(port, bin_dir, directory)
    try:
        server.execute(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD_USER[1]}'")
        yield server
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """A maker of new stores' ``--db`` values, once on SQLite (files) and once on PostgreSQL (new
    databases of the session's server, with RUNNER_ARTIFACTS set as a server store needs)."""
    if request.param == "sqlite":
        made = iter(range(1_000_000))
        return lambda: str(tmp_path / f"results{next(made) or ''}.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    monkeypatch.setenv("RUNNER_ARTIFACTS", str(tmp_path / "runs"))
    return server.new_database


@pytest.fixture
def store_db(new_store_db: Callable[[], str]) -> str:
    """A new store's ``--db`` value, on SQLite and on PostgreSQL (see ``new_store_db``)."""
    return new_store_db()


def execute_sql(db: str | Path, statement: str, **params: Any) -> None:
    """One statement on a store of either kind, as a test reaches behind the store's back (e.g. a deadline that passed)."""
    import sqlalchemy as sa

    from runner.store import resolve_url

    engine = sa.create_engine(resolve_url(db))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def query_sql(db: str | Path, statement: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of one query on a store of either kind, as dicts."""
    import sqlalchemy as sa

    from runner.store import resolve_url

    engine = sa.create_engine(resolve_url(db))
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(statement), params).mappings()]
    finally:
        engine.dispose()
