"""Run lifecycle: running → completed | failed | interrupted | lost; stop signals and the heartbeat."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runner.lifecycle import Interrupted, heartbeat, signals_deferred, stop_on_signals
from runner.store import Store, live_status, utcnow


def fake_run(store: Store, run_id: str, heartbeat_s: float | None) -> None:
    """A run row as `runner run` writes it before training (no torch needed)."""
    store.runs.create(run_id, heartbeat_s=heartbeat_s, name="fake", spec_yaml="", spec_json="{}", spec_hash="-",
                      model="cnn", strategy="full_finetune", dataset="mnist_bundled", seed=0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_raises_interrupted_and_the_previous_handler_comes_back(signum: int) -> None:
    def previous(*_: Any) -> None:
        pass

    original = signal.signal(signum, previous)
    try:
        with pytest.raises(Interrupted) as raised, stop_on_signals():
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs before this ends
        assert raised.value.signum == signum
        assert isinstance(raised.value, KeyboardInterrupt)
        assert signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, original)


def test_a_signal_inside_a_deferred_block_waits_until_the_block_is_done() -> None:
    done = []
    with pytest.raises(Interrupted), stop_on_signals():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            done.append("checkpoint written")  # not cut short
        done.append("after the block")  # never reached: the signal is raised as the block ends
    assert done == ["checkpoint written"]


def test_a_second_signal_inside_a_deferred_block_does_not_wait() -> None:
    done = []
    with pytest.raises(Interrupted), stop_on_signals(), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        done.append("first signal waits")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        done.append("second signal waits too")
    assert done == ["first signal waits"]


def test_a_late_signal_is_dropped_where_the_run_is_already_finishing() -> None:
    done = []
    with stop_on_signals():
        with signals_deferred(raise_after=False):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("finished")
        done.append("after the block")  # the dropped signal raised nothing here
        with signals_deferred():
            time.sleep(0.05)
            done.append("a later block")  # and it is not remembered for the next deferred block
    assert done == ["finished", "after the block", "a later block"]


def test_a_signal_waiting_in_a_block_an_error_leaves_lets_the_error_go_on_and_is_kept_as_late() -> None:
    """A failure being recorded when torchrun's SIGTERM arrives: the failure is what the caller must see."""
    from runner.lifecycle import late_signal

    late_signal()
    with pytest.raises(ValueError, match="recording the failure"), stop_on_signals():
        with signals_deferred(raise_after=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            raise ValueError("recording the failure")
    assert late_signal() == signal.SIGTERM  # a worker claims no next run
    with stop_on_signals(), signals_deferred():
        time.sleep(0.05)  # and the signal does not wait for the next deferred block


def test_the_heartbeat_beats_from_another_thread_until_the_block_ends() -> None:
    beats: list[str] = []
    with heartbeat(lambda: beats.append(threading.current_thread().name), 0.02):
        time.sleep(0.3)
    count = len(beats)
    assert count >= 3
    assert set(beats) == {"runner-heartbeat"}
    time.sleep(0.1)
    assert len(beats) == count  # stopped


def test_a_failing_beat_never_stops_the_heartbeat() -> None:
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise RuntimeError("database is locked")

    with heartbeat(flaky, 0.02):
        time.sleep(0.2)
    assert len(calls) >= 3


def test_lost_is_derived_from_the_heartbeat_deadline() -> None:
    now = utcnow()
    from datetime import timedelta

    assert live_status("running", now + timedelta(seconds=1), now) == "running"
    assert live_status("running", now - timedelta(seconds=1), now) == "lost"
    assert live_status("running", None, now) == "running"  # no heartbeat was ever promised
    for finished in ("completed", "failed", "interrupted"):
        assert live_status(finished, now - timedelta(days=1), now) == finished


def test_runs_show_and_report_show_a_silent_run_as_lost_and_a_beating_one_as_running(run_cli: Any, store_db: str) -> None:
    db = store_db
    store = Store(db)
    fake_run(store, "silent000000", heartbeat_s=0.05)
    fake_run(store, "beating00000", heartbeat_s=60)
    time.sleep(0.2)  # more than two intervals of the silent run

    statuses = {r["id"]: r["status"] for r in run_cli("runs", "--db", db, "--format", "json").json()}
    assert statuses == {"silent000000": "lost", "beating00000": "running"}
    assert [r["id"] for r in run_cli("runs", "--db", db, "--status", "lost", "--format", "json").json()] == ["silent000000"]
    assert [r["id"] for r in run_cli("runs", "--db", db, "--status", "running", "--format", "json").json()] == ["beating00000"]
    assert run_cli("show", "silent", "--db", db, "--format", "json").json()["status"] == "lost"
    report = run_cli("report", "--db", db, "--format", "csv")
    assert report.exit_code == 0
    assert any(line.startswith("silent000000,") and ",lost," in line for line in report.out.splitlines())

    store.runs.heartbeat("silent000000", 60)  # only slow, not dead: it is running again
    assert run_cli("show", "silent", "--db", db, "--format", "json").json()["status"] == "running"


def test_a_bad_heartbeat_setting_is_refused_before_any_row(run_cli: Any, tiny_spec: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_HEARTBEAT_S", "often")
    result = run_cli("run", tiny_spec, "--db", db)
    assert result.exit_code == 2
    assert result.err == "error: RUNNER_HEARTBEAT_S must be a positive number of seconds, got 'often'\n"
    assert not db.exists() or Store(db).query.count_runs() == 0


def test_sigterm_during_epoch_2_stores_interrupted_with_the_epoch_1_checkpoint(
    run_cli: Any, tiny_spec: Path, db: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from runner import training

    real_epoch = training.train_one_epoch
    epochs_started = []

    def terminated_in_epoch_2(*args: Any, **kwargs: Any) -> Any:
        epochs_started.append(1)
        if len(epochs_started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a cluster scheduler would
            time.sleep(1)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", terminated_in_epoch_2)
    handler_before = signal.getsignal(signal.SIGTERM)
    result = run_cli("run", tiny_spec, "--db", db, "-q", "--set", "data.train_per_class=40")

    assert result.exit_code == 143
    run_id = run_cli("runs", "--db", db, "--format", "json").json()[0]["id"]
    assert result.err.strip() == (f"run {run_id} interrupted by SIGTERM; its last checkpoint is epoch 1: "
                                  f"continue it with 'runner resume {run_id}'")
    details = run_cli("show", run_id, "--db", db, "--format", "json").json()
    assert details["status"] == "interrupted"
    assert details["stop_reason"] == "interrupted by SIGTERM"
    assert [e["epoch"] for e in details["epochs"]] == [1]
    assert details["checkpoints"]["last"]["epoch"] == 1
    assert torch.load(db.parent / "runs" / run_id / "last.pt", weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is handler_before
