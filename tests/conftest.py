"""Shared fixtures: a CLI invoker, a tiny spec, one tiny trained run per test session, and stores on
SQLite and on a throwaway PostgreSQL server (``store_db``)."""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pg_server import PostgresServer, throwaway_server, why_no_server

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
# PostgreSQL: one throwaway server per session (tests/pg_server.py), a new database per test


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (initdb + pg_ctl on a free port, data under a
    temporary directory, fsync off), stopped and removed at the end; skipped where the binaries are absent."""
    reason = why_no_server()
    if reason is not None:
        pytest.skip(reason)
    with throwaway_server() as server:
        yield server


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
