"""How a sweep shows: its runs' labels, one progress display read from the store, its outcome in a few lines.

Workers write only to the store; the display polls it (:meth:`SweepDisplay.refresh`), so N worker
processes give one display, not N interleaved bars. On a terminal it is one tqdm bar (runs done of
all, with the running runs' epochs and the failed and queued counts); elsewhere (a log file, CI) a
line per run as it ends. No torch import.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from typing import Any, TextIO

from runner.lifecycle import heartbeat
from runner.store import Store

ENDED = ("completed", "failed")


def format_value(value: Any) -> str:
    """A swept value as labels show it: text as it is, everything else as compact JSON (0.001, true, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def combination_label(combination: dict[str, Any], seed: int | None = None) -> str:
    """``training.optimizer.lr=0.001 seed=0``: how messages, status tables and reports name a run of a sweep."""
    parts = [f"{key}={format_value(value)}" for key, value in combination.items()]
    return " ".join([*parts, *([f"seed={seed}"] if seed is not None else [])]) or "(the spec as it is)"


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per status, in the order statuses go (a sweep's runs from :meth:`RunQueue.sweep_runs`)."""
    counted = Counter(row["status"] for row in rows)
    order = ("completed", "running", "failed", "interrupted", "lost", "queued")
    return {status: counted[status] for status in order if counted[status]}


def progress_text(rows: list[dict[str, Any]]) -> str:
    """``2 running (3f2a1c epoch 2/5, 9b7e0d epoch 1/5) · 1 failed · 3 queued``."""
    counts = status_counts(rows)
    running = [f"{row['id'][:6]} epoch {min(row['epochs_run'] + 1, row['epochs'])}/{row['epochs']}" for row in rows
               if row["status"] == "running"]
    parts = [f"{len(running)} running ({', '.join(running)})" if running else "0 running"]
    parts += [f"{counts[s]} {s}" for s in ("failed", "interrupted", "lost", "queued") if counts.get(s)]
    return " · ".join(parts)


def run_line(row: dict[str, Any]) -> str:
    """A run of a sweep in one line: id, status, combination, and its result or error."""
    label = combination_label(row["combination"], row["seed"])
    if row["status"] == "completed" and row["test_accuracy"] is not None:
        return f"run {row['id']} completed ({label}): test accuracy {row['test_accuracy']:.4f}"
    detail = f": {row['error']}" if row["status"] == "failed" and row["error"] else ""
    return f"run {row['id']} {row['status']} ({label}){detail}"


class SweepDisplay:
    """The sweep's progress on ``stream``: a bar on a terminal, a line per ended run elsewhere, nothing when quiet."""

    def __init__(self, store: Store, sweep_id: str, name: str, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.store, self.sweep_id, self.name = store, sweep_id, name
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar: Any = None
        self.reported: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def refresh(self) -> None:
        if self.quiet:
            return
        with self._lock:
            self.rows = self.store.queue.sweep_runs(self.sweep_id)
            if self.stream.isatty():
                self._draw_bar()
            else:
                self._print_ended()

    def _draw_bar(self) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=len(self.rows), desc=f"sweep {self.name}", file=self.stream, dynamic_ncols=True,
                            bar_format="{desc}: {n}/{total} runs done |{bar}| {elapsed}{postfix}")
        self.bar.n = sum(1 for row in self.rows if row["status"] in ENDED)
        self.bar.set_postfix_str(progress_text(self.rows), refresh=False)
        self.bar.refresh()

    def _print_ended(self) -> None:
        for row in self.rows:
            if row["status"] in ENDED and row["id"] not in self.reported:
                self.reported.add(row["id"])
                print(f"[{len(self.reported)}/{len(self.rows)}] {run_line(row)}", file=self.stream, flush=True)

    def close(self) -> None:
        self.refresh()
        if self.bar is not None:
            self.bar.close()

    def polling(self, interval: float = 0.5) -> Any:
        """Refresh from a background thread while the block runs (a worker training in this process);
        a refresh that fails (the store busy) is skipped, never raised into training."""
        return heartbeat(self.refresh, interval)


def outcome_lines(name: str, sweep_id: str, rows: list[dict[str, Any]]) -> list[str]:
    """The sweep's end: its counts, then one line per run that did not complete (id, combination, error)."""
    counts = status_counts(rows)
    summary = ", ".join(f"{count} {status}" for status, count in counts.items())
    lines = [f"sweep {name} ({sweep_id}): {len(rows)} runs: {summary}"]
    lines += [run_line(row) for row in rows if row["status"] != "completed"]
    return lines


__all__ = ["SweepDisplay", "combination_label", "format_value", "status_counts", "progress_text", "run_line", "outcome_lines"]
