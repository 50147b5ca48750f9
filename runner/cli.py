"""The ``runner`` command line: parse, call the core, print. Torch loads only behind training commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from runner import __version__
from runner.errors import RunnerError

db_option = click.option("--db", envvar="RUNNER_DB", default=None, metavar="URL|PATH", help="Results store (default: results.db; env RUNNER_DB).")


def _store(db: str | None, artifacts: str | None = None, create: bool = True) -> Any:
    from runner.store import Store

    return Store(db, artifacts=artifacts, create=create)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (pandas would cost a noticeable import for `runner runs`)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

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
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (dotted path); repeatable.")
@db_option
@click.option("--artifacts", default=None, metavar="DIR", help="Where run artefacts go (default: runs/ beside the store).")
@click.option("--device", default=None, help="Override the spec's device (auto, cpu, cuda, cuda:N, mps).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(spec: Path, overrides: tuple[str, ...], db: str | None, artifacts: str | None, device: str | None, quiet: bool) -> None:
    """Train the experiment in SPEC and print the new run's id."""
    from runner.execute import run_experiment
    from runner.spec import load_spec

    load_spec(spec, list(overrides))  # a bad spec must fail before the store is touched
    outcome = run_experiment(spec, overrides, store=_store(db, artifacts), device=device, quiet=quiet)
    if not quiet:
        acc = outcome.test.get("accuracy")
        click.echo(f"run {outcome.run_id} completed: test accuracy {acc:.4f}", err=True)
    click.echo(outcome.run_id)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def validate(spec: Path, overrides: tuple[str, ...]) -> None:
    """Check SPEC (keys, types, names, arguments) without running it."""
    from runner.build import resolve_spec
    from runner.plugins import load_registries
    from runner.spec import load_spec

    resolved = resolve_spec(load_spec(spec, list(overrides)), load_registries())
    click.echo(f"{spec}: ok ({resolved.model.name}, {resolved.training.strategy.name}, {resolved.training.epochs} epochs)")


@cli.command()
@db_option
@click.option("--status", default=None, help="Only runs with this status.")
@click.option("--name", default=None, metavar="GLOB", help="Only runs whose name matches.")
@click.option("--limit", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def runs(db: str | None, status: str | None, name: str | None, limit: int | None, fmt: str) -> None:
    """List runs, newest first."""
    from runner.reports import runs_list

    rows = runs_list(_store(db, create=False), status=status, name=name, limit=limit)
    if fmt == "json":
        _echo_json(rows)
    else:
        click.echo(_table(rows, ["id", "name", "status", "model", "strategy", "seed", "epochs_run", "best_val_accuracy", "test_accuracy", "started_at"]))


@cli.command()
@click.argument("run_id")
@db_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show(run_id: str, db: str | None, fmt: str) -> None:
    """Everything stored about one run (an id or a unique prefix)."""
    from runner.reports import run_details

    details = run_details(_store(db, create=False), run_id)
    if fmt == "json":
        _echo_json(details)
        return
    for key in ("id", "name", "status", "model", "strategy", "seed", "device", "started_at", "duration_s", "epochs_run",
                "stop_reason", "best_epoch", "best_val_accuracy", "spec_hash", "git_commit"):
        click.echo(f"{key:18} {details[key]}")
    click.echo(f"{'weights':18} {details['weights']}")
    click.echo(f"{'params':18} {details['params']['total']:,} total, {details['params']['trainable']:,} trainable"
               if details["params"]["total"] is not None else f"{'params':18} -")
    click.echo(f"{'test':18} {details['test']}")
    if details["error"]:
        click.echo(f"{'error':18} {details['error']}")
    if details["epochs"]:
        click.echo("\n" + _table(details["epochs"], list(details["epochs"][0])))


@cli.command()
@db_option
@click.option("--status", default=None)
@click.option("--name", default=None, metavar="GLOB")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown", "html", "json"]), default="table")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def report(db: str | None, status: str | None, name: str | None, fmt: str, output: Path | None) -> None:
    """A report of runs (pandas), printed or written to a file."""
    from runner.reports import report_frame

    frame = report_frame(_store(db, create=False), status=status, name=name)
    writers: dict[str, Callable[[], str]] = {
        "table": lambda: frame.to_string(index=False),
        "csv": lambda: frame.to_csv(index=False),
        "markdown": lambda: frame.to_markdown(index=False),
        "html": lambda: frame.to_html(index=False),
        "json": lambda: frame.to_json(orient="records", indent=2),
    }
    text = writers[fmt]()
    if output is None:
        click.echo(text)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def plugins(fmt: str) -> None:
    """Every registered name per kind, with the plugin that provided it."""
    from runner.plugins import load_registries

    registries = load_registries()
    rows = []
    for kind, registry in registries.by_kind().items():
        collided = registry.collisions()
        for entry in registry.entries():
            rows.append({"kind": kind, "name": entry.name, "plugin": entry.plugin, "distribution": entry.distribution, "version": entry.version, "collision": ""})
        for name, entries in collided.items():
            for entry in entries:
                rows.append({"kind": kind, "name": name, "plugin": entry.plugin, "distribution": entry.distribution, "version": entry.version, "collision": "COLLISION"})
    if fmt == "json":
        _echo_json({"names": rows, "problems": [str(p) for p in registries.problems]})
    else:
        click.echo(_table(rows, ["kind", "name", "plugin", "distribution", "version", "collision"]))
    for problem in registries.problems:
        click.echo(f"warning: {problem}", err=True)


@cli.command()
@click.argument("pattern", required=False)
def models(pattern: str | None) -> None:
    """Model names (optionally an fnmatch PATTERN) with their source plugin."""
    from runner.plugins import load_registries

    registry = load_registries().models
    names = registry.list(include=pattern if pattern is None or any(c in pattern for c in "*?[") else f"*{pattern}*")
    click.echo(_table([{"name": n, "plugin": registry.entry(n).plugin} for n in names], ["name", "plugin"]))


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def summary(spec: Path, overrides: tuple[str, ...]) -> None:
    """torchinfo summary of SPEC's model after surgery and freezing (no weights are loaded)."""
    from runner.build import prepare
    from runner.execute import model_summary
    from runner.models import count_parameters
    from runner.plugins import load_registries
    from runner.spec import load_spec
    from runner.training import apply_stage

    prepared = prepare(load_spec(spec, list(overrides)), load_registries(), base_dir=str(spec.parent), load_weights=False)
    apply_stage(prepared.model, prepared.strategy.stage(1))
    total, trainable = count_parameters(prepared.model)
    click.echo(model_summary(prepared.model, prepared.input_shape, "cpu"))
    click.echo(f"total parameters: {total:,}")
    click.echo(f"trainable parameters: {trainable:,}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (1 for failed runs)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="runner", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
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
