"""Schema versions: an old store is upgraded in place and read; a newer one is refused in one line.

The fixtures in tests/data are stores written by the released code of each schema version (see
tests/data/make_store_fixtures.py): ``store_v1.db`` and ``store_v2.db`` hold one completed run,
``store_v3.db`` a completed (tagged, evaluated), a failed and an interrupted run, ``store_v4.db``
the same and a run whose process was killed (``running`` in the file, ``lost`` to a reader).
"""

from __future__ import annotations

import ast
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import runner.store.migrations as migrations_module
from runner.store import SCHEMA_VERSION, Store
from runner.store.migrations import MIGRATIONS

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = {version: DATA / f"store_v{version}.db" for version in (1, 2, 3, 4)}
V1_STORE = FIXTURES[1]
V1_RUN = "6177fdec99e1"  # the completed tiny run the first released schema stored
V3_RUNS = {"tiny-completed": "completed", "tiny-failed": "failed", "tiny-interrupted": "interrupted"}


@pytest.fixture
def v1_copy(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copy(V1_STORE, path)
    return path


def copy_of(version: int, tmp_path: Path) -> Path:
    path = tmp_path / f"v{version}.db"
    shutil.copy(FIXTURES[version], path)
    return path


def schema(path: Path) -> dict[str, dict[str, Any]]:
    """Every table of an SQLite file: columns (type, nullability, default), primary key, indexes,
    unique constraints and foreign keys (with ON DELETE). Column order is left out: ALTER TABLE
    appends a column where a new store has it in the middle, and no query depends on the order."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        inspector = sa.inspect(engine)
        return {
            table: {
                "columns": {c["name"]: (str(c["type"]), c["nullable"], c.get("default")) for c in inspector.get_columns(table)},
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
                "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                "foreign_keys": sorted(
                    (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]), f["options"].get("ondelete"))
                    for f in inspector.get_foreign_keys(table)
                ),
            }
            for table in inspector.get_table_names()
        }
    finally:
        engine.dispose()


def rows(path: Path) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """table → (column names, every row sorted) of each table but meta."""
    with sqlite3.connect(path) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'meta'")]
        out = {}
        for table in tables:
            cursor = conn.execute(f"SELECT * FROM {table}")
            out[table] = ([d[0] for d in cursor.description], sorted(cursor.fetchall(), key=repr))
    return out


def built_by_migrations(path: Path, count: int) -> Path:
    """A store built from nothing by the first ``count`` migrations, stamped as Store stamps one."""
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for migration in MIGRATIONS[:count]:
            migration(conn)
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', :v)"), {"v": str(count)})
    engine.dispose()
    return path


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


# ------------------------------------------------------------------------------------------
# The migrations themselves


def test_migrations_are_numbered_in_order() -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS)
    assert [m.__name__[:5] for m in MIGRATIONS] == [f"m{n:03d}_" for n in range(1, SCHEMA_VERSION + 1)]


def test_migrations_never_use_the_models() -> None:
    """Each migration is written against the tables as they were, not against today's models."""
    tree = ast.parse(Path(migrations_module.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "sqlalchemy"}, imported
    for node in ast.walk(tree):  # metadata.create_all only on a MetaData the migration built itself
        if isinstance(node, ast.Attribute) and node.attr == "metadata":
            pytest.fail("a migration refers to some .metadata (the models' Base.metadata?)")


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_the_fixtures_are_stores_of_their_versions(version: int) -> None:
    with sqlite3.connect(f"file:{FIXTURES[version]}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("schema_version", str(version))]


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_the_first_migrations_build_exactly_the_released_schema(version: int, tmp_path: Path) -> None:
    """Migrations 1..N from an empty file give the tables the release of version N wrote."""
    assert schema(built_by_migrations(tmp_path / "built.db", version)) == schema(FIXTURES[version])


def test_every_migration_from_nothing_builds_the_schema_of_a_new_store(tmp_path: Path) -> None:
    Store(tmp_path / "new.db")
    assert schema(built_by_migrations(tmp_path / "built.db", SCHEMA_VERSION)) == schema(tmp_path / "new.db")


def test_the_schema_comparison_sees_types_nullability_indexes_and_foreign_keys(tmp_path: Path) -> None:
    """The comparison above is not of column names only: each of these differences shows."""
    base = "CREATE TABLE runs (id VARCHAR NOT NULL PRIMARY KEY, name VARCHAR NOT NULL);"
    child = ("CREATE TABLE tags (run_id VARCHAR NOT NULL, tag VARCHAR NOT NULL, PRIMARY KEY (run_id, tag), "
             "FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE);")
    variants = {
        "base": base + child,
        "type": base.replace("name VARCHAR", "name TEXT") + child,
        "nullable": base.replace("name VARCHAR NOT NULL", "name VARCHAR") + child,
        "index": base + child + "CREATE INDEX ix_runs_name ON runs (name);",
        "foreign key": base + child.replace(" ON DELETE CASCADE", ""),
        "primary key": base + child.replace("PRIMARY KEY (run_id, tag)", "PRIMARY KEY (run_id)"),
    }
    described = {}
    for label, sql in variants.items():
        with sqlite3.connect(tmp_path / f"{label}.db") as conn:
            conn.executescript(sql)
        described[label] = schema(tmp_path / f"{label}.db")
    assert [label for label in variants if described[label] == described["base"]] == ["base"]


# ------------------------------------------------------------------------------------------
# Upgrading stores of every released version


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_a_store_upgraded_from_each_released_version_has_exactly_the_schema_of_a_new_one(version: int, tmp_path: Path) -> None:
    old = copy_of(version, tmp_path)
    assert Store(old).schema_version() == SCHEMA_VERSION
    Store(tmp_path / "new.db")
    assert schema(old) == schema(tmp_path / "new.db")


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_upgrading_keeps_every_row_and_every_status(version: int, tmp_path: Path, run_cli: Any) -> None:
    old = copy_of(version, tmp_path)
    before = rows(old)
    conn = sqlite3.connect(old)
    statuses = dict(conn.execute("SELECT id, status FROM runs").fetchall())
    conn.close()
    assert statuses and sum(len(table_rows) for _, table_rows in before.values()) > len(statuses)

    Store(old)
    after = rows(old)
    assert set(before) <= set(after)
    for table, (columns, table_rows) in before.items():
        after_columns, after_rows = after[table]
        assert set(columns) <= set(after_columns), table
        keep = [after_columns.index(c) for c in columns]
        assert sorted((tuple(r[i] for i in keep) for r in after_rows), key=repr) == table_rows, table
    listed = run_cli("runs", "--db", old, "--format", "json")
    assert listed.exit_code == 0, listed.err
    # a run left running by a process that died long ago is lost to a reader, before and after
    assert {r["id"]: r["status"] for r in listed.json()} == {k: "lost" if v == "running" else v for k, v in statuses.items()}


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


def test_a_second_version_store_is_read_by_runs_show_and_report(run_cli: Any, tmp_path: Path) -> None:
    db = copy_of(2, tmp_path)
    assert [(r["id"], r["status"]) for r in run_cli("runs", "--db", db, "--format", "json").json()] == [(V1_RUN, "completed")]
    details = run_cli("show", V1_RUN, "--db", db, "--format", "json").json()
    assert [e["epoch"] for e in details["epochs"]] == [1, 2]
    assert (details["tags"], details["evaluations"]) == ([], [])
    assert [r["id"] for r in run_cli("report", "--db", db, "--format", "json").json()] == [V1_RUN]


def test_a_third_version_store_keeps_its_tags_evaluations_and_statuses(run_cli: Any, tmp_path: Path) -> None:
    db = copy_of(3, tmp_path)
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    assert {r["name"]: r["status"] for r in runs} == V3_RUNS
    ids = {r["name"]: r["id"] for r in runs}
    completed = run_cli("show", ids["tiny-completed"], "--db", db, "--format", "json").json()
    assert completed["tags"] == ["baseline", "fixture"]
    assert [(e["split"], e["checkpoint"], e["samples"]) for e in completed["evaluations"]] == [("test", "best", 225)]
    assert completed["evaluations"][0]["accuracy"] == pytest.approx(completed["test"]["accuracy"])
    failed = run_cli("show", ids["tiny-failed"], "--db", db, "--format", "json").json()
    assert failed["error"] == "OSError: [Errno 28] No space left on device" and "Traceback" in failed["traceback"]
    assert [r["id"] for r in run_cli("runs", "--db", db, "--tag", "fixture", "--format", "json").json()] == [ids["tiny-completed"]]
    report = run_cli("report", "--db", db, "--status", "interrupted", "--format", "json").json()
    assert [(r["id"], r["stop_reason"]) for r in report] == [(ids["tiny-interrupted"], "interrupted by SIGINT")]


def test_opening_an_upgraded_store_again_migrates_nothing(v1_copy: Path) -> None:
    Store(v1_copy)
    upgraded = schema(v1_copy), dump(v1_copy)
    assert Store(v1_copy).schema_version() == SCHEMA_VERSION
    assert (schema(v1_copy), dump(v1_copy)) == upgraded
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


# ------------------------------------------------------------------------------------------
# Every backend: a store of today's schema (on PostgreSQL there is no older store to migrate)


def schema_of(db: str) -> dict[str, Any]:
    """Tables, columns (type, nullability), primary keys, indexes and foreign keys of any store, and its meta rows."""
    from runner.store import resolve_url

    engine = sa.create_engine(resolve_url(db))
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables = {
                table: ({c["name"]: (str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)},
                        inspector.get_pk_constraint(table)["constrained_columns"],
                        sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
                        sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys(table)))
                for table in inspector.get_table_names()
            }
            meta = sorted(tuple(r) for r in conn.execute(sa.text("SELECT key, value FROM meta")))
    finally:
        engine.dispose()
    return {"tables": tables, "meta": meta}


def test_a_new_store_has_every_table_of_the_models_and_reopening_it_changes_nothing(store_db: str) -> None:
    from runner.store.schema import metadata

    Store(store_db)
    created = schema_of(store_db)
    assert set(created["tables"]) == set(metadata.tables) and created["meta"] == [("schema_version", str(SCHEMA_VERSION))]
    assert Store(store_db, create=False).schema_version() == SCHEMA_VERSION
    assert schema_of(store_db) == created


def test_a_new_store_stamped_by_a_newer_runner_is_refused_in_one_line_and_left_alone(run_cli: Any, store_db: str, tiny_spec: Path) -> None:
    from conftest import execute_sql

    location = Store(store_db).location
    execute_sql(store_db, "UPDATE meta SET value = :v WHERE key = 'schema_version'", v=str(SCHEMA_VERSION + 1))
    before = schema_of(store_db)
    expected = (f"error: the store {location} has schema version {SCHEMA_VERSION + 1}, newer than this runner "
                f"understands ({SCHEMA_VERSION}); upgrade runner-dl\n")
    for args in (("runs",), ("report",), ("run", tiny_spec)):
        result = run_cli(*args, "--db", store_db)
        assert (result.exit_code, result.err) == (2, expected), args
    assert schema_of(store_db) == before


def test_a_store_of_the_previous_schema_on_either_backend_migrates_to_the_new_one_and_keeps_its_runs(
    run_cli: Any, store_db: str, tiny_spec: Path,
) -> None:
    """Version 6 held seeds and checkpoint sizes as INTEGER, 32 bits on PostgreSQL: a seed above 2**31
    could not be stored there. The store is put back as version 6 made it, then opened by this runner."""
    from conftest import execute_sql, query_sql

    trained = run_cli("run", tiny_spec, "--db", store_db, "-q", "--set", "training.epochs=1")
    assert trained.exit_code == 0, trained.err
    new = schema_of(store_db)
    server = not store_db.endswith(".db")
    if server:
        for table, column in (("runs", "seed"), ("runs", "params_total"), ("runs", "params_trainable"), ("checkpoints", "size_bytes")):
            execute_sql(store_db, f"ALTER TABLE {table} ALTER COLUMN {column} TYPE INTEGER")
    for statement in ("DROP INDEX ix_runs_started_at", "DROP INDEX ix_runs_status_started_at", "CREATE INDEX ix_runs_status ON runs (status)"):
        execute_sql(store_db, statement)  # the indexes as they were before version 8
    execute_sql(store_db, "UPDATE meta SET value = '6' WHERE key = 'schema_version'")

    big_seed = 2**63 - 1
    again = run_cli("run", tiny_spec, "--db", store_db, "-q", "--set", "training.epochs=1", "--set", f"seed={big_seed}")
    assert again.exit_code == 0, again.err
    assert schema_of(store_db) == new  # exactly the schema of a new store
    seeds = sorted(r["seed"] for r in query_sql(store_db, "SELECT seed FROM runs"))
    assert seeds == [0, big_seed]
    assert run_cli("show", again.out.strip(), "--db", store_db, "--format", "json").json()["seed"] == big_seed
