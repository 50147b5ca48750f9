"""Schema versions: an old store is upgraded in place and read; a newer one is refused in one line."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from runner.store import SCHEMA_VERSION, Store
from runner.store.migrations import MIGRATIONS

V1_STORE = Path(__file__).resolve().parent / "data" / "store_v1.db"
V1_RUN = "6177fdec99e1"  # the completed tiny run the first released schema stored


@pytest.fixture
def v1_copy(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copy(V1_STORE, path)
    return path


def columns(path: Path) -> dict[str, set[str]]:
    inspector = sa.inspect(sa.create_engine(f"sqlite:///{path}"))
    return {table: {c["name"] for c in inspector.get_columns(table)} for table in inspector.get_table_names()}


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_migrations_are_numbered_in_order() -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS)
    assert [m.__name__[:5] for m in MIGRATIONS] == [f"m{n:03d}_" for n in range(1, SCHEMA_VERSION + 1)]


def test_the_fixture_is_a_first_version_store() -> None:
    with sqlite3.connect(f"file:{V1_STORE}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_a_first_version_store_is_upgraded_in_place_and_read_by_runs_show_and_report(run_cli: Any, v1_copy: Path) -> None:
    runs = run_cli("runs", "--db", v1_copy, "--format", "json")
    assert runs.exit_code == 0, runs.err
    assert [(r["id"], r["status"], r["epochs_run"]) for r in runs.json()] == [(V1_RUN, "completed", 2)]
    assert Store(v1_copy).schema_version() == SCHEMA_VERSION

    details = run_cli("show", V1_RUN, "--db", v1_copy, "--format", "json").json()
    assert [e["epoch"] for e in details["epochs"]] == [1, 2]  # every stored row survived
    assert details["test"]["accuracy"] == pytest.approx(runs.json()[0]["test_accuracy"])

    report = run_cli("report", "--db", v1_copy, "--format", "csv")
    assert report.exit_code == 0, report.err
    assert V1_RUN in report.out


def test_an_upgraded_store_has_exactly_the_schema_of_a_new_one(v1_copy: Path, tmp_path: Path) -> None:
    Store(v1_copy)
    Store(tmp_path / "new.db")
    assert columns(v1_copy) == columns(tmp_path / "new.db")


def test_opening_an_upgraded_store_again_migrates_nothing(v1_copy: Path) -> None:
    Store(v1_copy)
    upgraded = columns(v1_copy)
    assert Store(v1_copy).schema_version() == SCHEMA_VERSION
    assert columns(v1_copy) == upgraded
    with sqlite3.connect(v1_copy) as conn:
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("schema_version", str(SCHEMA_VERSION))]


def test_a_run_left_running_by_an_old_runner_shows_as_lost_after_the_upgrade(run_cli: Any, v1_copy: Path) -> None:
    with sqlite3.connect(v1_copy) as conn:  # the old runner died mid-run: no heartbeat deadline existed
        conn.execute("UPDATE runs SET status = 'running', ended_at = NULL")
    assert run_cli("runs", "--db", v1_copy, "--format", "json").json()[0]["status"] == "lost"


def test_a_store_from_a_newer_runner_is_refused_in_one_line(run_cli: Any, v1_copy: Path, tiny_spec: Path) -> None:
    with sqlite3.connect(v1_copy) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = dump(v1_copy)
    expected = (f"error: the store {v1_copy} has schema version {SCHEMA_VERSION + 1}, newer than this runner "
                f"understands ({SCHEMA_VERSION}); upgrade runner-dl\n")
    for args in (("runs",), ("report",), ("show", V1_RUN), ("run", tiny_spec)):
        result = run_cli(*args, "--db", v1_copy)
        assert (result.exit_code, result.err) == (2, expected), args
    assert dump(v1_copy) == before  # nothing written to it
