"""Frozen-feature cache: training-phase speed-up of a head-only run, and the same final metrics.

A 10-epoch head-only torchvision resnet18 on the bundled digits at 64x64 input, trained once with the
cache (features computed once, the head trained on them) and once without (every epoch runs the
frozen backbone). Times the training phase in-process (`fit`: data and model preparation excluded),
then checks the per-epoch and test metrics agree to 1e-4. Target: at least 5x faster.

    python bench/feature_cache.py [--epochs 10] [--size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from runner.execute import setup
from runner.plan import plan
from runner.registries import load_registries
from runner.spec import load_spec
from runner.training import fit


class _Quiet:
    def epoch_done(self, *args: object, **kwargs: object) -> None:
        pass

    def checkpoint_saved(self, *args: object, **kwargs: object) -> None:
        pass


def spec(epochs: int, size: int, cache: str) -> dict:
    return {
        "name": f"bench_feature_cache_{cache}",
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "mnist_bundled", "batch_size": 64},
        "model": {"name": "torchvision:resnet18", "weights": None},
        "transforms": {"train": [
            {"name": "ToImage"}, {"name": "Resize", "size": size},
            {"name": "ToDtype", "dtype": "float32", "scale": True}, {"name": "Normalize", "mean": [0.1307], "std": [0.3081]},
        ]},
        "training": {"epochs": epochs, "strategy": {"name": "head_only"}, "optimizer": {"name": "Adam", "lr": 0.003}, "feature_cache": cache},
    }


def timed_fit(epochs: int, size: int, cache: str, workdir: Path) -> tuple[float, object, str]:
    registries = load_registries()
    run_plan = plan(load_spec(spec(epochs, size, cache)), registries)
    parts = setup(run_plan, registries)  # seeded, stage 1 applied: as a run starts
    started = time.perf_counter()
    result = fit(run_plan, parts, _Quiet(), workdir / cache / "run")
    return time.perf_counter() - started, result, run_plan.feature_cache.describe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cached_s, cached, state = timed_fit(args.epochs, args.size, "auto", Path(tmp))
        plain_s, plain, _ = timed_fit(args.epochs, args.size, "off", Path(tmp))
    worst = max(abs(a[k] - b[k]) for a, b in zip(cached.history, plain.history) for k in a)
    worst = max(worst, *(abs(cached.test[k] - plain.test[k]) for k in ("loss", "accuracy", "f1_macro")))
    speedup = plain_s / cached_s
    print(f"head-only resnet18, {args.epochs} epochs, {args.size}x{args.size}, cache state: {state}")
    print(f"training phase with cache:    {cached_s:8.2f} s")
    print(f"training phase without cache: {plain_s:8.2f} s")
    print(f"largest metric difference: {worst:.2e} (per-epoch and test; target <= 1e-4)")
    print(f"test accuracy: {cached.test['accuracy']:.4f} with cache, {plain.test['accuracy']:.4f} without")
    print(f"speed-up: {speedup:.2f}x (target >= 5x): {'met' if speedup >= 5 and worst <= 1e-4 else 'NOT met'}")


if __name__ == "__main__":
    main()
