"""How long the light commands take to start, against an empty Python: ``runner --help``, ``runner runs``, ``runner report``.

Each command runs as a fresh process N times (alternating with ``python -c pass``); the script prints
the medians, the difference from ``python -c pass`` (target: within 0.3 s) and checks that none of
them imported torch or torchvision.

    .venv/bin/python bench/startup.py [-n 7]
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

# Runs a CLI command in-process, then says whether torch got imported (a check, not timed)
IMPORT_CHECK = (
    "import sys\nfrom runner.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print('heavy:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules), file=sys.stderr)\n"
)


def wall(command: list[str], cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def runner_script() -> list[str]:
    script = Path(sys.executable).parent / "runner"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="runs of each command (default 7)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        db = str(Path(tmp) / "results.db")
        from runner.store import Store

        Store(db)  # an empty store, so `runs` and `report` read a real database
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "runner --help": [*runner_script(), "--help"],
            "runner runs": [*runner_script(), "runs", "--db", db],
            "runner report": [*runner_script(), "report", "--db", db],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.n):
            for name, command in commands.items():
                times[name].append(wall(command, tmp))
        heavy = {}
        for name in list(commands)[1:]:
            argv = name.split()[1:] + (["--db", db] if name != "runner --help" else [])
            check = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *argv], cwd=tmp, capture_output=True, text=True)
            heavy[name] = check.stderr.strip().splitlines()[-1] if check.stderr.strip() else "heavy: ?"
    baseline = statistics.median(times["python -c pass"])
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.n} runs each, medians")
    for name, values in times.items():
        extra = "" if name == "python -c pass" else f"  +{statistics.median(values) - baseline:.3f} s  ({heavy[name]})"
        print(f"{name:16} {statistics.median(values):.3f} s  (min {min(values):.3f}){extra}")
    worst = max(statistics.median(v) for k, v in times.items() if k != "python -c pass")
    print(f"runner --help vs python -c pass: +{statistics.median(times['runner --help']) - baseline:.3f} s (target: within 0.3 s)")
    print(f"slowest light command vs python -c pass: +{worst - baseline:.3f} s")


if __name__ == "__main__":
    main()
