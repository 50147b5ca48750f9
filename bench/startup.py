"""How long the light commands take, against an empty Python: ``runner --help``, ``runner runs``, ``runner report``.

Targets (issue 14), each the median of N fresh processes minus the median of ``python -c pass``:
``runner runs`` within +0.35 s and ``runner report`` within +0.8 s on a store of 1,000 runs, and
``runner runs`` within +0.5 s on a store of 100,000 runs (where it shows the newest page). The
commands alternate with ``python -c pass`` round by round, so a load that drifts slows all alike;
the script also checks that none of them imported torch.

    .venv/bin/python bench/startup.py [-n 7] [--baseline-ref main] [--stores DIR]

``--stores DIR`` keeps the two synthetic stores there (building the big one takes about a minute) and
reuses them next time. The last lines are the targets' verdicts, one per line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import Version, add_baseline_option, build_store, header, measure, median, versions

SMALL, BIG = 1_000, 100_000
# (label, arguments after `runner`, which store, target in seconds over python -c pass)
COMMANDS = [
    ("runner --help", ["--help"], None, None),
    (f"runner runs ({SMALL:,} runs)", ["runs"], SMALL, 0.35),
    (f"runner report ({SMALL:,} runs)", ["report"], SMALL, 0.8),
    (f"runner runs ({BIG:,} runs)", ["runs"], BIG, 0.5),
]
# Runs a CLI command in-process, then says whether torch got imported (a check, not timed)
IMPORT_CHECK = (
    "import sys\nfrom runner.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print('torch imported' if {'torch', 'torchvision'} & set(sys.modules) else 'no torch', file=sys.stderr)\n"
)


def stores_for(version: Version, directory: Path) -> dict[int, Path]:
    """The two stores this version reads, built by its own store code (reused when they exist)."""
    paths = {}
    for runs, epochs in ((SMALL, 20), (BIG, 2)):
        path = directory / f"runs{runs}_schema{version.schema_version()}.db"
        if not path.exists():
            built = build_store(path, runs, epochs, version)
            print(f"  built {path.name} with {version.label} in {built['build_s']:.0f} s", flush=True)
        paths[runs] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="fresh processes per command (default 7; the median counts)")
    parser.add_argument("--stores", type=Path, default=None, help="keep (or reuse) the synthetic stores in this directory")
    add_baseline_option(parser)
    args = parser.parse_args()
    print(header("start-up of the light commands"), flush=True)
    with versions(args.baseline_ref) as measured, tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        store_dir = args.stores.resolve() if args.stores else Path(tmp)
        store_dir.mkdir(parents=True, exist_ok=True)
        stores = {v.label: stores_for(v, store_dir) for v in measured}
        cwd = Path(tmp)
        times: dict[tuple[str, str], list[float]] = {("python", "python -c pass"): []}
        cpu: dict[tuple[str, str], list[float]] = {}  # CPU seconds: what other processes' load changes least
        for i in range(args.n):
            order = [(v, c) for v in measured for c in COMMANDS]
            for version, (label, argv, store, _) in (order if i % 2 == 0 else order[::-1]):
                bare = measure([sys.executable, "-c", "pass"], cwd=cwd)
                times[("python", "python -c pass")].append(bare.wall_s)
                cpu.setdefault(("python", "python -c pass"), []).append(bare.cpu_s)
                command = [*version.runner(), *argv, *(["--db", str(stores[version.label][store])] if store else [])]
                result = measure(command, env=version.env(), cwd=cwd)
                times.setdefault((version.label, label), []).append(result.wall_s)
                cpu.setdefault((version.label, label), []).append(result.cpu_s)
        torch_check = {}
        for version in measured:
            for label, argv, store, _ in COMMANDS:
                check = subprocess.run([*version.python(), "-c", IMPORT_CHECK, *argv, *(["--db", str(stores[version.label][store])] if store else [])],
                                       cwd=cwd, env=version.env(), capture_output=True, text=True)
                torch_check[(version.label, label)] = (check.stderr.strip().splitlines() or ["?"])[-1]

    python = median(times[("python", "python -c pass")])
    print(f"python -c pass: median {python:.3f} s of {len(times[('python', 'python -c pass')])} processes")
    python_cpu = median(cpu[("python", "python -c pass")])
    print(f"{'command':34} {'version':28} {'median s':>9} {'min s':>7} {'over python':>12} {'cpu over python':>16}  torch?")
    for version in measured:
        for label, _, _, _ in COMMANDS:
            values = times[(version.label, label)]
            print(f"{label:34} {version.label:28} {median(values):9.3f} {min(values):7.3f} {median(values) - python:+12.3f} "
                  f"{median(cpu[(version.label, label)]) - python_cpu:+16.3f}  {torch_check[(version.label, label)]}")
    print(header("at the end"))
    for version in reversed(measured):  # this checkout's verdicts last
        for label, _, _, target in COMMANDS:
            if target is None:
                continue
            extra = median(times[(version.label, label)]) - python
            verdict = "met" if extra <= target and torch_check[(version.label, label)] == "no torch" else "NOT met"
            prefix = "" if version.label == "current" else f"[{version.label}] "
            print(f"{prefix}{label}: {extra:+.3f} s over python -c pass (target <= +{target:.2f} s): {verdict}")


if __name__ == "__main__":
    main()
