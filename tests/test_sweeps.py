"""Sweeps and seeds: many runs from one spec, as a resumable queue in the store, run by parallel workers.

The runs are small (tests/specs/tiny.yaml, fewer images, one thread each) but real: every test
trains, kills, resumes and reports through the same commands a user types. Subprocesses appear only
where the test is about processes: worker processes (-j 2, `runner worker`), SIGKILL and Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import sqlalchemy as sa

from conftest import TINY_SPEC, builtin_registries, execute_sql, query_sql
from runner.store import Store

LR = "training.optimizer.lr"
METRICS_PER_EPOCH = 4  # train_loss, train_accuracy, val_loss, val_accuracy


def write_spec(directory: Path, name: str = "grid", **changes: Any) -> Path:
    """tiny.yaml with fewer images, one thread and the given top-level sections or dotted keys changed."""
    raw = yaml.safe_load(TINY_SPEC.read_text())
    raw.update(name=name, performance={"threads": 1})
    raw["data"]["train_per_class"] = 40
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def grid_spec(directory: Path, **changes: Any) -> Path:
    """A 2 × 3 sweep: two learning rates, three seeds."""
    return write_spec(directory, sweep={"grid": {LR: [0.003, 0.01]}}, seeds=3, **changes)


def sweep_rows(db: Path | str) -> list[dict[str, Any]]:
    """Every row of the sweep's runs, in sweep order ([] while the store is still being created); any store."""
    if isinstance(db, Path) and not db.exists():
        return []
    try:
        return query_sql(db, "SELECT * FROM runs WHERE sweep_id IS NOT NULL ORDER BY sweep_index")
    except sa.exc.DBAPIError:  # no tables yet
        return []


def epoch_metrics(db: Path | str) -> dict[str, list[tuple[int, str, float]]]:
    """run id → its per-epoch metric rows, in order; any store."""
    out: dict[str, list[tuple[int, str, float]]] = {}
    for row in query_sql(db, "SELECT run_id, epoch, name, value FROM epoch_metrics ORDER BY run_id, epoch, name"):
        out.setdefault(row["run_id"], []).append((row["epoch"], row["name"], row["value"]))
    return out


def by_configuration(db: Path) -> dict[tuple[float, int], list[tuple[int, str, float]]]:
    """(learning rate, seed) → the run's per-epoch metrics."""
    metrics = epoch_metrics(db)
    return {(json.loads(r["combination_json"])[LR], r["seed"]): metrics[r["id"]] for r in sweep_rows(db)}


def cli(*args: Any, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """``runner ARGS`` as its own process (and process group, so a test can kill it with its workers)."""
    return subprocess.Popen([sys.executable, "-m", "runner", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True, **popen)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc): the sweep command's workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_until(condition: Any, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------
# Expansion: a pure function of the spec


def test_expansion_is_grid_times_variants_times_random_samples_times_seeds_in_a_fixed_order(tmp_path: Path) -> None:
    from runner.sweeps import expand, load_sweep

    spec = write_spec(tmp_path, seeds=[0, 7], sweep={
        "grid": {LR: [0.001, 0.003], "data.batch_size": [32, 64]},
        "variants": [{"training.epochs": 1}, {"training.epochs": 2, "training.optimizer.name": "SGD"}],
        "random": {"n": 2, "seed": 5, "space": {"training.optimizer.weight_decay": {"loguniform": [1e-5, 1e-2]},
                                                "data.eval_batch_size": {"int": [16, 256]}}},
    })
    runs = expand(load_sweep(spec))
    assert len(runs) == 2 * 2 * 2 * 2 * 2
    assert [r.index for r in runs] == list(range(1, 33))
    first = runs[0]
    assert list(first.combination) == [LR, "data.batch_size", "training.epochs", "training.optimizer.weight_decay", "data.eval_batch_size"]
    assert (first.combination[LR], first.combination["data.batch_size"], first.combination["training.epochs"], first.seed) == (0.001, 32, 1, 0)
    assert [r.seed for r in runs[:4]] == [0, 7, 0, 7]  # seeds innermost, then random samples, variants, grid
    assert runs[1].raw["seed"] == 7 and runs[1].raw["training"]["optimizer"]["lr"] == 0.001
    assert runs[2].combination["training.optimizer.weight_decay"] != runs[0].combination["training.optimizer.weight_decay"]
    assert runs[4].raw["training"]["optimizer"]["name"] == "SGD" and runs[4].raw["training"]["epochs"] == 2
    assert runs[16].combination[LR] == 0.003
    assert all(16 <= r.combination["data.eval_batch_size"] <= 256 for r in runs)
    again = expand(load_sweep(spec))
    assert [(r.label, r.raw) for r in again] == [(r.label, r.raw) for r in runs]  # same spec, same runs, same order


def test_seeds_alone_and_the_command_line_flags_make_a_sweep(tmp_path: Path) -> None:
    from runner.sweeps import expand, load_sweep

    assert load_sweep(write_spec(tmp_path)) is None  # a plain spec is one run
    assert [r.label for r in expand(load_sweep(write_spec(tmp_path, seeds=3)))] == ["seed=0", "seed=1", "seed=2"]
    document = load_sweep(write_spec(tmp_path, seeds=[4]), grid_flags=[f"{LR}=1e-3,3e-3"], seeds_flag="0,1")
    assert [r.label for r in expand(document)] == [f"{LR}=0.001 seed=0", f"{LR}=0.001 seed=1", f"{LR}=0.003 seed=0", f"{LR}=0.003 seed=1"]


def test_sweep_plan_lists_every_run_checked_as_text_and_json(run_cli: Any, tmp_path: Path) -> None:
    spec = grid_spec(tmp_path)
    text = run_cli("sweep", "plan", spec)
    assert text.exit_code == 0, text.err
    lines = text.out.strip().splitlines()
    assert lines[0] == f"sweep grid: 6 runs, each checked (keys: {LR})"
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert lines[1].endswith(f"{LR}=0.003 seed=0") and lines[6].endswith(f"{LR}=0.01 seed=2")
    planned = run_cli("sweep", "plan", spec, "--format", "json").json()
    assert planned["keys"] == [LR] and planned["max_attempts"] == 2
    assert [(r["combination"], r["seed"]) for r in planned["runs"]] == [({LR: lr}, s) for lr in (0.003, 0.01) for s in range(3)]
    assert all(r["spec"]["model"]["num_classes"] == 3 for r in planned["runs"])  # resolved by the plan
    assert len({r["spec_hash"] for r in planned["runs"]}) == 6
    assert not (tmp_path / "results.db").exists()  # planning stores nothing


def test_a_bad_value_in_one_combination_exits_2_naming_the_key_and_the_combination_and_queues_nothing(run_cli: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, sweep={"grid": {"data.batch_size": [32, 0]}}, seeds=2)
    db = tmp_path / "results.db"
    result = run_cli("run", spec, "--db", db, "-j", "2")
    assert result.exit_code == 2
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")
    assert "run 3 of 4 (data.batch_size=0 seed=0): data.batch_size: Input should be greater than 0" in result.err
    assert result.out == "" and not db.exists() and not (tmp_path / "runs").exists()
    # with a store already there, nothing is queued in it either
    Store(db)
    assert run_cli("sweep", "run", spec, "--db", db).exit_code == 2
    assert Store(db).query.count_runs() == 0 and Store(db).queue.sweeps() == []


# ------------------------------------------------------------------------------------------
# The queue in the store (no training)


def _queue(store: Store, runs: int, max_attempts: int = 2, name: str = "q") -> str:
    from runner.store.queue import QueuedRun, SweepRecord

    record = SweepRecord(name, f"hash-{name}", "{}", "/tmp", ("k",), max_attempts)
    queued = [QueuedRun(i, name, "", json.dumps({"training": {"epochs": 1}}), f"h{i}", "cnn", "full_finetune", "mnist", 0, {"k": i})
              for i in range(1, runs + 1)]
    sweep_id, created = store.queue.enqueue(record, queued)
    assert created
    return sweep_id


def test_claims_take_runs_in_sweep_order_count_attempts_and_requeue_lost_runs_while_attempts_are_left(store_db: str) -> None:
    from runner.store import new_owner

    store = Store(store_db)
    sweep_id = _queue(store, 3)
    first = store.queue.claim(new_owner(), 30.0, sweep_id)
    second = store.queue.claim(new_owner(), 30.0, sweep_id)
    assert [r["sweep_index"] for r in store.queue.sweep_runs(sweep_id) if r["status"] == "running"] == [1, 2]
    assert (first.attempts, first.resume, second.attempts) == (1, False, 1)

    execute_sql(store_db, "UPDATE runs SET lost_after = '2000-01-01 00:00:00' WHERE id = :id", id=first.run_id)  # the worker died
    assert {r["id"]: r["status"] for r in store.queue.sweep_runs(sweep_id)}[first.run_id] == "lost"
    again = store.queue.claim(new_owner(), 30.0, sweep_id)  # the claim pass requeues it, and it is first in order
    assert (again.run_id, again.attempts) == (first.run_id, 2)
    execute_sql(store_db, "UPDATE runs SET lost_after = '2000-01-01 00:00:00' WHERE id = :id", id=first.run_id)
    third = store.queue.claim(new_owner(), 30.0, sweep_id)  # no attempts left: it stays lost
    assert third.run_id != first.run_id and store.queue.claim(new_owner(), 30.0, sweep_id) is None
    statuses = {r["id"]: (r["status"], r["attempts"]) for r in store.queue.sweep_runs(sweep_id)}
    assert statuses[first.run_id] == ("lost", 2)
    assert sorted(statuses.values()) == [("lost", 2), ("running", 1), ("running", 1)]


def test_enqueueing_the_same_sweep_again_finds_it_and_queues_nothing_twice(store_db: str) -> None:
    from runner.store.queue import SweepRecord

    store = Store(store_db)
    sweep_id = _queue(store, 2)
    again, created = store.queue.enqueue(SweepRecord("q", "hash-q", "{}", "/tmp", ("k",), 3), [])
    assert (again, created) == (sweep_id, False)
    assert store.query.count_runs() == 2 and store.queue.sweep_row("q")["max_attempts"] == 3


CLAIM_AT_ONCE = """
import json, os, sys, time
from runner.store import Store, new_owner
gate = sys.argv[1]
store = Store(sys.argv[2])
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):
    time.sleep(0.001)
taken = []
while (claim := store.queue.claim(new_owner(), 30.0)) is not None:
    taken.append(claim.run_id)
print(json.dumps(taken))
"""


def test_eight_processes_claiming_one_queue_at_the_same_instant_never_take_a_run_twice(store_db: str, tmp_path: Path) -> None:
    from test_concurrency import start_at_once

    db = store_db
    store = Store(db)
    _queue(store, 40)
    results = start_at_once(CLAIM_AT_ONCE, tmp_path / "gate", [[str(db)]] * 8)
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    taken = [run_id for r in results for run_id in json.loads(r.stdout)]
    assert len(taken) == 40 and len(set(taken)) == 40
    assert {r["attempts"] for r in sweep_rows(db)} == {1}


def test_each_local_worker_gets_its_share_of_the_cores_and_one_device_set_before_torch_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner import workers

    started: list[tuple[list[str], dict[str, str]]] = []

    class Recorded:
        def __init__(self, argv: list[str], env: dict[str, str], **_: Any) -> None:
            started.append((argv, env))

    monkeypatch.setattr(workers.subprocess, "Popen", Recorded)
    monkeypatch.setattr(workers, "available_cores", lambda: 16)
    store = Store(tmp_path / "results.db")
    workers.LocalWorkers.start(store, "abc", 3, devices=["0", "1"]).close()
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1", "0"]
    assert {(env["OMP_NUM_THREADS"], argv[argv.index("--threads") + 1]) for argv, env in started} == {("5", "5")}
    argv = started[0][0]
    assert argv[1:4] == ["-m", "runner", "worker"] and {env["RUNNER_DB"] for _, env in started} == {store.url}
    assert argv[argv.index("--sweep") + 1] == "abc" and argv[argv.index("--artifacts") + 1] == str(tmp_path / "runs")
    assert [workers.threads_per_worker(jobs, cores=2) for jobs in (1, 2, 3)] == [2, 1, 1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_display_follows_the_sweep_runs_done_running_with_their_epoch_failed_and_queued(tmp_path: Path) -> None:
    from runner.store import new_owner
    from runner.sweep_progress import SweepDisplay, progress_text

    store = Store(tmp_path / "results.db")
    sweep_id = _queue(store, 4)
    failed = store.queue.claim(new_owner(), 30.0, sweep_id)
    owner = new_owner()
    running = store.queue.claim(owner, 30.0, sweep_id)
    store.runs.finish(failed.run_id, "failed", owner=failed.owner, error="RuntimeError: boom")
    rows = store.queue.sweep_runs(sweep_id)
    assert progress_text(rows) == f"1 running ({running.run_id[:6]} epoch 1/1) · 1 failed · 2 queued"

    log = io.StringIO()  # not a terminal (a log file, CI): one line per run as it ends, each once
    display = SweepDisplay(store, sweep_id, "q", stream=log)
    display.refresh()
    display.refresh()
    assert log.getvalue() == f"[1/4] run {failed.run_id} failed (k=1 seed=0): RuntimeError: boom\n"

    terminal = Terminal()  # a terminal: one bar for the whole sweep, not a bar per worker
    display = SweepDisplay(store, sweep_id, "q", stream=terminal)
    display.refresh()
    store.runs.finish(running.run_id, "completed", owner=owner)
    display.close()
    drawn = terminal.getvalue()
    assert "sweep q: 0/4 runs done" in drawn and f"1 running ({running.run_id[:6]} epoch 1/1) · 1 failed · 2 queued" in drawn
    assert "sweep q: 2/4 runs done" in drawn and "0 running · 1 failed · 2 queued" in drawn

    quiet = io.StringIO()
    SweepDisplay(store, sweep_id, "q", quiet=True, stream=quiet).close()
    assert quiet.getvalue() == ""


def test_the_example_sweeps_expand_and_check_as_the_readme_says(run_cli: Any) -> None:
    experiments = Path(__file__).resolve().parent.parent / "experiments"
    seeds = run_cli("sweep", "plan", experiments / "seeds.yaml", "--format", "json")
    assert seeds.exit_code == 0, seeds.err
    planned = seeds.json()
    assert (planned["name"], planned["keys"], [r["seed"] for r in planned["runs"]]) == ("seeds", [], [0, 1, 2, 3, 4])
    lr_sweep = run_cli("sweep", "plan", experiments / "lr_sweep.yaml", "--format", "json")
    assert lr_sweep.exit_code == 0, lr_sweep.err
    planned = lr_sweep.json()
    assert planned["keys"] == [LR]
    assert [(r["combination"][LR], r["seed"]) for r in planned["runs"]] == [(lr, s) for lr in (3e-4, 1e-3, 3e-3) for s in range(3)]


# ------------------------------------------------------------------------------------------
# Running sweeps


@pytest.fixture(scope="module")
def sequential_sweep(one_thread: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2 × 3 grid run with -j 1 (in this process); its store."""
    from runner.cli import main

    directory = tmp_path_factory.mktemp("sequential")
    db = directory / "results.db"
    try:
        main(["run", str(grid_spec(directory)), "--db", str(db), "-q"])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    return db


def test_a_grid_with_two_worker_processes_trains_each_run_once_and_equals_one_worker_bit_for_bit(
    run_cli: Any, tmp_path: Path, sequential_sweep: Path,
) -> None:
    db = tmp_path / "results.db"
    result = run_cli("run", grid_spec(tmp_path), "--db", db, "-j", "2")
    assert result.exit_code == 0, result.err
    sweep_id = result.out.strip()
    rows = sweep_rows(db)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"completed"} and {r["sweep_id"] for r in rows} == {sweep_id}
    assert {r["attempts"] for r in rows} == {1}
    metrics = epoch_metrics(db)
    assert all(len(metrics[r["id"]]) == 2 * METRICS_PER_EPOCH for r in rows)  # each trained exactly once
    seeds: dict[float, set[int]] = {}
    for row in rows:
        seeds.setdefault(json.loads(row["combination_json"])[LR], set()).add(row["seed"])
        assert json.loads(row["settings_json"])["performance"]["threads"] == 1  # what the worker used, recorded
    assert seeds == {0.003: {0, 1, 2}, 0.01: {0, 1, 2}}
    assert len({r["host"] + str(json.loads(r["settings_json"])["spec_dir"]) for r in rows}) == 1
    assert f"sweep grid ({sweep_id}): 6 runs: 6 completed" in result.err
    assert by_configuration(db) == by_configuration(sequential_sweep)  # the same numbers as one worker, bit for bit


def test_group_by_over_the_sweep_gives_three_runs_per_configuration_and_best_picks_the_best_mean(
    run_cli: Any, sequential_sweep: Path,
) -> None:
    import statistics

    runs = run_cli("runs", "--db", sequential_sweep, "--format", "json").json()
    assert {(r["sweep_id"] is not None, r["attempts"]) for r in runs} == {(True, 1)}
    accuracy = {r["id"]: r["test_accuracy"] for r in runs}
    by_lr: dict[float, list[float]] = {}
    for row in sweep_rows(sequential_sweep):
        by_lr.setdefault(json.loads(row["combination_json"])[LR], []).append(accuracy[row["id"]])

    groups = run_cli("report", "--db", sequential_sweep, "--sweep", "grid", "--format", "json")
    assert groups.exit_code == 0, groups.err
    table = {g[LR]: g for g in groups.json()}
    assert set(table) == set(by_lr)
    for lr, values in by_lr.items():
        assert table[lr]["n"] == 3
        assert table[lr]["test_accuracy_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert table[lr]["test_accuracy_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)

    sweep_id = sweep_rows(sequential_sweep)[0]["sweep_id"]
    assert run_cli("report", "--db", sequential_sweep, "--sweep", sweep_id, "--format", "json").json() == groups.json()  # by id

    best_lr = max(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))
    other = next(lr for lr in by_lr if lr != best_lr)
    best = run_cli("report", "--db", sequential_sweep, "--sweep", "grid", "--best", "test_accuracy")
    lines = best.out.strip().splitlines()
    assert lines[-3].startswith(f"best by mean test_accuracy (highest): {LR}={best_lr}: ")
    assert "(95% CI, n=3)" in lines[-3] and lines[-2].startswith(f"runner-up: {LR}={other}: ")
    assert lines[-1].startswith("difference ") and "Welch's t-test p = " in lines[-1]
    as_json = run_cli("report", "--db", sequential_sweep, "--sweep", "grid", "--best", "-test_loss", "--format", "json").json()
    lowest_loss = min(table, key=lambda lr: table[lr]["test_loss_mean"])
    assert as_json["best"]["best"][LR] == lowest_loss and as_json["best"]["lowest"] is True
    assert len(as_json["groups"]) == 2

    ungrouped = run_cli("report", "--db", sequential_sweep, "--sweep", "grid", "--group-by", "none", "--format", "json").json()
    assert len(ungrouped) == 6
    html = run_cli("report", "--db", sequential_sweep, "--sweep", "grid", "--best", "test_accuracy", "-o", "r.html")
    assert html.exit_code == 0, html.err
    page = Path("r.html").read_text()
    assert "<h2>Sweep</h2>" in page and "test_accuracy against each swept key" in page and "runner-up:" in page


def test_sweep_status_and_list_describe_the_sweep_without_torch(run_cli: Any, sequential_sweep: Path) -> None:
    status = run_cli("sweep", "status", "grid", "--db", sequential_sweep, "--format", "json").json()
    assert status["name"] == "grid" and status["counts"] == {"completed": 6} and status["keys"] == [LR]
    assert [r["index"] for r in status["runs"]] == [1, 2, 3, 4, 5, 6]
    assert status["runs"][0]["label"] == f"{LR}=0.003 seed=0" and status["runs"][0]["epochs_run"] == status["runs"][0]["epochs"] == 2
    table = run_cli("sweep", "status", "--db", sequential_sweep)
    assert table.out.startswith(f"sweep grid ({status['id']}), created ") and "6 runs: 6 completed" in table.out
    listed = run_cli("sweep", "list", "--db", sequential_sweep, "--format", "json").json()
    assert [(s["id"], s["runs"], s["counts"]) for s in listed] == [(status["id"], 6, {"completed": 6})]
    shown = run_cli("show", status["runs"][0]["id"], "--db", sequential_sweep, "--format", "json").json()
    assert (shown["sweep_id"], shown["combination"], shown["attempts"]) == (status["id"], {LR: 0.003}, 1)
    listed_runs = run_cli("runs", "--sweep", status["id"][:6], "--db", sequential_sweep, "--format", "json").json()
    assert sorted(r["id"] for r in listed_runs) == sorted(r["id"] for r in status["runs"])

    import runner

    frame = runner.runs(db=sequential_sweep, sweep="grid")
    assert len(frame) == 6 and set(frame["sweep_id"]) == {status["id"]} and set(frame["attempts"]) == {1}

    code = ("import sys\nfrom runner.cli import main\n"
            f"for args in (['sweep', 'status', '--db', {str(sequential_sweep)!r}], ['sweep', 'list', '--db', {str(sequential_sweep)!r}],\n"
            f"             ['report', '--sweep', 'grid', '--best', 'test_accuracy', '--db', {str(sequential_sweep)!r}]):\n"
            "    try:\n        main(args)\n    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            # --best's Welch test takes only scipy.special's t distribution: scipy.stats's import is 0.7 s more
            "assert 'scipy.stats' not in sys.modules, 'scipy.stats was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_rerunning_a_completed_sweep_trains_nothing(run_cli: Any, tmp_path: Path, sequential_sweep: Path) -> None:
    db = tmp_path / "copy.db"
    from conftest import copy_store

    copy_store(sequential_sweep, db)
    before = sweep_rows(db)
    again = run_cli("run", grid_spec(sequential_sweep.parent), "--db", db, "-q")
    assert again.exit_code == 0, again.err
    assert sweep_rows(db) == before


HUB = """
import torch


class Fragile(torch.nn.Module):
    def __init__(self, fail):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
        self.fail = fail

    def forward(self, x):
        if self.fail and self.training:
            raise RuntimeError("this configuration explodes")
        return self.net(x)


def fragile(fail=False, **kwargs):
    return Fragile(fail)
"""


def test_a_run_that_raises_fails_alone_exit_1_and_is_retried_once_by_the_next_sweep_command(run_cli: Any, tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hubconf.py").write_text(HUB)
    spec = write_spec(tmp_path, name="fragile", model={"name": f"hub-local:{tmp_path / 'hub'}/fragile", "trust_repo": True},
                      sweep={"grid": {"model.options.fail": [False, True]}}, seeds=2)
    db = tmp_path / "results.db"

    first = run_cli("run", spec, "--db", db, "-q")
    assert first.exit_code == 1
    rows = sweep_rows(db)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [json.loads(r["combination_json"]) for r in failed] == [{"model.options.fail": True}] * 2
    assert {r["status"] for r in rows if r not in failed} == {"completed"}
    for row in failed:
        assert f"run {row['id']} failed (model.options.fail=true seed={row['seed']}): RuntimeError: this configuration explodes" in first.err
    assert first.out.strip() == rows[0]["sweep_id"]
    completed = {r["id"]: r for r in rows if r["status"] == "completed"}

    second = run_cli("run", spec, "--db", db, "-q")  # retried once more: attempts 2, failed again
    assert second.exit_code == 1
    after = {r["id"]: r for r in sweep_rows(db)}
    assert [(after[r["id"]]["status"], after[r["id"]]["attempts"]) for r in failed] == [("failed", 2)] * 2
    assert {k: after[k] for k in completed} == completed  # the completed runs were left alone

    third = run_cli("run", spec, "--db", db, "-q")  # no attempts left: nothing runs
    assert third.exit_code == 1 and "this configuration explodes" in third.err
    assert {r["id"]: r for r in sweep_rows(db)} == after


def test_runs_sharing_an_upstream_experiment_train_it_once(run_cli: Any, tmp_path: Path) -> None:
    upstream = write_spec(tmp_path, name="upstream", training={"epochs": 1, "optimizer": {"name": "Adam", "lr": 0.003}})
    spec = write_spec(tmp_path, name="downstream", seeds=4,
                      model={"name": "cnn", "weights": {"experiment": upstream.name},
                             "options": yaml.safe_load(TINY_SPEC.read_text())["model"]["options"]})
    db = tmp_path / "results.db"
    result = run_cli("run", spec, "--db", db, "-j", "2")
    assert result.exit_code == 0, result.err
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    [upstream_run] = [r["id"] for r in runs if r["name"] == "upstream"]
    downstream = [r for r in sweep_rows(db)]
    assert len(downstream) == 4 and {r["status"] for r in downstream} == {"completed"}
    assert {r["weights_source"] for r in downstream} == {f"run:{upstream_run} (experiment {upstream.name})"}
    assert result.err.count("running it first") == 1


def test_a_stand_alone_worker_never_trains_an_upstream_experiment_it_fails_the_run_saying_why(tmp_path: Path) -> None:
    from runner.sweeps import load_sweep, plan_sweep, queue_sweep
    from runner.workers import work

    upstream = write_spec(tmp_path, name="upstream")
    spec = write_spec(tmp_path, name="downstream", seeds=1, model={"name": "cnn", "weights": {"experiment": upstream.name}})
    store = Store(tmp_path / "results.db")
    document = load_sweep(spec)
    queue_sweep(store, document, plan_sweep(document, builtin_registries()))  # queued, upstream not trained
    report = work(store, builtin_registries())
    [(run_id, status)] = report.runs.items()
    assert status == "failed" and report.exit_code == 1
    row = store.query.run_row(run_id)
    assert row["error"] == f"model.weights: experiment {upstream.name} has no completed run with a best checkpoint in the store"
    assert store.query.count_runs() == 1  # the upstream was not run


def test_ctrl_c_while_a_run_is_stored_completed_keeps_it_completed_and_the_worker_claims_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI caught a worker that went on emptying the queue after Ctrl-C: the signal reached it while
    its run was being stored completed, where it was dropped. Deliver it exactly there."""
    from runner.store.runs import RunWriter
    from runner.sweeps import load_sweep, plan_sweep, queue_sweep
    from runner.workers import WorkerStopped, work

    store = Store(tmp_path / "results.db")
    document = load_sweep(write_spec(tmp_path, name="three", seeds=3, training={"epochs": 1}))
    queue_sweep(store, document, plan_sweep(document, builtin_registries()))
    finish = RunWriter.finish

    def finish_with_ctrl_c(self: Any, run_id: str, status: str, *args: Any, **kwargs: Any) -> None:
        if status == "completed":
            os.kill(os.getpid(), signal.SIGINT)  # handled at once, in the middle of storing the completion
        finish(self, run_id, status, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "finish", finish_with_ctrl_c)
    with pytest.raises(WorkerStopped, match="worker stopped by SIGINT as run .* ended \\(completed\\)"):
        work(store, builtin_registries())
    statuses = [r["status"] for r in sweep_rows(tmp_path / "results.db")]
    assert sorted(statuses) == ["completed", "queued", "queued"]
    [completed] = [r for r in sweep_rows(tmp_path / "results.db") if r["status"] == "completed"]
    assert len(epoch_metrics(tmp_path / "results.db")[completed["id"]]) == METRICS_PER_EPOCH


WORKER_AT_ONCE = """
import os, sys, time
import torch, torchvision  # noqa: F401
import runner.cli, runner.workers, runner.plugins  # noqa: F401
gate = sys.argv[1]
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):
    time.sleep(0.001)
runner.cli.main(sys.argv[2:])
"""


def test_two_workers_started_at_the_same_instant_on_eight_queued_runs_complete_each_once(run_cli: Any, tmp_path: Path) -> None:
    from runner.sweeps import load_sweep, plan_sweep, queue_sweep
    from test_concurrency import start_at_once

    db = tmp_path / "results.db"
    document = load_sweep(write_spec(tmp_path, name="eight", seeds=8, training={"epochs": 1}))
    queued = queue_sweep(Store(db), document, plan_sweep(document, builtin_registries()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = start_at_once(WORKER_AT_ONCE, tmp_path / "gate", [["worker", "--db", str(db), "--sweep", queued.sweep_id]] * 2, env=env)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    said = [line.split()[1] for r in results for line in r.stderr.splitlines() if line.startswith("run ") and " completed: " in line]
    assert len(said) == 8 and len(set(said)) == 8  # each run completed by exactly one worker
    rows = sweep_rows(db)
    assert {r["status"] for r in rows} == {"completed"} and {r["attempts"] for r in rows} == {1}
    metrics = epoch_metrics(db)
    assert all(len(metrics[r["id"]]) == METRICS_PER_EPOCH for r in rows)
    assert len({r["owner"] for r in rows}) == 8  # one claim (owner token) per run


def _slow_sweep(directory: Path) -> Path:
    """Six runs of six epochs: long enough to be caught mid-sweep on an idle machine too (a second or
    more per run after the first epochs: the test polls every 0.1 s)."""
    return write_spec(directory, name="slow", seeds=6, training={"epochs": 6, "optimizer": {"name": "Adam", "lr": 0.003}},
                      data={"dataset": "mnist_bundled", "classes": [0, 1, 2], "batch_size": 16, "train_per_class": 300})


def test_sigkill_of_the_sweep_and_its_workers_then_the_same_command_finishes_every_run_once(run_cli: Any, tmp_path: Path) -> None:
    spec = _slow_sweep(tmp_path)
    db = tmp_path / "results.db"
    env = {"RUNNER_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1"}
    proc = cli("run", spec, "--db", db, "-j", "2", "-q", env=env)

    def caught_mid_sweep() -> bool:
        assert proc.poll() is None, proc.communicate()
        rows = sweep_rows(db) if db.exists() else []
        return (any(r["status"] == "completed" for r in rows)  # and two an epoch or more from their end
                and sum(1 for r in rows if r["status"] == "running" and 1 <= r["epochs_run"] <= 4) == 2)

    wait_until(caught_mid_sweep, "a completed run and two running ones")
    workers = children_of(proc.pid)
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(workers) == 2
    before = {r["id"]: r for r in sweep_rows(db)}
    killed = [run_id for run_id, r in before.items() if r["status"] == "running"]
    done = {run_id: r for run_id, r in before.items() if r["status"] == "completed"}
    done_metrics = {run_id: epoch_metrics(db)[run_id] for run_id in done}
    assert len(killed) == 2 and done
    time.sleep(2.5)  # two missed heartbeats: the killed runs are lost

    again = run_cli("run", spec, "--db", db, "-j", "2", "-q")
    assert again.exit_code == 0, again.err
    after = {r["id"]: r for r in sweep_rows(db)}
    assert set(after) == set(before)  # the same runs, no new ones
    assert {r["status"] for r in after.values()} == {"completed"}
    assert {k: after[k] for k in done} == done  # completed runs untouched
    assert {run_id: epoch_metrics(db)[run_id] for run_id in done} == done_metrics
    assert [after[run_id]["attempts"] for run_id in killed] == [2, 2]
    metrics = epoch_metrics(db)
    assert all([m[0] for m in metrics[run_id]] == sorted([1, 2, 3, 4, 5, 6] * METRICS_PER_EPOCH) for run_id in after)  # each epoch once


def test_ctrl_c_stops_the_workers_stores_their_runs_interrupted_keeps_the_queue_and_exits_130(run_cli: Any, tmp_path: Path) -> None:
    spec = _slow_sweep(tmp_path)
    db = tmp_path / "results.db"
    proc = cli("run", spec, "--db", db, "-j", "2", env={"OMP_NUM_THREADS": "1"})

    def two_mid_training_one_queued() -> bool:  # an epoch or more left each: neither is ending as the signal lands
        rows = sweep_rows(db)
        return (sum(1 for r in rows if r["status"] == "running" and 1 <= r["epochs_run"] <= 4) == 2
                and any(r["status"] == "queued" for r in rows))

    wait_until(two_mid_training_one_queued, "two runs in training and one queued")
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the sweep command
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    statuses = [r["status"] for r in sweep_rows(db)]
    assert statuses.count("interrupted") == 2 and statuses.count("queued") >= 1 and "running" not in statuses
    sweep_id = sweep_rows(db)[0]["sweep_id"]
    assert f"sweep slow ({sweep_id}) interrupted by SIGINT: 2 interrupted" in err and "run the same command again" in err
    assert children_of(proc.pid) == []

    again = run_cli("run", spec, "--db", db, "-q")
    assert again.exit_code == 0, again.err
    rows = sweep_rows(db)
    assert {r["status"] for r in rows} == {"completed"}
    metrics = epoch_metrics(db)
    assert all([m[0] for m in metrics[r["id"]]] == sorted([1, 2, 3, 4, 5, 6] * METRICS_PER_EPOCH) for r in rows)


# ------------------------------------------------------------------------------------------
# Stores of the released schema


def test_a_released_store_with_runs_is_migrated_keeps_its_statuses_and_takes_a_sweep(run_cli: Any, tmp_path: Path) -> None:
    import shutil

    db = tmp_path / "v4.db"
    shutil.copy(Path(__file__).parent / "data" / "store_v4.db", db)
    with sqlite3.connect(db) as conn:
        before = dict(conn.execute("SELECT id, status FROM runs").fetchall())
    listed = run_cli("runs", "--db", db, "--format", "json").json()
    assert {r["id"]: r["status"] for r in listed} == {**before, **{k: "lost" for k, v in before.items() if v == "running"}}
    assert {(r["sweep_id"], r["attempts"]) for r in listed} == {(None, 1)}
    assert sorted(set(before.values())) == ["completed", "failed", "interrupted", "running"]

    result = run_cli("run", write_spec(tmp_path, seeds=2, training={"epochs": 1}), "--db", db, "-q")
    assert result.exit_code == 0, result.err
    after = {r["id"]: r for r in run_cli("runs", "--db", db, "--format", "json").json()}
    assert {k: after[k]["status"] for k in before} == {r["id"]: r["status"] for r in listed}  # the old runs as they were
    assert sorted(r["status"] for k, r in after.items() if k not in before) == ["completed", "completed"]
