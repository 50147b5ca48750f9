"""``runner reproduce``: run a stored resolved spec again and compare the runs epoch by epoch.

Identical means bit for bit: every per-epoch metric and every test metric equal as stored floats.
On the CPU with the same versions, a run of the runner reproduces exactly; where the versions
recorded with the original differ from the current ones, the comparison says so first, since a
different torch may legitimately change the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.execute import run_experiment
from runner.plan import stored_plan
from runner.store import Store

if TYPE_CHECKING:
    from runner.registries import Registries

VERSION_FIELDS = {"python": "python_version", "torch": "torch_version", "torchvision": "torchvision_version", "runner": "runner_version"}


@dataclass
class Difference:
    """The first place the reproduction differs from the original."""

    epoch: int | None  # None: the test metrics (or the number of epochs) differ
    metric: str
    original: float | None
    reproduced: float | None

    @property
    def delta(self) -> float | None:
        if self.original is None or self.reproduced is None:
            return None
        return self.reproduced - self.original

    def describe(self) -> str:
        where = f"epoch {self.epoch}" if self.epoch is not None else "test"
        if self.original is None or self.reproduced is None:
            missing = "the reproduction" if self.reproduced is None else "the original"
            return f"differs at {where}: {self.metric} is missing from {missing}"
        return (f"differs at {where}: {self.metric} original {self.original!r}, reproduced {self.reproduced!r} "
                f"(difference {self.delta:+.3g})")

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "metric": self.metric, "original": self.original, "reproduced": self.reproduced, "difference": self.delta}


@dataclass
class Reproduction:
    original: str
    reproduction: str
    epochs: int
    difference: Difference | None
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.difference is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "original": self.original, "reproduction": self.reproduction, "identical": self.identical, "epochs": self.epochs,
            "difference": self.difference.as_dict() if self.difference else None, "warnings": self.warnings,
        }


def _by_epoch(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    epochs: dict[int, dict[str, float]] = {}
    for row in rows:
        epochs.setdefault(int(row["epoch"]), {})[row["name"]] = row["value"]
    return epochs


def first_difference(original: dict[int, dict[str, float]], reproduced: dict[int, dict[str, float]],
                     original_test: dict[str, float], reproduced_test: dict[str, float]) -> Difference | None:
    """Epochs in order, metrics by name; then the test metrics. Exact comparison of stored floats."""
    for epoch in sorted(set(original) | set(reproduced)):
        a, b = original.get(epoch, {}), reproduced.get(epoch, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                return Difference(epoch, name, a.get(name), b.get(name))
    for name in sorted(set(original_test) | set(reproduced_test)):
        if original_test.get(name) != reproduced_test.get(name):
            return Difference(None, name, original_test.get(name), reproduced_test.get(name))
    return None


def _plugin_versions(row: dict[str, Any]) -> dict[str, str | None]:
    return {p["plugin"]: p.get("version") for p in json.loads(row.get("plugins_json") or "[]")}


def _processes(row: dict[str, Any]) -> str:
    distributed = json.loads(row.get("settings_json") or "{}").get("distributed") or {}
    if not distributed.get("backend"):
        return "1 (no torchrun)"
    return f"{distributed['world_size']} ({distributed['backend']})"


def version_warnings(original: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per recorded version (Python, torch, torchvision, runner, each plugin) or device that changed."""
    lines = []
    for label, column in VERSION_FIELDS.items():
        if original.get(column) != current.get(column):
            lines.append(f"{label} was {original.get(column)} for run {original['id']}, now {current.get(column)}")
    if original.get("device") != current.get("device"):
        lines.append(f"device was {original.get('device')} for run {original['id']}, now {current.get('device')}")
    if _processes(original) != _processes(current):  # reproduce trains in one process: other batches
        lines.append(f"processes were {_processes(original)} for run {original['id']}, now {_processes(current)}")
    before, now = _plugin_versions(original), _plugin_versions(current)
    for plugin in sorted(set(before) | set(now)):
        if before.get(plugin) != now.get(plugin):
            lines.append(f"plugin {plugin} was {before.get(plugin, 'absent')} for run {original['id']}, now {now.get(plugin, 'absent')}")
    return lines


def reproduce_run(store: Store, run_id: str, registries: Registries, quiet: bool = True) -> Reproduction:
    """Train the run's stored resolved spec into a new run of the same store, and compare the two."""
    original = store.query.run_row(run_id)
    run_id = original["id"]
    original_plan = stored_plan(original, registries)
    outcome = run_experiment(original_plan.spec, store=store, quiet=quiet, registries=registries, base_dir=original_plan.spec_dir)
    store.manage.add_tags(outcome.run_id, [f"reproduces:{run_id}"])  # so the pair can be found later
    reproduced = store.query.run_row(outcome.run_id)
    epochs = store.query.epoch_metrics([run_id, outcome.run_id])
    difference = first_difference(
        _by_epoch([r for r in epochs if r["run_id"] == run_id]),
        _by_epoch([r for r in epochs if r["run_id"] == outcome.run_id]),
        store.query.split_metrics(run_id).get("test", {}),
        store.query.split_metrics(outcome.run_id).get("test", {}),
    )
    return Reproduction(run_id, outcome.run_id, int(reproduced["epochs_run"] or 0), difference, version_warnings(original, reproduced))


__all__ = ["reproduce_run", "Reproduction", "Difference", "first_difference", "version_warnings"]
