"""Tables of runs built from set-based queries (no torch; pandas only where a report needs it)."""

from __future__ import annotations

import json
from typing import Any

from runner.store import Store

SUMMARY_KEYS = ("id", "name", "status", "seed", "model", "strategy", "epochs_run", "best_val_accuracy", "test_accuracy", "duration_s")


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else value


def runs_list(store: Store, status: str | None = None, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """``runner runs``: the JSON-contract keys first, then when each run started."""
    rows = store.runs_table(status=status, name_glob=name, limit=limit)
    return [{**{k: row[k] for k in SUMMARY_KEYS}, "started_at": _iso(row["started_at"])} for row in rows]


def run_details(store: Store, run_id: str) -> dict[str, Any]:
    """``runner show``: the summary keys plus spec, epochs, test metrics, weights and provenance."""
    row = store.run_row(run_id)
    run_id = row["id"]
    split = store.split_metrics(run_id)
    epochs: dict[int, dict[str, Any]] = {}
    for m in store.epoch_metrics([run_id]):
        epochs.setdefault(m["epoch"], {"epoch": m["epoch"]})[m["name"]] = m["value"]
    test = split.get("test", {})
    details = {
        "id": run_id,
        "name": row["name"],
        "status": row["status"],
        "seed": row["seed"],
        "model": row["model"],
        "strategy": row["strategy"],
        "epochs_run": row["epochs_run"],
        "best_val_accuracy": row["best_val_accuracy"],
        "test_accuracy": test.get("accuracy"),
        "duration_s": row["duration_s"],
        "spec": json.loads(row["spec_json"]),
        "epochs": [epochs[e] for e in sorted(epochs)],
        "test": {k: test[k] for k in ("loss", "accuracy", "f1_macro") if k in test} or None,
        "weights": {"source": row["weights_source"], "sha256": row["weights_sha256"]} if row["weights_source"] else None,
        "best_epoch": row["best_epoch"],
        "stop_reason": row["stop_reason"],
        "spec_hash": row["spec_hash"],
        "dataset": row["dataset"],
        "device": row["device"],
        "host": row["host"],
        "started_at": _iso(row["started_at"]),
        "ended_at": _iso(row["ended_at"]),
        "versions": {
            "python": row["python_version"], "torch": row["torch_version"],
            "torchvision": row["torchvision_version"], "runner": row["runner_version"],
        },
        "git_commit": row["git_commit"],
        "params": {"total": row["params_total"], "trainable": row["params_trainable"]},
        "plugins": json.loads(row["plugins_json"] or "[]"),
        "settings": json.loads(row["settings_json"] or "{}"),
        "class_names": json.loads(row["class_names_json"] or "[]"),
        "confusion_matrix": json.loads(row["confusion_json"]) if row["confusion_json"] else None,
        "checkpoints": {k: {"epoch": c["epoch"], "path": c["path"], "sha256": c["sha256"]} for k, c in store.checkpoints(run_id).items()},
        "error": row["error"],
        "traceback": row["traceback"],
        "model_summary": row["model_summary"],
    }
    return details


def report_frame(store: Store, status: str | None = None, name: str | None = None) -> Any:
    """``runner report``: one row per run, test metrics pivoted into columns."""
    import pandas as pd

    runs = pd.DataFrame(store.runs_table(status=status, name_glob=name))
    if runs.empty:
        return pd.DataFrame(columns=list(SUMMARY_KEYS))
    runs["started_at"] = runs["started_at"].map(_iso)
    return runs[[*SUMMARY_KEYS, "started_at"]]
