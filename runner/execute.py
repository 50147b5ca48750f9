"""Running an experiment: upstream runs → plan (checked, nothing stored) → build → run row → fit → final status.

:func:`run_experiment` is the one entry point for a new run, also for the upstream experiments a
spec's weights name (which run first, through it, when the store has no completed run of them).
:func:`setup` is the one path from a plan to the objects that train, for new and resumed runs alike.
"""

from __future__ import annotations

import _thread
import json
import platform
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import data as data_mod
from runner.build import RunParts, build
from runner.distributed import ONE_PROCESS, Collective
from runner.errors import RunnerError, RunTakenOver, SpecError, StoreError
from runner.files import sha256_file
from runner.lifecycle import StopBeating, heartbeat, signals_deferred, signals_ignored, stop_on_signals
from runner.manage import apply_retention
from runner.performance import applied
from runner.plan import RunPlan, UpstreamWeights, named_weights, plan
from runner.rng import preserved, seed_everything
from runner.spec import Spec, load_spec
from runner.store import Store, new_owner
from runner.training import FitResult, SilentRecorder, apply_stage, fit
from runner.upstream import experiment_chain, find_upstream, upstream_experiment
from runner.version import __version__

if TYPE_CHECKING:
    from runner.registries import Registries


class TrainingFailed(Exception):
    """Training raised after the run row existed; the run is stored as ``failed`` (exit code 1).

    ``unrecorded``: why the store could not even record the failure (it is full, read-only, damaged).
    """

    exit_code = 1

    def __init__(self, run_id: str, error: str, unrecorded: BaseException | None = None) -> None:
        note = f"; the run could not be marked failed: {unrecorded}" if unrecorded is not None else ""
        super().__init__(f"run {run_id} failed: {error}{note}")
        self.run_id = run_id


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; the run is stored as ``interrupted`` and can be resumed."""

    def __init__(self, run_id: str, signal_name: str, checkpoint_epoch: int, resume_command: str | None = None) -> None:
        kept = f"its last checkpoint is epoch {checkpoint_epoch}" if checkpoint_epoch else "no epoch had finished"
        super().__init__(f"run {run_id} interrupted by {signal_name}; {kept}: continue it with "
                         f"'{resume_command or f'runner resume {run_id}'}'")
        self.run_id = run_id
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


@dataclass
class RunOutcome:
    run_id: str
    status: str
    test: dict[str, Any]


class StoreRecorder:
    """The training loop's :class:`~runner.training.Recorder`, writing to the results store as the run's owner."""

    def __init__(self, store: Store, run_id: str, owner: str, checkpoint_epoch: int = 0) -> None:
        self.store = store
        self.run_id = run_id
        self.owner = owner
        self.checkpoint_epoch = checkpoint_epoch  # of the last checkpoint, where a resume would start

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None:
        self.store.runs.log_epoch(self.run_id, epoch, metrics, duration_s, owner=self.owner, best_epoch=best_epoch,
                                  best_val_accuracy=best_val_accuracy)

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None:
        self.store.runs.save_checkpoint(self.run_id, kind, epoch, path, sha256_file(path), path.stat().st_size, owner=self.owner)
        if kind == "last":
            self.checkpoint_epoch = epoch

    def check_owner(self) -> None:
        self.store.runs.check_owner(self.run_id, self.owner)


# ------------------------------------------------------------------------------------------
# What a run records about where it ran


def git_commit(directory: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def model_summary(model: Any, input_shape: tuple[int, ...], device: Any) -> str:
    """torchinfo's table of the model (a forward pass; the random generators are left as they were)."""
    import torchinfo

    try:
        with preserved():
            return str(torchinfo.summary(model, input_size=(1, *input_shape), device=device, verbose=0, depth=3,
                                         col_names=("output_size", "num_params", "trainable")))
    except Exception as exc:  # a summary must never stop a run
        return f"(torchinfo summary unavailable: {type(exc).__name__}: {exc})"


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    return {
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "runner_version": __version__,
    }


def _progress_factory(quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


# ------------------------------------------------------------------------------------------
# Before planning: the things a plan needs to exist


def ensure_upstream(spec: Spec, store: Store, registries: Registries, base_dir: str, quiet: bool,
                    collective: Collective = ONE_PROCESS) -> UpstreamWeights | None:
    """The run whose checkpoint gives the spec its weights; an upstream experiment without one runs now
    (in a distributed run, rank 0 looks in the store and every rank trains the upstream run)."""
    path = upstream_experiment(spec, base_dir)
    found = collective.from_rank0(lambda: find_upstream(spec, store, registries, base_dir))
    if found is not None:
        if path is not None and collective.is_writer:
            print(f"reusing upstream run {found.run_id} of {path}", file=sys.stderr)
        return found
    if path is None:  # {run: ID} names a run that must exist; find_upstream said why it cannot be used
        return None
    if collective.is_writer:
        print(f"no completed run of {path} in the store: running it first", file=sys.stderr)
    run_experiment(path, store=store, registries=registries, quiet=quiet, collective=collective)
    return collective.from_rank0(lambda: find_upstream(spec, store, registries, base_dir))


def needs_work_before_planning(spec: Spec, registries: Registries, base_dir: str) -> bool:
    """Whether the run's plan must wait for an upstream experiment to train or for weights to download."""
    if upstream_experiment(spec, base_dir) is not None:
        return True
    if not isinstance(spec.model.weights, str):
        return False
    weights = named_weights(spec, registries, spec.model.weights)
    return weights.path is not None and not Path(weights.path).is_file() and weights.fetch is not None


def fetch_named_weights(spec: Spec, registries: Registries) -> None:
    """Download named pretrained weights that are not on disk yet (a plan hashes them)."""
    if not isinstance(spec.model.weights, str):
        return
    weights = named_weights(spec, registries, spec.model.weights)
    if weights.path is not None and not Path(weights.path).is_file() and weights.fetch is not None:
        weights.fetch()


# ------------------------------------------------------------------------------------------
# New runs


def run_experiment(
    source: str | Path | dict[str, Any] | Spec,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    store: Store,
    registries: Registries,
    device: str | None = None,
    quiet: bool = True,
    base_dir: str | None = None,
    collective: Collective = ONE_PROCESS,
) -> RunOutcome:
    """Plan and build everything, then train into a new run of ``store``.

    ``base_dir`` is where relative paths in the spec point (default: the spec file's directory,
    or the working directory for a mapping); ``runner reproduce`` passes the original run's.
    In a distributed run every rank calls this with its ``collective``; only rank 0 has a ``store``.
    """
    overrides = list(overrides) + ([f"device={device}"] if device else [])
    spec = load_spec(source, overrides)
    if base_dir is None:
        base_dir = str(Path(source).parent) if isinstance(source, (str, Path)) else "."
    experiment_chain(spec, base_dir, Path(source) if isinstance(source, (str, Path)) else None)  # a cycle fails before any work
    data = data_mod.load_data(spec, registries, base_dir)
    if needs_work_before_planning(spec, registries, base_dir):  # a typo must not cost an upstream training or a download
        plan(spec, registries, base_dir=base_dir, data=data, read_weights=False, world_size=collective.planned_world_size)
    upstream = ensure_upstream(spec, store, registries, base_dir, quiet, collective)

    def plan_run() -> RunPlan:
        fetch_named_weights(spec, registries)
        return plan(spec, registries, base_dir=base_dir, upstream=upstream, data=data, world_size=collective.planned_world_size)

    run_plan = collective.from_rank0(plan_run)  # the same plan on every rank
    parts = setup(run_plan, registries, data=data, collective=collective)
    run_id, owner, run_dir = collective.from_rank0(lambda: start_run(store, run_plan, parts))
    return train_run(store, run_id, owner, run_plan, parts, run_dir, quiet, collective=collective)


def setup(run_plan: RunPlan, registries: Registries, *, data: data_mod.LoadedData | None = None,
          checkpoint: dict[str, Any] | None = None, verify_weights: bool = False,
          collective: Collective = ONE_PROCESS) -> RunParts:
    """Seed, build the plan's model, loaders and strategy, and ready the model for epoch 1.

    With a ``checkpoint`` (resume) the model takes its weights from it; training then restores every
    random generator from it. Without one, the generators are seeded again after building, so the
    first epoch draws the same numbers however much building drew. ``verify_weights`` checks that
    the initial weights file still has the sha256 the plan recorded (a plan stored long ago). In a
    distributed run only rank 0 reads weights files; every rank then holds rank 0's weights.
    """
    spec = run_plan.spec
    seed_everything(spec.seed, spec.deterministic)
    parts = build(run_plan, registries, data=data, load_weights=checkpoint is None and collective.is_writer,
                  verify_weights=verify_weights, device=collective.device, shard=collective.shard)
    if checkpoint is None:
        apply_stage(parts.model, parts.strategy.stage(1))
    else:  # the weights now, before training computes anything from them (e.g. cached backbone features)
        parts.model.load_state_dict(checkpoint["model"])
    collective.prepare(parts.model, run_plan.distributed.sync_batchnorm)
    seed_everything(spec.seed, spec.deterministic)
    return parts


def start_run(store: Store, run_plan: RunPlan, parts: RunParts) -> tuple[str, str, Path]:
    """The new run's row (see :func:`record_new_run`): its id, owner token and artefacts directory."""
    summary = model_summary(parts.model, run_plan.data.input_shape, parts.device)
    owner = new_owner()
    run_id = record_new_run(store, run_plan, summary, owner)
    return run_id, owner, store.run_dir(run_id)


def record_new_run(store: Store, run_plan: RunPlan, summary: str, owner: str) -> str:
    """The run's row, ``running`` and owned by ``owner``, with its resolved spec, plan and provenance; its id."""
    run_id = store.new_run_id()
    store.runs.create(run_id, owner=owner, heartbeat_s=run_plan.heartbeat_s, **run_columns(run_plan, summary))
    return run_id


def run_columns(run_plan: RunPlan, summary: str) -> dict[str, Any]:
    """What a run's row records of its plan: resolved spec, settings, model, weights and where it runs."""
    spec = run_plan.spec
    return dict(
        name=spec.name,
        spec_yaml=spec.to_yaml(),
        spec_json=json.dumps(spec.resolved(), sort_keys=True),
        spec_hash=run_plan.spec_hash,
        model=spec.model.name,
        strategy=spec.training.strategy.name,
        dataset=spec.data.dataset,
        seed=spec.seed,
        device=run_plan.device,
        git_commit=git_commit(Path(run_plan.spec_dir)),
        params_total=run_plan.model.params_total,
        params_trainable=run_plan.model.params_trainable,
        model_summary=summary,
        plugins_json=json.dumps(list(run_plan.plugins)),
        settings_json=json.dumps(run_plan.to_json(), default=str),
        class_names_json=json.dumps(list(run_plan.data.class_names)),
        weights_source=run_plan.weights.source if run_plan.weights else None,
        weights_sha256=run_plan.weights.sha256 if run_plan.weights else None,
        **environment(),
    )


class _Fence:
    """The heartbeat's view of the run's ownership: when another process took the run over, the
    heartbeat stops and interrupts the main thread, which then stops without writing."""

    def __init__(self, store: Store, run_id: str, owner: str, heartbeat_s: float) -> None:
        self.store, self.run_id, self.owner, self.heartbeat_s = store, run_id, owner, heartbeat_s
        self.lost: RunTakenOver | None = None

    def beat(self) -> None:
        try:
            self.store.runs.heartbeat(self.run_id, self.heartbeat_s, owner=self.owner)
        except RunTakenOver as exc:
            self.lost = exc
            _thread.interrupt_main()  # training stops at once, not at its next write
            raise StopBeating from None


def train_run(
    store: Store, run_id: str, owner: str, run_plan: RunPlan, parts: RunParts, run_dir: Path, quiet: bool = True,
    resume_from: dict[str, Any] | None = None, collective: Collective = ONE_PROCESS,
) -> RunOutcome:
    """Train into the existing run ``run_id``, as its ``owner``, and store how it ended: completed, interrupted or failed.

    SIGINT and SIGTERM stop training and leave the run ``interrupted`` with its last checkpoint;
    any other exception leaves it ``failed`` with the error and traceback; the epochs already
    stored stay either way. A heartbeat thread keeps the run from showing as lost while this
    process lives. When another process has taken the run over (:class:`RunTakenOver`), this one
    stops without writing anything more. In a distributed run rank 0 does all this (a failure of
    another rank is the run's error); the other ranks train alongside (:func:`follow_run`).
    """
    if not collective.is_writer:
        return follow_run(run_id, run_plan, parts, run_dir, resume_from, collective)
    recorder = StoreRecorder(store, run_id, owner, int(resume_from["epoch"]) if resume_from else 0)
    fence = _Fence(store, run_id, owner, run_plan.heartbeat_s)
    with stop_on_signals():
        try:
            # threads and cudnn.benchmark are process-wide: set for training, then restored
            with heartbeat(fence.beat, run_plan.heartbeat_s), applied(run_plan.performance):
                result = fit(run_plan, parts, recorder, run_dir, _progress_factory(quiet), resume_from=resume_from,
                             collective=collective)
                collective.check_same_weights(parts.model, "after training")
        except RunTakenOver:
            raise
        except KeyboardInterrupt as exc:
            if fence.lost is not None:
                raise fence.lost from None
            signal_name = getattr(exc, "signal_name", "SIGINT")
            with signals_deferred(raise_after=False):
                # torchrun stops the other ranks (SIGTERM) when one fails
                if (failed := _failed_elsewhere(store, run_id, owner, collective)) is not None:
                    raise failed from exc
                store.runs.finish(run_id, "interrupted", owner=owner, stop_reason=f"interrupted by {signal_name}")
            raise RunInterrupted(run_id, signal_name, recorder.checkpoint_epoch, collective.resume_command(run_id)) from None
        except Exception as exc:
            # torchrun's SIGTERM follows another rank's failure closely: arriving while this one is
            # recorded, it must not leave the run `running` (it stops a worker claiming more, see late_signal)
            with signals_deferred(raise_after=False):
                # a rank that failed first explains a broken connection here (not an error rank 0 found itself)
                failed = None if isinstance(exc, RunnerError) else _failed_elsewhere(store, run_id, owner, collective)
                raise (failed or _failed(store, run_id, owner, *_described(exc))) from exc
        # trained: a signal now cannot make the run interrupted (a worker takes it as "claim no more")
        with signals_deferred(raise_after=False):
            test = _store_completed(store, run_id, owner, result)
    # only now: until the run completed, its last checkpoint was what a resume would start from
    apply_retention(store, run_id, run_plan.spec.checkpoints.keep)
    return RunOutcome(run_id, "completed", test)


def _store_completed(store: Store, run_id: str, owner: str, result: FitResult) -> dict[str, Any]:
    """Store the trained run's test metrics and mark it completed; its test metrics (without the confusion matrix)."""
    test = {k: v for k, v in result.test.items() if k != "confusion"}
    try:
        store.runs.save_split_metrics(run_id, "test", test, owner=owner)
        store.runs.finish(run_id, "completed", owner=owner, stop_reason=result.stop_reason, epochs_run=result.epochs_run,
                          best_epoch=result.best_epoch, confusion_json=json.dumps(result.test["confusion"]))
    except RunTakenOver:
        raise
    except Exception as exc:
        raise _failed(store, run_id, owner, *_described(exc)) from exc
    return test


def _described(exc: BaseException) -> tuple[str, str]:
    """The error and traceback stored with a run that failed on ``exc`` (being handled)."""
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


def _failed_elsewhere(store: Store, run_id: str, owner: str, collective: Collective) -> TrainingFailed | None:
    """Where another rank reported an error, the run stored ``failed`` with it: the exception to raise."""
    elsewhere = collective.failure_elsewhere()
    return None if elsewhere is None else _failed(store, run_id, owner, elsewhere.describe(), elsewhere.traceback)


def _failed(store: Store, run_id: str, owner: str, error: str, trace: str) -> TrainingFailed:
    """Store the run ``failed`` with ``error`` and its traceback; the exception to raise (saying so
    when the store cannot even record the failure: it is full, read-only, damaged)."""
    try:
        with signals_deferred(raise_after=False):
            store.runs.finish(run_id, "failed", owner=owner, error=error, traceback=trace, stop_reason="error")
    except StoreError as unrecorded:
        return TrainingFailed(run_id, error, unrecorded)
    return TrainingFailed(run_id, error)


def follow_run(run_id: str, run_plan: RunPlan, parts: RunParts, run_dir: Path, resume_from: dict[str, Any] | None,
               collective: Collective) -> RunOutcome:
    """A rank other than 0 of a distributed run: the same training on its shard, writing nothing.

    It ignores SIGINT and SIGTERM (rank 0 decides how the run ends) and stops with an error when
    rank 0 is gone; an error of its own goes to rank 0 (see :func:`runner.distributed.session`).
    """
    with signals_ignored(), applied(run_plan.performance):
        result = fit(run_plan, parts, SilentRecorder(), run_dir, None, resume_from=resume_from, collective=collective)
        collective.check_same_weights(parts.model, "after training")
    return RunOutcome(run_id, "completed", {k: v for k, v in result.test.items() if k != "confusion"})


__all__ = ["run_experiment", "setup", "train_run", "follow_run", "start_run", "record_new_run", "run_columns", "RunOutcome", "RunInterrupted",
           "TrainingFailed", "RunnerError", "SpecError"]
