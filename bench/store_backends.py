"""PostgreSQL against SQLite as the results store: the queue's claims and the report, measured.

1. Claims: 200 queued empty runs, claimed and finished (``completed``) by 1, 4 and 16 worker
   processes started at the same instant (a start barrier); the wall time until the queue is empty
   and each claim's latency (median, 95th percentile, worst), per backend.
2. Reports: a store of ``--rows`` per-epoch metric rows (default 2,000,000: 10,000 runs x 50 epochs
   x 4 metrics) on each backend, then ``runner report`` as a whole process, several ways.

    python bench/store_backends.py                     # the full measurement (a throwaway PostgreSQL server)
    python bench/store_backends.py --quick             # 200 runs with 1 and 4 workers, 40,000 metric rows
    python bench/store_backends.py --pg-url postgresql://me@host/db   # an existing server (its database is emptied)

Not a test: the numbers depend on the machine and its load, so the script prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from benchlib import METRICS, MODELS, STRATEGIES, measure, resolved_spec  # noqa: E402

CLAIMER = """
import json, os, sys, time
from runner.store import Store, new_owner
gate, url = sys.argv[1], sys.argv[2]
store = Store(url, artifacts=sys.argv[3])
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):
    time.sleep(0.001)
began = time.time()
latencies = []
while True:
    start = time.perf_counter()
    claim = store.queue.claim(new_owner(), 60.0)
    latencies.append(time.perf_counter() - start)
    if claim is None:
        break
    store.runs.finish(claim.run_id, "completed", owner=claim.owner)
print(json.dumps({"began": began, "ended": time.time(), "claims": latencies[:-1]}))
"""


def queue_runs(url: str, artifacts: Path, runs: int) -> None:
    """A sweep of ``runs`` queued runs with small specs (nothing trains: the claims are what is measured)."""
    from runner.store import Store
    from runner.store.queue import QueuedRun, SweepRecord

    record = SweepRecord("bench", "hash-bench", "{}", "/tmp", ("k",), 2)
    queued = [QueuedRun(i, "bench", "", json.dumps({"training": {"epochs": 1}}), f"h{i}", "cnn", "full_finetune", "mnist", 0, {"k": i})
              for i in range(1, runs + 1)]
    Store(url, artifacts=artifacts).queue.enqueue(record, queued)


def claim_race(url: str, artifacts: Path, workers: int, scratch: Path) -> dict[str, float]:
    """``workers`` processes claim and finish the queue at once; wall time and claim latencies."""
    gate = scratch / f"gate-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(gate), url, str(artifacts)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    while len(list(scratch.glob(f"{gate.name}.ready.*"))) < workers:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a claimer died: " + "".join(p.communicate()[1] for p in procs))
        time.sleep(0.01)
    gate.touch()
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a claimer failed: {err}")
        reports.append(json.loads(out))
    claims = sorted(latency for r in reports for latency in r["claims"])
    return {"wall_s": max(r["ended"] for r in reports) - min(r["began"] for r in reports), "claims": len(claims),
            "median_ms": 1000 * statistics.median(claims), "p95_ms": 1000 * claims[int(0.95 * (len(claims) - 1))],
            "max_ms": 1000 * claims[-1]}


def build_report_store(url: str, artifacts: Path, rows: int, epochs: int = 50) -> dict[str, Any]:
    """Runs of ``epochs`` epochs x 4 metrics up to ``rows`` metric rows, inserted with SQLAlchemy Core in
    batches: the same code for both backends (the schema comes from the store module)."""
    import sqlalchemy as sa

    from runner.store import Store, schema

    store = Store(url, artifacts=artifacts)
    runs = max(1, rows // (epochs * len(METRICS)))
    rng = random.Random(0)
    start = datetime(2024, 1, 1)
    began = time.perf_counter()
    with store.engine.begin() as conn:
        for first in range(0, runs, 500):
            run_rows, split_rows, metric_rows, epoch_rows = [], [], [], []
            for i in range(first, min(runs, first + 500)):
                run_id, name, seed = f"{i:012x}", f"experiment-{i // 10:04d}", i % 10
                model, strategy, lr = MODELS[i % len(MODELS)], STRATEGIES[i % len(STRATEGIES)], (1e-3, 3e-4, 1e-4)[i % 3]
                accuracy, started = 0.9 + 0.09 * rng.random(), start + timedelta(minutes=7 * i)
                run_rows.append({
                    "id": run_id, "name": name, "status": "completed", "spec_yaml": "",
                    "spec_json": json.dumps(resolved_spec(name, seed, model, strategy, lr, epochs), sort_keys=True),
                    "spec_hash": f"{i:064x}", "model": model, "strategy": strategy, "dataset": "mnist_bundled", "seed": seed,
                    "device": "cpu", "host": "bench", "started_at": started, "ended_at": started + timedelta(minutes=5),
                    "duration_s": 300.0, "epochs_run": epochs, "stop_reason": f"completed {epochs} epochs", "best_epoch": epochs,
                    "best_val_accuracy": accuracy - 0.01, "attempts": 1,
                })
                split_rows += [{"run_id": run_id, "split": "test", "name": k, "value": v}
                               for k, v in (("loss", 1 - accuracy), ("accuracy", accuracy), ("f1_macro", accuracy - 0.002))]
                for epoch in range(1, epochs + 1):
                    progress = epoch / epochs
                    metric_rows += [{"run_id": run_id, "epoch": epoch, "name": k, "value": v}
                                    for k, v in zip(METRICS, (1 - progress, progress, 1.1 - progress, progress * 0.98))]
                    epoch_rows.append({"run_id": run_id, "epoch": epoch, "duration_s": 6.0, "finished_at": start})
            conn.execute(sa.insert(schema.runs), run_rows)
            conn.execute(sa.insert(schema.split_metrics), split_rows)
            conn.execute(sa.insert(schema.epoch_metrics), metric_rows)
            conn.execute(sa.insert(schema.epochs), epoch_rows)
    return {"build_s": time.perf_counter() - began, "runs": runs, "metric_rows": runs * epochs * len(METRICS)}


REPORTS = [
    ["report"],
    ["report", "--format", "json"],
    ["report", "--group-by", "name", "--format", "json"],
    ["report", "--where", "model.name=torchvision:resnet18", "--where", "training.optimizer.lr=1e-3", "--sort", "-test_accuracy"],
    ["report", "--group-by", "model.name,training.optimizer.lr", "--columns", "test_accuracy"],
]


def report_times(url: str, cwd: Path, repeat: int) -> list[tuple[str, float, int]]:
    """Best wall time and its peak memory of each report command, as a whole ``runner`` process."""
    out = []
    for args in REPORTS:
        runs = [measure([sys.executable, "-m", "runner", *args, "--db", url], cwd=cwd) for _ in range(repeat)]
        best = min(runs, key=lambda run: run.wall_s)
        out.append((" ".join(args), best.wall_s, best.peak_rss_bytes))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 workers, 40,000 metric rows, one repeat")
    parser.add_argument("--runs", type=int, default=200, help="queued runs claimed per measurement")
    parser.add_argument("--workers", default=None, help="worker counts, comma separated (default 1,4,16)")
    parser.add_argument("--rows", type=int, default=None, help="metric rows of the report store (default 2,000,000)")
    parser.add_argument("--repeat", type=int, default=None, help="measure each report this many times (default 3)")
    parser.add_argument("--pg-url", default=None, help="an existing PostgreSQL database to use (default: a throwaway server)")
    options = parser.parse_args()
    workers = [int(w) for w in (options.workers or ("1,4" if options.quick else "1,4,16")).split(",")]
    rows = options.rows or (40_000 if options.quick else 2_000_000)
    repeat = options.repeat or (1 if options.quick else 3)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        new_pg = _postgres(stack, options.pg_url)
        backends: dict[str, Callable[[str], str]] = {"sqlite": lambda tag: str(scratch / f"{tag}.db"), "postgresql": new_pg}
        print(f"\n{options.runs} empty runs claimed and finished (each claim: one transaction; then one finish)")
        print(f"{'backend':11} {'workers':>7} {'wall s':>8} {'runs/s':>8} {'claim median ms':>16} {'p95 ms':>8} {'max ms':>8}")
        for backend, new_store in backends.items():
            for count in workers:
                url = new_store(f"claims{count}")
                queue_runs(url, scratch / "runs", options.runs)
                result = claim_race(url, scratch / "runs", count, scratch)
                assert result["claims"] == options.runs, result
                print(f"{backend:11} {count:7d} {result['wall_s']:8.2f} {options.runs / result['wall_s']:8.1f} "
                      f"{result['median_ms']:16.1f} {result['p95_ms']:8.1f} {result['max_ms']:8.1f}")
        print(f"\nrunner report on {rows:,} metric rows (best of {repeat}, whole process)")
        for backend, new_store in backends.items():
            url = new_store("report")
            built = build_report_store(url, scratch / "runs", rows)
            print(f"{backend}: built {built['runs']:,} runs, {built['metric_rows']:,} metric rows in {built['build_s']:.0f} s")
            for command, seconds, peak in report_times(url, scratch, repeat):
                print(f"  {seconds:6.2f} s  {peak / 2**20:6.0f} MiB  runner {command}")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


def _postgres(stack: ExitStack, url: str | None) -> Callable[[str], str]:
    """A maker of empty PostgreSQL databases: on the given server (its database emptied each time) or a throwaway one."""
    if url is not None:
        import sqlalchemy as sa

        def emptied(_tag: str) -> str:
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            engine.dispose()
            return url

        return emptied
    from pg_server import throwaway_server, why_no_server

    reason = why_no_server()
    if reason is not None:
        raise SystemExit(f"no PostgreSQL: {reason}; or pass --pg-url")
    server = stack.enter_context(throwaway_server())
    return lambda _tag: server.new_database()


if __name__ == "__main__":
    sys.exit(main())
