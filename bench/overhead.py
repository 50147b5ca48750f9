"""Where a quickstart run's time goes besides training, measured in-process.

Wraps the results store's methods, checkpoint writing and hashing, the model summary, plugin
loading and preparation with timers, runs ``run_experiment`` on experiments/quickstart.yaml, and
prints each one's seconds and share of the run. The issue's target: the store's work under 1%.

    .venv/bin/python bench/overhead.py [--epochs 8] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "experiments" / "quickstart.yaml"

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
_depth = {"store": 0}


def timed(label: str, function: Callable[..., Any], outermost_store: bool = False) -> Callable[..., Any]:
    """``function`` adding its wall time to ``spent[label]`` (store methods calling each other count once)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if outermost_store:
            _depth["store"] += 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if outermost_store:
                _depth["store"] -= 1
            if not outermost_store or _depth["store"] == 0:
                spent[label] += time.perf_counter() - started
                calls[label] += 1

    return wrapper


def instrument() -> None:
    from runner import execute, registries, training
    from runner.store import Store
    from runner.store.manage import RunManagement
    from runner.store.queries import RunQueries
    from runner.store.runs import RunWriter

    for cls in (Store, RunWriter, RunQueries, RunManagement):  # the store and its store.runs, .query, .manage
        for name, method in list(vars(cls).items()):
            if callable(method) and not name.startswith("__"):
                setattr(cls, name, timed("store (all store methods)", method, outermost_store=True))
    # opening (engine, connection, schema check or creation) apart from the run's reads and writes
    Store.__init__ = timed("store (all store methods)", timed("  of which opening the store", Store.__init__), outermost_store=True)
    training.save_tensors = timed("checkpoint files (torch.save)", training.save_tensors)
    execute.StoreRecorder.checkpoint_saved = timed("checkpoint rows + sha256", execute.StoreRecorder.checkpoint_saved)
    execute.sha256_file = timed("sha256 of checkpoints", execute.sha256_file)
    execute.model_summary = timed("model summary (torchinfo)", execute.model_summary)
    execute.git_commit = timed("git commit lookup", execute.git_commit)
    registries.load_registries = timed("plugin registries", registries.load_registries)
    execute.plan = timed("plan (data, model on meta, checks)", execute.plan)
    execute.build = timed("build (model, weights, loaders)", execute.build)
    training.train_one_epoch = timed("train epochs", training.train_one_epoch)
    training.evaluate = timed("evaluation (val + test)", training.evaluate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    import torch  # noqa: F401 - counted as start-up, apart from the run

    from runner import execute, registries
    from runner.store import Store

    imports_s = time.perf_counter() - started
    instrument()
    overrides = [f"training.epochs={args.epochs}"] if args.epochs else []
    overrides += [f"performance.threads={args.threads}"] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        os.chdir(tmp)
        run_started = time.perf_counter()
        store = Store(Path(tmp) / "results.db")
        execute.run_experiment(SPEC, overrides, store=store, registries=registries.load_registries())
        total = time.perf_counter() - run_started
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; imports before the run: {imports_s:.2f} s")
    print(f"run_experiment (with opening the store): {total:.2f} s")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {label:34} {seconds:8.3f} s  {100 * seconds / total:6.2f}%  ({calls[label]} calls)")
    store_s = spent["store (all store methods)"]
    epochs = calls["train epochs"]
    per_epoch = (store_s - spent["  of which opening the store"]) / max(epochs, 1)
    print(f"store: {store_s:.3f} s in all, {per_epoch * 1000:.1f} ms per epoch besides opening it")
    print(f"store share of the run: {100 * store_s / total:.2f}%")


if __name__ == "__main__":
    main()
