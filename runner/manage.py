"""Run management: tags, deleting runs, and checkpoint retention (``runner tag|delete|prune``).

Rows go through the store; files are removed here. Deleting removes a run's rows first, in one
transaction, then its files: an interruption in between leaves files without rows (freed by
deleting the directory), never rows that point at missing files. Only files inside the store's own
artefact root are ever removed (:meth:`Store.owns`): a copied store never deletes the original's.
No torch import.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from runner.ages import cutoff
from runner.errors import RunnerError
from runner.files import remove_stale_temporaries, stale_temporaries
from runner.store import Store, utcnow

KEEP_POLICIES = ("best", "last", "both", "all")
_TAG = re.compile(r"^[\w.:+-][\w.:+/-]*$")


class ManageError(RunnerError):
    """A run-management request that cannot be carried out (bad tag, running run)."""


# ------------------------------------------------------------------------------------------
# Tags


def check_tags(tags: Sequence[str]) -> list[str]:
    for tag in tags:
        if not _TAG.match(tag):
            raise ManageError(f"tag {tag!r}: use letters, digits and . _ - + : / (no spaces)")
    return list(dict.fromkeys(tags))


def tag_run(store: Store, run_id: str, add: Sequence[str] = (), remove: Sequence[str] = ()) -> list[str]:
    """Add and remove tags of a run; its tags afterwards."""
    run_id = store.query.resolve_run_id(run_id)
    if add:
        store.manage.add_tags(run_id, check_tags(add))
    if remove:
        store.manage.remove_tags(run_id, list(remove))
    return store.query.tags([run_id]).get(run_id, [])


# ------------------------------------------------------------------------------------------
# Files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove_file(path: Path) -> int:
    """Delete a file; the bytes it held (0 if it was already gone)."""
    size = _size(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def directory_bytes(path: Path) -> int:
    return sum(_size(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# ------------------------------------------------------------------------------------------
# Retention


def checkpoints_to_remove(kinds: Sequence[str], keep: str) -> list[str]:
    """Which of a run's checkpoint kinds a policy drops.

    ``both`` keeps best and last, ``best`` or ``last`` keeps that one, ``all`` keeps everything
    (per-epoch ``epoch-NNN`` files included). The kept kind must exist: a policy never removes a
    run's only remaining model.
    """
    if keep not in KEEP_POLICIES:
        raise ManageError(f"keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    if keep == "all":
        return []
    kept = {"both": ("best", "last"), "best": ("best",), "last": ("last",)}[keep]
    if not any(k in kinds for k in kept):
        return []
    return [k for k in kinds if k not in kept]


def apply_retention(store: Store, run_id: str, keep: str) -> tuple[int, int]:
    """Remove the checkpoints ``keep`` drops from one run: (files removed, bytes freed).

    A file that cannot be removed (permissions) keeps its row and is reported on stderr: the run
    stays usable either way.
    """
    records = store.query.checkpoints(run_id)
    removed = freed = 0
    for kind in checkpoints_to_remove(sorted(records), keep):
        path = records[kind]["path"]
        if not store.owns(path):
            print(f"warning: kept {path}: it is outside the store's artefact root {store.artifacts_root}", file=sys.stderr)
            continue
        try:
            freed += _remove_file(path)
        except OSError as exc:
            print(f"warning: cannot remove {path}: {exc.strerror or exc}", file=sys.stderr)
            continue
        store.manage.remove_checkpoint(run_id, kind)
        removed += 1
    return removed, freed


@dataclass
class PruneResult:
    keep: str
    runs_considered: int
    runs_pruned: list[str] = field(default_factory=list)
    files_removed: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    temporaries_removed: int = 0  # partial files of killed processes (see runner.files.stale_temporaries)
    temporaries_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"keep": self.keep, "runs_considered": self.runs_considered, "runs_pruned": self.runs_pruned,
                "files_removed": self.files_removed, "bytes_freed": self.bytes_freed, "dry_run": self.dry_run,
                "temporaries_removed": self.temporaries_removed, "temporaries_bytes": self.temporaries_bytes}


def prune_candidates(store: Store, keep: str, older_than: str | None = None, now: datetime | None = None) -> dict[str, list[str]]:
    """Completed runs (that ended before ``older_than``, if given) and the checkpoint kinds ``keep`` would drop.

    ``older_than`` is an age (``30d``) or an ISO date (:mod:`runner.ages`). Only completed runs: an
    interrupted, failed or lost run needs its last checkpoint to resume.
    """
    ended_before = cutoff(older_than, "--older-than", now or utcnow()) if older_than else None
    candidates = {}
    for run_id in store.query.completed_runs(ended_before=ended_before):
        kinds = checkpoints_to_remove(sorted(store.query.checkpoints(run_id)), keep)
        if kinds:
            candidates[run_id] = kinds
    return candidates


def prune(store: Store, keep: str = "best", older_than: str | None = None, dry_run: bool = False) -> PruneResult:
    """Apply a retention policy to old completed runs, and remove the partial files killed processes
    left anywhere under the artefact root; how many files and bytes it freed."""
    candidates = prune_candidates(store, keep, older_than)
    result = PruneResult(keep=keep, runs_considered=len(store.query.completed_runs()), dry_run=dry_run)
    if dry_run:
        stale = stale_temporaries(store.artifacts_root)
        result.temporaries_removed, result.temporaries_bytes = len(stale), sum(_size(p) for p in stale)
    else:
        result.temporaries_removed, result.temporaries_bytes = remove_stale_temporaries(store.artifacts_root)
    for run_id, kinds in candidates.items():
        records = store.query.checkpoints(run_id)
        if dry_run:
            result.files_removed += len(kinds)
            result.bytes_freed += sum(_size(records[k]["path"]) for k in kinds)
        else:
            removed, freed = apply_retention(store, run_id, keep)
            result.files_removed += removed
            result.bytes_freed += freed
        result.runs_pruned.append(run_id)
    return result


# ------------------------------------------------------------------------------------------
# Deleting runs


@dataclass
class DeletePlan:
    run_ids: list[str]
    paths: list[Path]  # artefact directories and files outside them, all inside the store's artefact root
    bytes: int
    kept: list[Path] = field(default_factory=list)  # the runs' files outside that root: never deleted


def check_deletable(row: dict[str, object], force: bool) -> None:
    """A run whose process is alive is never deleted; ``force`` deletes one marked running that has no heartbeat to tell."""
    if row["status"] != "running":
        return  # a running run that missed two heartbeats reads as lost
    if row["lost_after"] is not None:
        beat = row["heartbeat_at"]
        last = f"last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC" if isinstance(beat, datetime) else "no heartbeat yet"
        raise ManageError(f"run {row['id']} is running ({last}); stop it first: it can be deleted once it has stopped, "
                          f"or has missed two heartbeats and shows as lost")
    if not force:
        raise ManageError(f"run {row['id']} is running; stop it first (or pass --force if its process is gone)")


def run_files(store: Store, row: dict[str, object]) -> list[Path]:
    """A run's artefact directory (when it is the run's own) and its checkpoint files outside it."""
    directory = store.artifacts_dir(row)
    own = directory if directory.name == row["id"] else None  # never a shared directory a row might name
    paths = [own] if own is not None else []
    for record in store.query.checkpoints(str(row["id"])).values():
        path = record["path"]
        if (own is None or own not in path.parents) and path not in paths:
            paths.append(path)
    return paths


def delete_plan(store: Store, run_ids: Sequence[str], force: bool = False) -> DeletePlan:
    """Resolve ids (prefixes allowed) and find each run's files; a live running run is refused."""
    ids: list[str] = []
    paths: list[Path] = []
    kept: list[Path] = []
    for given in run_ids:
        row = store.query.run_row(given)
        check_deletable(row, force)
        if row["id"] in ids:
            continue
        ids.append(row["id"])
        for path in run_files(store, row):
            (paths if store.owns(path) else kept).append(path)
    total = sum(directory_bytes(p) if p.is_dir() else _size(p) for p in paths)
    return DeletePlan(ids, paths, total, kept)


def delete_runs(store: Store, plan: DeletePlan) -> int:
    """Delete the planned runs' rows (one transaction), then their files; the bytes freed."""
    store.manage.delete_runs(plan.run_ids)
    freed = 0
    for path in plan.paths:
        if path.is_dir():
            size = directory_bytes(path)
            shutil.rmtree(path)
            freed += size
        elif path.exists():
            freed += _remove_file(path)
    return freed


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


__all__ = [
    "KEEP_POLICIES", "ManageError", "tag_run", "apply_retention", "prune", "PruneResult",
    "delete_plan", "delete_runs", "DeletePlan", "human_bytes",
]
