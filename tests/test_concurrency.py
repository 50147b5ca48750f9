"""Several processes writing one SQLite store at once: every run and every row arrives, nothing is locked out.

Each test starts its processes behind a start barrier: every child imports what it needs, says it is
ready, and waits for one gate file; the gate opens only when all are ready, so they begin together
instead of in the order their interpreters happened to finish starting.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from runner.store import SCHEMA_VERSION

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
V1_STORE = Path(__file__).resolve().parent / "data" / "store_v1.db"
V1_RUN = "6177fdec99e1"
METRICS_PER_EPOCH = 4  # train_loss, train_accuracy, val_loss, val_accuracy
TEST_METRICS = 3  # loss, accuracy, f1_macro
PROCESSES = 16

BARRIER = """
import os, sys, time

def wait_at_barrier():
    '''Say this process is ready (argv[1] + ".ready.PID"), then wait until the gate argv[1] exists.'''
    gate = sys.argv[1]
    open(f"{gate}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.001)
    return time.time()
"""

# Opens the store after the barrier and reports what it found and which schema statements it ran itself.
OPEN_AT_ONCE = BARRIER + """
import json
import sqlalchemy as sa
from sqlalchemy import event
from runner.store import Store

ran = []
@event.listens_for(sa.engine.Engine, "after_cursor_execute")
def record(conn, cursor, statement, parameters, context, executemany):
    words = statement.split()
    if words and words[0].upper() in ("CREATE", "ALTER", "INSERT", "UPDATE"):
        ran.append(" ".join(words[:3]))

passed = wait_at_barrier()
store = Store(sys.argv[2])
print(json.dumps({"version": store.schema_version(), "ran": ran, "passed": passed}))
"""

# A `runner run` whose imports are done before the barrier, so every run starts training at once.
RUN_AT_ONCE = BARRIER + """
import torch, torchvision  # noqa: F401
import runner.cli, runner.execute, runner.plugins  # noqa: F401
wait_at_barrier()
runner.cli.main(sys.argv[2:])
"""


def start_at_once(script: str, gate: Path, argvs: list[list[str]], env: dict[str, str] | None = None,
                  timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Run ``script`` once per argv; open the gate when every process waits at the barrier."""
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(gate), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for argv in argvs
    ]
    deadline = time.monotonic() + timeout
    while len(list(gate.parent.glob(f"{gate.name}.ready.*"))) < len(procs):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"a process did not reach the barrier: {[p.communicate() for p in procs]}")
        time.sleep(0.01)
    gate.touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=timeout), *p.communicate()) for p in procs]


def open_store_in_processes(path: Path | str, count: int, gates: Path | None = None) -> list[dict[str, Any]]:
    """``count`` processes open the store at ``path`` (a file or a URL) at once; gates: where their barrier files go."""
    gate = (gates or Path(path).parent) / f"gate-{count}-{time.monotonic_ns()}"
    results = start_at_once(OPEN_AT_ONCE, gate, [[str(path)]] * count)
    assert [r.returncode for r in results] == [0] * count, [r.stderr for r in results]
    assert not any("locked" in r.stderr for r in results)
    reports = [json.loads(r.stdout) for r in results]
    passed = [r["passed"] for r in reports]
    assert max(passed) - min(passed) < 2, passed  # they really started together
    return reports


def schema_work_alone(path: Path | str, gates: Path | None = None) -> Counter[str]:
    """The schema statements one process runs when it opens ``path`` with no other process about."""
    [report] = open_store_in_processes(path, 1, gates)
    assert report["ran"]
    return Counter(report["ran"])


def meta_and_tables(path: Path | str) -> tuple[list[tuple[str, str]], list[str]]:
    """Read without the store, which would create or migrate what it opens; any store."""
    import sqlalchemy as sa

    from runner.store import resolve_url

    engine = sa.create_engine(resolve_url(path))
    try:
        with engine.connect() as conn:
            meta = [tuple(r) for r in conn.execute(sa.text("SELECT key, value FROM meta"))]
            tables = sorted(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    return meta, tables


def test_processes_creating_one_new_store_at_once_all_succeed_and_one_creates_it(new_store_db: Any, tmp_path: Path) -> None:
    expected = schema_work_alone(new_store_db(), tmp_path)
    path = new_store_db()
    reports = open_store_in_processes(path, PROCESSES, tmp_path)
    assert [r["version"] for r in reports] == [SCHEMA_VERSION] * PROCESSES

    # exactly one process created the tables and stamped the version; the others found them
    [creator] = [r["ran"] for r in reports if r["ran"]]
    assert Counter(creator) == expected
    meta, tables = meta_and_tables(path)
    assert meta == [("schema_version", str(SCHEMA_VERSION))]
    assert sorted(s.split()[2] for s in creator if s.startswith("CREATE TABLE")) == tables
    from runner.store import Store

    assert Store(path, create=False).query.count_runs() == 0


def test_opening_a_store_tries_again_when_connecting_meets_a_lock(tmp_path: Path, monkeypatch: Any) -> None:
    """Connecting (an old file switching to WAL) and the unlocked version read can meet another
    process's lock when many open one old store at once (CI saw one of 16 fail): the store tries again."""
    from sqlalchemy.exc import OperationalError

    from runner.store import Store, database

    shutil.copy(V1_STORE, tmp_path / "old.db")
    real = database.Store._current_version
    calls: list[int] = []

    def locked_the_first_time(store: Any) -> int | None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT value FROM meta", {}, Exception("database is locked"))
        return real(store)

    monkeypatch.setattr(database.Store, "_current_version", locked_the_first_time)
    assert Store(tmp_path / "old.db").schema_version() == SCHEMA_VERSION
    assert len(calls) == 2


def test_processes_migrating_one_old_store_at_once_all_succeed_and_each_step_runs_once(tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    shutil.copy(V1_STORE, tmp_path / "alone" / "old.db")
    expected = schema_work_alone(tmp_path / "alone" / "old.db")
    assert expected["UPDATE meta SET"] == SCHEMA_VERSION - 1  # one transaction per migration
    path = tmp_path / "old.db"
    shutil.copy(V1_STORE, path)
    with sqlite3.connect(path) as conn:
        run_before = conn.execute("SELECT * FROM runs").fetchall()
        metrics_before = conn.execute("SELECT * FROM epoch_metrics ORDER BY epoch, name").fetchall()

    reports = open_store_in_processes(path, PROCESSES)
    assert [r["version"] for r in reports] == [SCHEMA_VERSION] * PROCESSES

    # every migration ran exactly once, under the lock (not necessarily all in the same process)
    assert sum((Counter(r["ran"]) for r in reports), Counter()) == expected
    meta, tables = meta_and_tables(path)
    assert meta == [("schema_version", str(SCHEMA_VERSION))]
    assert meta_and_tables(tmp_path / "alone" / "old.db")[1] == tables
    with sqlite3.connect(path) as conn:  # migrated once, nothing lost
        [run_after] = conn.execute("SELECT * FROM runs").fetchall()
        assert run_after[0] == V1_RUN and run_after[: len(run_before[0])] == run_before[0]
        assert conn.execute("SELECT * FROM epoch_metrics ORDER BY epoch, name").fetchall() == metrics_before


def test_four_runs_writing_one_new_store_at_once_all_complete_with_every_row(tmp_path: Path, run_cli: Any) -> None:
    db = tmp_path / "shared.db"
    epochs = [1, 2, 2, 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNNER_HEARTBEAT_S": "1"}  # the most frequent beats: more writers
    argvs = [["run", str(TINY), "--db", str(db), "-q", "--set", f"training.epochs={n}", "--set", f"seed={i}",
              "--set", "data.train_per_class=60"] for i, n in enumerate(epochs)]
    results = start_at_once(RUN_AT_ONCE, tmp_path / "gate", argvs, env=env)

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "locked" not in result.stderr
    run_ids = {r.stdout.strip() for r in results}
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    assert {r["id"] for r in runs} == run_ids and len(run_ids) == 4
    assert {r["status"] for r in runs} == {"completed"}

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM epoch_metrics").fetchone() == (METRICS_PER_EPOCH * sum(epochs),)
        assert conn.execute("SELECT COUNT(*) FROM epochs").fetchone() == (sum(epochs),)
        assert conn.execute("SELECT COUNT(*) FROM split_metrics").fetchone() == (TEST_METRICS * len(epochs),)
        # the writers overlapped: each run was running while another one was (not necessarily all four at
        # once: on a loaded machine the 1-epoch run can end before the slowest process has started)
        spans = conn.execute("SELECT id, started_at, ended_at FROM runs").fetchall()
        assert all(any(other != run_id and start < other_end and other_start < end for other, other_start, other_end in spans)
                   for run_id, start, end in spans)
    by_run = {r["id"]: r["epochs_run"] for r in runs}
    assert sorted(by_run.values()) == sorted(epochs)
    for run_id in run_ids:
        details = run_cli("show", run_id, "--db", db, "--format", "json").json()
        assert [e["epoch"] for e in details["epochs"]] == list(range(1, by_run[run_id] + 1))
        assert all(len(e) == 1 + METRICS_PER_EPOCH for e in details["epochs"])
        assert len(details["test"]) == TEST_METRICS
        assert set(details["checkpoints"]) == {"best", "last"}
