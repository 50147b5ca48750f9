"""Several experiments at once on one machine: each copy's time over the time of one copy alone.

Runs the quickstart (experiments/quickstart.yaml) alone, then 2 and 3 copies started at the same
moment, through ``runner run`` (its defaults, one shared results store as a sweep would use) and as
the hand-written loop ``bench/plain_loop.py`` (the same model, data and epochs, with torch's and
OpenMP's defaults, as a user's own script has them). Each copy's wall time is divided by the solo
time of its side. Targets (issue 14, for runner's defaults on 2 cores): every copy of 2 within 2.3x
solo, every copy of 3 within 3.5x. The plain loop's ratios are there to compare against.

    .venv/bin/python bench/contention.py [--epochs 8] [--copies 1,2,3] [--rounds 1] [--baseline-ref REF]
        [--set performance.threads=1] [--env OMP_WAIT_POLICY=ACTIVE]

``--set`` adds spec overrides to the runner's copies and ``--env`` variables to every copy (both for
trying other defaults). The last lines are the verdicts, the current checkout's last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import DATA, ROOT, Version, add_baseline_option, header, measure, median, versions

SPEC = ROOT / "experiments" / "quickstart.yaml"
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"
TARGETS = {2: 2.3, 3: 3.5}


def runner_command(version: Version, db: Path, epochs: int | None, sets: list[str], device: str | None) -> list[str]:
    command = [*version.runner(), "run", "-q", "--db", str(db), str(SPEC), *(["--device", device] if device else [])]
    for override in ([f"training.epochs={epochs}"] if epochs else []) + sets:
        command += ["--set", override]
    return command


def plain_command(epochs: int | None) -> list[str]:
    # the runner's recorded switches on a CPU: channels_last on, torch's default thread count
    return [sys.executable, str(PLAIN_LOOP), "--data", str(DATA), "--epochs", str(epochs or 8), "--channels-last", "--device", "cpu"]


def at_once(commands: list[list[str]], env: dict[str, str], cwd: Path) -> list[float]:
    """Start every command at the same moment; each one's wall time."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return [m.wall_s for m in pool.map(lambda c: measure(c, env=env, cwd=cwd), commands)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the quickstart spec's (8)")
    parser.add_argument("--copies", default="1,2,3", help="how many copies at once, in turn (1 is the solo time)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence; the solo time is the median")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="spec override for the runner's copies")
    parser.add_argument("--env", action="append", default=[], metavar="VAR=VALUE", help="environment variable for every copy")
    parser.add_argument("--no-plain", action="store_true", help="measure only the runner")
    parser.add_argument("--device", default=None, help="the runner's --device (the plain loop stays on the CPU: use --no-plain elsewhere)")
    add_baseline_option(parser)
    args = parser.parse_args()
    copies = sorted({int(c) for c in args.copies.split(",")} | {1})
    extra_env = dict(item.split("=", 1) for item in args.env)
    print(header(f"contention: {SPEC.name}, {args.epochs or 'the spec’s'} epochs, copies {copies}"), flush=True)
    print(f"runner overrides: {args.sets or 'none'}; extra environment: {extra_env or 'none'}", flush=True)

    walls: dict[tuple[str, int], list[list[float]]] = {}
    with versions(args.baseline_ref) as measured, tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        sides: list[tuple[str, Version | None]] = [(f"runner {v.label}", v) for v in measured]
        if not args.no_plain:
            sides.append(("plain loop", None))
        for round_ in range(args.rounds):
            for n in copies:
                for side, version in (sides if round_ % 2 == 0 else sides[::-1]):
                    work = Path(tmp) / f"{side.replace(' ', '_')}-{round_}-{n}"
                    work.mkdir()
                    if version is None:
                        commands, env = [plain_command(args.epochs)] * n, dict(os.environ, **extra_env)
                    else:
                        commands = [runner_command(version, work / "results.db", args.epochs, args.sets, args.device)] * n
                        env = version.env(**extra_env)
                    times = at_once(commands, env, work)
                    walls.setdefault((side, n), []).append(times)
                    print(f"round {round_ + 1}: {side:32} x{n}: " + ", ".join(f"{t:.1f} s" for t in times), flush=True)

    print(header("at the end"))
    print(f"{'side':32} {'copies':>6} {'solo s':>8} {'each copy / solo':>40}")
    verdicts = []
    for side, version in sides:
        solo = median([t for times in walls[(side, 1)] for t in times])
        for n in copies[1:]:
            ratios = [t / solo for times in walls[(side, n)] for t in times]
            print(f"{side:32} {n:6d} {solo:8.1f} {', '.join(f'{r:.2f}x' for r in ratios):>40}")
            if version is None:
                verdicts.append(f"plain loop, {n} copies at once: worst copy {max(ratios):.2f}x solo ({solo:.1f} s) (no target: for comparison)")
            else:
                target = TARGETS.get(n)
                verdict = f" (target <= {target}x): {'met' if max(ratios) <= target else 'NOT met'}" if target else ""
                prefix = "" if version.label == "current" else f"[{version.label}] "
                verdicts.append((version.label == "current", f"{prefix}runner, {n} copies at once: worst copy {max(ratios):.2f}x solo ({solo:.1f} s){verdict}"))
    plain = [v for v in verdicts if isinstance(v, str)]
    runner = sorted((v for v in verdicts if not isinstance(v, str)), key=lambda v: v[0])
    for line in [*plain, *(text for _, text in runner)]:
        print(line)


if __name__ == "__main__":
    main()
