"""Workers empty a sweep's queue, one claimed run at a time; the local launcher starts them as processes.

A worker (``runner worker --db URL [--sweep ID]``, :func:`work`) claims the next queued run
(:meth:`runner.store.queue.RunQueue.claim`), plans it from its stored spec (or, when it goes on from
a checkpoint, takes the plan it was trained with, as ``runner resume`` does), records the plan on
the run's row, trains it with :func:`runner.execute.train_run` under the claim's owner token, and
takes the next until none is left. A run that fails is stored ``failed`` and the worker goes on; a
stop signal stores the run ``interrupted`` and stops the worker. A worker never trains an upstream
experiment: the sweep command trains each one once before any worker starts, and a run whose
upstream has no completed run fails, saying so.

:class:`LocalWorkers` is the launcher of ``runner run SPEC -j N``: N worker processes on this
machine, each with ``max(1, cores // N)`` torch threads and, with ``--devices``, one device each.
A launcher only starts workers; the store holds all state, so any worker can finish any sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from runner.errors import RunnerError, RunTakenOver
from runner.execute import RunInterrupted, TrainingFailed, model_summary, run_columns, setup, train_run
from runner.lifecycle import Interrupted, StopBeating, heartbeat, heartbeat_interval, late_signal, signals_deferred, stop_on_signals
from runner.resume import load_last_checkpoint, remove_leftovers, resumed_columns, resumed_plan
from runner.store import DB_ENV, Store, new_owner
from runner.store.queue import Claim

if TYPE_CHECKING:
    from runner.build import RunParts
    from runner.plan import RunPlan
    from runner.registries import Registries

# Exit codes of a worker that ended as designed: queue empty (0), a run failed (1), stopped (130, 143).
EXPECTED_EXITS = (0, 1, 130, 143)


@dataclass
class WorkerReport:
    """What one worker did: run id → how the run ended (completed, failed, taken over)."""

    runs: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if all(status == "completed" for status in self.runs.values()) else 1


# ------------------------------------------------------------------------------------------
# One worker


def work(store: Store, registries: Registries, *, sweep_id: str | None = None, quiet: bool = True,
         on_run_end: Callable[[str, str, str], None] | None = None) -> WorkerReport:
    """Claim and train queued runs (of one sweep, or of any) until none is left.

    ``on_run_end(run_id, status, detail)`` hears of each run as it ends. A stop signal raises
    :class:`~runner.execute.RunInterrupted` after the run is stored ``interrupted``.
    """
    report = WorkerReport()
    heartbeat_s = heartbeat_interval()
    late_signal()  # one from before this worker started is not this worker's to act on
    with stop_on_signals():  # between runs too: a signal never ends the process with a run half claimed
        while (claim := store.queue.claim(new_owner(), heartbeat_s, sweep_id)) is not None:
            status, detail = run_claim(store, registries, claim, quiet)
            report.runs[claim.run_id] = status
            if on_run_end is not None:
                on_run_end(claim.run_id, status, detail)
            # a signal that arrived while this run's end was being stored still stops the worker
            if (signum := late_signal()) is not None:
                raise WorkerStopped(signum, claim.run_id, status)
    return report


class WorkerStopped(Interrupted):
    """A stop signal arrived as a run ended: that run keeps how it ended, the worker takes no other."""

    def __init__(self, signum: int, run_id: str, status: str) -> None:
        super().__init__(signum)
        self.args = (f"worker stopped by {self.signal_name} as run {run_id} ended ({status}); the queue keeps the other runs",)


@dataclass
class Prepared:
    """A claimed run, ready to train: its plan, its parts, where its artefacts go and the checkpoint it goes on from."""

    plan: RunPlan
    parts: RunParts
    run_dir: Path
    state: dict[str, Any] | None


def run_claim(store: Store, registries: Registries, claim: Claim, quiet: bool = True) -> tuple[str, str]:
    """Plan, set up and train a claimed run; how it ended (completed, failed, taken over) and a one-line detail."""
    try:
        prepared = _prepare_beating(store, registries, claim)
    except RunTakenOver as exc:
        return "taken over", str(exc)
    except KeyboardInterrupt as exc:
        signal_name = getattr(exc, "signal_name", "SIGINT")
        _finish(store, claim, "interrupted", stop_reason=f"interrupted by {signal_name}")
        raise RunInterrupted(claim.run_id, signal_name, 0) from None
    except Exception as exc:  # noqa: BLE001 - any problem before training fails this run, not the worker
        error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
        if not _finish(store, claim, "failed", error=error, traceback=traceback.format_exc(), stop_reason="error"):
            return "taken over", f"run {claim.run_id} was taken over"
        return "failed", error
    try:
        outcome = train_run(store, claim.run_id, claim.owner, prepared.plan, prepared.parts, prepared.run_dir, quiet,
                            resume_from=prepared.state)
    except TrainingFailed as exc:
        cause = exc.__cause__
        return "failed", f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    except RunTakenOver as exc:
        return "taken over", str(exc)
    return "completed", f"test accuracy {outcome.test.get('accuracy', float('nan')):.4f}"


def _finish(store: Store, claim: Claim, status: str, **fields: Any) -> bool:
    """Store how a run that never reached training ended; False when another process owns it now."""
    try:
        with signals_deferred(raise_after=False):
            store.runs.finish(claim.run_id, status, owner=claim.owner, **fields)
    except RunTakenOver:
        return False
    return True


def _prepare_beating(store: Store, registries: Registries, claim: Claim) -> Prepared:
    """:func:`prepare` with the run's heartbeat going (planning and building take time) and stop signals caught."""
    heartbeat_s = heartbeat_interval()

    def beat() -> None:
        try:
            store.runs.heartbeat(claim.run_id, heartbeat_s, owner=claim.owner)
        except RunTakenOver:
            raise StopBeating from None

    with stop_on_signals(), heartbeat(beat, heartbeat_s):
        return prepare(store, registries, claim)


def prepare(store: Store, registries: Registries, claim: Claim) -> Prepared:
    """The claimed run's plan and parts, recorded on its row (the queued row gets its plan).

    A run the store holds a last checkpoint of goes on from it with the plan it was trained with;
    any other starts from its stored resolved spec, planned now on this machine (device, threads).
    """
    row = store.query.run_row(claim.run_id)
    run_dir = store.artifacts_dir(row, must_exist=claim.resume)
    state = load_last_checkpoint(run_dir) if claim.resume else None
    if state is not None:
        run_plan = resumed_plan(row, registries, store)
        parts = setup(run_plan, registries, checkpoint=state, verify_weights=True)
        columns = {**run_columns(run_plan, row["model_summary"]), **resumed_columns(state)}
    else:
        run_plan, data = fresh_plan(row, store, registries, claim.spec_dir)
        parts = setup(run_plan, registries, data=data)
        columns = {**run_columns(run_plan, model_summary(parts.model, run_plan.data.input_shape, parts.device)), **resumed_columns(None)}
    store.queue.start(claim.run_id, claim.owner, int(state["epoch"]) if state else 0, run_plan.heartbeat_s, **columns)
    if state is not None:
        remove_leftovers(run_dir)
    return Prepared(run_plan, parts, run_dir, state)


def fresh_plan(row: dict[str, Any], store: Store, registries: Registries, base_dir: str) -> tuple[RunPlan, Any]:
    """The plan of a queued run from its stored resolved spec, with its loaded data; it must hash as it did when queued."""
    from runner.data import load_data
    from runner.plan import plan
    from runner.spec import load_spec
    from runner.upstream import find_upstream

    spec = load_spec(json.loads(row["spec_json"]))
    upstream = find_upstream(spec, store, registries, base_dir)  # only looks: upstream experiments were trained before
    data = load_data(spec, registries, base_dir)
    run_plan = plan(spec, registries, base_dir=base_dir, upstream=upstream, data=data)
    if run_plan.spec_hash != row["spec_hash"]:
        raise RunnerError(f"run {row['id']}: its spec no longer resolves to the experiment that was queued (has the data or a plugin changed?)")
    return run_plan, data


# ------------------------------------------------------------------------------------------
# Worker processes on this machine


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """Torch threads for each of ``jobs`` workers sharing ``cores``: max(1, cores // jobs)."""
    return max(1, (cores or available_cores()) // jobs)


def worker_command(store: Store, sweep_id: str | None, threads: int | None = None) -> list[str]:
    """The command line of one worker process on the same artefact directory as ``store`` (the store
    itself is named in the environment, :func:`worker_environment`, so no URL shows in a process list)."""
    argv = [sys.executable, "-m", "runner", "worker", "-q"]
    if store.artifacts_root is not None:
        argv += ["--artifacts", str(store.artifacts_root)]
    if sweep_id is not None:
        argv += ["--sweep", sweep_id]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def worker_environment(store: Store, threads: int | None, device: str | None) -> dict[str, str]:
    """The environment of a worker process: its store, and its thread count and device, set before torch loads."""
    env = {**os.environ, DB_ENV: store.url}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device  # worker i sees one device, as cuda:0
    return env


class LocalWorkers:
    """Worker processes on this machine, started by :meth:`start`.

    Each worker has a session of its own, so a Ctrl-C at the terminal reaches only the launcher,
    which passes the signal on to each worker once (:meth:`send`): a second signal would not wait
    for a checkpoint being written. Their stderr goes to a temporary file, read back only when a
    worker exits in an unexpected way (:meth:`problems`).
    """

    def __init__(self, processes: list[subprocess.Popen[bytes]], logs: list[Any]) -> None:
        self.processes = processes
        self._logs = logs

    @classmethod
    def start(cls, store: Store, sweep_id: str | None, jobs: int, devices: Sequence[str] = (),
              threads: int | None = None) -> LocalWorkers:
        """``jobs`` workers; worker i gets ``devices[i % len(devices)]`` and ``threads`` (default: an equal share of the cores)."""
        threads = threads or threads_per_worker(jobs)
        processes, logs = [], []
        for i in range(jobs):
            log = tempfile.TemporaryFile()
            device = devices[i % len(devices)] if devices else None
            processes.append(subprocess.Popen(worker_command(store, sweep_id, threads), env=worker_environment(store, threads, device),
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True))
            logs.append(log)
        return cls(processes, logs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def send(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def wait(self, timeout: float | None = None) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.processes]

    def problems(self) -> list[str]:
        """One line per worker that ended other than as designed (killed, crashed), with its last words."""
        lines = []
        for i, (process, log) in enumerate(zip(self.processes, self._logs), 1):
            if process.poll() is not None and process.returncode not in EXPECTED_EXITS:
                log.seek(0)
                said = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
                lines.append(f"worker {i} (pid {process.pid}) exited with code {process.returncode}" + (f": {said[-1]}" if said else ""))
        return lines

    def close(self) -> None:
        for log in self._logs:
            log.close()


def wait_for(workers: LocalWorkers, refresh: Callable[[], None], interval: float = 0.5) -> None:
    """Refresh the display until every worker has exited; a stop signal is passed on to the workers,
    which store their runs ``interrupted``, and raised again once they have stopped."""
    try:
        with stop_on_signals():
            while workers.running():
                refresh()
                time.sleep(interval)
    except KeyboardInterrupt as exc:
        workers.send(getattr(exc, "signum", signal.SIGINT))
        with stop_on_signals():  # until they are done; a second signal stops them at once
            try:
                workers.wait()
            except KeyboardInterrupt as again:
                workers.send(getattr(again, "signum", signal.SIGINT))
                workers.wait()
        raise


__all__ = ["work", "WorkerStopped", "run_claim", "prepare", "fresh_plan", "WorkerReport", "LocalWorkers", "wait_for", "worker_command",
           "worker_environment", "threads_per_worker", "available_cores", "EXPECTED_EXITS"]
