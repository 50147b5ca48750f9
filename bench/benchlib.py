"""What the bench scripts share: the machine's load, a baseline checkout, timed processes, synthetic stores.

Every bench script measures the runner of this checkout; with ``--baseline-ref REF`` it also measures
the runner of another commit in the same invocation, alternating with this one, so that "before"
and "after" see the same machine and the same load. The other commit is unpacked with
``git archive REF`` into a temporary directory and put first on ``PYTHONPATH`` of the processes
that measure it (``python -m runner`` then imports that commit's ``runner``; the installed
packages, torch included, are shared). The bench scripts themselves are always this checkout's.

    python bench/benchlib.py build-store DB --runs 1000 --epochs 10   # a synthetic store (what the benches use)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "runner" / "data" / "mnist_5k.npz"
# Variables that change how the processes measured here run; the header prints the ones set
TUNING_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "RUNNER_FAST_EXIT")


# ------------------------------------------------------------------------------------------
# The machine


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def header(what: str) -> str:
    """The first line of every bench: what it measures, the load average (1, 5, 15 min) and the tuning environment."""
    tuning = ", ".join(f"{k}={os.environ[k]}" for k in TUNING_ENV if k in os.environ) or "none set"
    return f"{what} | load average {load_average()} on {os.cpu_count()} cores | tuning environment: {tuning}"


# ------------------------------------------------------------------------------------------
# Which runner: this checkout or a baseline commit


@dataclass(frozen=True)
class Version:
    """A runner source tree to measure: ``label`` names it in the output."""

    label: str
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that must import this version's ``runner``."""
        env = dict(os.environ, **extra)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env

    def python(self) -> list[str]:
        """The interpreter, kept from putting the working directory first on ``sys.path`` (``-m`` and ``-c``
        would otherwise import the ``runner`` of whatever checkout the bench was started in)."""
        return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]

    def runner(self) -> list[str]:
        return [*self.python(), "-m", "runner"]

    def schema_version(self) -> int:
        """The store schema this version writes (a store built by one version is read by another only when they agree)."""
        out = subprocess.run([*self.python(), "-c", "from runner.store import SCHEMA_VERSION; print(SCHEMA_VERSION)"],
                             env=self.env(), capture_output=True, text=True, check=True)
        return int(out.stdout)


CURRENT = Version("current", ROOT)


def add_baseline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline-ref", default=None, metavar="GIT_REF",
                        help="also measure the runner of this commit (e.g. main~3), alternating with this checkout's")


@contextlib.contextmanager
def versions(baseline_ref: str | None) -> Iterator[list[Version]]:
    """This checkout, then (with a ref) that commit unpacked into a temporary directory (removed after).

    Both with their bytecode compiled, as a clone's is after its first run: where the environment
    says not to write bytecode (``PYTHONDONTWRITEBYTECODE``), every process would otherwise compile
    this checkout's modules from source and only the baseline's would be compiled.
    """
    compile_bytecode(CURRENT.root / "runner")
    if baseline_ref is None:
        yield [CURRENT]
        return
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        yield [CURRENT, checkout(baseline_ref, Path(tmp))]


def compile_bytecode(package: Path) -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def checkout(ref: str, into: Path) -> Version:
    """``git archive REF`` unpacked into ``into``, its bytecode compiled (as a fresh clone's would be after one run)."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref}: not a commit of {ROOT} ({commit.stderr.strip()})")
    archive = into / "source.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), ref], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    archive.unlink()
    compile_bytecode(into / "src" / "runner")
    return Version(f"baseline {ref} ({commit.stdout.strip()})", into / "src")


# ------------------------------------------------------------------------------------------
# Timed processes


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float  # user + system of the process and its children
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str


def measure(command: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True) -> Measured:
    """Run ``command`` to its end: wall time, CPU time and peak resident memory (``wait4``'s rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, process.returncode,
                          out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def alternating(rounds: int, sides: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, side) in the order A B C, C B A, A B C, ...: no side always goes first or last."""
    for i in range(rounds):
        for side in (sides if i % 2 == 0 else list(reversed(sides))):
            yield i, side


# ------------------------------------------------------------------------------------------
# Synthetic stores


METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
MODELS = ("cnn", "torchvision:resnet18", "torchvision:vgg16", "torchvision:mobilenet_v3_small")
STRATEGIES = ("full_finetune", "head_only", "gradual")


def resolved_spec(name: str, seed: int, model: str, strategy: str, lr: float, epochs: int) -> dict:
    """A resolved spec shaped like the ones runs store (about 1.5 kB of JSON)."""
    return {
        "name": name, "seed": seed, "description": "", "deterministic": False, "device": "cpu",
        "data": {"dataset": "mnist_bundled", "classes": None, "batch_size": 64, "eval_batch_size": None, "num_workers": 0,
                 "channels": "auto", "on_corrupt": "error", "options": {}, "train_per_class": None,
                 "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": None}},
        "model": {"name": model, "num_classes": 10, "weights": "DEFAULT" if model != "cnn" else None, "trust_repo": False,
                  "surgery": {}, "options": {"layers": [{"type": "Conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
                                                        {"type": "BatchNorm2d"}, "ReLU", {"type": "MaxPool2d", "kernel_size": 2},
                                                        "Flatten", {"type": "Linear", "out_features": "num_classes"}]} if model == "cnn" else {}},
        "transforms": {"train": [{"name": "ToImage"}, {"name": "ToDtype", "dtype": "float32", "scale": True}],
                       "eval": [{"name": "ToImage"}, {"name": "ToDtype", "dtype": "float32", "scale": True}]},
        "training": {"epochs": epochs, "optimizer": {"name": "Adam", "lr": lr}, "loss": {"name": "CrossEntropyLoss"},
                     "scheduler": None, "early_stopping": None, "grad_clip": None, "strategy": {"name": strategy}},
    }


def build_store(db: Path, runs: int, epochs: int, version: Version = CURRENT) -> dict[str, float]:
    """A store of ``runs`` completed runs x ``epochs`` epochs x 4 metrics, built by ``version``'s store code.

    Building it in that version's process means its schema is the one that version reads (a newer
    schema would be refused by an older runner). Returns the row counts and the build time.
    """
    result = measure([sys.executable, str(Path(__file__).resolve()), "build-store", str(db), "--runs", str(runs), "--epochs", str(epochs)],
                     env=version.env())
    return json.loads(result.stdout.strip().splitlines()[-1])


def _build_store_here(db: Path, runs: int, epochs: int) -> dict[str, float]:
    """The rows go in through the store's own engine and table definitions (``runner.store.schema``),
    so their types, defaults and constraints are the store's; SQLAlchemy Core inserts them in a few
    big transactions, because the store's one-transaction-per-epoch API would take hours here.
    """
    import sqlalchemy as sa

    from runner.store import Store, schema

    # this script runs with the store code of the version measured: before its tables were Core
    # tables, they were the ORM models' (a --baseline-ref older than that)
    tables = (schema.metadata if hasattr(schema, "metadata") else schema.Base.metadata).tables

    began = time.perf_counter()
    store = Store(db)  # the schema, exactly as the runner creates it
    rng = random.Random(0)
    start = datetime(2024, 1, 1)
    run_rows, split_rows = [], []
    for i in range(runs):
        run_id = f"{i:012x}"
        name, seed = f"experiment-{i // 10:04d}", i % 10
        model, strategy = MODELS[i % len(MODELS)], STRATEGIES[i % len(STRATEGIES)]
        lr = (1e-3, 3e-4, 1e-4)[i % 3]
        started = start + timedelta(minutes=7 * i)
        accuracy = 0.9 + 0.09 * rng.random()
        run_rows.append({
            "id": run_id, "name": name, "status": "completed", "spec_yaml": "",
            "spec_json": json.dumps(resolved_spec(name, seed, model, strategy, lr, epochs), sort_keys=True),
            "spec_hash": f"{i:064x}", "model": model, "strategy": strategy, "dataset": "mnist_bundled", "seed": seed,
            "device": "cpu", "host": "bench", "class_names_json": json.dumps([str(c) for c in range(10)]),
            "confusion_json": json.dumps([[50 if r == c else rng.randint(0, 3) for c in range(10)] for r in range(10)]),
            "weights_source": "torchvision:DEFAULT" if model != "cnn" else None, "started_at": started,
            "ended_at": started + timedelta(minutes=5), "duration_s": 300.0 + rng.random(), "epochs_run": epochs,
            "stop_reason": f"completed {epochs} epochs", "best_epoch": rng.randint(1, epochs), "best_val_accuracy": accuracy - 0.01,
        })
        split_rows += [{"run_id": run_id, "split": "test", "name": n, "value": v}
                       for n, v in (("loss", 1 - accuracy), ("accuracy", accuracy), ("f1_macro", accuracy - 0.002))]

    def chunks(rows: Iterator[dict], size: int = 200_000) -> Iterator[list[dict]]:
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def metric_rows() -> Iterator[dict]:
        for i in range(runs):
            for epoch in range(1, epochs + 1):
                progress = epoch / epochs
                for name, value in zip(METRICS, (1 - progress, progress, 1.1 - progress, progress * 0.98)):
                    yield {"run_id": f"{i:012x}", "epoch": epoch, "name": name, "value": value}

    def epoch_rows() -> Iterator[dict]:
        for i in range(runs):
            for epoch in range(1, epochs + 1):
                yield {"run_id": f"{i:012x}", "epoch": epoch, "duration_s": 6.0, "finished_at": start}

    with store.engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA synchronous=OFF")
        for name, rows in (("runs", iter(run_rows)), ("split_metrics", iter(split_rows)), ("epoch_metrics", metric_rows()), ("epochs", epoch_rows())):
            for chunk in chunks(rows):
                conn.execute(sa.insert(tables[name]), chunk)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = {name: conn.execute(sa.select(sa.func.count()).select_from(tables[name])).scalar_one()
                  for name in ("runs", "epoch_metrics", "epochs", "split_metrics")}
    store.engine.dispose()
    return {"build_s": time.perf_counter() - began, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-store", help="a synthetic store of completed runs (built by the runner on PYTHONPATH)")
    build.add_argument("db", type=Path)
    build.add_argument("--runs", type=int, default=1000)
    build.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    if args.db.exists():
        raise SystemExit(f"{args.db} exists")
    print(json.dumps(_build_store_here(args.db, args.runs, args.epochs)))


if __name__ == "__main__":
    main()
