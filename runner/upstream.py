"""Weights from earlier runs: ``{run: ID}`` or ``{experiment: SPEC}`` (reused, or run first)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runner.errors import SpecError


def checkpoint_of_upstream(weights_spec: Any, store: Any, base_dir: str) -> tuple[Path, str]:
    """The best checkpoint of the run the weights spec names, and a description of the source."""
    if hasattr(weights_spec, "run"):
        run_id = store.query.resolve_run_id(weights_spec.run)
        return best_checkpoint(store, run_id), f"run:{run_id}"
    spec_path = Path(weights_spec.experiment).expanduser()
    spec_path = spec_path if spec_path.is_absolute() else Path(base_dir) / spec_path
    run_id = completed_run_for(spec_path, store)
    return best_checkpoint(store, run_id), f"run:{run_id} (experiment {weights_spec.experiment})"


def completed_run_for(spec_path: Path, store: Any) -> str:
    """Reuse the completed run whose resolved-spec hash matches, or run the experiment now."""
    from runner.build import resolved_spec_hash
    from runner.execute import run_experiment
    from runner.plugins import load_registries
    from runner.spec import load_spec

    registries = load_registries()
    spec = load_spec(spec_path)
    spec_hash = resolved_spec_hash(spec, registries, str(spec_path.parent))
    existing = store.query.find_completed_run(spec_hash)
    if existing is not None:
        print(f"reusing upstream run {existing} of {spec_path}", file=sys.stderr)
        return existing
    print(f"no completed run of {spec_path} in the store: running it first", file=sys.stderr)
    return run_experiment(spec_path, store=store).run_id


def best_checkpoint(store: Any, run_id: str) -> Path:
    row = store.query.run_row(run_id)
    if row["status"] != "completed":
        raise SpecError(f"model.weights: run {run_id} is {row['status']}, not completed")
    checkpoint = store.query.checkpoints(run_id).get("best")
    if checkpoint is None or not Path(checkpoint["path"]).is_file():
        raise SpecError(f"model.weights: run {run_id} has no best checkpoint on disk")
    return Path(checkpoint["path"])
