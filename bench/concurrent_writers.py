"""Stress: 16 `runner run` processes start at one instant on one SQLite store; every row must arrive.

Not a test (it takes minutes and a lot of memory): run it by hand, and read its counts.

    .venv/bin/python bench/concurrent_writers.py [--processes 16] [--epochs 2]

Three stores, one after the other: a new one (created by whichever process gets there first), an
existing one that already holds runs, and an old one of schema version 1 that the processes must
migrate while they start (tests/data/store_v1.db). Each process imports torch and the runner first,
then waits at a start barrier (a gate file that opens once every process is ready), so they really
begin together. For each store the script prints what arrived against what should have: runs,
completed runs, epoch rows, metric rows, test metrics, checkpoint rows, plus exit codes and any
"database is locked" on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "specs" / "tiny.yaml"
V1_STORE = ROOT / "tests" / "data" / "store_v1.db"
METRICS_PER_EPOCH = 4  # train_loss, train_accuracy, val_loss, val_accuracy
TEST_METRICS = 3  # loss, accuracy, f1_macro

# Each child imports what it needs, says it is ready (GATE.ready.PID) and waits for the gate file.
CHILD = """
import os, sys, time
import torch, torchvision  # noqa: F401
import runner.cli, runner.execute, runner.plugins  # noqa: F401
gate = sys.argv[1]
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):
    time.sleep(0.001)
print(f"passed {time.time()}", file=sys.stderr)
runner.cli.main(sys.argv[2:])
"""


def count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


def start_together(db: Path, processes: int, epochs: int, workdir: Path) -> tuple[list[subprocess.CompletedProcess[str]], float, float]:
    """Run the processes behind the barrier; their results, the spread of their start (s) and the wall time (s)."""
    gate = workdir / f"gate-{db.stem}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUNNER_HEARTBEAT_S": "1"}
    argv = ["run", str(TINY), "--db", str(db), "-q", "--set", f"training.epochs={epochs}", "--set", "data.train_per_class=30"]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(gate), *argv, "--set", f"seed={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(processes)]
    while len(list(workdir.glob(f"{gate.name}.ready.*"))) < processes:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process ended before the barrier: {[p.communicate() for p in procs if p.poll() is not None]}")
        time.sleep(0.05)
    started = time.monotonic()
    gate.touch()
    results = [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]
    wall = time.monotonic() - started
    passed = [float(line.split()[1]) for r in results for line in r.stderr.splitlines() if line.startswith("passed ")]
    return results, max(passed) - min(passed) if passed else float("nan"), wall


def report(label: str, db: Path, runs_before: int, results: list[subprocess.CompletedProcess[str]], spread: float, wall: float,
           epochs: int, metrics_before: dict[str, int]) -> bool:
    n = len(results)
    codes = sorted({r.returncode for r in results})
    locked = sum("locked" in r.stderr for r in results)
    errors = [line for r in results for line in r.stderr.splitlines() if line.startswith("error")]
    expected = {
        "runs": runs_before + n,
        "completed runs": metrics_before["completed runs"] + n,
        "epoch rows": metrics_before["epoch rows"] + n * epochs,
        "epoch metric rows": metrics_before["epoch metric rows"] + n * epochs * METRICS_PER_EPOCH,
        "test metric rows": metrics_before["test metric rows"] + n * TEST_METRICS,
        "checkpoint rows": metrics_before["checkpoint rows"] + n * 2,  # best and last
    }
    found = store_counts(db)
    print(f"\n{label}: {n} processes, barrier spread {spread:.3f} s, wall {wall:.0f} s, exit codes {codes}, "
          f"'locked' on stderr in {locked}")
    for key, want in expected.items():
        print(f"  {key:18} {found[key]:6} of {want:6}  {'ok' if found[key] == want else 'MISSING'}")
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    print(f"  schema version     {version}")
    for line in errors[:5]:
        print(f"  {line}")
    return codes == [0] and locked == 0 and found == expected


def store_counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {"runs": 0, "completed runs": 0, "epoch rows": 0, "epoch metric rows": 0, "test metric rows": 0, "checkpoint rows": 0}
    return {
        "runs": count(db, "SELECT COUNT(*) FROM runs"),
        "completed runs": count(db, "SELECT COUNT(*) FROM runs WHERE status = 'completed'"),
        "epoch rows": count(db, "SELECT COUNT(*) FROM epochs"),
        "epoch metric rows": count(db, "SELECT COUNT(*) FROM epoch_metrics"),
        "test metric rows": count(db, "SELECT COUNT(*) FROM split_metrics WHERE split = 'test'"),
        "checkpoint rows": count(db, "SELECT COUNT(*) FROM checkpoints"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="runner-writers-"))
    print(f"{args.processes} writers, {args.epochs} epochs each, in {workdir}; {os.cpu_count()} CPUs")
    existing = workdir / "existing.db"
    seeded = subprocess.run([sys.executable, "-m", "runner", "run", str(TINY), "--db", str(existing), "-q",
                             "--set", "training.epochs=1", "--set", "data.train_per_class=30"], capture_output=True, text=True)
    assert seeded.returncode == 0, seeded.stderr
    shutil.copy(V1_STORE, workdir / "old.db")
    ok = True
    for label, db in (("new store", workdir / "new.db"), ("existing store", existing), ("version-1 store, migrated at start", workdir / "old.db")):
        before = store_counts(db)
        results, spread, wall = start_together(db, args.processes, args.epochs, workdir)
        ok &= report(label, db, before["runs"], results, spread, wall, args.epochs, before)
    shutil.rmtree(workdir)
    print("\nall rows arrived" if ok else "\nSOMETHING WAS LOST OR FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
