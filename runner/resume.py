"""``runner resume RUN_ID``: continue an interrupted, failed or lost run from its last checkpoint.

The run keeps its id and its stored plan. The last checkpoint (``runs/<id>/last.pt``) puts back the
model, optimizer, scheduler, early stopping, RNG states and the train loader's shuffling, and
training goes on after the checkpoint's epoch; the strategy's stage follows from the epoch. On CPU
the epochs that follow equal, bit for bit, those of a run that was never stopped. Epoch rows the
store got after the checkpoint are deleted and trained again.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.distributed import ONE_PROCESS, Collective
from runner.errors import RunnerError
from runner.execute import RunOutcome, setup, train_run
from runner.files import remove_stale_temporaries
from runner.lifecycle import heartbeat_interval
from runner.plan import RunPlan, stored_plan
from runner.store import RESUMABLE, Store, new_owner
from runner.tensor_files import load_tensors
from runner.upstream import upstream_run_id

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


def remove_leftovers(run_dir: Path) -> None:
    """Partial checkpoint files of killed processes (``.last.pt.<pid>.tmp``) in the run's directory: removed, and said."""
    removed, freed = remove_stale_temporaries(run_dir)
    if removed:
        print(f"removed {removed} partial checkpoint file(s) left by a killed process ({freed} bytes) from {run_dir}", file=sys.stderr)


def with_upstream_weights_here(run_plan: RunPlan, store: Store) -> RunPlan:
    """Initial weights from another run of the store are where that run's best checkpoint is now: the
    store may have moved since the plan recorded their path (their sha256 is checked all the same)."""
    weights = run_plan.weights
    upstream = upstream_run_id(weights.source) if weights is not None and weights.kind == "run" else None
    record = store.query.checkpoints(upstream).get("best") if upstream else None
    if record is None:
        return run_plan
    return replace(run_plan, weights=replace(weights, path=str(record["path"])))  # type: ignore[arg-type]


def resumed_plan(row: dict[str, Any], registries: Registries, store: Store) -> RunPlan:
    """The plan a stored run goes on with: the one it was trained with, beating at this process's interval."""
    # the heartbeat of the process that trains now, which may not be the one that started the run
    run_plan = with_upstream_weights_here(replace(stored_plan(row, registries), heartbeat_s=heartbeat_interval()), store)
    if run_plan.spec_hash != row["spec_hash"]:
        raise RunnerError(f"run {row['id']}: its spec no longer resolves to the same experiment (has the data or a plugin changed?)")
    return run_plan


def resumed_columns(state: dict[str, Any] | None) -> dict[str, Any]:
    """The run's progress columns as of its last checkpoint (nothing when training starts over)."""
    history = state["history"] if state else []
    return {"best_epoch": state["early_stopping"]["best_epoch"] if state else None,
            "best_val_accuracy": max((h["val_accuracy"] for h in history if h["val_accuracy"] is not None), default=None)}


def check_processes(run_id: str, run_plan: RunPlan, collective: Collective) -> None:
    """A run continues on as many processes as it started with: the global batch, and so the training, depend on it."""
    trained = run_plan.distributed.world_size if run_plan.distributed.backend else None
    if trained == collective.planned_world_size:
        return
    if trained is None:
        raise RunnerError(f"run {run_id} was trained by one process: resume it without --nproc or torchrun")
    raise RunnerError(f"run {run_id} was trained by {trained} processes (global batch {run_plan.distributed.global_batch_size}): "
                      f"resume it with --nproc {trained} (or torchrun with {trained} processes)")


def resume_run(run_id: str, store: Store | None, registries: Registries, quiet: bool = True,
               collective: Collective = ONE_PROCESS) -> RunOutcome:
    """Continue the run ``run_id`` (an id or unique prefix) in ``store`` and return how it ended.

    In a distributed run rank 0 reads the run and its checkpoint and hands both to the other ranks
    (which have no ``store``).
    """

    def read_run() -> tuple[dict[str, Any], RunPlan, Path, dict[str, Any] | None]:
        assert store is not None
        row = store.query.run_row(run_id)
        check_resumable(row)
        run_plan = resumed_plan(row, registries, store)
        check_processes(row["id"], run_plan, collective)
        run_dir = store.artifacts_dir(row, must_exist=bool(store.query.checkpoints(row["id"])))
        return row, run_plan, run_dir, load_last_checkpoint(run_dir)

    row, run_plan, run_dir, state = collective.from_rank0(read_run)
    parts = setup(run_plan, registries, checkpoint=state, verify_weights=True, collective=collective)

    def claim() -> str:
        assert store is not None
        owner = new_owner()
        store.runs.claim_for_resume(row["id"], int(state["epoch"]) if state else 0, run_plan.heartbeat_s, owner=owner,
                                    **resumed_columns(state))
        remove_leftovers(run_dir)
        return owner

    owner = collective.from_rank0(claim)
    return train_run(store, row["id"], owner, run_plan, parts, run_dir, quiet, resume_from=state, collective=collective)


__all__ = ["resume_run", "resumed_plan", "resumed_columns", "check_resumable", "load_last_checkpoint", "remove_leftovers"]
