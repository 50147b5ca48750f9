"""runner: a plugin-based deep-learning experiment runner for image classification.

The Python API works on the same results store and runs as the command line::

    import runner

    run = runner.run("experiments/quickstart.yaml", ["training.epochs=2"], db="results.db")
    print(run.id, run.status, run.test["accuracy"])

    loaded = runner.load_model(run.id, db="results.db")   # loaded.model: torch.nn.Module in eval mode
    print(loaded.class_names)
    runner.predict(run.id, ["digit.png"], db="results.db")  # [{"path": …, "top": [{"class": …, "prob": …}]}]

    runner.runs(db="results.db")              # pandas DataFrame, one row per run
    runner.metrics(run.id, db="results.db")   # pandas DataFrame, one row per run and epoch

Every function takes ``db`` (a path or URL; default ``RUNNER_DB`` or ``results.db``, as for the
CLI) and raises :class:`RunnerError` subclasses for bad input. Importing ``runner`` stays light:
torch, pandas and the store load inside the functions that need them. Functions that build models
take ``registries`` (from :func:`runner.registries.load_registries`) to reuse loaded plugins; without
it they load them once per call and report plugins that failed to load as warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from runner.errors import RunnerError
    from runner.inference import RunModel
    from runner.registries import Registries
    from runner.spec import Spec
    from runner.store import Store

from runner.version import __version__

__all__ = [
    "__version__",
    "Run",
    "RunModel",
    "RunnerError",
    "Spec",
    "evaluate",
    "get_run",
    "load_model",
    "metrics",
    "predict",
    "run",
    "runs",
]

# Names served from submodules on first use, so `import runner` (and `runner --help`) stays fast.
_LAZY = {"RunModel": "runner.inference", "RunnerError": "runner.errors", "Spec": "runner.spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


@dataclass(frozen=True)
class Run:
    """One stored run, as ``runner show --format json`` describes it."""

    id: str
    name: str
    status: str
    model: str
    seed: int
    epochs_run: int
    best_epoch: int | None
    best_val_accuracy: float | None
    test: dict[str, float]  # loss, accuracy, f1_macro on the test split ({} until completed)
    class_names: list[str]
    tags: list[str]
    spec: dict[str, Any]  # the resolved spec
    db: str = field(repr=False)  # the store's URL (it may hold a password: left out of the repr)
    details: dict[str, Any] = field(repr=False, default_factory=dict)  # everything `runner show` prints

    @classmethod
    def from_details(cls, details: dict[str, Any], db: str) -> "Run":
        return cls(
            id=details["id"], name=details["name"], status=details["status"], model=details["model"], seed=details["seed"],
            epochs_run=details["epochs_run"], best_epoch=details["best_epoch"], best_val_accuracy=details["best_val_accuracy"],
            test=dict(details["test"] or {}), class_names=list(details["class_names"]), tags=list(details.get("tags", [])),
            spec=details["spec"], db=db, details=details,
        )


def _store(db: str | Path | None, create: bool = False) -> Store:
    from runner.store import Store

    return Store(db, create=create)


def _registries(given: Registries | None) -> Registries:
    """The caller's registries, or the plugins loaded now (a plugin that failed to load is a warning)."""
    import warnings

    from runner import exit_hook
    from runner.registries import load_registries

    exit_hook.install()  # torch is about to load: skip ~1 s of garbage collection at exit (RUNNER_FAST_EXIT=0: off)
    if given is not None:
        return given
    registries = load_registries()
    for problem in registries.problems:
        warnings.warn(str(problem), RuntimeWarning, stacklevel=3)
    return registries


def run(
    spec: str | Path | Mapping[str, Any] | Spec,
    overrides: Sequence[str] = (),
    *,
    db: str | Path | None = None,
    artifacts: str | Path | None = None,
    device: str | None = None,
    quiet: bool = True,
    registries: Registries | None = None,
) -> Run:
    """Train an experiment and return its stored run.

    :param spec: a YAML file path, a mapping with the same keys, or a typed :class:`Spec`.
    :param overrides: dotted ``key=value`` overrides, as ``--set`` takes them (``"training.epochs=3"``).
    :param db: the results store (created if missing); ``artifacts``: where checkpoints go (default
        ``RUNNER_ARTIFACTS``, else ``runs/`` beside an SQLite file; required for a server store).
    :param device: overrides the spec's device (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``).
    :raises TrainingFailed: training raised; the run is stored as failed.
    """
    from runner.performance import contention_defaults

    contention_defaults()  # when torch is not loaded yet: OpenMP threads that sleep while they wait
    from runner import import_gc
    from runner.errors import RunnerError
    from runner.store import Store, artifacts_required, resolve_url

    with import_gc.paused():
        from runner.execute import run_experiment

    reason = artifacts_required(resolve_url(db), artifacts)  # a server store needs an artefact directory, before any work
    if reason is not None:
        raise RunnerError(reason)
    store = Store(db, artifacts=artifacts, create=True)
    source = dict(spec) if isinstance(spec, Mapping) else spec
    outcome = run_experiment(source, list(overrides), store=store, registries=_registries(registries), device=device, quiet=quiet)
    return get_run(outcome.run_id, db=store.url)


def get_run(run_id: str, *, db: str | Path | None = None) -> Run:
    """A stored run by id (or a unique prefix of one)."""
    from runner.reports import run_details

    store = _store(db)
    return Run.from_details(run_details(store, run_id), store.url)


def load_model(run_id: str, *, db: str | Path | None = None, checkpoint: str = "best", device: str | None = None,
               registries: Registries | None = None) -> RunModel:
    """A run's trained model (eval mode), class names and evaluation preprocessing.

    :param checkpoint: ``best`` (default) or ``last``.
    :param device: where the model goes (default: ``cpu`` for a run trained on the CPU, else the best available).
    :returns: a :class:`RunModel`: ``.model``, ``.class_names``, ``.preprocess(pil_image)``, ``.probabilities(batch)``.
    """
    from runner.inference import load_run_model

    return load_run_model(_store(db), run_id, _registries(registries), checkpoint=checkpoint, device=device)


def evaluate(
    run_id: str,
    *,
    db: str | Path | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    checkpoint: str = "best",
    device: str | None = None,
    registries: Registries | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on its own ``test`` (or ``val``) split, or on other data given as
    ``data.*`` overrides; the result is stored with the run. Keys: split, loss, accuracy, f1_macro, …"""
    from runner.inference import evaluate_run

    return evaluate_run(_store(db), run_id, _registries(registries), split=split, overrides=overrides, checkpoint=checkpoint, device=device)


def predict(
    run_id: str,
    images: Sequence[str | Path],
    *,
    db: str | Path | None = None,
    top_k: int = 5,
    checkpoint: str = "best",
    device: str | None = None,
    registries: Registries | None = None,
) -> list[dict[str, Any]]:
    """Classify image files (directories are searched recursively), preprocessed as at evaluation.

    :returns: one ``{"path": …, "top": [{"class": …, "prob": …}, …]}`` per image, best class first.
    """
    from runner.inference import load_run_model, predict_images

    run_model = load_run_model(_store(db), run_id, _registries(registries), checkpoint=checkpoint, device=device)
    return predict_images(run_model, images, top_k=top_k)


def runs(*, db: str | Path | None = None, status: str | None = None, name: str | None = None, tags: Sequence[str] = (),
         sweep: str | None = None) -> pd.DataFrame:
    """Runs as a pandas DataFrame, newest first: the ``runner runs --format json`` columns.

    :param status: only runs with this status; ``name``: a glob on the run name; ``tags``: runs carrying all of them;
        ``sweep``: the runs of one sweep (its id, id prefix or name).
    """
    import pandas as pd

    from runner.reports import SUMMARY_KEYS, runs_list

    frame = pd.DataFrame(runs_list(_store(db), status=status, name=name, tags=tags, sweep=sweep),
                         columns=[*SUMMARY_KEYS, "started_at", "tags", "sweep_id", "attempts"])
    frame["started_at"] = pd.to_datetime(frame["started_at"])
    return frame


def metrics(run_ids: str | Sequence[str] | None = None, *, db: str | Path | None = None) -> pd.DataFrame:
    """Per-epoch metrics as a pandas DataFrame: one row per run and epoch, one column per metric.

    :param run_ids: a run id, several, or None for every run in the store (ids may be unique prefixes).
    """
    import pandas as pd

    store = _store(db)
    if run_ids is None:
        ids = [row["id"] for row in store.query.runs_table()]
    else:
        ids = [store.query.resolve_run_id(r) for r in ([run_ids] if isinstance(run_ids, str) else run_ids)]
    long = pd.DataFrame(store.query.epoch_metrics(ids), columns=["run_id", "epoch", "name", "value"])
    wide = long.pivot_table(index=["run_id", "epoch"], columns="name", values="value", aggfunc="first")
    wide = wide.reset_index().rename_axis(columns=None)
    order = {run_id: i for i, run_id in enumerate(ids)}
    return wide.sort_values(["run_id", "epoch"], key=lambda col: col.map(order) if col.name == "run_id" else col, ignore_index=True)
