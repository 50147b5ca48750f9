"""A store and its runs/ can be moved or copied: each copy uses its own artefacts, never the original's.

Rows record artefact paths relative to ``runs/`` beside the store, resolved against the store in
use. A store written before that (absolute paths) keeps working, and no command ever deletes a file
outside the store's own artefact root.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from runner.store import Store
from runner.store.migrations import MIGRATIONS
from test_resume import checkpoint_of_epoch_fails


def snapshot(directory: Path) -> dict[str, Any]:
    """Every file under ``directory`` with its sha256, and every row of its store."""
    files = {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    with sqlite3.connect(directory / "results.db") as conn:
        rows = list(conn.iterdump())
    return {"files": files, "rows": rows}


def digit_png(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L").save(path)
    return path


@pytest.fixture
def project(run_cli: Any, tiny_spec: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A project directory: a store with two completed runs and one failed run, started from the first's
    weights, that can resume."""
    root = tmp_path / "project"
    root.mkdir()
    db = root / "results.db"
    runs = {}
    for name, extra in (("kept", []), ("doomed", ["--set", "seed=1"])):
        result = run_cli("run", tiny_spec, "--db", db, "-q", "--set", "training.epochs=1", *extra)
        assert result.exit_code == 0, result.err
        runs[name] = result.out.strip()
    with checkpoint_of_epoch_fails(2):  # transfer learning: its initial weights are another run's best checkpoint
        assert run_cli("run", tiny_spec, "--db", db, "-q", "--set", "seed=2", "--set", f"model.weights={{run: {runs['kept']}}}").exit_code == 1
    runs["failed"] = next(r["id"] for r in run_cli("runs", "--db", db, "--format", "json").json() if r["status"] == "failed")
    # the commands above ran in this process: a connection they left for the collector would, closed
    # later, fold SQLite's WAL into results.db and change its bytes (not its rows) mid-test
    gc.collect()
    return root, runs


def test_rows_hold_paths_relative_to_the_stores_runs_directory(project: tuple[Path, dict[str, str]]) -> None:
    root, runs = project
    with sqlite3.connect(root / "results.db") as conn:
        assert conn.execute("SELECT artifacts_dir FROM runs WHERE id = ?", (runs["kept"],)).fetchall() == [(runs["kept"],)]
        paths = dict(conn.execute("SELECT kind, path FROM checkpoints WHERE run_id = ?", (runs["kept"],)).fetchall())
    assert paths == {"best": f"{runs['kept']}/best.pt", "last": f"{runs['kept']}/last.pt"}


def test_every_command_works_on_a_copy_of_a_moved_project_and_leaves_the_original_untouched(
    run_cli: Any, project: tuple[Path, dict[str, str]], tmp_path: Path,
) -> None:
    original, runs = project
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    moved = original.rename(tmp_path / "moved")  # no path into the original's old place can work any more
    before = snapshot(moved)
    db = copy / "results.db"

    details = run_cli("show", runs["kept"], "--db", db, "--format", "json").json()
    assert {k: c["path"] for k, c in details["checkpoints"].items()} == {
        "best": str(copy / "runs" / runs["kept"] / "best.pt"), "last": str(copy / "runs" / runs["kept"] / "last.pt")}
    evaluated = run_cli("eval", runs["kept"], "--db", db, "--format", "json")
    assert evaluated.exit_code == 0, evaluated.err
    assert evaluated.json()["accuracy"] == details["test"]["accuracy"]
    predicted = run_cli("predict", runs["kept"], digit_png(tmp_path / "digit.png"), "--db", db, "--format", "json")
    assert predicted.exit_code == 0, predicted.err
    exported = run_cli("export", runs["kept"], "--format", "state_dict", "-o", tmp_path / "model.pt", "--db", db)
    assert exported.exit_code == 0, exported.err

    resumed = run_cli("resume", runs["failed"], "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert run_cli("show", runs["failed"], "--db", db, "--format", "json").json()["status"] == "completed"
    assert sorted(p.name for p in (copy / "runs" / runs["failed"]).iterdir()) == ["best.pt", "last.pt"]

    deleted = run_cli("delete", runs["doomed"], "--db", db, "--yes")
    assert deleted.exit_code == 0, deleted.err
    assert not (copy / "runs" / runs["doomed"]).exists()
    pruned = run_cli("prune", "--keep", "best", "--db", db, "--yes", "--format", "json")
    assert pruned.exit_code == 0, pruned.err
    assert pruned.json()["files_removed"] == 2  # the last checkpoints of the two completed runs left
    assert not (copy / "runs" / runs["kept"] / "last.pt").exists()

    assert snapshot(moved) == before  # the original: every file and every row as it was
    assert run_cli("eval", runs["doomed"], "--db", moved / "results.db").exit_code == 0  # and the moved store still works


def test_a_copy_of_a_store_with_absolute_paths_never_deletes_the_originals_files(
    run_cli: Any, project: tuple[Path, dict[str, str]], tmp_path: Path,
) -> None:
    """The issue's case: rows of the copy still name the original's files (absolute paths, as
    stores written before relative paths hold them). Reading works; deleting keeps those files."""
    original, runs = project
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    with sqlite3.connect(copy / "results.db") as conn:
        conn.execute("UPDATE runs SET artifacts_dir = ? || '/' || artifacts_dir", (str(original / "runs"),))
        conn.execute("UPDATE checkpoints SET path = ? || '/' || path", (str(original / "runs"),))
    before = snapshot(original)

    assert run_cli("eval", runs["doomed"], "--db", copy / "results.db").exit_code == 0  # legacy paths still read
    deleted = run_cli("delete", runs["doomed"], "--db", copy / "results.db", "--yes")
    assert deleted.exit_code == 0, deleted.err
    assert deleted.err == (f"kept 1 file(s) outside the store's artefact root {copy / 'runs'} (another store's, or --artifacts): "
                           f"{original / 'runs' / runs['doomed']}\n")
    assert snapshot(original) == before
    pruned = run_cli("prune", "--keep", "best", "--db", copy / "results.db", "--yes", "--format", "json")
    assert pruned.exit_code == 0 and pruned.json()["files_removed"] == 0
    assert "outside the store's artefact root" in pruned.err
    assert snapshot(original) == before


def test_the_upgrade_makes_absolute_paths_inside_the_stores_runs_relative(tmp_path: Path) -> None:
    """A store of schema version 4 recorded absolute paths; upgrading makes those under its own runs/
    relative (so it can move from then on) and leaves paths elsewhere as they were."""
    db = tmp_path / "results.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        for migration in MIGRATIONS[:4]:
            migration(conn)
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', '4')"))
        for run_id, directory in (("inside000000", tmp_path / "runs" / "inside000000"), ("outside00000", Path("/elsewhere/outside00000"))):
            conn.execute(sa.text(
                "INSERT INTO runs (id, name, status, spec_yaml, spec_json, spec_hash, model, strategy, dataset, seed, started_at, "
                "epochs_run, artifacts_dir) VALUES (:id, 'x', 'completed', '', '{}', '-', 'cnn', 'full_finetune', 'mnist_bundled', 0, "
                "'2026-01-01 00:00:00', 1, :dir)"), {"id": run_id, "dir": str(directory)})
            conn.execute(sa.text("INSERT INTO checkpoints (run_id, kind, epoch, path, sha256, size_bytes) VALUES (:id, 'best', 1, :path, '-', 1)"),
                         {"id": run_id, "path": str(directory / "best.pt")})
    engine.dispose()

    store = Store(db)
    with sqlite3.connect(db) as conn:
        assert dict(conn.execute("SELECT id, artifacts_dir FROM runs")) == {"inside000000": "inside000000",
                                                                             "outside00000": "/elsewhere/outside00000"}
        assert dict(conn.execute("SELECT run_id, path FROM checkpoints")) == {"inside000000": "inside000000/best.pt",
                                                                              "outside00000": "/elsewhere/outside00000/best.pt"}
    assert store.query.checkpoints("inside000000")["best"]["path"] == tmp_path / "runs" / "inside000000" / "best.pt"
    assert store.query.checkpoints("outside00000")["best"]["path"] == Path("/elsewhere/outside00000/best.pt")


@pytest.mark.parametrize("stored", ["../../outside.pt", "/etc/passwd", "."])
def test_no_row_can_point_a_deletion_outside_the_artefact_root(tmp_path: Path, stored: str) -> None:
    store = Store(tmp_path / "results.db")
    assert not store.owns(store.artifact_path(stored))
    assert store.owns(store.artifact_path("abc/best.pt"))
