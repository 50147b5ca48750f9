"""The store's queries: one run filter for ``runs`` and ``report``, name globs alike on every dialect."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from runner.store import RunFilter, Store, utcnow
from runner.store.queries import glob_match

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["tiny", "tiny-1", "tiny_1", "tinyA1", "Tiny", "tiny-10", "a%b", "axb", "a[1]", "a1", "x?y", "x*y", "xzy", "back\\slash"]
GLOBS = ["tiny*", "tiny?1", "tiny_1", "tiny-?", "Tiny", "*1", "?iny", "a%b", "a[1]", "a[12]", "x?y", "x*y", "*", "back\\*", "nothing"]


def expected_matches(glob: str) -> set[str]:
    """fnmatch-style with only * and ? special, case-sensitive: the behaviour every dialect must give."""
    pattern = re.escape(glob).replace(r"\*", ".*").replace(r"\?", ".")
    return {name for name in NAMES if re.fullmatch(pattern, name, re.DOTALL)}


def add_run(store: Store, run_id: str, name: str, **fields: object) -> None:
    store.runs.create(run_id, name=name, spec_yaml="", spec_json=json.dumps(fields.pop("spec", {})), spec_hash="-", model="cnn",
                      strategy="full_finetune", dataset="mnist_bundled", seed=int(fields.pop("seed", 0)), **fields)


@pytest.fixture
def named_store(store_db: str) -> Store:
    store = Store(store_db)
    for i, name in enumerate(NAMES):
        add_run(store, f"{i:012d}", name)
    return store


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
@pytest.mark.parametrize("glob", GLOBS)
def test_a_name_glob_matches_the_same_names_in_every_dialect(named_store: Store, glob: str, dialect: str) -> None:
    """SQLite's GLOB and the LIKE other databases get both match exactly the fnmatch-style names: on
    an SQLite store both (LIKE made case-sensitive, as PostgreSQL's is), on PostgreSQL its own LIKE."""
    on_sqlite = named_store.engine.dialect.name == "sqlite"
    if not on_sqlite and dialect == "sqlite":
        pytest.skip("GLOB is SQLite's")
    names = sa.table("runs", sa.column("name"))
    with named_store.engine.connect() as conn:
        if on_sqlite:
            conn.exec_driver_sql("PRAGMA case_sensitive_like=ON")
        found = set(conn.execute(sa.select(names.c.name).where(glob_match(names.c.name, glob, dialect))).scalars())
    assert found == expected_matches(glob)


@pytest.mark.parametrize("glob", GLOBS)
def test_runs_and_report_select_the_same_runs_by_name(named_store: Store, glob: str) -> None:
    listed = {r["name"] for r in named_store.query.runs_table(RunFilter(name_glob=glob))}
    reported = set(named_store.query.report_runs(RunFilter(name_glob=glob))["name"])
    assert listed == reported == expected_matches(glob)


def test_runs_and_report_apply_every_filter_field_alike(store_db: str) -> None:
    store = Store(store_db)
    add_run(store, "aaaa00000001", "old", spec={"model": {"name": "cnn"}, "seed": 1}, seed=1, started_at=utcnow() - timedelta(days=30))
    add_run(store, "aaaa00000002", "new", spec={"model": {"name": "mlp"}, "seed": 2}, seed=2)
    add_run(store, "aaaa00000003", "lost", spec={"model": {"name": "cnn"}, "seed": 3}, seed=3, heartbeat_s=1e-6)
    store.runs.finish("aaaa00000002", "completed")
    store.manage.add_tags("aaaa00000002", ["keep", "paper"])
    store.manage.add_tags("aaaa00000003", ["keep"])
    filters = {
        RunFilter(): {"aaaa00000001", "aaaa00000002", "aaaa00000003"},
        RunFilter(status="lost"): {"aaaa00000003"},
        RunFilter(status="running"): {"aaaa00000001"},
        RunFilter(status="completed"): {"aaaa00000002"},
        RunFilter(name_glob="?e*"): {"aaaa00000002"},
        RunFilter(since=utcnow() - timedelta(days=1)): {"aaaa00000002", "aaaa00000003"},
        RunFilter(where=(("model.name", "cnn"),)): {"aaaa00000001", "aaaa00000003"},
        RunFilter(where=(("seed", 2),)): {"aaaa00000002"},
        RunFilter(run_ids=("aaaa00000001", "aaaa00000003")): {"aaaa00000001", "aaaa00000003"},
        RunFilter(tags=("keep",)): {"aaaa00000002", "aaaa00000003"},
        RunFilter(tags=("keep", "paper")): {"aaaa00000002"},
        RunFilter(status="lost", tags=("keep",), where=(("model.name", "cnn"),)): {"aaaa00000003"},
    }
    for run_filter, expected in filters.items():
        assert {r["id"] for r in store.query.runs_table(run_filter)} == expected, run_filter
        assert set(store.query.report_runs(run_filter)["id"]) == expected, run_filter
        assert set(store.query.report_split_metrics(run_filter)["run_id"]) <= expected, run_filter
    statuses = {r["id"]: r["status"] for r in store.query.runs_table()}
    assert statuses == dict(zip(store.query.report_runs(RunFilter())["id"], store.query.report_runs(RunFilter())["status"]))
    assert [r["id"] for r in store.query.runs_table(limit=2)] == ["aaaa00000003", "aaaa00000002"]  # newest first


# A spec with every JSON type, and per key: the type every dialect names, and the report's cell
SPEC_VALUES = {"arch": "cnn", "lr": 0.001, "epochs": 3, "ratio": 3.0, "as_text": "1e-3", "flag": True, "off": False,
               "nothing": None, "classes": [3, 8], "nested": {"a": [1, {"z": "y"}], "b": 1}}  # stored sorted, as runs are
EXPECTED_TYPES = {"arch": "text", "lr": "real", "epochs": "integer", "ratio": "real", "as_text": "text", "flag": "true",
                  "off": "false", "nothing": "null", "classes": "array", "nested": "object", "nested.a": "array",
                  "nested.a.1.z": "text", "classes.1": "integer", "missing": None}
WHERE_MATCHES = [("arch", "cnn", True), ("arch", "mlp", False), ("lr", 1e-3, True), ("lr", "1e-3", True), ("lr", "0.001", True),
                 ("epochs", 3, True), ("epochs", "3", True), ("epochs", 3.0, True), ("ratio", 3, True), ("as_text", "1e-3", True),
                 ("as_text", 0.001, False), ("flag", True, True), ("flag", 1, False), ("off", False, True), ("nothing", None, True),
                 ("arch", None, False), ("classes", [3, 8], True), ("classes", [8, 3], False), ("classes.1", 8, True),
                 ("nested", {"a": [1, {"z": "y"}], "b": 1}, True), ("nested.a.1.z", "y", True), ("missing", 1, False)]


def test_json_paths_give_the_same_types_matches_and_report_cells_on_every_dialect(store_db: str) -> None:
    """The one per-dialect piece of SQL for spec keys (json_value/json_type: SQLite's json_extract,
    PostgreSQL's jsonb paths): the same JSON type names, the same --where matches, the same cells."""
    from runner.store.queries import json_type

    store = Store(store_db)
    add_run(store, "dddd00000001", "json", spec=SPEC_VALUES)
    dialect = store.engine.dialect.name
    with store.engine.connect() as conn:
        runs = sa.table("runs", sa.column("spec_json"))
        types = {key: conn.execute(sa.select(json_type(runs.c.spec_json, key, dialect))).scalar() for key in EXPECTED_TYPES}
    assert types == EXPECTED_TYPES
    for key, value, matches in WHERE_MATCHES:
        found = store.query.runs_table(RunFilter(where=((key, value),)))
        assert bool(found) is matches, (key, value)
    keys = ["arch", "lr", "epochs", "as_text", "nothing", "classes", "nested"]  # "nothing": an SQL keyword
    row = store.query.report_runs(RunFilter(), keys).iloc[0]
    assert [row[k] for k in keys[:4]] == ["cnn", 0.001, 3, "1e-3"] and row["nothing"] is None
    assert (row["classes"], row["nested"]) == ("[3,8]", '{"a":[1,{"z":"y"}],"b":1}')
    assert store.query.spec_key_exists("nested.a") and not store.query.spec_key_exists("nested.c")


def test_checkpoint_paths_come_back_as_paths_and_show_keeps_them_as_text(store_db: str) -> None:
    from runner.reports import run_details

    store = Store(store_db)
    add_run(store, "cccc00000001", "ckpt")
    path = store.run_dir("cccc00000001") / "best.pt"
    store.runs.save_checkpoint("cccc00000001", "best", 1, path, "0" * 64, 1)
    assert store.query.checkpoints("cccc00000001")["best"]["path"] == path
    assert store.artifacts_dir(store.query.run_row("cccc00000001")) == store.run_dir("cccc00000001")
    assert run_details(store, "cccc")["checkpoints"] == {"best": {"epoch": 1, "path": str(path), "sha256": "0" * 64}}


def test_only_the_store_package_imports_sqlalchemy() -> None:
    importers = []
    for path in sorted((ROOT / "runner").rglob("*.py")):
        if (ROOT / "runner" / "store") in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if any(m == "sqlalchemy" or m.startswith("sqlalchemy.") for m in modules):
            importers.append(str(path.relative_to(ROOT)))
    assert importers == []


def test_the_store_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from runner.store import Store, RunFilter\n"
        f"store = Store({str(tmp_path / 'r.db')!r})\n"
        "store.query.runs_table(RunFilter(name_glob='x*')); store.query.report_runs(RunFilter())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_limited_listing_is_the_newest_page_of_the_filtered_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "results.db")
    for i in range(6):
        add_run(store, f"dddd0000000{i}", f"run-{i}", started_at=utcnow() - timedelta(hours=10 - i))
        if i % 2:
            store.manage.add_tags(f"dddd0000000{i}", ["odd"])
    assert [r["id"] for r in store.query.runs_table(RunFilter(tags=("odd",)), limit=2)] == ["dddd00000005", "dddd00000003"]
    assert [r["id"] for r in store.query.runs_table(limit=3)] == ["dddd00000005", "dddd00000004", "dddd00000003"]
    assert store.query.count_runs() == 6 and store.query.count_runs(RunFilter(tags=("odd",))) == 3


@pytest.mark.parametrize(("status", "index"), [(None, "ix_runs_started_at"), ("completed", "ix_runs_status_started_at"),
                                             ("failed", "ix_runs_status_started_at")])
def test_the_newest_page_is_read_through_an_index_in_started_at_order(store_db: str, status: str | None, index: str) -> None:
    """`runner runs` on a big store must not sort every run to show 50 (a 100,000-run SQLite store:
    106 ms without the index, 0.5 ms with it), nor `runner runs --status S` every run of that status.
    PostgreSQL's planner prefers a scan of a table this small, so sequential scans are priced out there."""
    store = Store(store_db)
    for i in range(30):
        add_run(store, f"ffff{i:08d}", f"run-{i}", started_at=utcnow() - timedelta(minutes=100 - i))
        store.runs.finish(f"ffff{i:08d}", "completed" if i % 3 else "failed")
    statements: list[tuple[str, object]] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda conn, cursor, statement, parameters, context, many:
                    statements.append((statement, parameters)))
    newest = [f"ffff{i:08d}" for i in range(29, -1, -1) if status is None or (status == "failed") == (i % 3 == 0)][:3]
    assert [r["id"] for r in store.query.runs_table(RunFilter(status=status), limit=3)] == newest
    (statement, parameters), = [(s, p) for s, p in statements if "LIMIT" in s.upper()]
    on_sqlite = store.engine.dialect.name == "sqlite"
    with store.engine.connect() as conn:
        if not on_sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
        plan = " ".join(str(row) for row in conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if on_sqlite else "EXPLAIN ") + statement, parameters))
    assert re.search(rf"\b{index}\b", plan), plan


def test_a_status_filter_selects_the_runs_whose_live_status_it_names(store_db: str) -> None:
    """The filter is spelled on the stored columns (so an index serves it) and must agree with the
    status every listing shows: a running run past its deadline is lost, one without a deadline runs."""
    from conftest import execute_sql

    from runner.store.status import STATUSES, live_status

    store = Store(store_db)
    now = utcnow()
    cases = [(status, None) for status in STATUSES if status != "running"]
    cases += [("running", None), ("running", now - timedelta(hours=1)), ("running", now + timedelta(hours=1)),
              ("lost", now - timedelta(hours=1))]
    for i, (stored, lost_after) in enumerate(cases):
        add_run(store, f"cccc{i:08d}", f"run-{i}")
        execute_sql(store_db, "UPDATE runs SET status = :s, lost_after = :t WHERE id = :i", s=stored, t=lost_after, i=f"cccc{i:08d}")
    shown = {r["id"]: r["status"] for r in store.query.runs_table()}
    assert shown == {f"cccc{i:08d}": live_status(s, t, utcnow()) for i, (s, t) in enumerate(cases)}
    for status in STATUSES:
        expected = {run_id for run_id, live in shown.items() if live == status}
        assert {r["id"] for r in store.query.runs_table(RunFilter(status=status))} == expected, status
        assert set(store.query.report_runs(RunFilter(status=status))["id"]) == expected, status
        assert store.query.count_runs(RunFilter(status=status)) == len(expected), status


def test_runs_shows_the_newest_page_and_says_how_many_more(tmp_path: Path, run_cli) -> None:
    from runner.cli import RUNS_SHOWN

    db = tmp_path / "results.db"
    store = Store(db)
    for i in range(RUNS_SHOWN + 7):
        add_run(store, f"eeee{i:08d}", f"run-{i}", started_at=utcnow() - timedelta(minutes=1000 - i))
    page = run_cli("runs", "--db", db)
    assert page.exit_code == 0
    listed = [line.split()[0] for line in page.out.splitlines()[1:]]
    assert listed == [f"eeee{i:08d}" for i in range(RUNS_SHOWN + 6, 6, -1)]  # the newest, newest first
    assert page.err == "7 more run(s) not shown: --limit N shows the newest N, --limit 0 all\n"
    everything = run_cli("runs", "--db", db, "--limit", "0")
    assert len(everything.out.splitlines()) == 1 + RUNS_SHOWN + 7 and everything.err == ""
    assert len(run_cli("runs", "--db", db, "--format", "json").json()) == RUNS_SHOWN + 7  # scripts still get every run
    three = run_cli("runs", "--db", db, "--name", "run-1*", "--limit", "3")
    assert len(three.out.splitlines()) == 4 and three.err.startswith("8 more run(s) not shown")  # run-1, run-10..19: 11 match


def test_listing_a_store_needs_no_write_lock(tmp_path: Path, run_cli) -> None:
    """A store at the current version is opened with one read: `runner runs` answers while a run holds the write lock."""
    import sqlite3

    db = tmp_path / "results.db"
    add_run(Store(db), "ffff00000001", "busy")
    writer = sqlite3.connect(db, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE runs SET name = 'still busy'")
        result = run_cli("runs", "--db", db, "--format", "json")
    finally:
        writer.rollback()
        writer.close()
    assert result.exit_code == 0 and [r["name"] for r in result.json()] == ["busy"]
