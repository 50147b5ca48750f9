"""Does channels_last pay on this machine? The quickstart CNN (bench/plain_loop.py) in both memory formats.

Alternates fresh processes with and without ``--channels-last`` and prints the median in-process
seconds (imports left out) of each, and their ratio. ``performance.channels_last: auto`` turns it on
for convolutional models on CPU and CUDA because of this measurement.

    .venv/bin/python bench/channels_last.py [--rounds 3] [--epochs 2] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PLAIN_LOOP = Path(__file__).resolve().parent / "plain_loop.py"
DATA = Path(__file__).resolve().parent.parent / "runner" / "data" / "mnist_5k.npz"


def seconds(args: argparse.Namespace, channels_last: bool) -> float:
    command = [sys.executable, str(PLAIN_LOOP), "--data", str(DATA), "--epochs", str(args.epochs),
               "--threads", str(args.threads), "--device", args.device] + (["--channels-last"] if channels_last else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["seconds_in_process"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.rounds):
        for channels_last in ((False, True) if i % 2 == 0 else (True, False)):
            times[channels_last].append(seconds(args, channels_last))
    contiguous, last = statistics.median(times[False]), statistics.median(times[True])
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.epochs} epochs, threads {args.threads or 'default'}, {args.device}")
    print(f"contiguous     median {contiguous:.2f} s  {[round(t, 2) for t in times[False]]}")
    print(f"channels_last  median {last:.2f} s  {[round(t, 2) for t in times[True]]}")
    print(f"channels_last / contiguous: {last / contiguous:.3f}")


if __name__ == "__main__":
    main()
