"""Several processes writing one SQLite store at once: every run and every row arrives, nothing is locked out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner.store import SCHEMA_VERSION, Store

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
V1_STORE = Path(__file__).resolve().parent / "data" / "store_v1.db"
METRICS_PER_EPOCH = 4  # train_loss, train_accuracy, val_loss, val_accuracy
TEST_METRICS = 3  # loss, accuracy, f1_macro

OPEN_AT_ONCE = """
import sys, time
from runner.store import Store
start = float(sys.argv[2])
while time.time() < start:  # every process opens the store in the same instant
    pass
print(Store(sys.argv[1]).schema_version())
"""


def open_store_in_processes(path: Path, count: int) -> list[subprocess.CompletedProcess[str]]:
    start = time.time() + 3  # time enough for every interpreter to import sqlalchemy
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(path), str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    results = open_store_in_processes(path, 6)
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    assert [r.stdout.strip() for r in results] == [str(SCHEMA_VERSION)] * 6
    assert Store(path).query.count_runs() == 0


def test_processes_migrating_one_old_store_at_once_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    shutil.copy(V1_STORE, path)
    results = open_store_in_processes(path, 6)
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert [r["id"] for r in store.query.runs_table()] == ["6177fdec99e1"]  # migrated once, nothing lost


def test_four_runs_writing_one_new_store_at_once_all_complete_with_every_row(tmp_path: Path, run_cli: Any) -> None:
    db = tmp_path / "shared.db"
    epochs = [1, 2, 2, 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNNER_HEARTBEAT_S": "0.2"}  # frequent beats: more writers
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "runner", "run", str(TINY), "--db", str(db), "-q",
             "--set", f"training.epochs={n}", "--set", f"seed={i}", "--set", "data.train_per_class=60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i, n in enumerate(epochs)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]

    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "locked" not in err
    run_ids = {out.strip() for out, _ in outputs}
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    assert {r["id"] for r in runs} == run_ids and len(run_ids) == 4
    assert {r["status"] for r in runs} == {"completed"}

    store = Store(db)
    assert len(store.query.epoch_metrics(sorted(run_ids))) == METRICS_PER_EPOCH * sum(epochs)
    by_run = {r["id"]: r["epochs_run"] for r in runs}
    assert sorted(by_run.values()) == sorted(epochs)
    for run_id in run_ids:
        details = run_cli("show", run_id, "--db", db, "--format", "json").json()
        assert len(details["epochs"]) == by_run[run_id]
        assert len(details["test"]) == TEST_METRICS
        assert set(details["checkpoints"]) == {"best", "last"}
