"""Training that diverges: a NaN or infinite loss fails the run in one line, and is stored as null everywhere.

The metrics of the epoch that diverged are stored (a value that is not a finite number as NULL, so
every output shows null or an empty cell); its checkpoint is not written, so a resume starts from
the last sound epoch. ``training.nonfinite_validation: continue`` lets a run go on past a NaN
validation loss.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

DIVERGING = ["--set", "training.optimizer.name=SGD", "--set", "training.optimizer.lr=1e30"]
# class 0 weighs nothing: an evaluation batch of two class-0 images has loss 0/0 (training batches mix classes)
NAN_VALIDATION = ["--set", "training.loss={name: CrossEntropyLoss, weight: [0, 1, 1]}", "--set", "data.eval_batch_size=2"]


def test_a_diverging_run_fails_in_one_line_naming_metric_epoch_batch_and_the_hint(run_cli: Any, tiny_spec: Path, db: Path) -> None:
    before = run_cli("run", tiny_spec, "--db", db, "-q", "--set", "training.epochs=1")
    assert before.exit_code == 0, before.err
    kept_id = before.out.strip()
    kept = run_cli("show", kept_id, "--db", db, "--format", "json").json()

    result = run_cli("run", tiny_spec, "--db", db, "-q", *DIVERGING)

    assert result.exit_code == 1
    assert result.out == ""
    [line] = result.err.splitlines()
    match = re.fullmatch(r"error: run ([0-9a-f]{12}) failed: TrainingDiverged: train_loss is nan at epoch 1, batch (\d+): "
                         r"lower the learning rate, or set training\.grad_clip", line)
    assert match, line
    run_id, batch = match.group(1), int(match.group(2))
    assert batch >= 2  # the first step of SGD at 1e30 is what breaks the weights

    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["status"] == "failed" and details["stop_reason"] == "error"
    assert details["error"] == line.split(": ", 2)[2]
    assert [e["epoch"] for e in details["epochs"]] == [1]  # the epoch is stored, its loss as null
    assert details["epochs"][0]["train_loss"] is None and details["epochs"][0]["val_loss"] is None
    assert details["epochs"][0]["train_accuracy"] is not None
    assert details["checkpoints"] == {} and not (db.parent / "runs" / run_id).exists()  # no checkpoint of broken weights
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM epoch_metrics WHERE run_id = ? AND name = 'train_loss'", (run_id,)).fetchall() == [(None,)]

    # every output reads it: null in JSON, an empty cell in tables and CSV
    report = run_cli("report", "--db", db, "--format", "json").json()
    assert {r["id"]: r["status"] for r in report} == {kept_id: "completed", run_id: "failed"}
    shown = run_cli("show", run_id, "--db", db)
    assert shown.exit_code == 0 and "TrainingDiverged: train_loss is nan at epoch 1" in shown.out
    for args in (("runs",), ("report", "--format", "csv"), ("compare", kept_id, run_id), ("plot", run_id, "-o", db.parent / "p.png"),
                 ("report", "-o", db.parent / "report.html")):
        assert run_cli(*args, "--db", db).exit_code == 0, args
    assert run_cli("show", kept_id, "--db", db, "--format", "json").json() == kept  # nothing of the other run lost


def test_a_nan_validation_loss_fails_the_run_unless_the_spec_says_continue(run_cli: Any, tiny_spec: Path, db: Path) -> None:
    failed = run_cli("run", tiny_spec, "--db", db, "-q", *NAN_VALIDATION)
    assert failed.exit_code == 1
    assert re.fullmatch(r"error: run [0-9a-f]{12} failed: TrainingDiverged: val_loss is nan at epoch 1: lower the learning rate, "
                        r"or set training\.grad_clip \(or training\.nonfinite_validation: continue to go on\)\n", failed.err), failed.err

    went_on = run_cli("run", tiny_spec, "--db", db, "-q", *NAN_VALIDATION, "--set", "training.nonfinite_validation=continue")
    assert went_on.exit_code == 0, went_on.err
    details = run_cli("show", went_on.out.strip(), "--db", db, "--format", "json").json()
    assert details["status"] == "completed"
    assert [e["val_loss"] for e in details["epochs"]] == [None, None]
    assert all(e["train_loss"] is not None and e["val_accuracy"] is not None for e in details["epochs"])
    assert details["test"]["loss"] is None and details["test"]["accuracy"] is not None
    evaluated = run_cli("eval", went_on.out.strip(), "--db", db, "--format", "json")
    assert evaluated.exit_code == 0, evaluated.err
    assert evaluated.json()["loss"] is None  # valid JSON: null, never NaN
    assert "loss null  accuracy " in run_cli("eval", went_on.out.strip(), "--db", db).out
    # the option decides only when to give up, not what is trained: both runs have one spec hash
    failed_id = re.search(r"run ([0-9a-f]{12})", failed.err).group(1)
    assert run_cli("show", failed_id, "--db", db, "--format", "json").json()["spec_hash"] == details["spec_hash"]


def test_every_value_that_is_not_a_finite_number_is_stored_as_null(tmp_path: Path) -> None:
    """SQLite would keep an infinity (and print it as Infinity, which is not JSON) but turn NaN into
    NULL: the store makes both NULL, on every database."""
    from runner.store import Store

    store = Store(tmp_path / "results.db")
    store.runs.create("inf000000000", name="x", spec_yaml="", spec_json="{}", spec_hash="-", model="cnn",
                      strategy="full_finetune", dataset="mnist_bundled", seed=0)
    store.runs.log_epoch("inf000000000", 1, {"train_loss": float("inf"), "val_loss": float("-inf"), "val_accuracy": 0.5}, 1.0)
    store.runs.save_split_metrics("inf000000000", "test", {"loss": float("nan"), "accuracy": 0.5})
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert dict(conn.execute("SELECT name, value FROM epoch_metrics")) == {"train_loss": None, "val_loss": None, "val_accuracy": 0.5}
        assert dict(conn.execute("SELECT name, value FROM split_metrics")) == {"loss": None, "accuracy": 0.5}
