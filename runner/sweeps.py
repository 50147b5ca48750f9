"""Sweeps: many runs from one spec, expanded, checked whole and queued in the store before any training.

A spec becomes a sweep with two top-level sections (or the flags ``--sweep KEY=V1,V2`` and ``--seeds``)::

    seeds: 3                       # or [0, 1, 2]: every configuration runs once per seed
    sweep:
      grid: {training.optimizer.lr: [1e-3, 3e-3], data.batch_size: [32, 64]}   # the cross product
      variants:                    # explicit configurations (a model with its own learning rate)
        - {model.name: cnn, training.optimizer.lr: 1e-3}
      random: {n: 4, seed: 0, space: {training.optimizer.weight_decay: {loguniform: [1e-5, 1e-2]}}}
      max_attempts: 2              # a failed or lost run is started at most this often

:func:`expand` is a pure function: grid × variants × random samples × seeds, in that order, the same
runs in the same order for the same sweep. :func:`check_runs` plans every expanded spec
(:func:`runner.plan.plan`, weights not read) so one bad combination stops the sweep before anything
is queued, naming the combination and the key. :func:`queue_sweep` stores the sweep and its runs
``queued`` (or finds the same sweep again and requeues what did not complete); :func:`run_sweep`
then trains upstream experiments once and lets workers (:mod:`runner.workers`) empty the queue.

Importing this module does not import torch: planning and training load it when they run.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner.errors import RunnerError, SpecError
from runner.launchers import LauncherSection, launcher_section, start_workers
from runner.spec import SWEEP_SECTIONS, Spec, apply_overrides, parse_yaml, read_mapping, set_key, validate_mapping
from runner.store import Store
from runner.store.queue import QueuedRun, SweepRecord
from runner.sweep_progress import SweepDisplay, combination_label, outcome_lines, status_counts

if TYPE_CHECKING:
    from runner.plan import RunPlan
    from runner.registries import Registries


class SweepError(SpecError):
    """A sweep that cannot be expanded or has a combination that is not a valid spec (exit code 2)."""


# ------------------------------------------------------------------------------------------
# The sweep sections


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Where a random sample draws one key's value from: exactly one of the four."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    choice: Optional[list[Any]] = Field(None, min_length=1)
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    integer: Optional[tuple[int, int]] = Field(None, alias="int")  # inclusive bounds

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [name for name in ("choice", "uniform", "loguniform", "integer") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice: [...], uniform: [a, b], loguniform: [a, b], int: [a, b]")
        low_high = getattr(self, given[0]) if given[0] != "choice" else None
        if low_high is not None and not low_high[0] <= low_high[1]:
            raise ValueError(f"{given[0].replace('integer', 'int')}: the low end must not exceed the high end")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: both ends must be positive")
        return self

    def sample(self, rng: random.Random) -> Any:
        """One value; floats keep 6 significant digits, so specs and labels stay readable (and still differ)."""
        if self.choice is not None:
            return rng.choice(self.choice)
        if self.integer is not None:
            return rng.randint(*self.integer)
        if self.uniform is not None:
            return float(f"{rng.uniform(*self.uniform):.6g}")
        low, high = self.loguniform  # type: ignore[misc]
        return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.6g}")


class RandomSection(_Strict):
    n: int = Field(gt=0)
    seed: int = 0
    space: dict[str, Distribution] = Field(min_length=1)


class SweepSection(_Strict):
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)
    random: Optional[RandomSection] = None
    max_attempts: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _non_empty(self) -> "SweepSection":
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
        for i, variant in enumerate(self.variants):
            if not variant:
                raise ValueError(f"variants[{i}]: an empty variant")
        return self


def _section_error(exc: ValidationError, label: str) -> SweepError:
    """The first problem of the sweep section as one line, with a "did you mean" for unknown keys."""
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"]]
    key = ".".join(["sweep", *loc])
    if error["type"] == "extra_forbidden":
        fields = {1: SweepSection.model_fields, 2: RandomSection.model_fields}.get(len(loc), Distribution.model_fields)
        close = difflib.get_close_matches(loc[-1], list(fields), n=1)
        hint = f"; did you mean {'.'.join(['sweep', *loc[:-1], close[0]])!r}?" if close else ""
        return SweepError(f"{label}: unknown key {key!r}{hint}")
    return SweepError(f"{label}: {key}: {error['msg'].removeprefix('Value error, ')}")


def parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    """``seeds:``: a list of integers, or an integer N meaning 0..N-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SweepError(f"{where}: give a positive number of seeds or a list of seeds, got {value}")
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise SweepError(f"{where}: a seed is listed twice: {value}")
        return tuple(value)
    raise SweepError(f"{where}: give a number of seeds (3 means 0, 1, 2) or a list of integers, got {value!r}")


def parse_seeds_flag(text: str) -> tuple[int, ...]:
    """``--seeds 3`` (0, 1, 2) or ``--seeds 0,1,5``."""
    value = parse_yaml(f"[{text}]" if "," in text else text, source="--seeds")
    return parse_seeds(value, "--seeds")


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """``--sweep training.optimizer.lr=1e-3,3e-3`` → ("training.optimizer.lr", [0.001, 0.003]); values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise SweepError(f"--sweep expects KEY=VALUE[,VALUE...], got {text!r}")
    values = parse_yaml(f"[{raw}]", source=f"--sweep {key.strip()}")
    return key.strip(), list(values)


# ------------------------------------------------------------------------------------------
# The sweep and its expansion


@dataclass(frozen=True)
class SweepDocument:
    """A sweep as read: the base spec (overrides applied) and what varies over it."""

    base: dict[str, Any]
    section: SweepSection
    seeds: tuple[int, ...] | None  # None: every configuration runs once, with the base spec's seed
    label: str  # the spec file, for messages
    base_dir: str  # where the spec's relative paths point
    launcher: LauncherSection = field(default_factory=LauncherSection)  # where its workers run (not part of the sweep)

    @property
    def name(self) -> str:
        return str(self.base.get("name", "experiment"))

    @property
    def keys(self) -> tuple[str, ...]:
        """The swept spec keys in order: grid, then variants, then random (the seed aside)."""
        variant_keys = [key for variant in self.section.variants for key in variant]
        random_keys = list(self.section.random.space) if self.section.random else []
        return tuple(dict.fromkeys([*self.section.grid, *variant_keys, *random_keys]))

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.base, "sweep": self.section.model_dump(mode="json", exclude_none=True, by_alias=True), "seeds": self.seeds}


def load_sweep(source: str | Path | dict[str, Any], overrides: Sequence[str] = (), grid_flags: Sequence[str] = (),
               seeds_flag: str | None = None, max_attempts: int | None = None, base_dir: str | None = None) -> SweepDocument | None:
    """The sweep a spec and the command line describe, or None for a plain spec (one run)."""
    raw, label = read_mapping(source)
    sections = {key: raw.pop(key) for key in SWEEP_SECTIONS if key in raw}
    if not sections and not grid_flags and seeds_flag is None:
        return None
    launcher = launcher_section(raw.pop("launcher", None), label)
    raw = apply_overrides(raw, list(overrides))
    try:
        section = SweepSection.model_validate(sections.get("sweep") or {})
    except ValidationError as exc:
        raise _section_error(exc, label) from None
    for flag in grid_flags:  # the command line adds keys to the grid, or replaces the spec's values of one
        key, values = parse_grid_flag(flag)
        section.grid[key] = values
    if max_attempts is not None:
        section.max_attempts = max_attempts
    if seeds_flag is not None:
        seeds: tuple[int, ...] | None = parse_seeds_flag(seeds_flag)
    elif "seeds" in sections:
        seeds = parse_seeds(sections["seeds"], f"{label}: seeds")
    else:
        seeds = None
    if base_dir is None:
        base_dir = str(Path(source).parent) if isinstance(source, (str, Path)) else "."
    document = SweepDocument(raw, section, seeds, label, base_dir, launcher)
    _check_keys(document)
    return document


def _check_keys(document: SweepDocument) -> None:
    """A key varies in one place only: in the grid, the variants or the random space; ``seed`` only through ``seeds``."""
    section = document.section
    places = {"grid": set(section.grid), "variants": {k for v in section.variants for k in v},
              "random": set(section.random.space) if section.random else set()}
    for (first, a), (second, b) in itertools.combinations(places.items(), 2):
        both = sorted(a & b)
        if both:
            raise SweepError(f"{document.label}: sweep key {both[0]!r} is in both {first} and {second}; give it in one place")
    if document.seeds is not None and "seed" in document.keys:
        raise SweepError(f"{document.label}: sweep key 'seed' and seeds are both given; use seeds")


@dataclass(frozen=True)
class ExpandedRun:
    """One run of a sweep: its place (from 1), the swept values it has, and its spec mapping."""

    index: int
    combination: dict[str, Any]
    seed: int | None  # None: the base spec's seed
    raw: dict[str, Any] = field(repr=False)

    @property
    def label(self) -> str:
        return combination_label(self.combination, self.seed)


def random_samples(section: RandomSection | None) -> list[dict[str, Any]]:
    """``n`` draws from the random space, from a generator seeded with its ``seed`` (the same every time)."""
    if section is None:
        return [{}]
    rng = random.Random(section.seed)
    return [{key: distribution.sample(rng) for key, distribution in section.space.items()} for _ in range(section.n)]


def expand(document: SweepDocument) -> list[ExpandedRun]:
    """Every run of the sweep, in order: grid (cross product, keys in order) × variants × random samples × seeds."""
    section = document.section
    grid = [dict(zip(section.grid, values)) for values in itertools.product(*section.grid.values())]
    configurations = [{**g, **v, **r} for g in grid for v in section.variants or [{}] for r in random_samples(section.random)]
    runs = []
    for combination in configurations:
        for seed in document.seeds if document.seeds is not None else (None,):
            raw = json.loads(json.dumps(document.base))
            for key, value in combination.items():
                set_key(raw, key.split("."), value, what="sweep key")
            if seed is not None:
                raw["seed"] = seed
            runs.append(ExpandedRun(len(runs) + 1, combination, seed, raw))
    return runs


# ------------------------------------------------------------------------------------------
# Checking every run before anything is queued


@dataclass(frozen=True)
class PlannedRun:
    """An expanded run that passed planning: its resolved spec, as it is queued."""

    run: ExpandedRun
    spec: Spec  # resolved by the plan: defaults, evaluation transforms and class count filled in
    spec_hash: str

    @property
    def seed(self) -> int:
        return self.spec.seed


def check_runs(document: SweepDocument, runs: Sequence[ExpandedRun], registries: Registries) -> list[PlannedRun]:
    """Plan every run (weights not read); the first that fails is a :class:`SweepError` naming its combination."""
    from runner.plan import plan

    loaded: dict[str, Any] = {}  # runs that share their data section share the loaded dataset
    planned = []
    for run in runs:
        where = f"{document.label}: run {run.index} of {len(runs)} ({run.label})"
        try:
            spec = validate_mapping(run.raw, where)
            run_plan: RunPlan = plan(spec, registries, base_dir=document.base_dir, read_weights=False,
                                     data=_shared_data(loaded, spec, registries, document.base_dir))
        except SweepError:
            raise
        except SpecError as exc:
            message = str(exc)
            raise SweepError(message if message.startswith(where) else f"{where}: {message}") from None
        except RunnerError as exc:
            raise SweepError(f"{where}: {exc}") from None
        planned.append(PlannedRun(run, run_plan.spec, run_plan.spec_hash))
    return planned


def _shared_data(loaded: dict[str, Any], spec: Spec, registries: Registries, base_dir: str) -> Any:
    from runner.data import load_data

    data = spec.data
    key = json.dumps([data.dataset, data.options, data.classes, data.on_corrupt], sort_keys=True, default=str)
    if key not in loaded:
        loaded[key] = load_data(spec, registries, base_dir)
    return loaded[key]


def sweep_hash(planned: Sequence[PlannedRun]) -> str:
    """What identifies a sweep: its runs, in order (label and spec hash each). Speed settings, which
    are not part of a spec hash, do not make another sweep."""
    canonical = json.dumps([[p.run.label, p.spec_hash] for p in planned], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sweep_record(document: SweepDocument, planned: Sequence[PlannedRun]) -> SweepRecord:
    return SweepRecord(
        name=document.name, spec_hash=sweep_hash(planned), spec_json=json.dumps(document.to_json(), sort_keys=True),
        spec_dir=str(Path(document.base_dir).resolve()), keys=document.keys, max_attempts=document.section.max_attempts,
    )


def queued_run(planned: PlannedRun) -> QueuedRun:
    spec = planned.spec
    return QueuedRun(
        index=planned.run.index, name=spec.name, spec_yaml=spec.to_yaml(), spec_json=json.dumps(spec.resolved(), sort_keys=True),
        spec_hash=planned.spec_hash, model=spec.model.name, strategy=spec.training.strategy.name, dataset=spec.data.dataset,
        seed=spec.seed, combination=planned.run.combination,
    )


@dataclass(frozen=True)
class QueuedSweep:
    sweep_id: str
    created: bool  # False: the same sweep was stored before and continues
    requeued: dict[str, list[str]]  # status → runs put back in the queue (a sweep that continues)


def queue_sweep(store: Store, document: SweepDocument, planned: Sequence[PlannedRun]) -> QueuedSweep:
    """Store the sweep with its runs ``queued``; the same sweep stored before continues: what did not
    complete is requeued (:meth:`runner.store.queue.RunQueue.requeue`), completed runs stay as they are."""
    sweep_id, created = store.queue.enqueue(sweep_record(document, planned), [queued_run(p) for p in planned])
    requeued = {} if created else store.queue.requeue(sweep_id)
    return QueuedSweep(sweep_id, created, requeued)


# ------------------------------------------------------------------------------------------
# Running a sweep


def prepare_shared_inputs(document: SweepDocument, planned: Sequence[PlannedRun], store: Store, registries: Registries,
                          quiet: bool = True) -> None:
    """What several runs need and one process must make: upstream experiments (trained once, before
    any worker starts) and named pretrained weights (downloaded once)."""
    from runner.execute import ensure_upstream, fetch_named_weights
    from runner.upstream import experiment_chain, upstream_experiment

    seen: set[Any] = set()
    for run in planned:
        spec = run.spec
        upstream = upstream_experiment(spec, document.base_dir)
        if upstream is not None and upstream.resolve() not in seen:
            seen.add(upstream.resolve())
            experiment_chain(spec, document.base_dir)  # a cycle fails before any work
            ensure_upstream(spec, store, registries, document.base_dir, quiet)
        weights = (spec.model.name, spec.model.weights) if isinstance(spec.model.weights, str) else None
        if weights is not None and weights not in seen:
            seen.add(weights)
            fetch_named_weights(spec, registries)


class SweepInterrupted(KeyboardInterrupt):
    """A stop signal ended the sweep: running runs are stored ``interrupted``, queued ones stay queued."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SweepOutcome:
    sweep_id: str
    name: str
    rows: list[dict[str, Any]]  # the sweep's runs (RunQueue.sweep_runs)
    problems: list[str]  # workers that ended other than as designed

    @property
    def exit_code(self) -> int:
        """0 when every run of the sweep completed, else 1."""
        return 0 if self.rows and all(row["status"] == "completed" for row in self.rows) else 1

    def lines(self) -> list[str]:
        return [*outcome_lines(self.name, self.sweep_id, self.rows), *self.problems]


def plan_sweep(document: SweepDocument, registries: Registries) -> list[PlannedRun]:
    """Every run of the sweep, expanded and checked (nothing is stored)."""
    return check_runs(document, expand(document), registries)


def run_sweep(document: SweepDocument, planned: Sequence[PlannedRun], store: Store, registries: Registries, *, jobs: int = 1,
              devices: Sequence[str] = (), quiet: bool = True) -> SweepOutcome:
    """Queue the sweep (or continue it), train shared upstream experiments once, and let ``jobs``
    workers empty its queue: in this process for one local job, else as worker processes of the
    sweep's launcher (``document.launcher``: here, a Slurm job array, Ray tasks)."""
    queued = queue_sweep(store, document, planned)
    rows = store.queue.sweep_runs(queued.sweep_id)
    if not quiet:
        print(_queued_line(document.name, queued, rows), file=sys.stderr)
    waiting = {row["sweep_index"] for row in rows if row["status"] == "queued"}
    problems: list[str] = []
    if waiting:
        prepare_shared_inputs(document, [p for p in planned if p.run.index in waiting], store, registries, quiet)
        problems = execute_queue(store, registries, queued.sweep_id, document.name, jobs=min(jobs, len(waiting)),
                                 devices=devices, quiet=quiet, launcher=document.launcher)
    return SweepOutcome(queued.sweep_id, document.name, store.queue.sweep_runs(queued.sweep_id), problems)


def _queued_line(name: str, queued: QueuedSweep, rows: list[dict[str, Any]]) -> str:
    if queued.created:
        return f"sweep {name} ({queued.sweep_id}): {len(rows)} runs queued"
    again = ", ".join(f"{len(ids)} {status}" for status, ids in queued.requeued.items() if ids)
    counts = ", ".join(f"{count} {status}" for status, count in status_counts(rows).items())
    return f"sweep {name} ({queued.sweep_id}) continues: {counts}" + (f" (requeued: {again})" if again else "")


def execute_queue(store: Store, registries: Registries, sweep_id: str, name: str, *, jobs: int, devices: Sequence[str] = (),
                  quiet: bool = True, launcher: LauncherSection | None = None) -> list[str]:
    """Workers empty the sweep's queue under one progress display; what went wrong with worker processes.

    A stop signal stops the workers (their runs are stored ``interrupted``) and raises :class:`SweepInterrupted`.
    """
    from runner.workers import wait_for, work

    launcher = launcher or LauncherSection()
    display = SweepDisplay(store, sweep_id, name, quiet=quiet)
    try:
        if launcher.name == "local" and jobs == 1 and not devices:
            with display.polling():
                work(store, registries, sweep_id=sweep_id)
            return []
        workers = start_workers(store, sweep_id, jobs, launcher, devices)
        try:
            wait_for(workers, display.refresh)
            return workers.problems()
        finally:
            workers.close()
    except KeyboardInterrupt as exc:  # a worker's RunInterrupted says how by its exit code
        signal_name = getattr(exc, "signal_name", None) or ("SIGTERM" if getattr(exc, "exit_code", 130) == 143 else "SIGINT")
        counts = status_counts(store.queue.sweep_runs(sweep_id))
        left = ", ".join(f"{counts[s]} {s}" for s in ("interrupted", "queued") if counts.get(s))
        raise SweepInterrupted(f"sweep {name} ({sweep_id}) interrupted by {signal_name}" + (f": {left}" if left else "")
                               + "; run the same command again to continue", 143 if signal_name == "SIGTERM" else 130) from None
    finally:
        display.close()


__all__ = [
    "SweepInterrupted", "SweepOutcome", "plan_sweep", "run_sweep", "execute_queue",
    "SweepError", "SweepSection", "SweepDocument", "ExpandedRun", "PlannedRun", "QueuedSweep",
    "load_sweep", "expand", "check_runs", "queue_sweep", "prepare_shared_inputs",
    "parse_grid_flag", "parse_seeds_flag", "sweep_hash",
]
