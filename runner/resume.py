"""``runner resume RUN_ID``: continue an interrupted, failed or lost run from its last checkpoint.

The run keeps its id. Its stored (resolved) spec is prepared again, the last checkpoint
(``runs/<id>/last.pt``) puts back the model, optimizer, scheduler, early stopping, RNG states and the
train loader's shuffling, and training goes on after the checkpoint's epoch; the strategy's stage
follows from the epoch. On CPU the epochs that follow equal, bit for bit, those of a run that was
never stopped. Epoch rows the store got after the checkpoint are deleted and trained again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.execute import RunOutcome, train_run
from runner.store import RESUMABLE, Store

CHECKPOINT_NAME = "last.pt"


def check_resumable(row: dict[str, Any]) -> None:
    """Refuse a run that is still alive or already done, with the reason in one line."""
    status, run_id = row["status"], row["id"]
    if status == "running":
        last = row["heartbeat_at"]
        beat = f"last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC" if last else "no heartbeat yet"
        raise RunnerError(f"run {run_id} is still running ({beat}); only interrupted, failed or lost runs can be resumed")
    if status not in RESUMABLE:
        raise RunnerError(f"run {run_id} is {status}; only interrupted, failed or lost runs can be resumed")


def run_directory(store: Store, row: dict[str, Any]) -> Path:
    return Path(row["artifacts_dir"]) if row["artifacts_dir"] else store.run_dir(row["id"])


def load_last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's last training state, or None when it stopped before its first epoch ended."""
    import torch

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never retried without weights_only
        from runner.build import unsafe_load_reason

        raise RunnerError(f"checkpoint {path} {unsafe_load_reason(exc)}") from None
    needed = {"epoch", "model", "optimizer", "scheduler", "early_stopping", "history", "rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise RunnerError(f"{path} is not a resumable checkpoint (it lacks {sorted(needed - set(state or {}))})")
    return state


def resume_run(run_id: str, store: Store, quiet: bool = True, registries: Any = None) -> RunOutcome:
    """Continue the run ``run_id`` (an id or unique prefix) in ``store`` and return how it ended."""
    from runner.build import prepare, seed_everything
    from runner.lifecycle import heartbeat_interval
    from runner.plugins import load_registries
    from runner.spec import load_spec
    from runner.training import apply_stage

    row = store.query.run_row(run_id)
    check_resumable(row)
    heartbeat_s = heartbeat_interval()
    spec = load_spec(json.loads(row["spec_json"]))
    spec_dir = json.loads(row["settings_json"] or "{}").get("spec_dir", ".")
    run_dir = run_directory(store, row)
    state = load_last_checkpoint(run_dir)

    registries = registries if registries is not None else load_registries()
    seed_everything(spec.seed, spec.deterministic)
    # with a checkpoint the model's weights come from it, so the original source need not exist now
    prepared = prepare(spec, registries, base_dir=spec_dir, store=store, load_weights=state is None)
    if prepared.spec.spec_hash() != row["spec_hash"]:
        raise RunnerError(f"run {row['id']}: its spec no longer resolves to the same experiment (has the data or a plugin changed?)")
    if state is None:  # start again from scratch, exactly as `runner run` would have
        apply_stage(prepared.model, prepared.strategy.stage(1))
        seed_everything(spec.seed, spec.deterministic)
    else:  # the weights now, before training computes anything from them (e.g. cached backbone features)
        prepared.model.load_state_dict(state["model"])

    epoch = int(state["epoch"]) if state else 0
    history = state["history"] if state else []
    store.runs.claim_for_resume(
        row["id"], epoch, heartbeat_s,
        best_epoch=state["early_stopping"]["best_epoch"] if state else None,
        best_val_accuracy=max((h["val_accuracy"] for h in history), default=None),
    )
    return train_run(store, row["id"], prepared, run_dir, heartbeat_s, quiet, resume_from=state)


__all__ = ["resume_run", "check_resumable", "load_last_checkpoint"]
