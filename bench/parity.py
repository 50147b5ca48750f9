"""Is the runner as fast as a hand-written loop? Whole-process wall time, alternating runs.

Runs the quickstart experiment (experiments/quickstart.yaml) through ``runner run`` (a subprocess
doing everything a run does: results store, checkpoints, model summary) and through
``bench/plain_loop.py`` (the same model, data, split, seed, batch size, optimizer and epochs written
by hand), alternating A-B, B-A, ... so that a machine whose load drifts slows both sides alike.
The plain loop copies the thread count, memory format and mixed precision the runner recorded for
its run, so on CPU both must report the same per-epoch losses to the last digit.

    .venv/bin/python bench/parity.py [--rounds 3] [--epochs 8] [--threads N] [--device cpu|cuda]

The last line is ``parity ratio (median): X.XXX`` (runner/plain, median of the paired rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "experiments" / "quickstart.yaml"
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"
DATA = ROOT / "runner" / "data" / "mnist_5k.npz"


def timed(command: list[str], cwd: Path) -> tuple[str, float, float]:
    """stdout, wall seconds and CPU seconds (user + system) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.stdout, wall, cpu


def runner_command(db: Path, args: argparse.Namespace) -> list[str]:
    script = Path(sys.executable).parent / "runner"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "runner"]
    command += ["run", "-q", "--db", str(db), str(SPEC), "--set", f"training.epochs={args.epochs}"]
    if args.threads:
        command += ["--set", f"performance.threads={args.threads}"]
    if args.device:
        command += ["--device", args.device]
    return command


def plain_command(spec: Any, performance: dict[str, Any], device: str, args: argparse.Namespace) -> list[str]:
    """The plain loop with the runner's workload and the switches the runner recorded for its run."""
    command = [
        sys.executable, str(PLAIN_LOOP), "--data", str(DATA), "--epochs", str(args.epochs),
        "--batch-size", str(spec.data.batch_size), "--lr", str(spec.training.optimizer.options["lr"]),
        "--weight-decay", str(spec.training.optimizer.options["weight_decay"]),
        "--max-lr", str(spec.training.scheduler.options["max_lr"]),
        "--total-steps", str(spec.training.scheduler.options["total_steps"]),
        "--seed", str(spec.seed), "--threads", str(performance["threads"]), "--device", device,
        "--amp", performance["amp"] or "off",
    ]
    if performance["channels_last"]:
        command.append("--channels-last")
    if performance["cudnn_benchmark"]:
        command.append("--cudnn-benchmark")
    return command


def runner_results(db: Path, run_id: str) -> dict[str, Any]:
    from runner.reports import run_details
    from runner.store import Store

    details = run_details(Store(db, create=False), run_id)
    epochs = [{k: e[k] for k in ("train_loss", "val_loss", "val_accuracy")} for e in details["epochs"]]
    return {"epochs": epochs, "test": details["test"], "settings": details["settings"], "device": details["device"]}


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": result["epochs"], "test": {k: result["test"][k] for k in ("loss", "accuracy", "f1_macro")}}


def largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    pairs = [(x[k], y[k]) for x, y in zip(a["epochs"], b["epochs"]) for k in x]
    pairs += [(a["test"][k], b["test"][k]) for k in a["test"]]
    return max(abs(x - y) for x, y in pairs)


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}  min {min(values):.2f}  max {max(values):.2f}"


def main() -> None:
    from runner.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the quickstart spec's (8)")
    parser.add_argument("--threads", type=int, default=0, help="performance.threads for both sides (default: the runner's default)")
    parser.add_argument("--device", default=None, help="runner --device (default: the spec's, auto)")
    args = parser.parse_args()
    spec = load_spec(SPEC)
    args.epochs = args.epochs or spec.training.epochs

    runner_walls: list[float] = []
    plain_walls: list[float] = []
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    outputs: dict[str, list[dict[str, Any]]] = {"runner": [], "plain": []}
    recorded: dict[str, Any] = {}
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        def run_runner(i: int) -> tuple[float, float]:
            work = Path(tmp) / f"runner-{i}"
            work.mkdir()
            out, wall, cpu = timed(runner_command(work / "results.db", args), work)
            result = runner_results(work / "results.db", out.strip().splitlines()[-1])
            recorded.setdefault("performance", result["settings"]["performance"])
            recorded.setdefault("device", result["device"])
            outputs["runner"].append(comparable(result))
            return wall, cpu

        def run_plain(i: int) -> tuple[float, float]:
            out, wall, cpu = timed(plain_command(spec, recorded["performance"], recorded["device"], args), Path(tmp))
            outputs["plain"].append(comparable(json.loads(out)))
            return wall, cpu

        for i in range(args.rounds):
            # A-B, then B-A: neither side always runs first (the runner goes first once, to learn its switches)
            if i % 2 == 0:
                (rw, rc), (pw, pc) = run_runner(i), run_plain(i)
            else:
                (pw, pc), (rw, rc) = run_plain(i), run_runner(i)
            runner_walls.append(rw)
            plain_walls.append(pw)
            ratios.append(rw / pw)
            cpu_ratios.append(rc / pc)
            if i == 0:
                perf = recorded["performance"]
                print(f"workload: {SPEC.relative_to(ROOT)}, {args.epochs} epochs, batch {spec.data.batch_size}, "
                      f"{spec.training.optimizer.name} lr {spec.training.optimizer.options['lr']}, seed {spec.seed}, "
                      f"device {recorded['device']}, threads {perf['threads']}, channels_last {perf['channels_last']}, "
                      f"amp {perf['amp']}", flush=True)
            print(f"round {i + 1}: runner {rw:.2f} s (cpu {rc:.2f} s)  plain {pw:.2f} s (cpu {pc:.2f} s)  "
                  f"ratio {rw / pw:.3f}", flush=True)

    reference = outputs["plain"][0]
    identical = all(o == reference for side in outputs.values() for o in side)
    print(f"runner wall s: {summary(runner_walls)}")
    print(f"plain  wall s: {summary(plain_walls)}")
    print(f"ratio of median wall times: {statistics.median(runner_walls) / statistics.median(plain_walls):.3f}")
    print(f"cpu-time ratio runner/plain (median of rounds): {statistics.median(cpu_ratios):.3f}")
    if identical:
        print(f"per-epoch losses agree: yes, to the last digit (train_loss, val_loss, val_accuracy of {args.epochs} epochs "
              f"and the test metrics; {args.rounds} runs each side)")
    else:
        worst = max(largest_difference(o, reference) for side in outputs.values() for o in side)
        print(f"per-epoch losses agree: no (largest difference {worst:.3g})")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"parity ratio (min): {min(ratios):.3f}")
    print(f"parity ratio (max): {max(ratios):.3f}")
    print(f"parity ratio (median): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
