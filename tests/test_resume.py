"""`runner resume`: interrupted, failed and lost runs continue from their last checkpoint, bit for bit.

The spec (tests/specs/resume.yaml) makes every piece of state matter: random crops through a
DataLoader, dropout, gradual unfreezing (a new optimizer at epoch 2), a scheduler and early stopping.
Every learning-rate scheduler the docs mention resumes exactly too, and so does the README's own
example (the quickstart, Ctrl-C in epoch 2, with torch's default threads).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from runner.store import Store
from conftest import builtin_registries, yielding_to_the_test

SPEC = Path(__file__).resolve().parent / "specs" / "resume.yaml"
EPOCHS = 4


@pytest.fixture(scope="module")
def uninterrupted(one_thread: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The `show` JSON of the spec run once without interruption."""
    from runner.execute import run_experiment
    from runner.reports import run_details

    store = Store(tmp_path_factory.mktemp("uninterrupted") / "results.db")
    outcome = run_experiment(SPEC, store=store, registries=builtin_registries())
    return run_details(store, outcome.run_id)


def start_run(db: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(SPEC), "--db", str(db), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env}, preexec_fn=yielding_to_the_test,  # stopped after the first of 4 short epochs
    )


def wait_for_first_epoch(db: Path, proc: subprocess.Popen[str], timeout: float = 180) -> str:
    """The run's id, once its first epoch is in the store."""
    deadline = time.monotonic() + timeout
    store = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        if store is None and db.exists():
            store = Store(db, create=False)
        rows = store.query.runs_table() if store is not None else []
        if rows and rows[0]["epochs_run"] >= 1:
            return rows[0]["id"]
        time.sleep(0.02)
    raise AssertionError("no epoch was stored in time")


def assert_same_training(details: dict[str, Any], reference: dict[str, Any]) -> None:
    assert details["status"] == "completed"
    assert details["epochs"] == reference["epochs"]  # every metric of every epoch, exactly
    assert details["test"] == reference["test"]
    assert details["best_epoch"] == reference["best_epoch"]
    assert details["stop_reason"] == reference["stop_reason"]


@contextmanager
def checkpoint_of_epoch_fails(epoch: int) -> Iterator[None]:
    """Inside, writing the last checkpoint of ``epoch`` fails as on a full disk."""
    from runner import training

    real_save = training.save_tensors

    def disk_full(payload: Any, path: Path, before_replace: Any = None) -> None:
        if path.name == "last.pt" and payload["epoch"] == epoch:
            raise OSError(28, "No space left on device")
        real_save(payload, path, before_replace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save_tensors", disk_full)
        yield


def test_uninterrupted_reference_trains_every_epoch(uninterrupted: dict[str, Any]) -> None:
    assert uninterrupted["status"] == "completed"
    assert [e["epoch"] for e in uninterrupted["epochs"]] == list(range(1, EPOCHS + 1))


def test_sigint_in_epoch_2_then_resume_equals_an_uninterrupted_run(run_cli: Any, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    import torch

    db = tmp_path / "results.db"
    proc = start_run(db)
    run_id = wait_for_first_epoch(db, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"run {run_id} interrupted by SIGINT; its last checkpoint is epoch 1" in err
    assert f"runner resume {run_id}" in err
    stopped = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert stopped["status"] == "interrupted"
    assert [e["epoch"] for e in stopped["epochs"]] == [1]
    assert stopped["epochs"] == uninterrupted["epochs"][:1]
    checkpoint = torch.load(tmp_path / "runs" / run_id / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1

    resumed = run_cli("resume", run_id, "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert resumed.out.strip() == run_id
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert_same_training(details, uninterrupted)
    assert len(run_cli("runs", "--db", db, "--format", "json").json()) == 1  # the same run, not a new one


def test_sigkill_shows_lost_within_two_heartbeats_and_resume_completes(run_cli: Any, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    interval = 1.0
    db = tmp_path / "results.db"
    proc = start_run(db, RUNNER_HEARTBEAT_S=str(interval))
    run_id = wait_for_first_epoch(db, proc)
    assert run_cli("runs", "--db", db, "--format", "json").json()[0]["status"] == "running"

    proc.kill()
    proc.wait(timeout=30)
    killed = time.monotonic()
    while run_cli("runs", "--db", db, "--format", "json").json()[0]["status"] == "running":
        assert time.monotonic() - killed < 10 * interval, "a killed run never showed as lost"
        time.sleep(0.05)
    shown_lost_after = time.monotonic() - killed
    assert shown_lost_after <= 2 * interval + 0.5  # 0.5 s for polling and a busy machine

    assert [r["id"] for r in run_cli("runs", "--db", db, "--status", "lost", "--format", "json").json()] == [run_id]
    assert run_cli("show", run_id, "--db", db, "--format", "json").json()["status"] == "lost"
    assert "lost" in run_cli("report", "--db", db, "--format", "csv").out

    resumed = run_cli("resume", run_id, "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert_same_training(run_cli("show", run_id, "--db", db, "--format", "json").json(), uninterrupted)


def test_a_paused_run_resumed_elsewhere_stops_without_writing_when_it_wakes(
    run_cli: Any, tmp_path: Path, uninterrupted: dict[str, Any],
) -> None:
    """SIGSTOP for longer than two heartbeats: the run shows lost and is resumed; after SIGCONT the
    first process finds it no longer owns the run and stops, leaving the resumed run as it is."""
    import socket

    interval = 1.0
    db = tmp_path / "results.db"
    proc = start_run(db, RUNNER_HEARTBEAT_S=str(interval))
    run_id = wait_for_first_epoch(db, proc)
    proc.send_signal(signal.SIGSTOP)
    try:
        paused = time.monotonic()
        while run_cli("show", run_id, "--db", db, "--format", "json").json()["status"] != "lost":
            assert time.monotonic() - paused < 20 * interval, "a paused run never showed as lost"
            time.sleep(0.1)
        resumed = run_cli("resume", run_id, "--db", db, "-q")
        assert resumed.exit_code == 0, resumed.err
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 1, err
    assert err.strip().splitlines() == [
        f"error: run {run_id} was taken over by pid {os.getpid()} on {socket.gethostname()}; stopping without writing"
    ]
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["error"] is None and details["traceback"] is None
    assert_same_training(details, uninterrupted)


@pytest.mark.parametrize("failing_epoch", [1, 2])
def test_failure_after_the_epoch_was_stored_keeps_metrics_and_resume_redoes_that_epoch(
    run_cli: Any, tmp_path: Path, uninterrupted: dict[str, Any], failing_epoch: int,
) -> None:
    """An epoch reaches the store but its checkpoint cannot be written: the run fails with that
    epoch's rows stored and the previous checkpoint (or none) on disk; resume deletes the rows and
    trains the epoch again (from scratch when no checkpoint exists)."""
    db = tmp_path / "results.db"
    with checkpoint_of_epoch_fails(failing_epoch):
        failed = run_cli("run", SPEC, "--db", db, "-q")
    assert failed.exit_code == 1
    assert failed.err.count("\n") == 1 and "No space left on device" in failed.err
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["status"] == "failed"
    assert details["error"] == "OSError: [Errno 28] No space left on device"
    assert "Traceback (most recent call last)" in details["traceback"] and "in disk_full" in details["traceback"]
    assert details["epochs"] == uninterrupted["epochs"][:failing_epoch]  # nothing already stored is lost
    assert (tmp_path / "runs" / run_id / "last.pt").exists() == (failing_epoch > 1)

    resumed = run_cli("resume", run_id, "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert_same_training(details, uninterrupted)
    assert details["error"] is None and details["traceback"] is None


def test_resume_of_a_head_only_run_on_cached_features_of_a_pretrained_backbone(
    run_cli: Any, tmp_path: Path, trained_tiny_run: Any, one_thread: Any,
) -> None:
    """Transfer learning: the backbone's weights come from a file and only the head trains, on
    backbone features computed once. A resume must compute them from the same backbone again."""
    pretrained = trained_tiny_run.db.parent / "runs" / trained_tiny_run.run_id / "best.pt"
    tiny = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
    args = [tiny, "-q", "--set", "training.strategy.name=head_only", "--set", "training.epochs=3",
            "--set", "data.train_per_class=40", "--set", f"model.weights.file={pretrained}"]
    reference_id = run_cli("run", *args, "--db", tmp_path / "reference.db").out.strip()
    reference = run_cli("show", reference_id, "--db", tmp_path / "reference.db", "--format", "json").json()
    assert reference["settings"]["feature_cache"] == "on"

    db = tmp_path / "results.db"
    with checkpoint_of_epoch_fails(2):
        assert run_cli("run", *args, "--db", db).exit_code == 1
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    assert run_cli("resume", run_id, "--db", db, "-q").exit_code == 0
    assert_same_training(run_cli("show", run_id, "--db", db, "--format", "json").json(), reference)


def test_resume_refuses_completed_running_and_unknown_runs(run_cli: Any, trained_tiny_run: Any, tmp_path: Path) -> None:
    done = run_cli("resume", trained_tiny_run.run_id, "--db", trained_tiny_run.db)
    assert done.exit_code == 2
    assert done.err == f"error: run {trained_tiny_run.run_id} is completed; only interrupted, failed or lost runs can be resumed\n"

    store = Store(tmp_path / "live.db")
    store.runs.create("alive0000000", heartbeat_s=60, name="alive", spec_yaml="", spec_json="{}", spec_hash="-",
                      model="cnn", strategy="full_finetune", dataset="mnist_bundled", seed=0)
    alive = run_cli("resume", "alive", "--db", tmp_path / "live.db")
    assert alive.exit_code == 2
    assert alive.err.startswith("error: run alive0000000 is still running (last heartbeat ")
    assert alive.err.count("\n") == 1

    unknown = run_cli("resume", "nosuchrun", "--db", tmp_path / "live.db")
    assert unknown.exit_code == 2 and "no run 'nosuchrun'" in unknown.err


def test_two_resumes_of_one_run_cannot_both_claim_it(store_db: str) -> None:
    from runner.errors import StoreError

    store = Store(store_db)
    store.runs.create("stopped00000", name="x", spec_yaml="", spec_json="{}", spec_hash="-",
                      model="cnn", strategy="full_finetune", dataset="mnist_bundled", seed=0)
    store.runs.finish("stopped00000", "interrupted")
    store.runs.claim_for_resume("stopped00000", 0, heartbeat_s=60)
    with pytest.raises(StoreError, match="cannot be resumed: it is no longer interrupted or failed or lost"):
        store.runs.claim_for_resume("stopped00000", 0, heartbeat_s=60)
    assert store.query.run_row("stopped00000")["status"] == "running"


def test_last_checkpoint_holds_everything_a_resume_needs_and_loads_weights_only(trained_tiny_run: Any) -> None:
    import torch

    path = trained_tiny_run.db.parent / "runs" / trained_tiny_run.run_id / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "early_stopping", "history", "rng"} <= set(state)
    assert {"torch", "numpy", "python", "train_loader"} <= set(state["rng"])
    assert len(state["history"]) == 2 and "val_accuracy" in state["history"][0]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from runner.tensor_files import save_tensors

    path = tmp_path / "last.pt"
    save_tensors({"epoch": 1, "w": torch.ones(3)}, path)

    def crash_half_way(payload: Any, target: Any) -> None:
        target.write(b"PK\x03\x04 half a zip")  # save_tensors hands torch.save an open file
        raise KeyboardInterrupt  # the process stops in the middle of writing

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(torch, "save", crash_half_way)
        save_tensors({"epoch": 2, "w": torch.zeros(3)}, path)

    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no half-written file left behind


# ------------------------------------------------------------------------------------------
# Learning-rate schedulers: each writes its state into the optimizer, and must resume exactly

TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
SCHEDULERS = {
    "OneCycleLR": "{name: OneCycleLR, max_lr: 0.01, total_steps: 3}",
    "CosineAnnealingLR": "{name: CosineAnnealingLR, T_max: 3}",
    "StepLR": "{name: StepLR, step_size: 1, gamma: 0.5}",
    "ReduceLROnPlateau": "{name: ReduceLROnPlateau, patience: 0, factor: 0.5}",
}
GRADUAL = "{name: gradual, stages: [{epochs: 1, train: head}, {train: all, lr_mult: 0.5}]}"


@pytest.mark.parametrize(("scheduler", "strategy", "failing_epoch"), [
    *(pytest.param(name, "{name: full_finetune}", 2, id=name) for name in SCHEDULERS),
    # resumed in the first stage: the second starts a fresh optimizer and scheduler
    pytest.param("OneCycleLR", GRADUAL, 2, id="gradual-OneCycleLR-stage-1"),
    # resumed inside the second stage: its optimizer and scheduler come from the checkpoint
    pytest.param("OneCycleLR", GRADUAL, 3, id="gradual-OneCycleLR-stage-2"),
])
def test_resume_with_every_scheduler_equals_an_uninterrupted_run(
    run_cli: Any, tmp_path: Path, scheduler: str, strategy: str, failing_epoch: int,
) -> None:
    args = [TINY, "-q", "--set", "training.epochs=3", "--set", "data.train_per_class=60", "--set", "data.batch_size=16",
            "--set", f"training.scheduler={SCHEDULERS[scheduler]}", "--set", f"training.strategy={strategy}"]
    reference = run_cli("run", *args, "--db", tmp_path / "reference.db")
    assert reference.exit_code == 0, reference.err
    expected = run_cli("show", reference.out.strip(), "--db", tmp_path / "reference.db", "--format", "json").json()

    db = tmp_path / "results.db"
    with checkpoint_of_epoch_fails(failing_epoch):
        assert run_cli("run", *args, "--db", db).exit_code == 1
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    resumed = run_cli("resume", run_id, "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert_same_training(run_cli("show", run_id, "--db", db, "--format", "json").json(), expected)


def start_quickstart(db: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    quickstart = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(quickstart), "--db", str(db), "-q", "--set", "training.epochs=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_the_readme_interrupt_example_resumes_bit_for_bit_with_default_threads(run_cli: Any, tmp_path: Path) -> None:
    """README, "When runs stop": the quickstart (OneCycleLR), Ctrl-C in epoch 2, `runner resume`.
    Every process keeps torch's default number of threads; a run records the count it trained with
    and a resume trains with that count again."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    reference_db = tmp_path / "reference.db"
    reference = start_quickstart(reference_db, env)
    out, err = reference.communicate(timeout=1800)
    assert reference.returncode == 0, err
    expected = run_cli("show", out.strip(), "--db", reference_db, "--format", "json").json()

    db = tmp_path / "results.db"
    proc = start_quickstart(db, env)
    run_id = wait_for_first_epoch(db, proc, timeout=1800)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert [e["epoch"] for e in run_cli("show", run_id, "--db", db, "--format", "json").json()["epochs"]] == [1]

    resumed = subprocess.run([sys.executable, "-m", "runner", "resume", run_id, "--db", str(db), "-q"],
                             capture_output=True, text=True, env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert_same_training(details, expected)
    assert details["settings"]["performance"]["threads"] == expected["settings"]["performance"]["threads"]


# ------------------------------------------------------------------------------------------
# A process fenced off between an epoch's row and its checkpoint files replaces no file


def test_a_process_taken_over_after_storing_an_epoch_does_not_replace_the_new_owners_checkpoint(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window a SIGSTOP can hit: epoch 2's row is stored, then (while this process is paused)
    the run shows lost, another process resumes it and writes its own last.pt. Waking up, this
    process must not overwrite that file: it stops without writing, in one line."""
    import hashlib

    from runner.execute import StoreRecorder

    db = tmp_path / "results.db"
    real_epoch_done = StoreRecorder.epoch_done
    seen: dict[str, Any] = {}

    def taken_over_after_epoch_2(self: StoreRecorder, epoch: int, *args: Any) -> None:
        real_epoch_done(self, epoch, *args)
        if epoch != 2:
            return
        run_dir = tmp_path / "runs" / self.run_id
        seen["best"] = hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
        with sqlite3.connect(db) as conn:  # missed its heartbeats: lost
            conn.execute("UPDATE runs SET lost_after = '2000-01-01 00:00:00' WHERE id = ?", (self.run_id,))
        self.store.runs.claim_for_resume(self.run_id, 1, heartbeat_s=60, owner="otherhost:4242:cafe0000")
        (run_dir / "last.pt").write_bytes(b"the new owner's checkpoint")

    monkeypatch.setattr(StoreRecorder, "epoch_done", taken_over_after_epoch_2)
    result = run_cli("run", TINY, "--db", db, "-q", "--set", "training.epochs=3", "--set", "data.train_per_class=60")

    assert result.exit_code == 1
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    assert result.err == f"error: run {run_id} was taken over by pid 4242 on otherhost; stopping without writing\n"
    run_dir = tmp_path / "runs" / run_id
    assert (run_dir / "last.pt").read_bytes() == b"the new owner's checkpoint"
    assert hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest() == seen["best"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left either
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["status"] == "running" and details["error"] is None
    assert [e["epoch"] for e in details["epochs"]] == [1]
    assert {k: c["epoch"] for k, c in details["checkpoints"].items()} == {"best": 1, "last": 1}


# ------------------------------------------------------------------------------------------
# Partial checkpoint files of killed processes

KILLED_WRITER = """
import sys, time
from pathlib import Path
from runner.files import atomic_write

def write_slowly(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint" * 4096)
        f.flush()
        time.sleep(600)

atomic_write(Path(sys.argv[1]), write_slowly)
"""


def killed_mid_write(path: Path) -> Path:
    """Start a process writing ``path`` the way checkpoints are written, SIGKILL it mid-write; its leftover."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)])
    leftover = path.with_name(f".{path.name}.{proc.pid}.tmp")
    deadline = time.monotonic() + 120
    while not (leftover.exists() and leftover.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never started"
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    return leftover


def test_resume_and_prune_remove_partial_checkpoints_of_killed_processes(
    run_cli: Any, tmp_path: Path, uninterrupted: dict[str, Any],
) -> None:
    db = tmp_path / "results.db"
    with checkpoint_of_epoch_fails(2):
        assert run_cli("run", SPEC, "--db", db, "-q").exit_code == 1
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    run_dir = tmp_path / "runs" / run_id
    leftover = killed_mid_write(run_dir / "last.pt")
    size = leftover.stat().st_size
    last_before = (run_dir / "last.pt").read_bytes()

    resumed = run_cli("resume", run_id, "--db", db, "-q")
    assert resumed.exit_code == 0, resumed.err
    assert resumed.err == f"removed 1 partial checkpoint file(s) left by a killed process ({size} bytes) from {run_dir}\n"
    assert not leftover.exists()
    assert last_before != (run_dir / "last.pt").read_bytes()  # the resumed run wrote its own
    assert_same_training(run_cli("show", run_id, "--db", db, "--format", "json").json(), uninterrupted)

    leftovers = [killed_mid_write(run_dir / "best.pt"), killed_mid_write(tmp_path / "runs" / ".feature_cache" / "abc.pt")]
    kept = {p: p.read_bytes() for p in run_dir.iterdir()}
    dry = run_cli("prune", "--db", db, "--dry-run", "--format", "json").json()
    assert (dry["temporaries_removed"], all(p.exists() for p in leftovers)) == (2, True)
    pruned = run_cli("prune", "--db", db, "--keep", "both", "--yes")
    assert pruned.exit_code == 0, pruned.err
    assert pruned.out.splitlines()[-1] == f"removed 2 partial file(s) left by killed processes ({2 * size / 1024:.1f} KiB)"
    assert not any(p.exists() for p in leftovers)
    assert {p: p.read_bytes() for p in run_dir.iterdir()} == {p: b for p, b in kept.items() if p not in leftovers}
