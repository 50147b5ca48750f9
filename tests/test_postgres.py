"""A PostgreSQL results store, against a real server (the session's throwaway one, tests/conftest.py):
URLs that cannot be used, passwords never shown, artefacts in a directory every worker reaches, and
workers on several processes claiming one queue at once, one of them killed mid-run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import TINY_SPEC, builtin_registries, query_sql, yielding_to_the_test
from pg_server import PG_PASSWORD_USER, PostgresServer, free_port
from runner.store import Store, artifacts_required, mask_url

METRICS_PER_EPOCH = 4


def tables_of(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------
# URLs and their passwords


def test_mask_url_hides_the_password_and_only_the_password() -> None:
    assert mask_url("postgresql+psycopg://alice:pa%3Ass%40w0rd@db.example:5432/runs") == "postgresql+psycopg://alice:***@db.example:5432/runs"
    assert mask_url("postgresql+psycopg://alice@db.example/runs") == "postgresql+psycopg://alice@db.example/runs"
    assert mask_url("sqlite:////tmp/results.db") == "sqlite:////tmp/results.db"


BAD_URLS = {
    # case: (how the URL is wrong, the words of its one line)
    "wrong password": (lambda s: s.url("postgres", *PG_PASSWORD_USER[:1], password="not-the-password"),
                       f'password authentication failed for user "{PG_PASSWORD_USER[0]}"'),
    "unreachable host": (lambda s: s.url("postgres", password="s3cret-too", port=free_port()), "Connection refused"),
    "missing database": (lambda s: s.url("no_such_db", password="s3cret-too"), 'database "no_such_db" does not exist'),
}


@pytest.mark.parametrize("case", list(BAD_URLS))
@pytest.mark.parametrize("command", ["runs", "run"])
def test_a_url_that_cannot_be_used_is_one_line_with_the_password_masked_exit_2_and_nothing_written(
    case: str, command: str, run_cli: Any, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    make_url, words = BAD_URLS[case]
    url = make_url(postgres_server)
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    databases = postgres_server.databases()
    args = ["runs", "--db", url] if command == "runs" else ["run", TINY_SPEC, "--db", url, "--artifacts", tmp_path / "shared"]
    result = run_cli(*args)
    assert result.exit_code == 2, result.err
    assert len(result.err.strip().splitlines()) == 1 and result.out == ""
    line = result.err.strip()
    assert words in line and password not in line and ":***@" in line, line
    assert line.startswith(f"error: cannot use the store {mask_url(url)}: ")
    assert postgres_server.databases() == databases and not (tmp_path / "shared").exists()  # nothing written


def test_a_postgresql_url_without_psycopg_names_the_extra(run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the postgres extra were not installed
    result = run_cli("runs", "--db", "postgresql://alice:hunter2@db.example/runs")
    assert result.exit_code == 2
    assert result.err.strip() == ("error: cannot use the store postgresql+psycopg://alice:***@db.example/runs: its driver psycopg "
                                  "is not installed (pip install 'runner-dl[postgres]')")


def test_no_command_output_report_or_error_shows_the_password(run_cli: Any, postgres_server: PostgresServer, tmp_path: Path) -> None:
    postgres_server.execute("CREATE DATABASE secret_store")
    user, password = PG_PASSWORD_USER
    url = postgres_server.url("secret_store", user, password)
    ran = run_cli("run", TINY_SPEC, "--db", url, "--artifacts", tmp_path / "runs", "--set", "training.epochs=1")
    assert ran.exit_code == 0, ran.err
    run_id = ran.out.strip()
    outputs = [ran.out + ran.err]
    for args in (["show", run_id], ["show", run_id, "--format", "json"], ["runs", "--format", "json"], ["report", "--format", "json"],
                 ["report", "-o", tmp_path / "report.html"], ["show", "nosuchrun"], ["sweep", "status"], ["runs", "--status", "lost"]):
        result = run_cli(*args, "--db", url)
        outputs.append(result.out + result.err)
    outputs.append((tmp_path / "report.html").read_text())
    assert not any(password in text for text in outputs)
    assert f"no run 'nosuchrun' in {mask_url(url)}" in outputs[6]
    assert mask_url(url) in outputs[-1]  # the HTML report names its store, masked


# ------------------------------------------------------------------------------------------
# Artefacts


def test_a_server_store_without_an_artifact_directory_is_refused_before_any_work(run_cli: Any, postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    expected = artifacts_required(url, None)
    assert expected is not None and "--artifacts DIR" in expected and "RUNNER_ARTIFACTS" in expected
    for args in (["run", TINY_SPEC], ["sweep", "run", TINY_SPEC, "--seeds", "2"], ["run", TINY_SPEC, "--seeds", "2"]):
        result = run_cli(*args, "--db", url)
        assert (result.exit_code, result.err.strip()) == (2, f"error: {expected}")
    assert tables_of(url) == []  # not even the schema: refused before the store was opened


def test_runs_record_their_artifact_directory_and_a_missing_one_is_named(
    run_cli: Any, postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval and resume find a run's artefacts from its row wherever the command runs; when the shared
    directory is not there, one line names it."""
    url = postgres_server.new_database()
    monkeypatch.setenv("RUNNER_ARTIFACTS", str(tmp_path / "shared"))
    ran = run_cli("run", TINY_SPEC, "--db", url, "--set", "training.epochs=1")
    assert ran.exit_code == 0, ran.err
    run_id = ran.out.strip()
    run_dir = tmp_path / "shared" / run_id
    assert query_sql(url, "SELECT artifacts_dir FROM runs") == [{"artifacts_dir": str(run_dir)}]
    monkeypatch.delenv("RUNNER_ARTIFACTS")
    monkeypatch.chdir(tmp_path / "shared")  # another working directory: the row says where the artefacts are
    assert run_cli("eval", run_id, "--db", url, "--format", "json").exit_code == 0

    shutil.move(run_dir, tmp_path / "elsewhere")  # the shared directory is not mounted here
    line = f"error: run {run_id}: its artefact directory {run_dir} does not exist here (is the shared artefact directory mounted on this machine?)"
    for args in (["eval", run_id], ["predict", run_id, tmp_path / "elsewhere"], ["export", run_id, "--format", "state_dict", "-o", tmp_path / "m.pt"]):
        result = run_cli(*args, "--db", url)
        assert (result.exit_code, result.err.strip()) == (2, line), args
    store = Store(url, create=False)
    store.runs.finish(run_id, "interrupted")
    result = run_cli("resume", run_id, "--db", url)
    assert (result.exit_code, result.err.strip()) == (2, line)

    shutil.move(tmp_path / "elsewhere", run_dir)  # mounted again: resume finds the run's checkpoint from its row
    resumed = run_cli("resume", run_id, "--db", url, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert query_sql(url, "SELECT status, attempts FROM runs") == [{"status": "completed", "attempts": 2}]


# ------------------------------------------------------------------------------------------
# Claims across processes


def test_a_claim_skips_a_run_another_transaction_holds_instead_of_waiting_for_it(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """SELECT … FOR UPDATE SKIP LOCKED: while one worker's claim transaction holds the first queued
    run, another claim takes the second at once (a claim that waited would hit the lock timeout)."""
    from test_sweeps import _queue

    from runner.store import new_owner

    url = postgres_server.new_database()
    store = Store(url, artifacts=tmp_path)
    sweep_id = _queue(store, 3)
    first_id = store.queue.sweep_runs(sweep_id)[0]["id"]
    holder = sa.create_engine(url)
    with holder.connect() as conn, conn.begin():
        conn.execute(sa.text("SELECT id FROM runs WHERE id = :id FOR UPDATE"), {"id": first_id})
        waiting = sa.create_engine(url, connect_args={"options": "-c lock_timeout=3000"})
        claim = Store.__new__(Store)  # the same store, on an engine whose statements give up after 3 s of waiting on a lock
        claim.__dict__.update(store.__dict__, engine=waiting)
        from runner.store.queue import RunQueue

        taken = RunQueue(claim).claim(new_owner(), 30.0, sweep_id)
        waiting.dispose()
    holder.dispose()
    assert taken is not None and taken.run_id == store.queue.sweep_runs(sweep_id)[1]["id"]
    assert [r["status"] for r in store.queue.sweep_runs(sweep_id)] == ["queued", "running", "queued"]


def _tiny_sweep(directory: Path, name: str, seeds: int, epochs: int, **changes: Any) -> Any:
    from test_sweeps import write_spec

    from runner.sweeps import load_sweep, plan_sweep

    document = load_sweep(write_spec(directory, name=name, seeds=seeds, training={"epochs": epochs, "optimizer": {"name": "Adam", "lr": 0.003}},
                                     **changes))
    return document, plan_sweep(document, builtin_registries())


@pytest.mark.slow
def test_four_workers_started_at_the_same_instant_on_forty_queued_runs_complete_each_exactly_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    from test_concurrency import start_at_once
    from test_sweeps import WORKER_AT_ONCE, epoch_metrics, sweep_rows

    from runner.sweeps import queue_sweep

    url = postgres_server.new_database()
    document, planned = _tiny_sweep(tmp_path, "forty", seeds=40, epochs=1, data__train_per_class=10)
    queued = queue_sweep(Store(url, artifacts=tmp_path / "runs"), document, planned)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNNER_DB": url, "RUNNER_ARTIFACTS": str(tmp_path / "runs")}
    results = start_at_once(WORKER_AT_ONCE, tmp_path / "gate", [["worker", "--sweep", queued.sweep_id]] * 4, env=env, timeout=900)
    assert [r.returncode for r in results] == [0] * 4, [r.stderr[-2000:] for r in results]
    said = [line.split()[1] for r in results for line in r.stderr.splitlines() if line.startswith("run ") and " completed: " in line]
    assert len(said) == 40 and len(set(said)) == 40  # each run completed by exactly one worker
    rows = sweep_rows(url)
    assert len(rows) == 40 and {r["status"] for r in rows} == {"completed"} and {r["attempts"] for r in rows} == {1}
    assert len({r["owner"] for r in rows}) == 40  # one claim per run
    metrics = epoch_metrics(url)
    assert sorted(len(metrics[r["id"]]) for r in rows) == [METRICS_PER_EPOCH] * 40  # each trained once: one epoch's rows


@pytest.mark.slow
def test_a_worker_killed_mid_run_leaves_it_to_be_requeued_after_the_lease_and_resumed_by_another_worker(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    from test_sweeps import epoch_metrics, sweep_rows, wait_until

    from runner.sweeps import queue_sweep

    url = postgres_server.new_database()
    epochs = 10  # enough that the kill after the first epoch lands mid-run on a fast machine too (4 were all done by then once)
    document, planned = _tiny_sweep(tmp_path, "killed", seeds=1, epochs=epochs, data__train_per_class=80)
    queued = queue_sweep(Store(url, artifacts=tmp_path / "runs"), document, planned)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNNER_DB": url, "RUNNER_ARTIFACTS": str(tmp_path / "runs"), "RUNNER_HEARTBEAT_S": "1"}
    argv = [sys.executable, "-m", "runner", "worker", "--sweep", queued.sweep_id]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=yielding_to_the_test)  # killed after its first epoch, not after its last
    wait_until(lambda: any(r["epochs_run"] >= 1 for r in sweep_rows(url)) or first.poll() is not None, "the first epoch", timeout=600)
    first.kill()  # SIGKILL: no word to the store
    first.wait(timeout=60)
    (row,) = sweep_rows(url)
    assert (row["status"], row["attempts"]) == ("running", 1) and 1 <= row["epochs_run"] < epochs, row
    store = Store(url, create=False)
    wait_until(lambda: store.queue.sweep_runs(queued.sweep_id)[0]["status"] == "lost", "the lease (two heartbeats) to pass", timeout=60)

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    (row,) = sweep_rows(url)
    assert (row["status"], row["attempts"]) == ("completed", 2)
    assert f"run {row['id']} completed" in second.stderr  # the second worker took it: requeued by its claim pass
    assert len(epoch_metrics(url)[row["id"]]) == epochs * METRICS_PER_EPOCH  # each epoch stored once
    assert row["stop_reason"] != "error"


def test_a_database_of_another_program_is_refused_in_one_line_and_left_alone(run_cli: Any, postgres_server: PostgresServer,
                                                                             tmp_path: Path) -> None:
    url = postgres_server.new_database()
    from conftest import execute_sql

    execute_sql(url, "CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    result = run_cli("run", TINY_SPEC, "--db", url, "--artifacts", tmp_path / "runs")
    assert (result.exit_code, result.err.strip()) == (2, f"error: {mask_url(url)} holds tables but is not a runner results store")
    assert tables_of(url) == ["orders"] and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# The other commands on a PostgreSQL store


def test_a_sweep_its_status_report_and_a_reproduction_on_a_postgresql_store(run_cli: Any, postgres_server: PostgresServer,
                                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_sweeps import write_spec

    url = postgres_server.new_database()
    monkeypatch.setenv("RUNNER_DB", url)
    monkeypatch.setenv("RUNNER_ARTIFACTS", str(tmp_path / "shared"))
    spec = write_spec(tmp_path, name="pg_sweep", seeds=2, sweep={"grid": {"training.optimizer.lr": [0.003, 0.01]}}, training={"epochs": 1})
    swept = run_cli("sweep", "run", spec, "-q")
    assert swept.exit_code == 0, swept.err
    status = run_cli("sweep", "status", "pg_sweep", "--format", "json").json()
    assert status["counts"] == {"completed": 4} and [r["attempts"] for r in status["runs"]] == [1, 1, 1, 1]
    assert [r["name"] for r in run_cli("sweep", "list", "--format", "json").json()] == ["pg_sweep"]
    best = run_cli("report", "--sweep", "pg_sweep", "--best", "test_accuracy", "--format", "json")
    assert best.exit_code == 0, best.err
    groups = best.json()["groups"]
    assert sorted(g["training.optimizer.lr"] for g in groups) == [0.003, 0.01] and {g["n"] for g in groups} == {2}

    run_id = status["runs"][0]["id"]
    reproduced = run_cli("reproduce", run_id, "-q")
    assert reproduced.exit_code == 0, reproduced.err
    assert reproduced.out.startswith("identical: run ")
    assert len(run_cli("runs", "--format", "json").json()) == 5
