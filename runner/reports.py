"""Tables of runs built from set-based queries (no torch; pandas only where a report needs it).

``runner report`` reads two tables (runs and their test-split metrics), each with one SQL query that
applies every filter, and pivots/aggregates them with pandas: the cost does not grow with per-run
Python work, and the 2,000,000 per-epoch metric rows of a big store are never read for a table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from runner.ages import cutoff
from runner.errors import RunnerError
from runner.files import atomic_write_bytes
from runner.store import STATUSES, RunFilter, Store, utcnow

SUMMARY_KEYS = ("id", "name", "status", "seed", "model", "strategy", "epochs_run", "best_val_accuracy", "test_accuracy", "duration_s")
TEST_METRICS = ("loss", "accuracy", "f1_macro")
REPORT_COLUMNS = (
    "id", "name", "status", "model", "weights_source", "strategy", "seed", "epochs_run", "stop_reason",
    "best_val_accuracy", "best_epoch", *(f"test_{m}" for m in TEST_METRICS), "duration_s", "started_at",
)
INTEGER_COLUMNS = ("seed", "epochs_run", "best_epoch")
# the numeric columns a --group-by aggregates (seed and best_epoch are labels, not outcomes)
AGGREGATED_COLUMNS = ("best_val_accuracy", *(f"test_{m}" for m in TEST_METRICS), "epochs_run", "duration_s")
COMPARED_METRICS = ("name", "status", "epochs_run", "stop_reason", "best_val_accuracy", "best_epoch",
                    *(f"test_{m}" for m in TEST_METRICS), "duration_s")

FORMATS = ("table", "csv", "markdown", "html", "json", "parquet", "latex")
FORMAT_BY_EXTENSION = {
    ".txt": "table", ".csv": "csv", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
    ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".tex": "latex", ".latex": "latex",
}
PLOT_EXTENSIONS = (".png", ".svg", ".pdf")


class ReportError(RunnerError):
    """A report request that cannot be met (unknown column, bad date, bad format...)."""


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else value


# ------------------------------------------------------------------------------------------
# runner runs / runner show (JSON contracts: extend, never rename)


def runs_list(store: Store, status: str | None = None, name: str | None = None, limit: int | None = None,
              tags: Sequence[str] = (), sweep: str | None = None) -> list[dict[str, Any]]:
    """``runner runs``: the JSON-contract keys first, then when each run started, its tags, its sweep and its attempts."""
    sweep_id = store.queue.sweep_row(sweep)["id"] if sweep else None
    rows = store.query.runs_table(RunFilter(status=status, name_glob=name, tags=tuple(tags), sweep_id=sweep_id), limit=limit)
    tagged = store.query.tags([row["id"] for row in rows])
    return [{**{k: row[k] for k in SUMMARY_KEYS}, "started_at": _iso(row["started_at"]), "tags": tagged.get(row["id"], []),
             "sweep_id": row["sweep_id"], "attempts": row["attempts"]} for row in rows]


def count_runs(store: Store, status: str | None = None, name: str | None = None, tags: Sequence[str] = ()) -> int:
    """How many runs :func:`runs_list` would list without a limit."""
    return store.query.count_runs(RunFilter(status=status, name_glob=name, tags=tuple(tags)))


def run_details(store: Store, run_id: str) -> dict[str, Any]:
    """``runner show``: the summary keys plus spec, epochs, test metrics, weights and provenance."""
    row = store.query.run_row(run_id)
    run_id = row["id"]
    split = store.query.split_metrics(run_id)
    epochs: dict[int, dict[str, Any]] = {}
    for m in store.query.epoch_metrics([run_id]):
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
        "checkpoints": {k: {"epoch": c["epoch"], "path": str(c["path"]), "sha256": c["sha256"]}
                        for k, c in store.query.checkpoints(run_id).items()},
        "error": row["error"],
        "traceback": row["traceback"],
        "model_summary": row["model_summary"],
        "tags": store.query.tags([run_id]).get(run_id, []),
        "evaluations": [_evaluation(e) for e in store.query.evaluations(run_id)],
        "sweep_id": row["sweep_id"],
        "combination": json.loads(row["combination_json"]) if row["combination_json"] else None,
        "attempts": row["attempts"],
    }
    return details


def _evaluation(row: dict[str, Any]) -> dict[str, Any]:
    """A stored ``runner eval`` result as ``show`` lists it."""
    return {
        "id": row["id"], "created_at": _iso(row["created_at"]), "split": row["split"],
        "checkpoint": row["checkpoint"], "checkpoint_epoch": row["checkpoint_epoch"], "dataset": row["dataset"],
        "overrides": json.loads(row["overrides_json"]), "device": row["device"], "samples": row["samples"],
        "loss": row["loss"], "accuracy": row["accuracy"], "f1_macro": row["f1_macro"],
    }


# ------------------------------------------------------------------------------------------
# runner report: the request, parsed from the command line


@dataclass(frozen=True)
class ReportRequest:
    run_filter: RunFilter = field(default_factory=RunFilter)
    columns: tuple[str, ...] = ()
    sort: tuple[str, ...] = ()  # a leading "-" sorts that column descending
    group_by: tuple[str, ...] = ()

    def spec_keys(self) -> list[str]:
        """Requested names that are not report columns: resolved-spec keys, read with json_extract."""
        names = [*self.columns, *self.group_by, *(s.lstrip("-") for s in self.sort)]
        if self.group_by:  # sorting a grouped table names its output columns, not spec keys
            names = [*self.columns, *self.group_by]
        return list(dict.fromkeys(n for n in names if n not in REPORT_COLUMNS and not n.startswith("test_")))


def split_names(text: str | None) -> tuple[str, ...]:
    """``"a, b,c"`` → ("a", "b", "c")."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """An ISO date or date-time (UTC unless it says otherwise), or an age such as ``7d``, ``12h``, ``2w`` (:mod:`runner.ages`)."""
    return cutoff(text, "--since", now or utcnow()) if text else None


def parse_where(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``model.name=cnn`` → (("model.name", "cnn"),); values are YAML scalars, as with ``--set``."""
    if not items:
        return ()  # without --where, the report need not import the spec's pydantic models and YAML
    from runner.spec import parse_override

    pairs = []
    for item in items:
        if "=" not in item:
            raise ReportError(f"--where expects KEY=VALUE, got {item!r}")
        path, value = parse_override(item)
        pairs.append((".".join(path), value))
    return tuple(pairs)


def make_request(status: str | None = None, name: str | None = None, since: str | None = None, where: Sequence[str] = (),
                 columns: str | None = None, sort: str | None = None, group_by: str | None = None,
                 run_ids: Sequence[str] = (), tags: Sequence[str] = ()) -> ReportRequest:
    """A :class:`ReportRequest` from command-line strings, each checked with a one-line error."""
    if status and status not in STATUSES:
        raise ReportError(f"--status {status!r} is not a run status; choose from {', '.join(STATUSES)}")
    run_filter = RunFilter(status=status, name_glob=name, since=parse_since(since), where=parse_where(where), run_ids=tuple(run_ids),
                           tags=tuple(tags))
    return ReportRequest(run_filter, split_names(columns), split_names(sort), split_names(group_by))


# ------------------------------------------------------------------------------------------
# runner report: building the tables


@dataclass
class Report:
    runs: Any  # DataFrame, one row per run, the requested columns
    groups: Any | None  # DataFrame, one row per group (with --group-by), else None
    run_ids: list[str]  # in report order, whichever columns were asked for
    frame: Any = None  # DataFrame, one row per run, every column (what the groups were computed from)
    columns_chosen: bool = False  # --columns gave the columns and their order

    @property
    def table(self) -> Any:
        """The table a format writes: the groups when grouped, else the runs."""
        return self.groups if self.groups is not None else self.runs


def _check_spec_keys(store: Store, keys: Sequence[str], where: Sequence[tuple[str, Any]]) -> None:
    """Unknown names fail loudly: a typo would otherwise print an empty or blank-column report."""
    if not (keys or where) or not store.query.count_runs():
        return
    for key, _ in where:
        if not store.query.spec_key_exists(key):
            raise ReportError(f"--where {key}: no stored run's resolved spec has the key {key!r} (such as model.name or seed)")
    for key in keys:
        if not store.query.spec_key_exists(key):
            raise ReportError(
                f"unknown column {key!r}: not a report column ({', '.join(REPORT_COLUMNS)}) "
                f"nor a key of any stored resolved spec (such as model.name or training.optimizer.lr)"
            )


def runs_frame(store: Store, run_filter: RunFilter, spec_keys: Sequence[str] = ()) -> Any:
    """Every report column for the filtered runs, newest first, test metrics pivoted into ``test_*``."""
    import pandas as pd

    runs = store.query.report_runs(run_filter, spec_keys)
    metrics = store.query.report_split_metrics(run_filter, "test")
    test = metrics.pivot(index="run_id", columns="name", values="value").add_prefix("test_")
    test.columns.name = None
    for metric in TEST_METRICS:
        if f"test_{metric}" not in test.columns:
            test[f"test_{metric}"] = float("nan")
    frame = runs.join(test.astype("float64"), on="id")
    frame["started_at"] = pd.to_datetime(frame["started_at"]).dt.strftime("%Y-%m-%dT%H:%M:%S")
    for column in INTEGER_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    extra_metrics = sorted(c for c in test.columns if c not in REPORT_COLUMNS)
    ordered = [*REPORT_COLUMNS[:REPORT_COLUMNS.index("duration_s")], *extra_metrics, "duration_s", "started_at"]
    return frame[[*ordered, *(k for k in spec_keys if k not in ordered)]].reset_index(drop=True)


def _unknown(names: Sequence[str], frame: Any, what: str) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ReportError(f"unknown {what} {missing[0]!r}; columns: {', '.join(map(str, frame.columns))}")


def sort_frame(frame: Any, sort: Sequence[str]) -> Any:
    """Sort by ``col`` / ``-col`` names, missing values last; mixed-type columns sort as text."""
    if not sort:
        return frame
    by = [s.lstrip("-") for s in sort]
    _unknown(by, frame, "sort column")
    ascending = [not s.startswith("-") for s in sort]
    try:
        return frame.sort_values(by, ascending=ascending, kind="stable", na_position="last").reset_index(drop=True)
    except TypeError:  # a spec key holding numbers in some runs and text in others
        return frame.sort_values(by, ascending=ascending, kind="stable", na_position="last",
                                 key=lambda s: s.astype(str) if s.dtype == object else s).reset_index(drop=True)


def t_quantile(probability: float, dof: int) -> float:
    """Student's t quantile for whole degrees of freedom (NaN for none), as ``scipy.special.stdtrit(dof, probability)``.

    Groups of runs have whole degrees of freedom, for which the t distribution function has a closed
    form (Abramowitz & Stegun 26.7.3-4, in θ = atan(t / √dof)); bisection in θ solves it to float
    precision. Importing scipy.special for this one quantile took 0.11-0.19 s, a tenth of a grouped
    report on 2,000,000 metric rows (``bench/report_speed.py``); tests check it against scipy.
    """
    if dof < 1 or not 0 < probability < 1:
        return math.nan
    if probability < 0.5:
        return -t_quantile(1 - probability, dof)
    target = 2 * probability - 1  # P(|T| < t)
    low, high = 0.0, math.pi / 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):  # as close as floats get
            break
        if _t_central_probability(middle, dof) < target:
            low = middle
        else:
            high = middle
    return math.sqrt(dof) * math.tan((low + high) / 2)


def _t_central_probability(theta: float, dof: int) -> float:
    """P(|T| < √dof·tan θ) for Student's t with ``dof`` (a whole number >= 1) degrees of freedom."""
    sin, cos_squared = math.sin(theta), math.cos(theta) ** 2
    if dof % 2 == 0:  # sin θ · (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(dof-2) θ)
        term = total = 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * cos_squared
            total += term
        return sin * total
    if dof == 1:
        return 2 * theta / math.pi
    term = total = 1.0  # odd: 2/π · (θ + sin θ cos θ · (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ... up to cos^(dof-3) θ))
    for k in range(1, (dof - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * cos_squared
        total += term
    return 2 / math.pi * (theta + sin * math.cos(theta) * total)


def aggregate(frame: Any, keys: Sequence[str], metrics: Sequence[str]) -> Any:
    """One row per group: the keys, ``n`` runs, and per metric its mean, sample std and 95% CI half-width.

    The interval uses Student's t with (values - 1) degrees of freedom: with three seeds the
    half-width is 4.30 standard errors, not 1.96. A metric a run lacks (a failed run has no test
    accuracy) is left out of that metric's statistics.
    """
    import numpy as np
    import pandas as pd

    values = frame[list(metrics)].astype("float64")
    grouped = values.groupby([frame[k] for k in keys], dropna=False, sort=False)
    count = grouped.count()
    mean, std = grouped.mean(), grouped.std(ddof=1)
    dof = (count - 1).clip(lower=0)
    quantiles = {int(d): t_quantile(0.975, int(d)) for d in np.unique(dof.to_numpy())}
    with np.errstate(invalid="ignore", divide="ignore"):
        ci95 = dof.apply(lambda column: column.map(quantiles)) * std / np.sqrt(count)
    stats = {}
    for metric in metrics:
        stats[f"{metric}_mean"] = mean[metric]
        stats[f"{metric}_std"] = std[metric]
        stats[f"{metric}_ci95"] = ci95[metric].where(count[metric] > 1)
    sizes = frame.groupby([frame[k] for k in keys], dropna=False, sort=False).size().rename("n")
    table = pd.concat([sizes, pd.DataFrame(stats)], axis=1).reset_index()
    table.columns = [*keys, "n", *stats]
    return sort_frame(table, list(keys))


def build_report(store: Store, request: ReportRequest) -> Report:
    """The report's tables for ``request`` (see :class:`ReportRequest`)."""
    spec_keys = request.spec_keys()
    _check_spec_keys(store, spec_keys, request.run_filter.where)
    frame = runs_frame(store, request.run_filter, spec_keys)
    _unknown(request.columns, frame, "column")
    _unknown(request.group_by, frame, "--group-by key")
    groups = None
    if request.group_by:
        metrics = [c for c in frame.columns if c in AGGREGATED_COLUMNS or (c.startswith("test_") and c not in REPORT_COLUMNS)]
        if request.columns:
            metrics = [c for c in metrics if c in request.columns]
        groups = sort_frame(aggregate(frame, request.group_by, metrics), request.sort)
    else:
        frame = sort_frame(frame, request.sort)
    default_columns = [c for c in frame.columns if c in REPORT_COLUMNS or c.startswith("test_")]
    runs = frame[list(request.columns) if request.columns else default_columns]
    return Report(runs=runs, groups=groups, run_ids=frame["id"].tolist(), frame=frame, columns_chosen=bool(request.columns))


# ------------------------------------------------------------------------------------------
# runner report --sweep, --best; runner sweep status / list


def sweep_selection(store: Store, ref: str) -> tuple[str, tuple[str, ...]]:
    """A sweep (id, id prefix or name) as the report selects it: its id and its swept keys."""
    sweep = store.queue.sweep_row(ref)
    return sweep["id"], tuple(json.loads(sweep["keys_json"]))


def for_sweep(request: ReportRequest, sweep_id: str, keys: Sequence[str], group_by_given: bool) -> ReportRequest:
    """The request narrowed to a sweep's runs, grouped by its swept keys unless ``--group-by`` said otherwise
    (by ``name`` for a sweep of seeds only; ``--group-by none`` lists the runs)."""
    group_by = request.group_by if group_by_given else (tuple(keys) or ("name",))
    if group_by == ("none",):
        group_by = ()
    return replace(request, run_filter=replace(request.run_filter, sweep_id=sweep_id), group_by=group_by)


@dataclass(frozen=True)
class Best:
    """The best group by mean of a metric, beside the runner-up, and whether the two differ beyond noise."""

    metric: str
    lowest: bool  # lower is better (``--best -val_loss``)
    keys: tuple[str, ...]
    best: dict[str, Any]  # the group's row of the grouped table
    runner_up: dict[str, Any] | None
    p_value: float | None  # Welch's t-test of the two groups' values; None when either has fewer than two

    def _describe(self, row: dict[str, Any]) -> str:
        from runner.sweep_progress import combination_label

        mean, ci = row[f"{self.metric}_mean"], row[f"{self.metric}_ci95"]
        interval = f" ± {ci:.4g} (95% CI, n={row['n']})" if ci is not None and ci == ci else f" (n={row['n']}, no interval)"
        return f"{combination_label({k: row[k] for k in self.keys})}: {mean:.4g}{interval}"

    def lines(self) -> list[str]:
        direction = "lowest" if self.lowest else "highest"
        lines = [f"best by mean {self.metric} ({direction}): {self._describe(self.best)}"]
        if self.runner_up is None:
            return [*lines, "no runner-up: one configuration has the metric"]
        lines.append(f"runner-up: {self._describe(self.runner_up)}")
        difference = abs(self.best[f"{self.metric}_mean"] - self.runner_up[f"{self.metric}_mean"])
        if self.p_value is None:
            verdict = "too few runs to test it (a configuration has fewer than two)"
        elif self.p_value >= 0.05:
            verdict = f"Welch's t-test p = {self.p_value:.3g}: within noise"
        else:
            verdict = f"Welch's t-test p = {self.p_value:.3g}: beyond noise (p < 0.05)"
        return [*lines, f"difference {difference:.4g}; {verdict}"]

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "lowest": self.lowest, "best": self.best, "runner_up": self.runner_up, "p_value": self.p_value}


def best_group(report: Report, keys: Sequence[str], choice: str) -> Best:
    """``--best METRIC`` (highest mean) or ``--best -METRIC`` (lowest) over the report's groups."""
    if report.groups is None:
        raise ReportError("--best compares configurations: give --group-by KEY (a --sweep report groups by its swept keys)")
    lowest, metric = choice.startswith("-"), choice.lstrip("-")
    column = f"{metric}_mean"
    if column not in report.groups.columns:
        metrics = [c.removesuffix("_mean") for c in report.groups.columns if c.endswith("_mean")]
        raise ReportError(f"--best {metric}: not a metric of the report; choose from {', '.join(metrics)}")
    ranked = report.groups.dropna(subset=[column]).sort_values(column, ascending=lowest, kind="stable")
    if ranked.empty:
        raise ReportError(f"--best {metric}: no configuration has a value of it (have its runs completed?)")
    rows = frame_records(ranked.head(2))
    best, runner_up = rows[0], rows[1] if len(rows) > 1 else None
    p_value = None
    if runner_up is not None:
        samples = [_group_values(report.frame, keys, row, metric) for row in (best, runner_up)]
        if min(len(values) for values in samples) >= 2:
            p_value = welch_p_value(*samples)
    return Best(metric, lowest, tuple(keys), best, runner_up, p_value)


def welch_p_value(first: Sequence[float], second: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test, as ``scipy.stats.ttest_ind(first, second, equal_var=False).pvalue``.

    The statistic and its Welch-Satterthwaite degrees of freedom are scipy's formulas; only the t
    distribution comes from scipy.special: importing scipy.stats took another 0.74-0.90 s on top of
    scipy.special's 0.15-0.19 s here, which ``--best`` paid on every call. Tests check it against ttest_ind.
    """
    import numpy as np
    from scipy.special import stdtr

    a, b = np.asarray(first, dtype="float64"), np.asarray(second, dtype="float64")
    a_share, b_share = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size  # squared standard errors
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = (a.mean() - b.mean()) / np.sqrt(a_share + b_share)
        dof = (a_share + b_share) ** 2 / (a_share**2 / (a.size - 1) + b_share**2 / (b.size - 1))
    if np.isnan(dof):  # both samples constant: any degrees of freedom give the same answer (as scipy does)
        dof = 1.0
    return float(2 * stdtr(dof, -np.abs(statistic)))


def _group_values(frame: Any, keys: Sequence[str], row: dict[str, Any], metric: str) -> list[float]:
    """The metric's values of the runs in the group ``row`` stands for."""
    mask = frame.index == frame.index
    for key in keys:
        mask &= frame[key].isna() if row[key] is None else frame[key] == row[key]
    return frame.loc[mask, metric].dropna().astype(float).tolist()


def sweep_status(store: Store, ref: str | None = None) -> dict[str, Any]:
    """``runner sweep status``: the sweep (default: the newest), its counts per status and its runs in order."""
    from runner.sweep_progress import combination_label, status_counts

    sweep = store.queue.sweep_row(ref) if ref else store.queue.latest_sweep()
    runs = store.queue.sweep_runs(sweep["id"])
    return {
        "id": sweep["id"], "name": sweep["name"], "created_at": _iso(sweep["created_at"]), "spec_hash": sweep["spec_hash"],
        "keys": json.loads(sweep["keys_json"]), "max_attempts": sweep["max_attempts"], "counts": status_counts(runs),
        "runs": [{"index": r["sweep_index"], "id": r["id"], "status": r["status"], "seed": r["seed"], "combination": r["combination"],
                  "label": combination_label(r["combination"], r["seed"]), "attempts": r["attempts"], "epochs_run": r["epochs_run"],
                  "epochs": r["epochs"], "test_accuracy": r["test_accuracy"], "error": r["error"],
                  "started_at": _iso(r["started_at"]) if r["attempts"] else None, "ended_at": _iso(r["ended_at"])} for r in runs],
    }


def sweeps_list(store: Store) -> list[dict[str, Any]]:
    """``runner sweep list``: every sweep, newest first, with its runs counted per status."""
    return [{"id": s["id"], "name": s["name"], "created_at": _iso(s["created_at"]), "keys": json.loads(s["keys_json"]),
             "max_attempts": s["max_attempts"], "runs": sum(s["counts"].values()), "counts": s["counts"]}
            for s in store.queue.sweeps()]


# ------------------------------------------------------------------------------------------
# runner report: formats


def output_format(fmt: str | None, output: Path | None) -> str:
    """``--format`` if given, else the format ``-o FILE``'s extension names, else ``table``."""
    if fmt:
        if fmt not in FORMATS:
            raise ReportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        chosen = fmt
    elif output is not None:
        chosen = FORMAT_BY_EXTENSION.get(output.suffix.lower(), "")
        if not chosen:
            raise ReportError(f"cannot tell the format from {output.name!r}; give --format ({', '.join(FORMATS)}) "
                              f"or an extension ({', '.join(FORMAT_BY_EXTENSION)})")
    else:
        chosen = "table"
    if chosen == "parquet" and output is None:
        raise ReportError("parquet is a binary format: give -o FILE.parquet")
    return chosen


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def frame_records(frame: Any) -> list[dict[str, Any]]:
    """Rows as dicts with JSON-ready values: missing values (NaN, NA) become None.

    Column by column, then zipped: a quarter of the time of ``astype(object).where(...).to_dict("records")``
    (19 ms against 69 ms on 10,000 runs), with the same Python values.
    """
    columns = []
    for _, column in frame.items():
        values = column.to_numpy(dtype=object, copy=True)  # Python floats, ints and strings; pd.NA / NaN where missing
        values[column.isna().to_numpy()] = None
        columns.append(values.tolist())
    names = frame.columns.tolist()
    return [dict(zip(names, row)) for row in zip(*columns)]


def frame_json(frame: Any) -> str:
    """A JSON list, one object per line.

    json.dumps keeps every float's full repr (pandas' to_json rounds to at most 15 decimals); one
    line per row keeps json's C encoder, which ``indent`` would turn off (twice the time on 10,000 runs).
    """
    records = frame_records(frame)
    if not records:
        return "[]"
    encode = json.JSONEncoder(default=json_default).encode  # one encoder: json.dumps(default=...) builds one per row
    return "[\n  " + ",\n  ".join(map(encode, records)) + "\n]"


def render(report: Report, fmt: str) -> str | bytes:
    """The report's table in ``fmt``: text for every format except parquet (bytes); html is :mod:`runner.html_report`'s."""
    table = report.table
    if fmt == "parquet":
        import io

        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        return buffer.getvalue()
    if fmt == "json":
        return frame_json(table)
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return markdown_table(table)
    if fmt == "latex":
        return latex_table(table)
    return text_table(table)


# Text, Markdown and LaTeX tables are built column-wise with pandas' vectorised string methods:
# DataFrame.to_string, to_markdown (tabulate) and to_latex (Styler) take 0.4, 1.3 and 3.9 s on
# 10,000 runs, cell by cell. Missing values are blank in all three (never "nan").


def _cell_texts(frame: Any, float_format: str) -> list[tuple[str, bool, Any]]:
    """(column name, numeric?, the cells as a string Series) per column; floats in ``float_format``, missing blank."""
    import numpy as np

    columns = []
    for name in frame.columns:
        column = frame[name]
        if column.dtype.kind == "f":
            text = column.__class__(np.char.mod(float_format, column.to_numpy(dtype="float64")), index=column.index).where(column.notna(), "")
        else:
            text = column.astype("string").fillna("")
        numeric = column.dtype.kind in "fiu" or str(column.dtype) == "Int64"
        columns.append((str(name), numeric, text))
    return columns


def _padded(name: str, numeric: bool, text: Any, min_width: int = 0) -> tuple[str, Any]:
    """A column's header and cells padded to one width: numbers right-aligned, text left-aligned."""
    width = max(len(name), int(text.str.len().max()) if len(text) else 0, min_width)
    if numeric:
        return name.rjust(width), text.str.rjust(width)
    return name.ljust(width), text.str.ljust(width)


def text_table(frame: Any) -> str:
    """An aligned plain-text table: numbers right-aligned with 6 significant digits, text left-aligned."""
    if frame.empty:
        return "(no runs match)"
    header, cells = map(list, zip(*(_padded(name, numeric, text) for name, numeric, text in _cell_texts(frame, "%.6g"))))
    body = cells[0].str.cat(cells[1:], sep="  ").str.rstrip() if len(cells) > 1 else cells[0].str.rstrip()
    return "\n".join(["  ".join(header).rstrip(), *body.tolist()])


def markdown_table(frame: Any) -> str:
    """A GitHub-flavoured pipe table (as tabulate's "pipe" format): numbers right-aligned, 6 significant digits."""
    header, rule, cells = [], [], []
    for name, numeric, text in _cell_texts(frame, "%.6g"):
        name, text = _padded(name.replace("|", "\\|"), numeric, text.str.replace("|", "\\|", regex=False), min_width=3)
        header.append(name)
        rule.append("-" * (len(name) + 1) + ":" if numeric else ":" + "-" * (len(name) + 1))
        cells.append(text)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    if len(frame):
        lines += ("| " + cells[0].str.cat(cells[1:], sep=" | ") + " |").tolist()
    return "\n".join(lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash ", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde ", "^": r"\textasciicircum "}
_LATEX_PATTERN = "[" + "".join("\\" + c for c in _LATEX_SPECIAL) + "]"


def _latex_escape(text: Any) -> Any:
    return text.str.replace(_LATEX_PATTERN, lambda match: _LATEX_SPECIAL[match.group(0)], regex=True)


def latex_table(frame: Any) -> str:
    """A booktabs ``tabular`` as pandas' ``to_latex(index=False, escape=True)`` writes it: numbers right-aligned, 6 decimals."""
    columns = _cell_texts(frame, "%.6f")
    align = "".join("r" if numeric else "l" for _, numeric, _ in columns)
    header = " & ".join(_latex_escape(frame.columns.to_series().astype("string")).tolist()) + " \\\\"
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule", header, "\\midrule"]
    if len(frame):
        escaped = [_latex_escape(text) for _, _, text in columns]
        lines += (escaped[0].str.cat(escaped[1:], sep=" & ") + " \\\\").tolist()
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def write_output(path: Path, data: str | bytes) -> None:
    """Write a report or figure file atomically; a problem is one line naming the file."""
    path = Path(path)
    if not path.parent.exists():
        raise ReportError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------
# per-epoch curves and confusion matrices (plots, compare, the HTML report)


def resolve_run_ids(store: Store, run_ids: Sequence[str]) -> list[str]:
    """Full ids for ids or unique prefixes, in the order given, each once."""
    return list(dict.fromkeys(store.query.resolve_run_id(r) for r in run_ids))


def epoch_curves(store: Store, run_ids: Sequence[str]) -> dict[str, Any]:
    """run id → DataFrame indexed by epoch with one column per metric (train_loss, val_accuracy...)."""
    long = store.query.epoch_metrics_frame(run_ids)
    wide = long.pivot_table(index=["run_id", "epoch"], columns="name", values="value", aggfunc="first")
    wide.columns.name = None
    return {run_id: curves.droplevel("run_id") for run_id, curves in wide.groupby(level="run_id")}


def plot_data(store: Store, run_ids: Sequence[str]) -> list[Any]:
    """What a figure needs of each run, in the order given (plots.RunPlotData)."""
    from runner.plots import RunPlotData

    documents = store.query.run_documents(run_ids).set_index("id")
    curves = epoch_curves(store, run_ids)
    data = []
    for run_id in run_ids:  # a handful of runs, one figure row each
        document = documents.loc[run_id]
        data.append(RunPlotData(
            run_id=run_id,
            name=document["name"],
            curves=curves.get(run_id),
            class_names=json.loads(document["class_names_json"] or "[]"),
            # a run without a test result (failed) has no matrix: pandas reads its NULL as NaN
            confusion=json.loads(document["confusion_json"]) if isinstance(document["confusion_json"], str) else None,
        ))
    return data


def plot_format(output: Path) -> str:
    suffix = output.suffix.lower()
    if suffix not in PLOT_EXTENSIONS:
        raise ReportError(f"cannot write a plot as {output.name!r}; use one of {', '.join(PLOT_EXTENSIONS)}")
    return suffix[1:]


def plot_runs(store: Store, run_ids: Sequence[str], output: Path) -> list[str]:
    """``runner plot``: learning curves and the test confusion matrix of each run, one row per run."""
    from runner.plots import figure_bytes, runs_figure

    fmt = plot_format(output)
    run_ids = resolve_run_ids(store, run_ids)
    write_output(output, figure_bytes(runs_figure(plot_data(store, run_ids)), fmt))
    return run_ids


# ------------------------------------------------------------------------------------------
# runner compare


@dataclass
class Comparison:
    run_ids: list[str]
    differences: Any  # DataFrame: one row per resolved-spec key whose values differ, one column per run
    metrics: Any  # DataFrame: one row per metric, one column per run

    def to_json(self) -> dict[str, Any]:
        def by_row(frame: Any) -> dict[str, dict[str, Any]]:
            return dict(zip(frame.index, frame_records(frame)))  # key → {run id: value}

        return {"runs": self.run_ids, "differences": by_row(self.differences), "metrics": by_row(self.metrics)}

    def to_text(self) -> str:
        def show(frame: Any) -> str:
            return frame.astype(object).where(frame.notna(), "").to_string()

        differences = show(self.differences) if len(self.differences) else "(the resolved specs are identical)"
        return f"resolved-spec keys that differ\n{differences}\n\nmetrics\n{show(self.metrics)}"


def _flat_spec_values(spec_json: str) -> dict[str, str]:
    """Dotted key → the value as canonical JSON (so lists and numbers compare exactly)."""
    def walk(value: Any, prefix: str) -> Any:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                yield from walk(child, f"{prefix}.{key}" if prefix else str(key))
        else:
            yield prefix, value

    return dict(walk(json.loads(spec_json), ""))


def compare_runs(store: Store, run_ids: Sequence[str]) -> Comparison:
    """The resolved-spec keys whose values differ between the runs, beside the runs' metrics."""
    import pandas as pd

    run_ids = resolve_run_ids(store, run_ids)
    if len(run_ids) < 2:
        raise ReportError("compare needs at least two different runs")
    documents = store.query.run_documents(run_ids).set_index("id").loc[run_ids]
    specs = pd.DataFrame({run_id: _flat_spec_values(text) for run_id, text in documents["spec_json"].items()})
    canonical = specs.apply(lambda column: column.map(lambda v: json.dumps(v, sort_keys=True)))
    differences = specs[canonical.nunique(axis=1, dropna=False) > 1]
    frame = runs_frame(store, RunFilter(run_ids=tuple(run_ids))).set_index("id").loc[run_ids]
    metric_names = [*COMPARED_METRICS, *(c for c in frame.columns if c.startswith("test_") and c not in COMPARED_METRICS)]
    metrics = frame[metric_names].astype(object).T
    metrics.columns = run_ids
    return Comparison(run_ids, differences.sort_index(), metrics)


def compare_plot(store: Store, run_ids: Sequence[str], output: Path) -> None:
    """Per-epoch curves of the runs overlaid: loss and accuracy, train dashed, validation solid."""
    from runner.plots import figure_bytes, overlay_figure

    fmt = plot_format(output)
    write_output(output, figure_bytes(overlay_figure(plot_data(store, resolve_run_ids(store, run_ids))), fmt))
