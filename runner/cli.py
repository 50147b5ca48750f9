"""The ``runner`` command line: parse, call the core, print. Torch loads only behind training commands."""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click

from runner.errors import RunnerError
from runner.version import __version__

RUNS_SHOWN = 50  # `runner runs` in a terminal: the newest page, however big the store

db_option = click.option("--db", envvar="RUNNER_DB", default=None, metavar="URL|PATH", help="Results store (default: results.db; env RUNNER_DB).")
artifacts_option = click.option("--artifacts", envvar="RUNNER_ARTIFACTS", default=None, metavar="DIR",
                                help="Where run artefacts go (default: runs/ beside an SQLite store; required for a server store; env RUNNER_ARTIFACTS).")


def _store(db: str | None, artifacts: str | None = None, create: bool = True) -> Any:
    from runner.store import Store

    return Store(db, artifacts=artifacts, create=create)


# C0 and C1 controls but tab and newline, and the bidirectional overrides: what a name could use to
# rewrite the terminal (clear the screen, move the cursor, reorder text)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), never obeyed by the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def _whole_process() -> bool:
    """Whether this command is the whole process (``runner ...``), not a call of :func:`main` from a user's
    script or a test: only then may imports be frozen out of the collector's reach."""
    return bool(click.get_current_context().find_root().obj.get("whole_process", False))


def _reading_modules(pandas: bool = False) -> Any:
    """:mod:`runner.reports` for a command that reads the store, and pandas for one that builds frames,
    imported with the collector paused (see :mod:`runner.import_gc`)."""
    from runner import import_gc

    with import_gc.paused(freeze=_whole_process(), collect=False):
        from runner import reports

        if pandas:
            import pandas  # noqa: F401  (imported here, not later inside a report function)
    return reports


def _check_artifacts(db: str | None, artifacts: str | None) -> None:
    """Before any work: new runs in a server store need an artefact directory every worker can reach."""
    from runner.store import artifacts_required, resolve_url

    reason = artifacts_required(resolve_url(db), artifacts)
    if reason is not None:
        raise RunnerError(reason)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _load_registries(warn: bool = True) -> Any:
    """The plugin registries, loaded once per command; every plugin that failed to load is one warning line on stderr.

    A broken plugin only warns: a spec that does not use its names still runs. ``warn=False``: the
    ranks other than 0 of a distributed run, which leave the warnings to rank 0.
    """
    from runner.registries import load_registries

    registries = load_registries()
    for problem in registries.problems if warn else ():
        click.echo(f"warning: {problem}", err=True)
    return registries


nproc_option = click.option(
    "--nproc", type=int, default=None, metavar="N",
    help="Train with N processes on this machine (DistributedDataParallel through torchrun's launcher; one GPU each on CUDA).",
)


def _launch(ctx: click.Context, nproc: int, args: list[str]) -> None:
    """This command again in ``nproc`` processes (torchrun's launcher, here); exits with its code."""
    from runner.distributed import launch

    debug = ctx.find_root().obj["debug"]
    sys.exit(launch(nproc, [*(["--debug"] if debug else []), *args], debug=debug))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (pandas would cost a noticeable import for `runner runs`)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else _printable(str(v))

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runner")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run image-classification experiments from YAML specs and compare their results."""
    ctx.ensure_object(dict)["debug"] = debug
    from runner import exit_hook

    # skips ~1 s of garbage collection at exit after torch is imported, ~0.05 s after SQLAlchemy and pandas
    exit_hook.install()


def _options(*options: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# What makes a spec a sweep (``run``, ``sweep plan``, ``sweep run``), and how its workers run
sweep_options = _options(
    click.option("--sweep", "grid", multiple=True, metavar="KEY=V1,V2", help="Run once per value of KEY (a grid over every --sweep); repeatable."),
    click.option("--seeds", default=None, metavar="N|S1,S2", help="Run every configuration once per seed (N: seeds 0..N-1)."),
    click.option("--max-attempts", type=click.IntRange(min=1), default=None, help="Starts a failed or lost run of a sweep gets (default 2)."),
)
worker_options = _options(
    click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Workers for a sweep (default 1, or the spec's launcher.jobs)."),
    click.option("--devices", default=None, metavar="I,J", help="CUDA devices for the workers: worker k uses device k mod their count."),
)


def _devices(text: str | None) -> list[str]:
    return [d.strip() for d in (text or "").split(",") if d.strip()]


def _run_sweep(document: Any, db: str | None, artifacts: str | None, jobs: int | None, devices: str | None, quiet: bool) -> None:
    """Plan every run of the sweep (nothing stored on a bad one), queue them, let workers run them, print the outcome."""
    from runner import exit_hook
    from runner.sweeps import plan_sweep, run_sweep

    exit_hook.install()
    registries = _load_registries()
    planned = plan_sweep(document, registries)  # a bad combination must fail before the store is touched
    jobs = jobs or document.launcher.jobs or 1
    outcome = run_sweep(document, planned, _store(db, artifacts), registries, jobs=jobs, devices=_devices(devices), quiet=quiet)
    for line in outcome.lines():
        click.echo(line, err=True)
    click.echo(outcome.sweep_id)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (dotted path); repeatable.")
@db_option
@artifacts_option
@click.option("--device", default=None, help="Override the spec's device (auto, cpu, cuda, cuda:N, mps).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@sweep_options
@worker_options
@nproc_option
@click.pass_context
def run(ctx: click.Context, spec: Path, overrides: tuple[str, ...], db: str | None, artifacts: str | None, device: str | None,
        quiet: bool, grid: tuple[str, ...], seeds: str | None, max_attempts: int | None, jobs: int | None, devices: str | None,
        nproc: int | None) -> None:
    """Train the experiment in SPEC and print the new run's id; a sweep prints its id (see `runner sweep`).

    Under torchrun (torchrun --nproc-per-node N -m runner run SPEC) every process trains a shard
    and rank 0 stores the run; --nproc N starts torchrun's launcher on this machine.
    """
    from runner.spec import load_spec
    from runner.sweeps import load_sweep

    _check_artifacts(db, artifacts)
    document = load_sweep(spec, [*overrides, *([f"device={device}"] if device else [])], grid, seeds, max_attempts)
    if document is not None:
        if nproc is not None:
            raise RunnerError("--nproc trains one run across processes; a sweep runs many: use -j N for its worker processes")
        _run_sweep(document, db, artifacts, jobs, devices, quiet)
        return
    if jobs not in (None, 1) or devices:
        raise RunnerError("-j and --devices run the workers of a sweep: add --sweep KEY=V1,V2 or --seeds, or sweep:/seeds: to the spec")
    checked = load_spec(spec, list(overrides))  # a bad spec must fail before the store is touched
    if nproc is not None:
        options = [*(["--db", db] if db else []), *(["--artifacts", artifacts] if artifacts else []),
                   *(["--device", device] if device else []), *(["-q"] if quiet else [])]
        _launch(ctx, nproc, ["run", str(spec), *[a for o in overrides for a in ("--set", o)], *options])
    from runner import import_gc

    with import_gc.paused(freeze=_whole_process()):
        from runner import distributed
        from runner.execute import run_experiment
        from runner.plan import resolve_device

    with distributed.session(lambda: str(resolve_device(device or checked.device)), ctx.find_root().obj["debug"]) as collective:
        registries = _load_registries(warn=collective.is_writer)
        store = _store(db, artifacts) if collective.is_writer else None  # one process writes the run
        outcome = run_experiment(spec, overrides, store=store, registries=registries, device=device, quiet=quiet or not collective.is_writer,
                                 collective=collective)
    if not collective.is_writer:
        return
    if not quiet:
        acc = outcome.test.get("accuracy")
        click.echo(f"run {outcome.run_id} completed: test accuracy {acc:.4f}", err=True)
    click.echo(outcome.run_id)


@cli.command()
@click.argument("run_id")
@db_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@nproc_option
@click.pass_context
def resume(ctx: click.Context, run_id: str, db: str | None, quiet: bool, nproc: int | None) -> None:
    """Continue an interrupted, failed or lost run from its last checkpoint, into the same run id.

    A run trained by N processes continues on N processes: --nproc N, or torchrun.
    """
    if nproc is not None:
        _launch(ctx, nproc, ["resume", run_id, *(["--db", db] if db else []), *(["-q"] if quiet else [])])
    from runner import import_gc

    with import_gc.paused(freeze=_whole_process()):
        from runner import distributed
        from runner.resume import resume_run

    def run_device() -> str:
        return str(_store(db, create=False).query.run_row(run_id)["device"] or "cpu")

    with distributed.session(run_device, ctx.find_root().obj["debug"]) as collective:
        store = _store(db, create=False) if collective.is_writer else None
        outcome = resume_run(run_id, store, _load_registries(warn=collective.is_writer), quiet=quiet or not collective.is_writer,
                             collective=collective)
    if not collective.is_writer:
        return
    if not quiet:
        click.echo(f"run {outcome.run_id} completed: test accuracy {outcome.test.get('accuracy'):.4f}", err=True)
    click.echo(outcome.run_id)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def validate(spec: Path, overrides: tuple[str, ...]) -> None:
    """Check the whole of SPEC (keys, names, arguments, data, model, stages) without running it or reading weights."""
    from runner.plan import plan
    from runner.spec import load_spec
    from runner.sweeps import load_sweep, plan_sweep

    document = load_sweep(spec, overrides)
    if document is not None:  # a sweep: every run of it
        click.echo(f"{spec}: ok (a sweep of {len(plan_sweep(document, _load_registries()))} runs)")
        return
    checked = plan(load_spec(spec, list(overrides)), _load_registries(), base_dir=str(spec.parent), read_weights=False)
    resolved = checked.spec
    click.echo(f"{spec}: ok ({resolved.model.name}, {resolved.training.strategy.name}, {resolved.training.epochs} epochs)")


@cli.command()
@db_option
@click.option("--status", default=None, help="Only runs with this status.")
@click.option("--name", default=None, metavar="GLOB", help="Only runs whose name matches GLOB (* any characters, ? one).")
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"At most N runs, the newest (default: {RUNS_SHOWN} in the table, all with --format json; 0: all).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Only runs with this tag; repeatable (all must match).")
@click.option("--sweep", "sweep_ref", default=None, metavar="ID|NAME", help="Only the runs of this sweep.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def runs(db: str | None, status: str | None, name: str | None, limit: int | None, tags: tuple[str, ...], sweep_ref: str | None,
         fmt: str) -> None:
    """List runs, newest first."""
    reports = _reading_modules()

    store = _store(db, create=False)
    if limit is None:  # a page for people; every run for scripts, as before
        limit = RUNS_SHOWN if fmt == "table" else 0
    rows = reports.runs_list(store, status=status, name=name, limit=limit or None, tags=tags, sweep=sweep_ref)
    if fmt == "json":
        _echo_json(rows)
    else:
        columns = ["id", "name", "status", "model", "strategy", "seed", "epochs_run", "best_val_accuracy", "test_accuracy", "started_at"]
        if any(row["tags"] for row in rows):
            rows, columns = [{**row, "tags": ",".join(row["tags"])} for row in rows], [*columns, "tags"]
        click.echo(_table(rows, columns))
    if limit and len(rows) == limit:
        more = reports.count_runs(store, status=status, name=name, tags=tags) - limit
        if more:
            click.echo(f"{more:,} more run(s) not shown: --limit N shows the newest N, --limit 0 all", err=True)


@cli.command()
@click.argument("run_id")
@db_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show(run_id: str, db: str | None, fmt: str) -> None:
    """Everything stored about one run (an id or a unique prefix)."""
    details = _reading_modules().run_details(_store(db, create=False), run_id)
    if fmt == "json":
        _echo_json(details)
        return

    def line(key: str, value: Any) -> None:
        click.echo(_printable(f"{key:18} {value}"))

    for key in ("id", "name", "status", "model", "strategy", "seed", "device", "started_at", "duration_s", "epochs_run",
                "stop_reason", "best_epoch", "best_val_accuracy", "spec_hash", "git_commit"):
        line(key, details[key])
    line("weights", details["weights"])
    distributed = (details["settings"] or {}).get("distributed") or {}
    if distributed.get("backend"):  # trained by torchrun's processes
        line("processes", f"{distributed['world_size']} ({distributed['backend']}), "
                          f"global batch {distributed['global_batch_size']} ({distributed['batch_size_per_process']} per process)")
    line("plugins", _plugins_text(details["plugins"]))
    for params_line in _params_lines(details):
        click.echo(_printable(params_line))
    line("test", details["test"])
    if details["error"]:
        line("error", details["error"])
    if details["tags"]:
        line("tags", ", ".join(details["tags"]))
    if details["epochs"]:
        click.echo("\n" + _table(details["epochs"], list(details["epochs"][0])))
    if details["evaluations"]:
        rows = [{**e, "overrides": " ".join(e["overrides"]) or "-"} for e in details["evaluations"]]
        click.echo("\nevaluations\n" + _table(rows, ["id", "created_at", "split", "checkpoint", "dataset", "overrides",
                                                                      "samples", "loss", "accuracy", "f1_macro"]))


def _plugins_text(plugins: list[dict[str, Any]]) -> str:
    """``runner-dl 0.1.0 (runner.plugins.models, …), runner-hello 0.1.0 (hello)``: what built the run."""
    by_distribution: dict[str, list[str]] = {}
    for p in plugins:
        label = f"{p['distribution']} {p['version']}" if p.get("distribution") else "no distribution"
        by_distribution.setdefault(label, []).append(p["plugin"])
    return ", ".join(f"{label} ({', '.join(names)})" for label, names in sorted(by_distribution.items())) or "-"


def _params_lines(details: dict[str, Any]) -> list[str]:
    """Total parameters, and the trainable ones of every stage of the strategy (one line per stage)."""
    params = details["params"]
    if params["total"] is None:
        return [f"{'params':18} -"]
    stages = (details["settings"].get("model") or {}).get("stages") or []
    if len(stages) < 2:
        return [f"{'params':18} {params['total']:,} total, {params['trainable']:,} trainable"]
    lines = [f"{'params':18} {params['total']:,} total; trainable by stage:"]
    for stage in stages:
        epochs = f"epochs {stage['first_epoch']}-{stage['last_epoch']}"
        lr = f", backbone lr x{stage['backbone_lr_mult']:g}" if stage["backbone_lr_mult"] != 1 else ""
        lines.append(f"  {epochs:16} {stage['params_trainable']:,} trainable ({json.dumps(stage['trainable'])}{lr})")
    return lines


@cli.command()
@db_option
@click.option("--status", default=None, help="Only runs with this status.")
@click.option("--name", default=None, metavar="GLOB", help="Only runs whose name matches GLOB (* any characters, ? one).")
@click.option("--since", default=None, metavar="DATE|AGE", help="Only runs started since DATE (ISO, UTC) or AGE ago (30m, 12h, 7d, 2w).")
@click.option("--where", multiple=True, metavar="KEY=VALUE", help="Only runs whose resolved spec has KEY=VALUE (e.g. model.name=cnn); repeatable.")
@click.option("--columns", default=None, metavar="COL[,COL]", help="Columns to show: report columns or resolved-spec keys.")
@click.option("--sort", default=None, metavar="[-]COL[,...]", help="Sort by these columns; a leading '-' sorts descending.")
@click.option("--group-by", "group_by", default=None, metavar="KEY[,KEY]", help="Aggregate runs: n, mean, std and 95% CI of each metric.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "html", "json", "parquet", "latex"]), default=None,
              help="Output format (default: from -o's extension, else table).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE instead of stdout.")
@click.option("--max-plots", type=click.IntRange(min=0), default=20, show_default=True, help="HTML: runs that get figures.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Only runs with this tag; repeatable (all must match).")
@click.option("--sweep", "sweep_ref", default=None, metavar="ID|NAME",
              help="Only a sweep's runs, grouped by its swept keys (--group-by none: one row per run).")
@click.option("--best", default=None, metavar="[-]METRIC", help="The best group by mean METRIC (-METRIC: lowest), with its CI and the runner-up.")
def report(db: str | None, status: str | None, name: str | None, since: str | None, where: tuple[str, ...], columns: str | None,
           sort: str | None, group_by: str | None, fmt: str | None, output: Path | None, max_plots: int,
           tags: tuple[str, ...], sweep_ref: str | None, best: str | None) -> None:
    """A report of runs (pandas), printed or written to a file."""
    reports = _reading_modules(pandas=True)

    fmt = reports.output_format(fmt, output)
    request = reports.make_request(status=status, name=name, since=since, where=where, columns=columns, sort=sort, group_by=group_by,
                                   tags=tags)
    store = _store(db, create=False)
    if sweep_ref is not None:
        request = reports.for_sweep(request, *reports.sweep_selection(store, sweep_ref), group_by_given=group_by is not None)
    built = reports.build_report(store, request)
    verdict = reports.best_group(built, request.group_by, best) if best else None
    if fmt == "html":
        from runner.html_report import render_html

        data: str | bytes = render_html(built, store, max_plots=max_plots, swept=request.group_by if sweep_ref else (),
                                        best=verdict)
    elif fmt == "json" and verdict is not None:  # a new shape only where --best asks for more than the table
        data = json.dumps({"groups": reports.frame_records(built.groups), "best": verdict.to_json()}, indent=2,
                          default=reports.json_default)
    else:
        data = reports.render(built, fmt)
        if verdict is not None and fmt == "table" and output is None:
            data = "\n".join([str(data), "", *verdict.lines()])
        elif verdict is not None:  # the file or the data on stdout stay as the format has them
            click.echo("\n".join(verdict.lines()), err=True)
    if output is None:
        click.echo(data)
    else:
        reports.write_output(output, data)
        click.echo(f"wrote {output}", err=True)


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID RUN_ID...")
@db_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the per-epoch curves, overlaid (.png, .svg, .pdf).")
def compare(run_ids: tuple[str, ...], db: str | None, fmt: str, output: Path | None) -> None:
    """The resolved-spec keys that differ between runs, side by side with their metrics."""
    reports = _reading_modules(pandas=True)

    store = _store(db, create=False)
    comparison = reports.compare_runs(store, run_ids)
    if output is not None:
        reports.compare_plot(store, comparison.run_ids, output)
        click.echo(f"wrote {output}", err=True)
    if fmt == "json":
        _echo_json(comparison.to_json())
    else:
        click.echo(comparison.to_text())


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID [RUN_ID...]")
@db_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The figure file (.png, .svg, .pdf).")
def plot(run_ids: tuple[str, ...], db: str | None, output: Path) -> None:
    """Learning curves (train vs validation) and the test confusion matrix of each run."""
    from runner import reports

    reports.plot_runs(_store(db, create=False), run_ids, output)
    click.echo(f"wrote {output}", err=True)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--kind", type=click.Choice(["model", "dataset", "transform", "strategy"]), default=None, help="Only names of this kind.")
@click.option("--plugin", "plugin_name", default=None, metavar="NAME", help="Only names from this plugin (plugin or distribution name).")
def plugins(fmt: str, kind: str | None, plugin_name: str | None) -> None:
    """Every registered name: kind, providing plugin, distribution, version; collisions flagged."""
    from runner.registries import name_rows, plugin_rows

    registries = _load_registries()
    rows = [r for r in name_rows(registries) if (kind is None or r["kind"] == kind)
            and (plugin_name is None or plugin_name in (r["plugin"], r["distribution"]))]
    if fmt == "json":
        _echo_json({"names": rows, "problems": [str(p) for p in registries.problems],
                    "plugins": plugin_rows(registries), "skipped": registries.skipped})
    else:
        click.echo(_table(rows, ["kind", "name", "plugin", "distribution", "version", "collision"]))
    for name, reason in registries.skipped.items():
        click.echo(f"note: plugin {name!r} not loaded ({reason})", err=True)


@cli.command()
@click.argument("pattern", required=False)
def models(pattern: str | None) -> None:
    """Model names (optionally an fnmatch PATTERN) with their source plugin and the named weights they offer."""
    registry = _load_registries().models
    if pattern is not None and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    # "vgg1*" matches "torchvision:vgg16": a pattern may leave out the source prefix
    names = [n for n in registry.list() if pattern is None or fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.split(":", 1)[-1], pattern)]
    rows = [{"name": n, "plugin": registry.entry(n).plugin, "weights": ", ".join(_weights_names(registry.entry(n)))} for n in names]
    click.echo(_table(rows, ["name", "plugin", "weights"]))


def _weights_names(entry: Any) -> list[str]:
    """The named weights a model builder offers (``model.weights: NAME``); none for most."""
    listed = getattr(entry.obj, "weights_names", None)
    if listed is None:
        return []
    with entry.blamed("weights_names"):
        return list(listed())


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def summary(spec: Path, overrides: tuple[str, ...]) -> None:
    """torchinfo summary of SPEC's model after surgery and freezing (no weights are loaded)."""
    from runner.build import build_run_model
    from runner.execute import model_summary
    from runner.plan import build_strategy, plan
    from runner.spec import load_spec
    from runner.training import apply_stage

    registries = _load_registries()
    run_plan = plan(load_spec(spec, list(overrides)), registries, base_dir=str(spec.parent), read_weights=False)
    model = build_run_model(run_plan, registries, load_weights=False)
    apply_stage(model, build_strategy(run_plan.spec, registries).stage(1))
    click.echo(model_summary(model, run_plan.data.input_shape, "cpu"))
    click.echo(f"total parameters: {run_plan.model.params_total:,}")
    click.echo(f"trainable parameters: {run_plan.model.params_trainable:,}")


# ------------------------------------------------------------------------------------------
# Sweeps and workers


@cli.command()
@db_option
@artifacts_option
@click.option("--sweep", "sweep_ref", default=None, metavar="ID|NAME", help="Only runs of this sweep (default: of any sweep, oldest first).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (unless a spec sets performance.threads).")
@click.option("--quiet", "-q", is_flag=True, help="Say only what failed.")
def worker(db: str | None, artifacts: str | None, sweep_ref: str | None, threads: int | None, quiet: bool) -> None:
    """Take queued runs from the store one at a time and train them, until the queue is empty.

    Exit code 0 when every run it took completed, 1 when one failed, 130/143 when stopped.
    """
    import os

    if threads is not None:  # before torch loads: OpenMP reads it once
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    store = _store(db, artifacts, create=False)
    sweep_id = store.queue.sweep_row(sweep_ref)["id"] if sweep_ref else None
    registries = _load_registries()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from runner.workers import work

    def on_run_end(run_id: str, status: str, detail: str) -> None:
        if status != "completed" or not quiet:
            click.echo(f"run {run_id} {status}: {detail}", err=True)

    report = work(store, registries, sweep_id=sweep_id, quiet=quiet, on_run_end=on_run_end)
    if not quiet:
        click.echo(f"worker done: {len(report.runs)} run(s) taken, no queued run left", err=True)
    if report.exit_code:
        sys.exit(report.exit_code)


@cli.group()
def sweep() -> None:
    """Many runs from one spec (sweep: and seeds: sections, or --sweep/--seeds): plan, run and follow them."""


@sweep.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (dotted path); repeatable.")
@sweep_options
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def sweep_plan(spec: Path, overrides: tuple[str, ...], grid: tuple[str, ...], seeds: str | None, max_attempts: int | None, fmt: str) -> None:
    """Every run the sweep in SPEC expands to, in order, each checked whole (nothing runs, nothing is stored)."""
    from runner import exit_hook
    from runner.sweep_progress import combination_label
    from runner.sweeps import load_sweep, plan_sweep, sweep_hash

    exit_hook.install()
    document = load_sweep(spec, overrides, grid, seeds, max_attempts)
    if document is None:
        raise RunnerError(f"{spec} is not a sweep: it has no sweep: or seeds: section (or give --sweep KEY=V1,V2 / --seeds)")
    planned = plan_sweep(document, _load_registries())
    if fmt == "json":
        _echo_json({"name": document.name, "keys": list(document.keys), "spec_hash": sweep_hash(planned),
                    "max_attempts": document.section.max_attempts,
                    "runs": [{"index": p.run.index, "combination": p.run.combination, "seed": p.seed, "spec_hash": p.spec_hash,
                              "spec": p.spec.resolved()} for p in planned]})
        return
    click.echo(f"sweep {document.name}: {len(planned)} runs, each checked (keys: {', '.join(document.keys) or 'seeds only'})")
    width = len(str(len(planned)))
    for p in planned:
        click.echo(f"{p.run.index:>{width}}  {p.spec_hash[:12]}  {combination_label(p.run.combination, p.seed)}")


# Where a sweep's workers run (``sweep run``); each overrides the spec's ``launcher:`` section
launcher_options = _options(
    click.option("--launcher", type=click.Choice(["local", "slurm", "ray"]), default=None,
                 help="local: worker processes here (default); slurm: a job array through submitit; ray: Ray tasks."),
    click.option("--slurm-partition", default=None, help="Slurm partition of the job array."),
    click.option("--slurm-time", type=click.IntRange(min=1), default=None, help="Minutes per job before Slurm stops and submitit requeues it (default 60)."),
    click.option("--slurm-gpus-per-task", type=click.IntRange(min=0), default=None, help="GPUs per worker job."),
    click.option("--slurm-cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per worker job (also its torch threads)."),
    click.option("--slurm-folder", default=None, metavar="DIR", help="Job scripts and logs, on a shared filesystem (default: ./submitit)."),
    click.option("--slurm-cluster", type=click.Choice(["slurm", "local"]), default=None,
                 help="local: submitit's local executor, the Slurm code path as processes on this machine."),
    click.option("--ray-address", default=None, metavar="ADDRESS", help="A running Ray cluster (auto, ray://HOST:10001); default: start a local one."),
    click.option("--ray-num-cpus", type=click.FloatRange(min=0, min_open=True), default=None, help="CPUs per worker task (default 1)."),
    click.option("--ray-num-gpus", type=click.FloatRange(min=0), default=None, help="GPUs per worker task (default 0); Ray places them."),
)


@sweep.command("run")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (dotted path); repeatable.")
@db_option
@artifacts_option
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@sweep_options
@worker_options
@launcher_options
def sweep_run(spec: Path, overrides: tuple[str, ...], db: str | None, artifacts: str | None, quiet: bool, grid: tuple[str, ...],
              seeds: str | None, max_attempts: int | None, jobs: int | None, devices: str | None, **launcher: Any) -> None:
    """Queue every run of the sweep in SPEC (or continue the same sweep) and run them with -j workers; print the sweep id.

    The workers run here, as a Slurm job array or as Ray tasks (--launcher, or the spec's launcher:
    section); all state is in the store, so a sweep started with one launcher can be finished with another.
    Exit code 0 when every run completed, 1 when any failed (one line each), 130 on Ctrl-C.
    """
    from dataclasses import replace

    from runner.launchers import with_options
    from runner.sweeps import load_sweep

    _check_artifacts(db, artifacts)
    document = load_sweep(spec, overrides, grid, seeds, max_attempts)
    if document is None:
        raise RunnerError(f"{spec} is not a sweep: it has no sweep: or seeds: section (or give --sweep KEY=V1,V2 / --seeds)")
    document = replace(document, launcher=with_options(document.launcher, name=launcher.pop("launcher"), **launcher))
    _run_sweep(document, db, artifacts, jobs, devices, quiet)


@sweep.command("status")
@click.argument("sweep_ref", required=False, metavar="[ID|NAME]")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def sweep_status(sweep_ref: str | None, db: str | None, fmt: str) -> None:
    """A sweep's runs (default: the newest sweep): counts per status, and per run its status, attempts and result."""
    status = _reading_modules().sweep_status(_store(db, create=False), sweep_ref)
    if fmt == "json":
        _echo_json(status)
        return
    counts = ", ".join(f"{n} {s}" for s, n in status["counts"].items())
    click.echo(f"sweep {status['name']} ({status['id']}), created {status['created_at']}: {len(status['runs'])} runs: {counts}")
    rows = [{**r, "epochs": f"{r['epochs_run']}/{r['epochs']}"} for r in status["runs"]]
    click.echo(_table(rows, ["index", "id", "status", "attempts", "epochs", "test_accuracy", "label", "error"]))


@sweep.command("list")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def sweep_list(db: str | None, fmt: str) -> None:
    """Every sweep, newest first, with its runs counted per status."""
    rows = _reading_modules().sweeps_list(_store(db, create=False))
    if fmt == "json":
        _echo_json(rows)
        return
    statuses = ["completed", "running", "failed", "interrupted", "lost", "queued"]
    table = [{**r, "keys": ",".join(r["keys"]), **{s: r["counts"].get(s, 0) for s in statuses}} for r in rows]
    click.echo(_table(table, ["id", "name", "created_at", "runs", *statuses, "keys"]))


# ------------------------------------------------------------------------------------------
# Using trained runs: eval, predict, export, reproduce; managing runs: tag, delete, prune

checkpoint_option = click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
                                 help="Which of the run's checkpoints to use.")
device_option = click.option("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: cpu for a run trained on the CPU, else auto).")


@cli.command("eval")
@click.argument("run_id")
@click.option("--set", "overrides", multiple=True, metavar="data.KEY=VALUE", help="Evaluate on other data: override a data.* key of the run's spec; repeatable.")
@click.option("--split", type=click.Choice(["test", "val", "all"]), default="test", show_default=True,
              help="The run's (seeded) test or val split, or all images of the data (e.g. other data given with --set).")
@checkpoint_option
@device_option
@db_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def eval_command(run_id: str, overrides: tuple[str, ...], split: str, checkpoint: str, device: str | None, db: str | None, fmt: str) -> None:
    """Evaluate RUN_ID's checkpoint with its own evaluation transforms, and store the result.

    On the run's own test split this recomputes its stored test metrics when the checkpoint holds
    the weights that were tested: the best epoch's, if it was the last epoch or early stopping
    restored it; otherwise the last epoch's (--checkpoint last).
    """
    from runner.inference import evaluate_run

    result = evaluate_run(_store(db, create=False), run_id, _load_registries(), split=split, overrides=overrides, checkpoint=checkpoint,
                          device=device)
    if fmt == "json":
        _echo_json(result)
        return
    click.echo(f"run {result['run_id']} ({checkpoint} checkpoint, epoch {result['checkpoint_epoch']}) on {result['dataset']} "
               f"{split} split, {result['samples']} images:")
    loss = "null" if result["loss"] is None else f"{result['loss']:.4f}"  # not a finite number
    click.echo(f"loss {loss}  accuracy {result['accuracy']:.4f}  f1_macro {result['f1_macro']:.4f}")


@cli.command()
@click.argument("run_id")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("--top-k", "-k", "top_k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes to list per image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per batch (default: the run's evaluation batch size).")
@checkpoint_option
@device_option
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def predict(run_id: str, images: tuple[Path, ...], top_k: int, batch_size: int | None, checkpoint: str, device: str | None,
            db: str | None, fmt: str) -> None:
    """Classify images (files, or directories searched recursively) with RUN_ID's model."""
    from runner.inference import load_run_model, predict_images

    run_model = load_run_model(_store(db, create=False), run_id, _load_registries(), checkpoint=checkpoint, device=device)
    predictions = predict_images(run_model, images, top_k=top_k, batch_size=batch_size)
    if fmt == "json":
        _echo_json(predictions)
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "prob"])
        for p in predictions:
            writer.writerows([p["path"], rank, t["class"], f"{t['prob']:.6g}"] for rank, t in enumerate(p["top"], 1))
    else:
        rows = [{"path": p["path"], "class": p["top"][0]["class"], "prob": p["top"][0]["prob"],
                 "next": ", ".join(f"{t['class']} {t['prob']:.3f}" for t in p["top"][1:])} for p in predictions]
        click.echo(_table(rows, ["path", "class", "prob", "next"] if top_k > 1 else ["path", "class", "prob"]))


@cli.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["state_dict", "torchscript", "onnx"]), required=True, help="onnx needs the extra: pip install 'runner-dl[onnx]'.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The model file; FILE.json beside it records class names and preprocessing.")
@checkpoint_option
@db_option
def export(run_id: str, fmt: str, output: Path, checkpoint: str, db: str | None) -> None:
    """Write RUN_ID's model as a state dict, TorchScript or ONNX file, checked to give the same logits."""
    from runner.export import export_run

    result = export_run(_store(db, create=False), run_id, fmt, output, _load_registries(), checkpoint=checkpoint)
    check = (f"same logits as the checkpoint with {result.checked_with} (max difference {result.max_abs_diff:.2g})"
             if result.max_abs_diff is not None else "not checked: onnxruntime is not installed")
    click.echo(f"wrote {result.path} ({fmt}; {check})")
    click.echo(f"wrote {result.sidecar} (class names, input shape, preprocessing)")


@cli.command()
@click.argument("run_id")
@db_option
@artifacts_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def reproduce(run_id: str, db: str | None, artifacts: str | None, fmt: str, quiet: bool) -> None:
    """Re-run RUN_ID's stored resolved spec into a new run and compare per-epoch metrics (exit 1 if they differ)."""
    from runner.reproduce import reproduce_run

    _check_artifacts(db, artifacts)
    result = reproduce_run(_store(db, artifacts, create=False), run_id, _load_registries(), quiet=quiet)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if fmt == "json":
        _echo_json(result.as_dict())
    elif result.difference is None:
        click.echo(f"identical: run {result.reproduction} reproduces run {result.original} ({result.epochs} epochs and test metrics, bit for bit)")
    else:
        click.echo(f"run {result.reproduction} {result.difference.describe()}")
    if result.difference is not None:
        sys.exit(1)


@cli.command()
@click.argument("run_id")
@click.argument("tags", nargs=-1, metavar="[TAG...]")
@click.option("--remove", "-r", multiple=True, metavar="TAG", help="Remove this tag; repeatable.")
@db_option
def tag(run_id: str, tags: tuple[str, ...], remove: tuple[str, ...], db: str | None) -> None:
    """Add TAGs to RUN_ID (or --remove them) and print its tags; `runs` and `report` filter with --tag."""
    from runner.manage import tag_run

    store = _store(db, create=False)
    current = tag_run(store, run_id, add=tags, remove=remove)
    click.echo(f"{store.query.resolve_run_id(run_id)}: {', '.join(current) if current else '(no tags)'}")


def _confirm_or_exit(question: str, nothing_done: str) -> None:
    """Ask; a "no" is said on stderr and ends the command with exit code 1 (not an interruption's 130)."""
    if not click.confirm(question):
        click.echo(nothing_done, err=True)
        sys.exit(1)


artifacts_root_option = click.option("--artifacts", default=None, metavar="DIR",
                                     help="The store's artefact root (default: runs/ beside it); files outside it are never removed.")


@cli.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Also delete runs marked running that have no heartbeat (whose process is gone).")
@db_option
@artifacts_root_option
def delete(run_ids: tuple[str, ...], yes: bool, force: bool, db: str | None, artifacts: str | None) -> None:
    """Delete runs: every stored row and every artefact (checkpoints). Asks first unless --yes."""
    from runner.manage import delete_plan, delete_runs, human_bytes

    store = _store(db, artifacts, create=False)
    plan = delete_plan(store, run_ids, force=force)
    if not yes:
        _confirm_or_exit(f"delete {len(plan.run_ids)} run(s) ({', '.join(plan.run_ids)}) and {human_bytes(plan.bytes)} of files?", "nothing deleted")
    freed = delete_runs(store, plan)
    click.echo(f"deleted {len(plan.run_ids)} run(s): {', '.join(plan.run_ids)}; freed {freed} bytes ({human_bytes(freed)})")
    if plan.kept:
        click.echo(f"kept {len(plan.kept)} file(s) outside the store's artefact root {store.artifacts_root} "
                   f"(another store's, or --artifacts): {', '.join(map(str, plan.kept))}", err=True)


@cli.command()
@click.option("--keep", type=click.Choice(["best", "last", "both"]), default="best", show_default=True, help="Checkpoints each run keeps.")
@click.option("--older-than", default=None, metavar="AGE|DATE", help="Only runs that ended more than AGE ago (30d, 12h, 90m, 2w) or before DATE (ISO, UTC).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@db_option
@artifacts_root_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def prune(keep: str, older_than: str | None, dry_run: bool, yes: bool, db: str | None, artifacts: str | None, fmt: str) -> None:
    """Apply a checkpoint retention policy to completed runs and say how much disk it freed.

    Partial checkpoint files that killed processes left behind are removed too.
    """
    from runner import manage

    store = _store(db, artifacts, create=False)
    candidates = manage.prune_candidates(store, keep, older_than)
    if candidates and not (yes or dry_run):
        files = sum(len(kinds) for kinds in candidates.values())
        _confirm_or_exit(f"remove {files} checkpoint file(s) from {len(candidates)} run(s), keeping {keep}?", "nothing removed")
    result = manage.prune(store, keep=keep, older_than=older_than, dry_run=dry_run)
    if fmt == "json":
        _echo_json(result.as_dict())
        return
    verb = "would free" if dry_run else "freed"
    done = "to prune" if dry_run else "pruned"
    click.echo(f"{len(result.runs_pruned)} of {result.runs_considered} completed run(s) {done} (keep {keep}): "
               f"{result.files_removed} checkpoint file(s), {verb} {result.bytes_freed} bytes ({manage.human_bytes(result.bytes_freed)})")
    if result.temporaries_removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {result.temporaries_removed} partial file(s) left by killed "
                   f"processes ({manage.human_bytes(result.temporaries_bytes)})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (1 for failed runs)."""
    from runner.performance import contention_defaults

    contention_defaults()  # before anything loads torch: OpenMP reads its wait policy once
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # argv None: this process's own command line, so the command may act on the whole process
        cli.main(args=argv, prog_name="runner", standalone_mode=False, obj={"whole_process": argv is None})
    except click.exceptions.Abort as exc:
        cause = exc.__cause__  # click turns a KeyboardInterrupt (e.g. a run's interruption) into Abort
        click.echo(str(cause) if isinstance(cause, KeyboardInterrupt) and str(cause) else "aborted", err=True)
        sys.exit(getattr(cause, "exit_code", 130))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # a run's interruption names the run and how to resume it
        click.echo(str(exc) or "interrupted", err=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except Exception as exc:
        if debug:
            raise
        code = getattr(exc, "exit_code", None)
        if isinstance(exc, RunnerError) or code is not None:
            click.echo(f"error: {exc}", err=True)
            sys.exit(code if isinstance(code, int) else 2)
        click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
