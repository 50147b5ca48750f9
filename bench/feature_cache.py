"""Frozen-feature cache: training-phase speed-up of a head-only run, and the same final metrics.

A 10-epoch head-only torchvision resnet18 on the bundled digits at 64x64 input, trained once with the
cache (features computed once, the head trained on them) and once without (every epoch runs the
frozen backbone). Times the training phase in-process (``fit``: data and model preparation
excluded; the cache starts empty, so its extraction is counted), then checks the per-epoch and test
metrics agree to 1e-4. Target (issue 14): at least 10x faster.

    .venv/bin/python bench/feature_cache.py [--epochs 10] [--size 64] [--device cpu|cuda] [--baseline-ref REF]

Each version is measured in a process of its own; the last line is this checkout's verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_baseline_option, header, measure, versions

TARGET = 10.0


class _Quiet:
    """Records nothing (runner.training.SilentRecorder, which a baseline before it may lack)."""

    def epoch_done(self, *args: object, **kwargs: object) -> None:
        pass

    def checkpoint_saved(self, *args: object, **kwargs: object) -> None:
        pass

    def check_owner(self) -> None:  # asked before each checkpoint replaces the last: the bench owns its run
        pass


def spec(epochs: int, size: int, cache: str, device: str = "cpu") -> dict:
    return {
        "name": f"bench_feature_cache_{cache}",
        "seed": 0,
        "device": device,
        "data": {"dataset": "mnist_bundled", "batch_size": 64},
        "model": {"name": "torchvision:resnet18", "weights": None},
        "transforms": {"train": [
            {"name": "ToImage"}, {"name": "Resize", "size": size},
            {"name": "ToDtype", "dtype": "float32", "scale": True}, {"name": "Normalize", "mean": [0.1307], "std": [0.3081]},
        ]},
        "training": {"epochs": epochs, "strategy": {"name": "head_only"}, "optimizer": {"name": "Adam", "lr": 0.003}, "feature_cache": cache},
    }


def timed_fit(epochs: int, size: int, cache: str, workdir: Path, device: str = "cpu") -> tuple[float, object, str]:
    from runner.execute import setup
    from runner.plan import plan
    from runner.registries import load_registries
    from runner.spec import load_spec
    from runner.training import fit

    registries = load_registries()
    run_plan = plan(load_spec(spec(epochs, size, cache, device)), registries)
    parts = setup(run_plan, registries)  # seeded, stage 1 applied: as a run starts
    started = time.perf_counter()
    result = fit(run_plan, parts, _Quiet(), workdir / cache / "run")
    return time.perf_counter() - started, result, run_plan.feature_cache.describe()


def runner_process_defaults() -> None:
    """What ``runner run`` sets before torch loads (OpenMP's wait policy), so both trainings run as the command's would.

    A baseline whose runner has no such defaults keeps OpenMP's, as its command did.
    """
    try:
        from runner.performance import contention_defaults
    except ImportError:
        return
    contention_defaults()


def worker(epochs: int, size: int, device: str) -> dict:
    """Both trainings in this process (the runner on PYTHONPATH): seconds, metrics' largest difference, accuracies."""
    runner_process_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        cached_s, cached, state = timed_fit(epochs, size, "auto", Path(tmp), device)
        plain_s, plain, _ = timed_fit(epochs, size, "off", Path(tmp), device)
    worst = max(abs(a[k] - b[k]) for a, b in zip(cached.history, plain.history) for k in a)
    worst = max(worst, *(abs(cached.test[k] - plain.test[k]) for k in ("loss", "accuracy", "f1_macro")))
    return {"cached_s": cached_s, "plain_s": plain_s, "worst": worst, "state": state,
            "cached_accuracy": cached.test["accuracy"], "plain_accuracy": plain.test["accuracy"],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_baseline_option(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.epochs, args.size, args.device)))
        return
    print(header(f"feature cache: head-only resnet18, {args.epochs} epochs, {args.size}x{args.size}, {args.device}"), flush=True)
    results = {}
    with versions(args.baseline_ref) as measured:
        for version in measured:
            out = measure([sys.executable, str(Path(__file__).resolve()), "--worker", "--epochs", str(args.epochs),
                           "--size", str(args.size), "--device", args.device], env=version.env())
            results[version.label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(header("at the end"))
    for label in reversed(list(results)):  # this checkout's last
        r = results[label]
        speedup = r["plain_s"] / r["cached_s"]
        met = speedup >= TARGET and r["worst"] <= 1e-4
        prefix = "" if label == "current" else f"[{label}] "
        print(f"{prefix}cache state: {r['state']}; OMP_WAIT_POLICY {r['omp_wait_policy']}; training phase {r['cached_s']:.2f} s with the cache, {r['plain_s']:.2f} s without; "
              f"largest metric difference {r['worst']:.2e} (target <= 1e-4); test accuracy {r['cached_accuracy']:.4f} / {r['plain_accuracy']:.4f}")
        print(f"{prefix}speed-up: {speedup:.2f}x (target >= {TARGET:.0f}x): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
