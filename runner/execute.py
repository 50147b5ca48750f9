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


@dataclass
class RunOutcome:
    run_id: str
    status: str
    test: dict[str, Any]


class StoreRecorder:
    """The training loop's :class:`~runner.training.Recorder`, writing to the results store."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None:
        self.store.log_epoch(self.run_id, epoch, metrics, duration_s, best_epoch=best_epoch, best_val_accuracy=best_val_accuracy)

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None:
        from runner.build import sha256_file

        self.store.save_checkpoint(self.run_id, kind, epoch, str(path), sha256_file(path), path.stat().st_size)


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
) -> RunOutcome:
    """Validate and prepare everything, then train into a new run of ``store``."""
    from runner.build import prepare, seed_everything
    from runner.models import count_parameters
    from runner.plugins import load_registries
    from runner.training import apply_stage, fit

    overrides = list(overrides) + ([f"device={device}"] if device else [])
    spec = load_spec(source, overrides)
    base_dir = str(Path(source).parent) if isinstance(source, (str, Path)) else "."
    store = store if store is not None else Store()
    registries = load_registries()
    seed_everything(spec.seed, spec.deterministic)
    prepared = prepare(spec, registries, base_dir=base_dir, store=store)
    apply_stage(prepared.model, prepared.strategy.stage(1))
    total, trainable = count_parameters(prepared.model)
    summary = model_summary(prepared.model, prepared.input_shape, prepared.device)
    seed_everything(spec.seed, spec.deterministic)  # the summary's forward pass must not shift RNG state

    run_id = store.new_run_id()
    resolved = prepared.spec
    store.create_run(
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
        settings_json=json.dumps({**prepared.settings, "strategy": prepared.strategy.describe()}, default=str),
        class_names_json=json.dumps(prepared.class_names),
        weights_source=prepared.weights.source if prepared.weights else None,
        weights_sha256=prepared.weights.sha256 if prepared.weights else None,
        **environment(),
    )
    try:
        result = fit(prepared, StoreRecorder(store, run_id), store.run_dir(run_id), _progress_factory(quiet))
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", stop_reason="interrupted by user")
        raise
    except Exception as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), stop_reason="error")
        raise TrainingFailed(run_id, exc) from exc
    test = {k: v for k, v in result.test.items() if k != "confusion"}
    store.save_split_metrics(run_id, "test", test)
    store.finish_run(
        run_id, "completed", stop_reason=result.stop_reason, epochs_run=result.epochs_run,
        best_epoch=result.best_epoch, confusion_json=json.dumps(result.test["confusion"]),
    )
    return RunOutcome(run_id, "completed", test)


__all__ = ["run_experiment", "RunOutcome", "TrainingFailed", "RunnerError"]
