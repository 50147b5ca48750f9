"""Running an experiment: prepare (checked, nothing stored) → run row → fit → final status."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.spec import Spec, load_spec
from runner.store import Store


class TrainingFailed(Exception):
    """Training raised after the run row existed; the run is stored as ``failed`` (exit code 1)."""

    exit_code = 1

    def __init__(self, run_id: str, error: BaseException) -> None:
        super().__init__(f"run {run_id} failed: {type(error).__name__}: {error}")
        self.run_id = run_id


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; the run is stored as ``interrupted`` and can be resumed."""

    def __init__(self, run_id: str, signal_name: str, checkpoint_epoch: int) -> None:
        kept = f"its last checkpoint is epoch {checkpoint_epoch}" if checkpoint_epoch else "no epoch had finished"
        super().__init__(f"run {run_id} interrupted by {signal_name}; {kept}: continue it with 'runner resume {run_id}'")
        self.run_id = run_id
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


@dataclass
class RunOutcome:
    run_id: str
    status: str
    test: dict[str, Any]


class StoreRecorder:
    """The training loop's :class:`~runner.training.Recorder`, writing to the results store."""

    def __init__(self, store: Store, run_id: str, checkpoint_epoch: int = 0) -> None:
        self.store = store
        self.run_id = run_id
        self.checkpoint_epoch = checkpoint_epoch  # of the last checkpoint, where a resume would start

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None:
        self.store.runs.log_epoch(self.run_id, epoch, metrics, duration_s, best_epoch=best_epoch, best_val_accuracy=best_val_accuracy)

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None:
        from runner.build import sha256_file

        self.store.runs.save_checkpoint(self.run_id, kind, epoch, str(path), sha256_file(path), path.stat().st_size)
        if kind == "last":
            self.checkpoint_epoch = epoch


def git_commit(directory: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def model_summary(model: Any, input_shape: tuple[int, ...], device: Any) -> str:
    import torchinfo

    try:
        return str(torchinfo.summary(model, input_size=(1, *input_shape), device=device, verbose=0, depth=3,
                                     col_names=("output_size", "num_params", "trainable")))
    except Exception as exc:  # a summary must never stop a run
        return f"(torchinfo summary unavailable: {type(exc).__name__}: {exc})"


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    from runner import __version__

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


def run_experiment(
    source: str | Path | dict[str, Any] | Spec,
    overrides: list[str] | tuple[str, ...] = (),
    store: Store | None = None,
    device: str | None = None,
    quiet: bool = True,
    registries: Any = None,
    base_dir: str | None = None,
) -> RunOutcome:
    """Validate and prepare everything, then train into a new run of ``store``.

    ``base_dir`` is where relative paths in the spec point (default: the spec file's directory,
    or the working directory for a mapping); ``runner reproduce`` passes the original run's.

    ``registries`` (from :func:`runner.plugins.load_registries`) lets a caller that already loaded
    the plugins, e.g. to report their problems, avoid loading them twice.
    """
    from runner.build import prepare, seed_everything
    from runner.lifecycle import heartbeat_interval
    from runner.models import count_parameters
    from runner.plugins import load_registries
    from runner.training import apply_stage

    overrides = list(overrides) + ([f"device={device}"] if device else [])
    spec = load_spec(source, overrides)
    heartbeat_s = heartbeat_interval()
    if base_dir is None:
        base_dir = str(Path(source).parent) if isinstance(source, (str, Path)) else "."
    store = store if store is not None else Store()
    registries = registries if registries is not None else load_registries()
    seed_everything(spec.seed, spec.deterministic)
    prepared = prepare(spec, registries, base_dir=base_dir, store=store)
    apply_stage(prepared.model, prepared.strategy.stage(1))
    total, trainable = count_parameters(prepared.model)
    summary = model_summary(prepared.model, prepared.input_shape, prepared.device)
    seed_everything(spec.seed, spec.deterministic)  # the summary's forward pass must not shift RNG state

    run_id = store.new_run_id()
    resolved = prepared.spec
    store.runs.create(
        run_id,
        name=resolved.name,
        spec_yaml=resolved.to_yaml(),
        spec_json=json.dumps(resolved.resolved(), sort_keys=True),
        spec_hash=resolved.spec_hash(),
        model=resolved.model.name,
        strategy=resolved.training.strategy.name,
        dataset=resolved.data.dataset,
        seed=resolved.seed,
        device=str(prepared.device),
        git_commit=git_commit(Path(base_dir)),
        params_total=total,
        params_trainable=trainable,
        model_summary=summary,
        plugins_json=json.dumps(registries.used_plugins(prepared.used_names)),
        # spec_dir: where relative paths in the spec point, for `runner resume`
        settings_json=json.dumps({**prepared.settings, "strategy": prepared.strategy.describe(),
                                  "spec_dir": str(Path(base_dir).resolve()), "heartbeat_s": heartbeat_s}, default=str),
        class_names_json=json.dumps(prepared.class_names),
        weights_source=prepared.weights.source if prepared.weights else None,
        weights_sha256=prepared.weights.sha256 if prepared.weights else None,
        heartbeat_s=heartbeat_s,
        **environment(),
    )
    return train_run(store, run_id, prepared, store.run_dir(run_id), heartbeat_s, quiet)


def train_run(
    store: Store, run_id: str, prepared: Any, run_dir: Path, heartbeat_s: float, quiet: bool = True,
    resume_from: dict[str, Any] | None = None,
) -> RunOutcome:
    """Train into the existing run ``run_id`` and store how it ended: completed, interrupted or failed.

    SIGINT and SIGTERM stop training and leave the run ``interrupted`` with its last checkpoint;
    any other exception leaves it ``failed`` with the error and traceback; the epochs already
    stored stay either way. A heartbeat thread keeps the run from showing as lost while this
    process lives.
    """
    from runner.lifecycle import heartbeat, signals_deferred, stop_on_signals
    from runner.performance import applied, of_run
    from runner.training import fit

    recorder = StoreRecorder(store, run_id, int(resume_from["epoch"]) if resume_from else 0)
    with stop_on_signals():
        try:
            # threads and cudnn.benchmark are process-wide: set for training (settings["performance"]), then restored
            with heartbeat(lambda: store.runs.heartbeat(run_id, heartbeat_s), heartbeat_s), applied(of_run(prepared)):
                result = fit(prepared, recorder, run_dir, _progress_factory(quiet), resume_from=resume_from)
                with signals_deferred(raise_after=False):  # finished: a late signal changes nothing
                    test = {k: v for k, v in result.test.items() if k != "confusion"}
                    store.runs.save_split_metrics(run_id, "test", test)
                    store.runs.finish(
                        run_id, "completed", stop_reason=result.stop_reason, epochs_run=result.epochs_run,
                        best_epoch=result.best_epoch, confusion_json=json.dumps(result.test["confusion"]),
                    )
        except KeyboardInterrupt as exc:
            signal_name = getattr(exc, "signal_name", "SIGINT")
            with signals_deferred(raise_after=False):
                store.runs.finish(run_id, "interrupted", stop_reason=f"interrupted by {signal_name}")
            raise RunInterrupted(run_id, signal_name, recorder.checkpoint_epoch) from None
        except Exception as exc:
            with signals_deferred(raise_after=False):
                store.runs.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), stop_reason="error")
            raise TrainingFailed(run_id, exc) from exc
    from runner.manage import apply_retention

    # only now: until the run completed, its last checkpoint was what a resume would start from
    apply_retention(store, run_id, prepared.spec.checkpoints.keep)
    return RunOutcome(run_id, "completed", test)


__all__ = ["run_experiment", "train_run", "RunOutcome", "RunInterrupted", "TrainingFailed", "RunnerError"]
