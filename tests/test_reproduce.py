"""`runner reproduce`: the stored resolved spec trained again, compared epoch by epoch."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import copy_store


def test_reproduce_says_identical_then_names_a_changed_metric(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    run_id = trained_tiny_run.run_id

    same = run_cli("reproduce", run_id, "--db", db)
    assert same.exit_code == 0, same.err
    assert same.out.startswith("identical")
    assert "warning" not in same.err  # same Python, torch, torchvision, runner and plugins
    rows = run_cli("runs", "--db", db, "--format", "json").json()
    assert len(rows) == 2
    reproduction = next(r for r in rows if r["id"] != run_id)
    assert reproduction["test_accuracy"] == next(r for r in rows if r["id"] == run_id)["test_accuracy"]
    assert reproduction["tags"] == [f"reproduces:{run_id}"]

    with sqlite3.connect(db) as conn:  # a stored metric changed by hand, and an older torch recorded
        conn.execute("UPDATE epoch_metrics SET value = value + 0.25 WHERE run_id = ? AND epoch = 2 AND name = 'val_loss'", (run_id,))
        conn.execute("UPDATE runs SET torch_version = '1.0.0' WHERE id = ?", (run_id,))
    changed = run_cli("reproduce", run_id, "--db", db)
    assert changed.exit_code == 1
    assert "differs at epoch 2: val_loss" in changed.out
    assert "(difference -0.25)" in changed.out
    assert f"warning: torch was 1.0.0 for run {run_id}, now" in changed.err


def test_first_difference_walks_the_epochs_then_the_test_metrics():
    from runner.reproduce import first_difference

    original = {1: {"train_loss": 0.5, "val_accuracy": 0.9}, 2: {"train_loss": 0.25, "val_accuracy": 0.95}}
    same = {1: dict(original[1]), 2: dict(original[2])}
    assert first_difference(original, same, {"accuracy": 0.9}, {"accuracy": 0.9}) is None

    later = {1: dict(original[1]), 2: {"train_loss": 0.25, "val_accuracy": 0.96}}
    found = first_difference(original, later, {}, {})
    assert (found.epoch, found.metric) == (2, "val_accuracy")
    assert abs(found.delta - 0.01) < 1e-12

    shorter = {1: dict(original[1])}
    found = first_difference(original, shorter, {}, {})
    assert (found.epoch, found.metric, found.reproduced) == (2, "train_loss", None)
    assert "missing from the reproduction" in found.describe()

    test_only = first_difference(original, same, {"accuracy": 0.9}, {"accuracy": 0.8})
    assert (test_only.epoch, test_only.metric) == (None, "accuracy")
    assert test_only.describe().startswith("differs at test: accuracy")


def test_reproduce_of_an_unknown_run_is_one_line(run_cli, trained_tiny_run, tmp_path):
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    result = run_cli("reproduce", "nope", "--db", db)
    assert result.exit_code == 2
    assert result.err.strip() == f"error: no run 'nope' in {db}"
