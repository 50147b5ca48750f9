"""Run management: tags and --tag filters, delete, checkpoint retention and prune."""

from __future__ import annotations

import io
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import execute_sql, query_sql

DATA = Path(__file__).resolve().parent / "data"


def train(run_cli, tiny_spec, db, *overrides: str) -> str:
    sets = [a for o in ("training.epochs=1", *overrides) for a in ("--set", o)]
    result = run_cli("run", tiny_spec, "--db", db, "-q", *sets)
    assert result.exit_code == 0, result.err
    return result.out.strip()


def query(db: Path | str, sql: str, *args: object) -> list[tuple]:
    """Rows of ``sql`` (``?`` placeholders) on a store of either kind, as tuples."""
    names = iter(range(len(args)))
    statement = re.sub(r"\?", lambda _: f":p{next(names)}", sql)
    return [tuple(r.values()) for r in query_sql(db, statement, **{f"p{i}": a for i, a in enumerate(args)})]


def runs_dir(db: Path | str) -> Path:
    """Where the store's run artefacts are: RUNNER_ARTIFACTS (a server store), else runs/ beside the file."""
    return Path(os.environ.get("RUNNER_ARTIFACTS") or Path(db).parent / "runs")


def run_files(db: Path | str, run_id: str) -> list[str]:
    return sorted(p.name for p in (runs_dir(db) / run_id).iterdir())


def rows_of(db: Path | str, run_id: str) -> dict[str, int]:
    """Rows that mention the run, per table (every table with a run_id column, and runs itself)."""
    from runner.store import resolve_url

    counts = {"runs": query(db, "SELECT COUNT(*) FROM runs WHERE id = ?", run_id)[0][0]}
    engine = sa.create_engine(resolve_url(db))
    try:
        inspector = sa.inspect(engine)
        tables = [t for t in inspector.get_table_names() if "run_id" in {c["name"] for c in inspector.get_columns(t)}]
    finally:
        engine.dispose()
    for table in tables:
        counts[table] = query(db, f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", run_id)[0][0]
    return counts


# ------------------------------------------------------------------------------------------
# Retention


def test_checkpoint_retention_keeps_what_the_spec_asks(run_cli, tiny_spec, db):
    both = train(run_cli, tiny_spec, db, "training.epochs=2")
    every = train(run_cli, tiny_spec, db, "training.epochs=2", "checkpoints.keep=all")
    best = train(run_cli, tiny_spec, db, "training.epochs=2", "checkpoints.keep=best")

    assert run_files(db, both) == ["best.pt", "last.pt"]
    assert run_files(db, every) == ["best.pt", "epoch-001.pt", "epoch-002.pt", "last.pt"]
    assert run_files(db, best) == ["best.pt"]
    kinds = {r: sorted(run_cli("show", r, "--db", db, "--format", "json").json()["checkpoints"]) for r in (both, every, best)}
    assert kinds == {both: ["best", "last"], every: ["best", "epoch-001", "epoch-002", "last"], best: ["best"]}
    # keep: best still leaves a usable model
    assert run_cli("eval", best, "--db", db).exit_code == 0
    # retention decides what is kept on disk, not what is trained: the spec hash ignores it
    assert len(set(query(db, "SELECT spec_hash FROM runs"))) == 1


def test_keep_last_leaves_only_the_last_checkpoint(run_cli, tiny_spec, db):
    run_id = train(run_cli, tiny_spec, db, "checkpoints.keep=last")
    assert run_files(db, run_id) == ["last.pt"]
    result = run_cli("predict", run_id, "--db", db, str(DATA / "missing.png"))
    assert result.exit_code == 2 and "has no best checkpoint on disk; it has a last checkpoint (--checkpoint last)" in result.err
    assert run_cli("eval", run_id, "--db", db, "--checkpoint", "last").exit_code == 0

    with open(db.parent / "runs" / run_id / "last.pt", "ab") as checkpoint:  # a checkpoint swapped behind the store's back
        checkpoint.write(b"\0")
    tampered = run_cli("eval", run_id, "--db", db, "--checkpoint", "last")
    assert tampered.exit_code == 2 and "changed since the run wrote it (sha256 differs)" in tampered.err


def test_prune_frees_the_expected_bytes(run_cli, tiny_spec, store_db):
    db = store_db
    first, second = train(run_cli, tiny_spec, db), train(run_cli, tiny_spec, db, "checkpoints.keep=all")
    artefacts = runs_dir(db)
    dropped = [artefacts / first / "last.pt", artefacts / second / "last.pt", artefacts / second / "epoch-001.pt"]
    expected = sum(p.stat().st_size for p in dropped)

    assert run_cli("prune", "--db", db, "--older-than", "1d", "--yes").out.startswith("0 of 2 completed run(s) pruned")
    dry = run_cli("prune", "--db", db, "--dry-run", "--format", "json").json()
    assert (dry["bytes_freed"], dry["files_removed"], dry["dry_run"]) == (expected, 3, True)
    assert all(p.exists() for p in dropped)

    result = run_cli("prune", "--db", db, "--keep", "best", "--yes")
    assert result.exit_code == 0, result.err
    assert f"2 of 2 completed run(s) pruned (keep best): 3 checkpoint file(s), freed {expected} bytes" in result.out
    assert not any(p.exists() for p in dropped)
    assert run_files(db, first) == ["best.pt"] and run_files(db, second) == ["best.pt"]
    assert query(db, "SELECT run_id, kind FROM checkpoints ORDER BY run_id, kind") == sorted([(first, "best"), (second, "best")])
    assert run_cli("prune", "--db", db, "--yes", "--format", "json").json()["bytes_freed"] == 0  # nothing left to drop


def test_prune_keeps_runs_that_could_still_resume(run_cli, tiny_spec, db):
    run_id = train(run_cli, tiny_spec, db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'interrupted' WHERE id = ?", (run_id,))
    result = run_cli("prune", "--db", db, "--yes", "--format", "json")
    assert result.json()["runs_pruned"] == [] and run_files(db, run_id) == ["best.pt", "last.pt"]
    assert run_cli("prune", "--db", db, "--older-than", "soon").err.strip().startswith("error: --older-than 'soon'")


# ------------------------------------------------------------------------------------------
# Delete


def test_delete_leaves_no_rows_and_no_files_of_the_run(run_cli, tiny_spec, store_db, monkeypatch):
    db = store_db
    doomed = train(run_cli, tiny_spec, db, "checkpoints.keep=all")
    kept = train(run_cli, tiny_spec, db)
    run_cli("tag", doomed, "old", "--db", db)
    assert run_cli("eval", doomed, "--db", db).exit_code == 0
    assert all(count > 0 for table, count in rows_of(db, doomed).items() if table in ("runs", "epoch_metrics", "checkpoints", "tags", "evaluations"))
    kept_rows = rows_of(db, kept)

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    refused = run_cli("delete", doomed, "--db", db)
    assert (refused.exit_code, refused.err) == (1, "nothing deleted\n")  # a "no" is not an interruption (130)
    assert rows_of(db, doomed)["runs"] == 1 and (runs_dir(db) / doomed).is_dir()

    result = run_cli("delete", doomed[:8], "--db", db, "--yes")
    assert result.exit_code == 0, result.err
    assert f"deleted 1 run(s): {doomed}" in result.out
    assert set(rows_of(db, doomed).values()) == {0}
    assert not (runs_dir(db) / doomed).exists()
    assert not any(doomed in str(p) for p in runs_dir(db).parent.rglob("*"))
    assert rows_of(db, kept) == kept_rows and run_files(db, kept) == ["best.pt", "last.pt"]
    assert run_cli("show", doomed, "--db", db).exit_code == 2


def test_delete_refuses_a_live_run_even_forced_and_a_run_without_heartbeat_unless_forced(run_cli, tiny_spec, store_db):
    """A run whose heartbeat is fresh has a live process writing it: deleting it would pull the run
    from under that process, so --force does not apply. A run marked running with no heartbeat
    deadline cannot say whether its process lives: --force deletes it."""
    db = store_db
    live, silent = train(run_cli, tiny_spec, db), train(run_cli, tiny_spec, db, "seed=1")
    execute_sql(db, "UPDATE runs SET status = 'running', heartbeat_at = '2999-01-01 00:00:00', lost_after = '2999-01-01 00:00:10' "
                    "WHERE id = :id", id=live)
    execute_sql(db, "UPDATE runs SET status = 'running', lost_after = NULL WHERE id = :id", id=silent)
    before = rows_of(db, live), run_files(db, live)
    for flags in ((), ("--force",)):
        result = run_cli("delete", live, "--db", db, "--yes", *flags)
        assert result.exit_code == 2, flags
        assert result.err == (f"error: run {live} is running (last heartbeat 2999-01-01 00:00:00 UTC); stop it first: it can be "
                              "deleted once it has stopped, or has missed two heartbeats and shows as lost\n")
    assert (rows_of(db, live), run_files(db, live)) == before  # nothing of it lost

    refused = run_cli("delete", silent, "--db", db, "--yes")
    assert refused.exit_code == 2 and "is running" in refused.err and "--force" in refused.err
    assert run_cli("delete", silent, "--db", db, "--yes", "--force").exit_code == 0
    assert query(db, "SELECT id FROM runs") == [(live,)]


# ------------------------------------------------------------------------------------------
# Tags


def test_tags_filter_runs_and_report(run_cli, tiny_spec, store_db):
    db = store_db
    baseline, candidate = train(run_cli, tiny_spec, db), train(run_cli, tiny_spec, db, "seed=1")
    assert run_cli("tag", baseline, "paper", "baseline", "--db", db).out.strip() == f"{baseline}: baseline, paper"
    assert run_cli("tag", candidate, "paper", "--db", db).exit_code == 0

    def ids(*args: str) -> list[str]:
        return [r["id"] for r in run_cli("runs", "--db", db, "--format", "json", *args).json()]

    assert sorted(ids("--tag", "paper")) == sorted([baseline, candidate])
    assert ids("--tag", "paper", "--tag", "baseline") == [baseline]
    assert ids("--tag", "nothing") == []
    assert baseline in run_cli("runs", "--db", db, "--tag", "baseline").out

    report = run_cli("report", "--db", db, "--tag", "baseline", "--format", "json")
    assert report.exit_code == 0, report.err
    assert [r["id"] for r in report.json()] == [baseline]

    assert run_cli("tag", baseline, "--remove", "paper", "--db", db).out.strip() == f"{baseline}: baseline"
    assert ids("--tag", "paper") == [candidate]
    assert run_cli("show", baseline, "--db", db, "--format", "json").json()["tags"] == ["baseline"]
    bad = run_cli("tag", baseline, "two words", "--db", db)
    assert bad.exit_code == 2 and "no spaces" in bad.err


# ------------------------------------------------------------------------------------------
# Schema


def test_a_version_1_store_gains_the_tags_and_evaluations_tables(tmp_path):
    from runner.store import SCHEMA_VERSION, RunFilter, Store

    db = tmp_path / "v1.db"
    shutil.copy(DATA / "store_v1.db", db)
    store = Store(db, create=False)
    assert store.schema_version() == SCHEMA_VERSION
    columns = {table: [c[1] for c in query(db, f"PRAGMA table_info({table})")] for table in ("tags", "evaluations")}
    assert columns["tags"] == ["run_id", "tag"]
    assert columns["evaluations"] == ["id", "run_id", "created_at", "split", "checkpoint", "checkpoint_epoch", "dataset",
                                      "overrides_json", "device", "samples", "loss", "accuracy", "f1_macro"]
    [run_id] = [r["id"] for r in store.query.runs_table()]
    store.manage.add_tags(run_id, ["migrated"])  # an old run can be tagged and found by its tag
    assert [r["id"] for r in store.query.runs_table(RunFilter(tags=("migrated",)))] == [run_id]
    assert store.query.evaluations(run_id) == []


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 1209600), ("1.5", 129600)])
def test_ages(text, seconds):
    from runner.ages import parse_age

    assert parse_age(text).total_seconds() == seconds


# ------------------------------------------------------------------------------------------
# Names that would rewrite the terminal


def test_show_and_runs_print_control_characters_of_a_run_name_as_escapes(run_cli, tiny_spec, db):
    name = "\x1b[2J\x1b[Hcleared\rover\u202eevil"
    run_id = train(run_cli, tiny_spec, db, 'name="\\e[2J\\e[Hcleared\\rover\\u202eevil"')  # YAML's escapes
    shown = run_cli("show", run_id, "--db", db)
    listed = run_cli("runs", "--db", db)
    for output in (shown.out, listed.out):
        assert "\x1b" not in output and "\r" not in output and "\u202e" not in output
        assert "\\x1b[2J\\x1b[Hcleared\\x0dover\\u202eevil" in output
    assert f"{'name':18} \\x1b[2J\\x1b[Hcleared\\x0dover\\u202eevil" in shown.out.splitlines()
    assert run_cli("show", run_id, "--db", db, "--format", "json").json()["name"] == name  # the data itself is kept as it is


def test_a_process_whose_run_was_deleted_stops_without_writing(tmp_path):
    """A lost run is deleted while its process was only paused: waking, the process's next write
    finds no run and is told so, as when the run was taken over (it then stops without writing)."""
    from runner.errors import RunTakenOver
    from runner.store import Store, new_owner

    store = Store(tmp_path / "results.db")
    owner = new_owner()
    store.runs.create("paused000000", heartbeat_s=60, owner=owner, name="x", spec_yaml="", spec_json="{}", spec_hash="-",
                      model="cnn", strategy="full_finetune", dataset="mnist_bundled", seed=0)
    store.manage.delete_runs(["paused000000"])
    with pytest.raises(RunTakenOver, match=r"^run paused000000 was deleted; stopping without writing$"):
        store.runs.heartbeat("paused000000", 60, owner=owner)
    with pytest.raises(RunTakenOver):
        store.runs.check_owner("paused000000", owner)
    assert store.query.count_runs() == 0
