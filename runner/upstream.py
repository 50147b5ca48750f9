"""Weights from earlier runs: ``{run: ID}`` or ``{experiment: SPEC}``, looked up in the store.

Everything here only reads. Running an upstream experiment that has no completed run yet is the
caller's decision (:func:`runner.execute.run_experiment` does it, through the same entry point as
any run); :func:`experiment_chain` finds a cycle of experiments before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import SpecError
from runner.plan import UpstreamWeights, resolved_spec_hash
from runner.spec import Spec, WeightsFromExperiment, WeightsFromRun, load_spec

if TYPE_CHECKING:
    from runner.registries import Registries


def experiment_path(reference: WeightsFromExperiment, base_dir: str) -> Path:
    path = Path(reference.experiment).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def upstream_experiment(spec: Spec, base_dir: str) -> Path | None:
    """The spec file whose run gives this spec its weights (``{experiment: …}``), if any."""
    weights = spec.model.weights
    return experiment_path(weights, base_dir) if isinstance(weights, WeightsFromExperiment) else None


def experiment_chain(spec: Spec, base_dir: str, origin: Path | None = None) -> list[Path]:
    """The upstream experiments this spec depends on, nearest first; a cycle is a :class:`SpecError`.

    Only spec files are read: nothing is loaded, planned or run.
    """
    seen = [origin.resolve()] if origin is not None else []
    chain: list[Path] = []
    current, directory = spec, base_dir
    while (path := upstream_experiment(current, directory)) is not None:
        resolved = path.resolve()
        if resolved in seen:
            cycle = " -> ".join(str(p) for p in [*seen[seen.index(resolved):], resolved])
            raise SpecError(f"model.weights: the upstream experiments form a cycle: {cycle}")
        seen.append(resolved)
        chain.append(path)
        current, directory = load_spec(path), str(path.parent)
    return chain


def find_upstream(spec: Spec, store: Any, registries: Registries, base_dir: str) -> UpstreamWeights | None:
    """The completed run the spec's weights name, with its best checkpoint; None when it has none yet."""
    weights = spec.model.weights
    if isinstance(weights, WeightsFromRun):
        run_id = store.query.resolve_run_id(weights.run)
        return UpstreamWeights(run_id, str(best_checkpoint(store, run_id)), f"run:{run_id}")
    if isinstance(weights, WeightsFromExperiment):
        path = experiment_path(weights, base_dir)
        run_id = store.query.find_completed_run(resolved_spec_hash(load_spec(path), registries, str(path.parent)))
        if run_id is None:
            return None
        return UpstreamWeights(run_id, str(best_checkpoint(store, run_id)), f"run:{run_id} (experiment {weights.experiment})")
    return None


def upstream_run_id(source: str) -> str | None:
    """The upstream run a stored weights source names (``run:ID`` or ``run:ID (experiment …)``, as written above)."""
    return source.removeprefix("run:").split(" ", 1)[0] if source.startswith("run:") else None


def best_checkpoint(store: Any, run_id: str) -> Path:
    row = store.query.run_row(run_id)
    if row["status"] != "completed":
        raise SpecError(f"model.weights: run {run_id} is {row['status']}, not completed")
    checkpoint = store.query.checkpoints(run_id).get("best")
    if checkpoint is None or not checkpoint["path"].is_file():
        raise SpecError(f"model.weights: run {run_id} has no best checkpoint on disk")
    return checkpoint["path"]


__all__ = ["experiment_chain", "find_upstream", "best_checkpoint", "upstream_experiment", "experiment_path", "upstream_run_id"]
