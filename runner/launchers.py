"""Launchers: where a sweep's workers run. Each one only starts ``runner worker`` processes; the store
holds all state, so a sweep started with one launcher can be finished with another.

- ``local``: worker processes on this machine (:class:`runner.workers.LocalWorkers`);
- ``slurm``: a job array of N workers through submitit (the ``slurm`` extra). Each job runs one
  ``runner worker``; a job that Slurm preempts or that reaches its time limit gets submitit's signal,
  stops its worker (the run is stored ``interrupted`` with its last checkpoint), puts that run back in
  the queue and is requeued by submitit; the requeued job's worker claims it and resumes it;
- ``ray``: N Ray tasks (the ``ray`` extra), each with ``num_cpus``/``num_gpus`` and running one
  ``runner worker``, on the cluster at ``--ray-address`` or on a local one started here. Ray places
  the GPUs: a task's worker sees only the devices Ray gave it.

The store's URL reaches a worker through its environment (``RUNNER_DB``), never a command line: a
Slurm job inherits the submitting environment, a Ray task gets it as an argument and sets it for its worker.

Every launcher has the interface the sweep command waits on (:func:`runner.workers.wait_for`):
``running()``, ``send(signum)``, ``wait()``, ``problems()`` and ``close()``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence
from unittest.mock import patch

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import RunnerError
from runner.store import ARTIFACTS_ENV, DB_ENV, Store

# what a worker's exit code means is runner.workers' (0, 1, 130, 143: it ended as designed); that
# module loads torch, which the sweep command's planning must not need, so it is imported where used

LauncherName = Literal["local", "slurm", "ray"]


class LauncherSection(BaseModel):
    """A sweep spec's ``launcher:`` section; the command line's ``--launcher``/``--slurm-*``/``--ray-*`` override it."""

    model_config = ConfigDict(extra="forbid")

    name: LauncherName = "local"
    jobs: int | None = Field(None, ge=1)  # workers, as -j
    slurm_partition: str | None = None
    slurm_time: int = Field(60, ge=1)  # minutes a job may run before Slurm stops (and submitit requeues) it
    slurm_gpus_per_task: int | None = Field(None, ge=0)
    slurm_cpus_per_task: int | None = Field(None, ge=1)
    slurm_folder: str = "submitit"  # job scripts and logs, on a filesystem the nodes share
    slurm_cluster: Literal["slurm", "local"] = "slurm"  # local: submitit's local executor, the same path on this machine
    slurm_max_requeues: int = Field(3, ge=0)  # how often a preempted or timed-out job comes back
    ray_address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: a local one
    ray_num_cpus: float = Field(1, gt=0)
    ray_num_gpus: float = Field(0, ge=0)


def launcher_section(raw: Any, label: str) -> LauncherSection:
    """A ``launcher:`` section, checked (one line naming the key on a bad one)."""
    try:
        return LauncherSection.model_validate(raw or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(LauncherSection.model_fields), n=1)
            raise RunnerError(f"{label}: unknown key 'launcher.{key}'" + (f"; did you mean 'launcher.{close[0]}'?" if close else "")) from None
        raise RunnerError(f"{label}: launcher.{key}: {error['msg']}") from None


def with_options(section: LauncherSection, **options: Any) -> LauncherSection:
    """The section with the command line's options that were given (not None) in place of its own."""
    given = {key: value for key, value in options.items() if value is not None}
    return LauncherSection.model_validate({**section.model_dump(), **given})


# ------------------------------------------------------------------------------------------
# The worker process a launcher starts


def run_worker_process(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run one ``runner worker`` to its end in this process's environment plus ``env``; its exit code
    and last line on stderr. Used inside a Ray task (whose environment holds the devices Ray gave it)."""
    completed = subprocess.run(list(argv), env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    said = [line for line in completed.stderr.splitlines() if line.strip()]
    return completed.returncode, said[-1] if said else ""


def _store_env(store: Store) -> dict[str, str]:
    env = {DB_ENV: store.url}
    if store.artifacts_root is not None:
        env[ARTIFACTS_ENV] = str(store.artifacts_root)
    return env


# ------------------------------------------------------------------------------------------
# Slurm, through submitit


class SlurmWorkerJob:
    """What each job of the array runs: one ``runner worker``, until the queue is empty.

    On submitit's checkpoint signal (preemption, time limit) :meth:`checkpoint` stops the worker
    (SIGTERM: its run is stored ``interrupted`` with its last checkpoint), puts the runs that worker
    left interrupted back in the queue, and hands submitit the same job to requeue.
    """

    def __init__(self, argv: Sequence[str], sweep_id: str) -> None:
        self.argv = list(argv)
        self.sweep_id = sweep_id
        self._process: subprocess.Popen[bytes] | None = None

    def __call__(self, index: int) -> int:
        from runner.workers import EXPECTED_EXITS

        self._process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        code = self._process.wait()
        if code not in EXPECTED_EXITS:
            raise RunnerError(f"worker {index}: runner worker exited with code {code}")
        return code

    def checkpoint(self, index: int) -> Any:
        import submitit

        process, self._process = self._process, None
        if process is not None:
            _stop(process.pid)
            Store(create=False).queue.requeue_stopped(self.sweep_id, process.pid)
        return submitit.helpers.DelayedSubmission(self, index)

    def __getstate__(self) -> dict[str, Any]:  # submitit pickles the job it requeues; a process does not pickle
        return {**self.__dict__, "_process": None}


def _stop(pid: int) -> None:
    """SIGTERM the worker and wait for it to end (it stores its run ``interrupted``).

    This runs in submitit's signal handler, on top of ``Popen.wait`` in :meth:`SlurmWorkerJob.__call__`,
    which holds the Popen's wait lock: so the process is signalled and reaped by pid, not through the Popen.
    """
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # it had already ended (and been reaped)
        pass


def _import_extra(module: str, name: str, launcher: str) -> Any:
    """The launcher's engine, or one line naming the extra (named as the launcher) that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RunnerError(f"--launcher {launcher} needs {name}: pip install 'runner-dl[{launcher}]'") from None


@dataclass
class SlurmWorkers:
    """The jobs of one submitit job array (``--launcher slurm``)."""

    jobs: list[Any]
    folder: Path

    @classmethod
    def start(cls, store: Store, sweep_id: str, jobs: int, section: LauncherSection) -> SlurmWorkers:
        """``jobs`` workers as a job array (``slurm_cluster: local``: the same code path, as local processes)."""
        from runner.workers import worker_command

        submitit = _import_extra("submitit", "submitit", "slurm")
        folder = Path(section.slurm_folder).expanduser().resolve() / sweep_id
        executor = submitit.AutoExecutor(folder=folder, cluster=section.slurm_cluster, slurm_max_num_timeout=section.slurm_max_requeues)
        parameters: dict[str, Any] = {"name": f"runner-{sweep_id}", "timeout_min": section.slurm_time, "tasks_per_node": 1,
                                      "slurm_array_parallelism": jobs}
        if section.slurm_partition:
            parameters["slurm_partition"] = section.slurm_partition
        if section.slurm_cpus_per_task:
            parameters["cpus_per_task"] = section.slurm_cpus_per_task
        if section.slurm_gpus_per_task is not None:
            parameters["slurm_gpus_per_task"] = section.slurm_gpus_per_task
        executor.update_parameters(**parameters)
        job = SlurmWorkerJob(worker_command(store, sweep_id, section.slurm_cpus_per_task), sweep_id)
        with patch.dict(os.environ, _store_env(store)):  # the submitted jobs inherit it; restored after
            submitted = executor.map_array(job, range(jobs))
        return cls(list(submitted), folder)

    def running(self) -> bool:
        return any(not job.done() for job in self.jobs)

    def send(self, signum: int) -> None:
        """Cancel the jobs (Slurm signals their workers, which store their runs ``interrupted``)."""
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)

    def wait(self, timeout: float | None = None) -> list[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("slurm jobs", timeout or 0)
            time.sleep(0.5)
        return [0 if job.exception() is None else 1 for job in self.jobs]

    def problems(self) -> list[str]:
        lines = []
        for job in self.jobs:
            exception = job.exception() if job.done() else None
            if exception is not None:
                said = [line for line in str(exception).splitlines() if line.strip()]
                lines.append(f"slurm job {job.job_id} failed: {said[-1] if said else type(exception).__name__} (logs in {self.folder})")
        return lines

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------
# Ray


@dataclass
class RayWorkers:
    """N Ray tasks, each running one ``runner worker`` (``--launcher ray``)."""

    ray: Any
    refs: list[Any]
    started_ray: bool  # this process started the (local) cluster, so it shuts it down
    results: dict[int, tuple[int, str]] = field(default_factory=dict)

    @classmethod
    def start(cls, store: Store, sweep_id: str, jobs: int, section: LauncherSection) -> RayWorkers:
        """``jobs`` tasks on the cluster at ``ray_address`` (or the one this process is connected to,
        or a new local one); each asks for ``ray_num_cpus`` CPUs and ``ray_num_gpus`` GPUs."""
        ray = _import_extra("ray", "Ray", "ray")
        started = False
        if not ray.is_initialized():
            ray.init(address=section.ray_address, include_dashboard=False, log_to_driver=False)
            started = True
        from runner.workers import worker_command

        threads = max(1, int(section.ray_num_cpus))
        task = ray.remote(num_cpus=section.ray_num_cpus, num_gpus=section.ray_num_gpus)(run_worker_process)
        argv = worker_command(store, sweep_id, threads)
        # the store's URL goes as an argument (held in Ray's object store), not in a runtime_env Ray would log
        refs = [task.remote(argv, _store_env(store)) for _ in range(jobs)]
        return cls(ray, refs, started)

    def _collect(self) -> None:
        done, _ = self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        for ref in done:
            index = self.refs.index(ref)
            if index not in self.results:
                try:
                    self.results[index] = self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task that died is reported, not raised
                    self.results[index] = (-1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def running(self) -> bool:
        self._collect()
        return len(self.results) < len(self.refs)

    def send(self, signum: int) -> None:
        """Cancel the tasks: Ray interrupts each (KeyboardInterrupt), which stops its worker process."""
        for index, ref in enumerate(self.refs):
            if index not in self.results:
                self.ray.cancel(ref)

    def wait(self, timeout: float | None = None) -> list[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ray tasks", timeout or 0)
            time.sleep(0.2)
        return [self.results[i][0] for i in range(len(self.refs))]

    def problems(self) -> list[str]:
        from runner.workers import EXPECTED_EXITS

        self._collect()
        return [f"ray worker {i + 1} exited with code {code}" + (f": {said}" if said else "")
                for i, (code, said) in sorted(self.results.items()) if code not in EXPECTED_EXITS]

    def close(self) -> None:
        if self.started_ray:
            self.ray.shutdown()


# ------------------------------------------------------------------------------------------


def start_workers(store: Store, sweep_id: str, jobs: int, section: LauncherSection, devices: Sequence[str] = ()) -> Any:
    """The workers of ``section.name`` for the sweep: N processes here, a Slurm job array or N Ray tasks."""
    from runner.workers import LocalWorkers, threads_per_worker

    if section.name != "local" and devices:
        raise RunnerError(f"--devices places workers on this machine; with --launcher {section.name} the scheduler places GPUs")
    if section.name == "slurm":
        return SlurmWorkers.start(store, sweep_id, jobs, section)
    if section.name == "ray":
        return RayWorkers.start(store, sweep_id, jobs, section)
    return LocalWorkers.start(store, sweep_id, jobs, devices, threads=threads_per_worker(jobs))


__all__ = ["LauncherName", "LauncherSection", "launcher_section", "with_options", "start_workers", "SlurmWorkers", "SlurmWorkerJob",
           "RayWorkers", "run_worker_process"]
