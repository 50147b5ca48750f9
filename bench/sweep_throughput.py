"""Sweep throughput: 8 quickstart-sized runs with one worker against two worker processes, and what the queue costs per run.

Not a test: it prints figures. Each sweep is a whole ``runner run SPEC --seeds 8 -j N -q`` process on
a new store (the quickstart spec, fewer epochs by default so it finishes in minutes; ``--epochs 8``
for the quickstart's own): one worker with torch's default threads (the cores), one worker with one
thread, and ``--jobs`` workers (one thread each on 2 cores). For each it prints the wall time, the
runs' own time (``duration_s``: claim, plan, build and train) and the rest per run: process start,
checking the 8 specs, queueing, and for -j 2 the workers' start (the rest of a parallel sweep
assumes its runs overlapped perfectly, so it is a lower bound).

Then the queue alone, on a new SQLite store, no training: the time to check (plan) one quickstart
spec, to enqueue a run, to claim one, and to record its plan on the claimed row (``start``), per run.
The target for queueing and claiming is under 0.2 s per run.

    .venv/bin/python bench/sweep_throughput.py [--epochs 2] [--runs 8] [--jobs 2] [--queue-runs 200]

The machine's load (``uptime``) is printed before and after: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import TUNING_ENV

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def sweep_spec(directory: Path, epochs: int, runs: int) -> Path:
    """The quickstart over ``runs`` seeds with ``epochs`` epochs (its one-cycle schedule shortened to match)."""
    text = QUICKSTART.read_text().replace("name: quickstart", f"name: quickstart_x{runs}\nseeds: {runs}")
    text = text.replace("  epochs: 8\n", f"  epochs: {epochs}\n").replace("total_steps: 8", f"total_steps: {epochs}")
    path = directory / "sweep.yaml"
    path.write_text(text)
    return path


def time_sweep(spec: Path, jobs: int, directory: Path, threads: int | None = None) -> dict[str, float]:
    db = directory / f"j{jobs}-t{threads}.db"
    extra = ["--set", f"performance.threads={threads}"] if threads else []
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "runner", "run", str(spec), "--db", str(db), "-j", str(jobs), "-q", *extra],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the -j {jobs} sweep failed:\n{result.stderr}")
    with sqlite3.connect(db) as conn:
        durations = [d for (d,) in conn.execute("SELECT duration_s FROM runs WHERE sweep_id IS NOT NULL")]
        threads = {json.loads(s)["performance"]["threads"] for (s,) in conn.execute("SELECT settings_json FROM runs WHERE sweep_id IS NOT NULL")}
        metrics = conn.execute("SELECT run_id, epoch, name, value FROM epoch_metrics ORDER BY run_id, epoch, name").fetchall()
    runs = len(durations)
    return {"wall": wall, "runs": runs, "training": sum(durations), "overhead_per_run": (wall - sum(durations) / jobs) / runs,
            "threads": sorted(threads), "metrics": len(metrics)}


QUEUE_BENCH = r"""
import json, sys, time
from pathlib import Path
from runner.registries import load_registries
from runner.store import Store, new_owner
from runner.sweeps import load_sweep, plan_sweep, queue_sweep, expand
from runner.execute import run_columns
from runner.plan import plan
from runner.spec import load_spec

spec, db, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
registries = load_registries()
document = load_sweep(spec, seeds_flag=str(count))
started = time.perf_counter()
planned = plan_sweep(document, registries)
checked = time.perf_counter() - started

store = Store(db)
started = time.perf_counter()
queued = queue_sweep(store, document, planned)
enqueued = time.perf_counter() - started

row_plan = plan(load_spec(planned[0].spec), registries, base_dir=str(spec.parent))
columns = run_columns(row_plan, "")
claims, starts = [], []
while True:
    t0 = time.perf_counter()
    claim = store.queue.claim(new_owner(), 10.0, queued.sweep_id)
    t1 = time.perf_counter()
    if claim is None:
        break
    store.queue.start(claim.run_id, claim.owner, 0, 10.0, **columns)
    t2 = time.perf_counter()
    claims.append(t1 - t0)
    starts.append(t2 - t1)
print(json.dumps({"runs": len(planned), "check": checked / len(planned), "enqueue": enqueued / len(planned),
                  "claim": sum(claims) / len(claims), "claim_max": max(claims), "start": sum(starts) / len(starts)}))
"""


def time_queue(spec: Path, directory: Path, count: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", QUEUE_BENCH, str(spec), str(directory / "queue.db"), str(count)],
                            capture_output=True, text=True, env={**os.environ, "RUNNER_DISABLE_PLUGINS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the queue benchmark failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--queue-runs", type=int, default=200)
    parser.add_argument("--skip-sweeps", action="store_true", help="only the queue figures")
    args = parser.parse_args()
    print(f"load before: {uptime()}")
    print(f"cores: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}; "
          f"OpenMP waiting: runner's default unless set here ({', '.join(f'{k}={os.environ[k]}' for k in TUNING_ENV if k in os.environ) or 'none set'})")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        spec = sweep_spec(directory, args.epochs, args.runs)
        configurations = [] if args.skip_sweeps else [("-j 1", 1, None), ("-j 1, 1 thread", 1, 1), (f"-j {args.jobs}", args.jobs, None)]
        results = {}
        for label, jobs, threads in configurations:
            results[label] = figures = time_sweep(spec, jobs, directory, threads)
            print(f"{label}: {figures['runs']} runs x {args.epochs} epochs in {figures['wall']:.1f} s wall "
                  f"({figures['runs'] / figures['wall'] * 60:.2f} runs/min); runs' own time {figures['training']:.1f} s in all; "
                  f"the rest {figures['overhead_per_run']:.2f} s per run; torch threads per run {figures['threads']}", flush=True)
        if results:
            parallel = results[f"-j {args.jobs}"]["wall"]
            print(f"-j {args.jobs} against -j 1: {results['-j 1']['wall'] / parallel:.2f}x; "
                  f"against -j 1 with one thread: {results['-j 1, 1 thread']['wall'] / parallel:.2f}x")
        queue = time_queue(spec, directory, args.queue_runs)
        print(f"queue, {queue['runs']} runs on SQLite: check (plan) {queue['check'] * 1000:.1f} ms/run, "
              f"enqueue {queue['enqueue'] * 1000:.2f} ms/run, claim {queue['claim'] * 1000:.2f} ms/run "
              f"(slowest {queue['claim_max'] * 1000:.1f} ms), record the plan {queue['start'] * 1000:.2f} ms/run")
        per_run = queue["enqueue"] + queue["claim"] + queue["start"]
        print(f"queueing and claiming (enqueue + claim + record the plan): {per_run:.3f} s per run (target < 0.2 s); "
              f"with the check before queueing: {per_run + queue['check']:.3f} s per run")
    print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
