"""How ``runner report`` scales: every variant at 10,000 to 2,000,000 per-epoch metric rows, time and peak memory.

Builds stores of 50, 500, 5,000 and 10,000 completed runs x 50 epochs x 4 metrics (10,000 to
2,000,000 metric rows, with their epoch rows and test metrics; see ``benchlib.build_store``: the rows
go in through the store's own tables), then runs each report variant as a whole ``runner report``
process, the way a user does, ``--repeat`` times, alternating the variants (and the versions, with
``--baseline-ref``). Targets (issue 14) at 2,000,000 rows: every variant within 1.0 s (median) and
300 MiB peak resident memory; and the time grows no faster than the rows (for every pair of sizes,
time ratio <= row ratio). The HTML report is measured too, but it draws figures for 20 runs with
matplotlib whatever the store's size, so it is shown for information and left out of the target.

    .venv/bin/python bench/report_speed.py [--repeat 3] [--sizes 10000,100000,1000000,2000000] [--stores DIR] [--baseline-ref REF]

The last lines are the verdicts: growth, then time and memory at the largest size.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from benchlib import Version, add_baseline_option, build_store, header, measure, median, versions

EPOCHS = 50
ROWS_PER_RUN = EPOCHS * 4
TARGET_SECONDS = 1.0
TARGET_BYTES = 300 << 20
VARIANTS = [  # the target applies to these
    ["report"],
    ["report", "--format", "json"],
    ["report", "--format", "markdown"],
    ["report", "--format", "latex"],
    ["report", "-o", "report.csv"],
    ["report", "-o", "report.parquet"],
    ["report", "--group-by", "name", "--format", "json"],
    ["report", "--where", "model.name=torchvision:resnet18", "--where", "training.optimizer.lr=1e-3", "--sort", "-test_accuracy"],
    ["report", "--group-by", "model.name,training.optimizer.lr", "--columns", "test_accuracy"],
    ["report", "--status", "completed", "--since", "2024-01-15", "--columns", "id,name,test_accuracy"],
]
FOR_INFORMATION = [["report", "-o", "report.html"]]


def store_for(version: Version, rows: int, directory: Path) -> Path:
    path = directory / f"metric_rows{rows}_schema{version.schema_version()}.db"
    if not path.exists():
        built = build_store(path, rows // ROWS_PER_RUN, EPOCHS, version)
        print(f"  built {path.name} ({built['runs']:,} runs, {built['epoch_metrics']:,} metric rows) with {version.label} "
              f"in {built['build_s']:.0f} s", flush=True)
    return path


def growth(times: dict[int, float]) -> tuple[float, float]:
    """The largest (time ratio / row ratio) over pairs of consecutive sizes, and the log-log slope of the two largest."""
    sizes = sorted(times)
    worst = max(times[b] / times[a] / (b / a) for a, b in zip(sizes, sizes[1:]))
    a, b = sizes[-2], sizes[-1]
    return worst, math.log(times[b] / times[a]) / math.log(b / a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="processes per variant and size (the median counts)")
    parser.add_argument("--sizes", default="10000,100000,1000000,2000000", help="metric rows of each store (multiples of 200)")
    parser.add_argument("--stores", type=Path, default=None, help="keep (or reuse) the synthetic stores in this directory")
    add_baseline_option(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(header("runner report at scale"), flush=True)
    commands = [*VARIANTS, *FOR_INFORMATION]
    results: dict[tuple[str, int, int], list] = {}
    with versions(args.baseline_ref) as measured, tempfile.TemporaryDirectory(prefix="report-speed-") as tmp:
        store_dir = args.stores.resolve() if args.stores else Path(tmp)
        store_dir.mkdir(parents=True, exist_ok=True)
        stores = {(v.label, n): store_for(v, n, store_dir) for v in measured for n in sizes}
        for i in range(args.repeat):
            order = [(v, n, c) for n in sizes for c in range(len(commands)) for v in measured]
            for version, rows, c in (order if i % 2 == 0 else order[::-1]):
                argv = [*commands[c], "--db", str(stores[(version.label, rows)])]
                results.setdefault((version.label, rows, c), []).append(measure([*version.runner(), *argv], env=version.env(), cwd=Path(tmp)))

    def seconds(label: str, rows: int, c: int) -> float:
        return median([r.wall_s for r in results[(label, rows, c)]])

    def peak(label: str, rows: int, c: int) -> int:
        return max(r.peak_rss_bytes for r in results[(label, rows, c)])

    print(f"\nmedian wall seconds (peak MiB) of {args.repeat} processes; columns: metric rows")
    print(f"{'command':96} {'version':10} " + " ".join(f"{n:>15,}" for n in sizes) + "  growth")
    for c, command in enumerate(commands):
        for version in measured:
            cells = " ".join(f"{seconds(version.label, n, c):7.2f} ({peak(version.label, n, c) / 2**20:4.0f})" for n in sizes)
            trend = "x{:.2f} slope {:.2f}".format(*growth({n: seconds(version.label, n, c) for n in sizes})) if len(sizes) > 1 else "-"
            note = "" if command in VARIANTS else "  (for information)"
            print(f"{'runner ' + ' '.join(command):96} {version.label[:10]:10} {cells}  {trend}{note}")
    print(header("at the end"))
    largest = sizes[-1]
    for version in reversed(measured):  # this checkout's verdicts last
        prefix = "" if version.label == "current" else f"[{version.label}] "
        if len(sizes) > 1:
            worst_c = max(range(len(VARIANTS)), key=lambda c: growth({n: seconds(version.label, n, c) for n in sizes})[0])
            worst, slope = growth({n: seconds(version.label, n, worst_c) for n in sizes})
            print(f"{prefix}growth {sizes[0]:,} -> {largest:,} rows: worst (time ratio / row ratio) between neighbouring sizes "
                  f"{worst:.3f} ('runner {' '.join(VARIANTS[worst_c])}'; slope of the two largest {slope:.2f}); "
                  f"no faster than linear (<= 1): {'met' if worst <= 1 else 'NOT met'}")
        slowest = max(range(len(VARIANTS)), key=lambda c: seconds(version.label, largest, c))
        fattest = max(range(len(VARIANTS)), key=lambda c: peak(version.label, largest, c))
        ok = all(r.returncode == 0 for (label, _, _), rs in results.items() if label == version.label for r in rs)
        met = ok and seconds(version.label, largest, slowest) <= TARGET_SECONDS and peak(version.label, largest, fattest) <= TARGET_BYTES
        print(f"{prefix}every variant at {largest:,} rows: slowest {seconds(version.label, largest, slowest):.2f} s "
              f"('runner {' '.join(VARIANTS[slowest])}'), largest peak {peak(version.label, largest, fattest) / 2**20:.0f} MiB "
              f"('runner {' '.join(VARIANTS[fattest])}') (target <= {TARGET_SECONDS:.1f} s and <= {TARGET_BYTES >> 20} MiB): "
              f"{'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
