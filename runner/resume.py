"""``runner resume RUN_ID``: continue an interrupted, failed or lost run from its last checkpoint.

The run keeps its id and its stored plan. The last checkpoint (``runs/<id>/last.pt``) puts back the
model, optimizer, scheduler, early stopping, RNG states and the train loader's shuffling, and
training goes on after the checkpoint's epoch; the strategy's stage follows from the epoch. On CPU
the epochs that follow equal, bit for bit, those of a run that was never stopped. Epoch rows the
store got after the checkpoint are deleted and trained again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError
from runner.execute import RunOutcome, setup, train_run
from runner.lifecycle import heartbeat_interval
from runner.plan import RunPlan, stored_plan
from runner.store import RESUMABLE, Store, new_owner
from runner.tensor_files import load_tensors

if TYPE_CHECKING:
    from runner.registries import Registries

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "scheduler", "early_stopping", "history", "rng"}


def check_resumable(row: dict[str, Any]) -> None:
    """Refuse a run that is still alive or already done, with the reason in one line."""
    status, run_id = row["status"], row["id"]
    if status == "running":
        last = row["heartbeat_at"]
        beat = f"last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC" if last else "no heartbeat yet"
        raise RunnerError(f"run {run_id} is still running ({beat}); only interrupted, failed or lost runs can be resumed")
    if status not in RESUMABLE:
        raise RunnerError(f"run {run_id} is {status}; only interrupted, failed or lost runs can be resumed")


def load_last_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's last training state, or None when it stopped before its first epoch ended."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = load_tensors(path, f"checkpoint {path}")
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise RunnerError(f"{path} is not a resumable checkpoint (it lacks {sorted(CHECKPOINT_KEYS - set(state or {}))})")
    return state


def resumed_plan(row: dict[str, Any], registries: Registries) -> RunPlan:
    """The plan a stored run goes on with: the one it was trained with, beating at this process's interval."""
    # the heartbeat of the process that trains now, which may not be the one that started the run
    run_plan = replace(stored_plan(row, registries), heartbeat_s=heartbeat_interval())
    if run_plan.spec_hash != row["spec_hash"]:
        raise RunnerError(f"run {row['id']}: its spec no longer resolves to the same experiment (has the data or a plugin changed?)")
    return run_plan


def resumed_columns(state: dict[str, Any] | None) -> dict[str, Any]:
    """The run's progress columns as of its last checkpoint (nothing when training starts over)."""
    history = state["history"] if state else []
    return {"best_epoch": state["early_stopping"]["best_epoch"] if state else None,
            "best_val_accuracy": max((h["val_accuracy"] for h in history), default=None)}


def resume_run(run_id: str, store: Store, registries: Registries, quiet: bool = True) -> RunOutcome:
    """Continue the run ``run_id`` (an id or unique prefix) in ``store`` and return how it ended."""
    row = store.query.run_row(run_id)
    check_resumable(row)
    run_plan = resumed_plan(row, registries)
    run_dir = store.artifacts_dir(row, must_exist=bool(store.query.checkpoints(row["id"])))
    state = load_last_checkpoint(run_dir)
    parts = setup(run_plan, registries, checkpoint=state, verify_weights=True)
    owner = new_owner()
    store.runs.claim_for_resume(row["id"], int(state["epoch"]) if state else 0, run_plan.heartbeat_s, owner=owner,
                                **resumed_columns(state))
    return train_run(store, row["id"], owner, run_plan, parts, run_dir, quiet, resume_from=state)


__all__ = ["resume_run", "resumed_plan", "resumed_columns", "check_resumable", "load_last_checkpoint"]
