"""One process against N (DistributedDataParallel through `runner run --nproc N`): time per epoch, images per second.

Each round trains the same spec twice in fresh stores, alternating which goes first so a machine
whose load drifts slows both alike: once as a plain `runner run` (one process, torch's default
threads), once with ``--nproc N`` (torchrun's launcher; one thread per process on the CPU, one GPU
per process on CUDA). By default the global batch stays the spec's (each process gets
``batch_size / N``), so both sides train on the same batches and differ only in how the work is
shared; ``--per-process-batch`` keeps ``batch_size`` per process instead (N times the global batch,
the usual way to scale on GPUs).

    .venv/bin/python bench/distributed.py                       # quickstart, 1 vs 2 processes, CPU
    .venv/bin/python bench/distributed.py --vgg --device cuda --nproc 4 --per-process-batch
        # experiments/vgg_pretrain.yaml (full VGG training), then experiments/vgg_transfer.yaml on
        # the weights of that run (head only, on cached features)

Both sides run with runner's own OpenMP waiting (a short spin, see the README's "Speed") unless the
environment sets it: with OpenMP's default spinning, a multi-threaded process on a machine shared
with other work waits for time slices, which would make any comparison a measure of the load.
``--threads T`` sets the one process's threads (default: torch's, the number of cores); each of the
N processes uses one (torchrun's ``OMP_NUM_THREADS=1``).

Per run it prints the whole-process wall time, the run's duration, the median epoch time and the
training images per epoch-second (training split / median epoch time; an epoch includes
validation and its bookkeeping). The load average is printed before and after: on a shared
machine, compare only figures taken under similar load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
VGG_PRETRAIN = ROOT / "experiments" / "vgg_pretrain.yaml"
VGG_TRANSFER = ROOT / "experiments" / "vgg_transfer.yaml"


def runner(args: list[str], env: dict[str, str]) -> tuple[str, float]:
    """stdout (the run id) and wall seconds of one `runner` process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"runner {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1], wall


def one_run(spec: Path, db: Path, nproc: int, sets: list[str], args: argparse.Namespace) -> tuple[str, float]:
    batch = spec_batch(spec)
    if nproc > 1 and not args.per_process_batch:
        if batch % nproc:
            raise SystemExit(f"{spec.name}: batch size {batch} does not split over {nproc} processes; use --per-process-batch")
        sets = [*sets, f"data.batch_size={batch // nproc}"]
    command = ["run", "-q", "--db", str(db), str(spec), "--device", args.device, *[a for s in sets for a in ("--set", s)]]
    if args.epochs:
        command += ["--set", f"training.epochs={args.epochs}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    elif args.threads:
        command += ["--set", f"performance.threads={args.threads}"]
    return runner(command, dict(os.environ))


def spec_batch(spec: Path) -> int:
    from runner.spec import load_spec

    return load_spec(spec).data.batch_size


def describe(db: Path, run_id: str, wall: float, label: str) -> dict[str, Any]:
    from runner.reports import run_details
    from runner.store import Store

    details = run_details(Store(db, create=False), run_id)
    durations = epoch_durations(db, run_id)
    median = statistics.median(durations)
    distributed = details["settings"].get("distributed", {})
    figures = {
        "label": label, "name": details["name"], "processes": distributed.get("world_size", 1),
        "global_batch": distributed.get("global_batch_size"), "threads": details["settings"]["performance"]["threads"],
        "backend": distributed.get("backend") or "-", "sync_batchnorm": distributed.get("sync_batchnorm", False),
        "wall_s": wall, "run_s": details["duration_s"], "epochs": len(durations), "median_epoch_s": median,
        "images_per_s": details["settings"]["split_sizes"]["train"] / median, "test_accuracy": details["test"].get("accuracy"),
    }
    return figures


def epoch_durations(db: Path, run_id: str) -> list[float]:
    """Seconds per epoch, as the run stored them (`runner show` does not print them: read the file, read-only)."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return [row[0] for row in connection.execute("SELECT duration_s FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))]


def trial(nproc: int, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One configuration in a fresh store: the quickstart, or the VGG pretraining then the transfer."""
    db = workdir / f"n{nproc}-{time.monotonic_ns()}.db"
    label = f"{nproc} process{'es' if nproc > 1 else ''}"
    if not args.vgg:
        run_id, wall = one_run(args.spec, db, nproc, [], args)
        return [describe(db, run_id, wall, label)]
    pretrain, wall = one_run(VGG_PRETRAIN, db, nproc, [], args)
    transfer, wall_transfer = one_run(VGG_TRANSFER, db, nproc, [f"model.weights={{run: {pretrain}}}"], args)
    return [describe(db, pretrain, wall, label), describe(db, transfer, wall_transfer, label)]


def show(figures: dict[str, Any]) -> None:
    print(f"  {figures['label']:12} {figures['name']:14} x{figures['processes']} (global batch {figures['global_batch']}, "
          f"{figures['threads']} thread(s) each, backend {figures['backend']}, SyncBatchNorm {'on' if figures['sync_batchnorm'] else 'off'}): "
          f"{figures['wall_s']:7.1f} s process, {figures['run_s']:7.1f} s run, "
          f"{figures['epochs']} epochs, median epoch {figures['median_epoch_s']:6.2f} s = {figures['images_per_s']:7.1f} "
          f"train images/s | test accuracy {figures['test_accuracy']:.4f}")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=QUICKSTART)
    parser.add_argument("--vgg", action="store_true", help="vgg_pretrain.yaml, then vgg_transfer.yaml on its weights")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="0: the specs' own")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="threads of the one process (0: torch's default)")
    parser.add_argument("--per-process-batch", action="store_true", help="batch_size per process (N times the global batch)")
    args = parser.parse_args()

    print(f"before: {load()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: runner sets a short spin)')}")
    results: dict[int, list[list[dict[str, Any]]]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = [1, args.nproc] if round_ % 2 == 0 else [args.nproc, 1]
            print(f"round {round_ + 1} ({' then '.join(map(str, order))} process(es)):")
            for nproc in order:
                figures = trial(nproc, args, Path(tmp))
                for f in figures:
                    show(f)
                results[nproc].append(figures)
    print(f"after: {load()}")
    for step in range(len(results[1][0])):
        one = statistics.median(r[step]["images_per_s"] for r in results[1])
        many = statistics.median(r[step]["images_per_s"] for r in results[args.nproc])
        name = results[1][0][step]["name"]
        print(f"{name}: {args.nproc} processes / 1 process, train images per epoch-second (median of {args.rounds}): "
              f"{many:.1f} / {one:.1f} = {many / one:.2f}x")


if __name__ == "__main__":
    main()
