"""Shared fixtures: a CLI invoker, a tiny spec, one tiny trained run per test session, and stores on
SQLite and on a throwaway PostgreSQL server (``store_db``)."""

from __future__ import annotations

import functools
import itertools
import os
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pg_server import PostgresServer, throwaway_server, why_no_server
from runner.performance import contention_defaults

# The suite trains in its own process (and its workers' under pytest-xdist) as much as in runner
# subprocesses: its OpenMP threads must not spin either while another test trains on the same cores
# (a 30 s quickstart took 219 s beside another worker with the default spinning).
contention_defaults()

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"
TINY_SPEC = SPECS / "tiny.yaml"


@functools.lru_cache(maxsize=1)
def builtin_registries() -> Any:
    """The built-in plugins only, loaded once: tests must not depend on which other plugins are installed."""
    from runner.testing import plugin_registries

    return plugin_registries()


def plan_and_build(spec: Any, registries: Any = None, **plan_options: Any) -> tuple[Any, Any]:
    """A spec's plan and the parts a run trains with (seeded as a run is), for tests of what lies between."""
    from runner.execute import setup
    from runner.plan import plan

    registries = registries or builtin_registries()
    run_plan = plan(spec, registries, **plan_options)
    return run_plan, setup(run_plan, registries)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch results.db in the repository or a user's TORCH_HOME, nor see installed plugins.

    ``RUNNER_LOAD_PLUGINS`` set to nothing loads no third-party plugin, in this process and in the
    ``runner`` subprocesses tests start: the suite passes whichever plugins are installed. A test
    that needs a plugin names it there (see ``install`` in test_plugins_loading.py).
    """
    monkeypatch.delenv("RUNNER_DB", raising=False)
    monkeypatch.delenv("RUNNER_ARTIFACTS", raising=False)
    monkeypatch.delenv("RUNNER_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("RUNNER_BLOCK_PLUGINS", raising=False)
    monkeypatch.setenv("RUNNER_LOAD_PLUGINS", "")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)


_counter = itertools.count()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """``install(entry_point, source, dist=…, version=…)``: a plugin distribution visible to entry points.

    The plugin is real as far as ``importlib.metadata`` can tell: a module and a ``.dist-info``
    directory with an ``entry_points.txt``, in a folder put on ``sys.path``.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []
    loaded: list[str] = []

    def install_plugin(entry_point: str, source: str, dist: str | None = None, version: str = "1.0.0") -> str:
        module = f"fake_runner_plugin_{next(_counter)}"
        dist = dist or f"runner-{entry_point.replace('_', '-')}"
        loaded.append(entry_point)  # the suite loads only the plugins a test installs (RUNNER_LOAD_PLUGINS)
        monkeypatch.setenv("RUNNER_LOAD_PLUGINS", ",".join(loaded))
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[runner]\n{entry_point} = {module}\n", encoding="utf-8")
        created.append(module)
        return module

    yield install_plugin
    for module in created:
        sys.modules.pop(module, None)


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """Run ``runner ARGS…`` in-process (torch is imported once per session, not per call): a ``CliResult``."""
    from runner.testing import invoke

    return invoke


@pytest.fixture
def tiny_spec() -> Path:
    return TINY_SPEC


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


def yielding_to_the_test() -> None:
    """``preexec_fn`` of a runner subprocess that a test stops mid-run (a signal after its first epoch):
    at a lower priority, the test's polling wins the cores, so on a loaded machine the run cannot
    finish its remaining epochs before the test has seen the first one."""
    os.nice(10)


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
    """A private copy of an SQLite store with its runs/ (its checkpoints), e.g. for commands that write.

    Rows name checkpoints relative to runs/ beside the store, so the copy uses its own copies.
    """
    import shutil
    import sqlite3

    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    if (source.parent / "runs").is_dir():
        shutil.copytree(source.parent / "runs", target.parent / "runs", dirs_exist_ok=True)
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
# fresh virtual environments for installed-package tests (test_plugin_package.py, test_plugin_docs.py)


def clean_env(torch_home: Path, load_plugins: str) -> dict[str, str]:
    """This environment without runner's settings, with its own TORCH_HOME and only ``load_plugins`` loading."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "PYTHONHOME", "VIRTUAL_ENV"))}
    env["RUNNER_LOAD_PLUGINS"] = load_plugins
    env["TORCH_HOME"] = str(torch_home)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def make_venv(venv: Path, env: dict[str, str]) -> None:
    """A fresh venv that sees this environment's packages (torch, pip, setuptools) after its own.

    A ``.pth`` file adds this interpreter's site-packages, which is what ``--system-site-packages``
    would do if torch lived in the base interpreter rather than in a virtual environment.
    """
    import importlib.util
    import site
    import subprocess

    has_pip = importlib.util.find_spec("pip") is not None
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if has_pip else []), str(venv)], check=True, env=env)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in parents]
    Path(purelib, "_test_parent_environment.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")


def pip_install_offline(venv: Path, env: dict[str, str], *args: str, cwd: Path) -> None:
    """``pip install`` into ``venv`` with nothing fetched: no dependencies, no build isolation, no index."""
    import subprocess

    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr


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
