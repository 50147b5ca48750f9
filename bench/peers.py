"""The quickstart three ways in one run: a hand-written loop, the runner, PyTorch Lightning.

The same model, data split, batch order, optimizer, schedule, seeds and epochs on each side:
``bench/plain_loop.py`` (plain PyTorch), ``runner run experiments/quickstart.yaml`` (results store,
checkpoints, model summary included) and ``bench/lightning_loop.py`` (Lightning's Trainer with its
defaults). Whole processes, imports included, in alternating order, ``--rounds`` times; each round's
ratio to the plain loop, and the median of those ratios. Every side must report the plain loop's
per-epoch losses, so the work is the same. Peak resident memory (``wait4``) of every process too.

The plain loop keeps OpenMP's defaults, as a user's own script has them. Where the runner's threads
wait otherwise (its short spin, ``runner.performance``), the plain loop also runs a second time with
the runner's setting, which splits ``runner / plain`` into what that setting costs the loop alone and
the runner's own overhead.

Lightning is installed into a throwaway virtual environment that sees this environment's packages
(torch is not installed twice): ``lightning``, ``lightning-utilities`` and ``torchmetrics`` with
``pip --no-deps``. When that fails (no registry), the Lightning side is skipped and says why.

Targets (issue 14): runner / plain <= 1.02 and below lightning / plain; peak RSS runner / plain <= 1.15.

    .venv/bin/python bench/peers.py [--rounds 5] [--epochs 8] [--device cpu|cuda] [--lightning-venv DIR] [--baseline-ref REF]

The last two lines are ``runner / plain: X.XXX`` and ``lightning / plain: X.XXX`` (medians of the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import DATA, ROOT, Version, add_baseline_option, alternating, header, measure, median, versions

from runner.performance import BLOCKTIME_ENV, OPENMP_WAITING, SPINCOUNT_ENV, WAIT_POLICY_ENV

SPEC = ROOT / "experiments" / "quickstart.yaml"
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"
LIGHTNING_LOOP = ROOT / "bench" / "lightning_loop.py"
LIGHTNING_PACKAGES = ["lightning", "lightning-utilities", "torchmetrics"]
SPEED_TARGET, MEMORY_TARGET = 1.02, 1.15
# the environment variables behind the runner's recorded performance.omp_wait_policy and the rest
OPENMP_WAIT_FIELDS = dict(zip((WAIT_POLICY_ENV, SPINCOUNT_ENV, BLOCKTIME_ENV), OPENMP_WAITING))
PLAIN_AS_RUNNER = "plain, runner's waiting"


def lightning_python(venv: Path, wheels: Path | None = None) -> tuple[Path | None, str]:
    """A Python that imports lightning (and sees this environment's torch), or None and why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
        # this environment's packages after the venv's own: torch, pip, and the runner for runner.data
        Path(purelib, "_bench_parent_environment.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    check = subprocess.run([str(python), "-c", "import lightning; print(lightning.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        offline = ["--no-index", "--find-links", str(wheels)] if wheels else []  # a GPU machine without a registry
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *offline, *LIGHTNING_PACKAGES],
                                 capture_output=True, text=True)
        check = subprocess.run([str(python), "-c", "import lightning; print(lightning.__version__)"], capture_output=True, text=True)
        if check.returncode != 0:
            reason = (install.stderr or check.stderr).strip().splitlines()
            return None, f"lightning could not be installed or imported: {reason[-1] if reason else 'no output'}"
    return python, f"lightning {check.stdout.strip()}"


def runners_openmp_waiting(perf: dict[str, Any]) -> dict[str, str] | None:
    """This environment with the OpenMP waiting the runner's run recorded, or None when it is this environment's own."""
    recorded = {name: perf.get(field) for name, field in OPENMP_WAIT_FIELDS.items()}
    if all(os.environ.get(name) == value for name, value in recorded.items()):
        return None
    env = {k: v for k, v in os.environ.items() if k not in recorded}
    env.update({name: value for name, value in recorded.items() if value is not None})
    return env


def recorded_switches(version: Version, device: str, tmp: Path) -> dict[str, Any]:
    """One short runner run tells which switches the runner uses here, so the other sides can use the same."""
    db = tmp / "probe.db"
    out = measure([*version.runner(), "run", "-q", "--db", str(db), str(SPEC), "--set", "training.epochs=1", "--device", device],
                  env=version.env(), cwd=tmp)
    code = ("import json, sys\nfrom runner.reports import run_details\nfrom runner.store import Store\n"
            "d = run_details(Store(sys.argv[1], create=False), sys.argv[2])\n"
            "print(json.dumps({'performance': d['settings']['performance'], 'device': d['device']}))")
    shown = subprocess.run([*version.python(), "-c", code, str(db), out.stdout.strip().splitlines()[-1]], env=version.env(),
                           capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three sides (default 5; medians count)")
    parser.add_argument("--epochs", type=int, default=8, help="the quickstart's 8 by default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (mixed precision on both sides on CUDA)")
    parser.add_argument("--lightning-venv", type=Path, default=None, help="keep (or reuse) the Lightning environment here")
    parser.add_argument("--lightning-wheels", type=Path, default=None, help="install Lightning from these wheels (offline)")
    parser.add_argument("--no-lightning", action="store_true", help="measure only the plain loop and the runner")
    add_baseline_option(parser)
    args = parser.parse_args()
    print(header(f"peers: {SPEC.name}, {args.epochs} epochs, {args.device}"), flush=True)

    with versions(args.baseline_ref) as measured, tempfile.TemporaryDirectory(prefix="peers-") as tmp_name:
        tmp = Path(tmp_name)
        lightning, why = (None, "--no-lightning was given") if args.no_lightning else lightning_python(
            args.lightning_venv.resolve() if args.lightning_venv else tmp / "lightning-venv", args.lightning_wheels)
        print(f"lightning side: {why}", flush=True)
        switches = recorded_switches(measured[0], args.device, tmp)
        perf = switches["performance"]
        print(f"runner's switches here: device {switches['device']}, threads {perf['threads']}, channels_last {perf['channels_last']}, "
              f"amp {perf['amp']}, omp_wait_policy {perf.get('omp_wait_policy')}", flush=True)
        common = ["--data", str(DATA), "--epochs", str(args.epochs), "--device", switches["device"]]
        common += ["--channels-last"] if perf["channels_last"] else []
        commands: dict[str, tuple[list[str], dict[str, str] | None]] = {
            "plain": ([sys.executable, str(PLAIN_LOOP), *common, "--threads", str(perf["threads"]), "--amp", perf["amp"] or "off",
                       *(["--cudnn-benchmark"] if perf["cudnn_benchmark"] else [])], None),
        }
        waiting = runners_openmp_waiting(perf)
        if waiting is not None:  # the same loop, its threads waiting as the runner's do: what is the runner's own overhead
            commands[PLAIN_AS_RUNNER] = (commands["plain"][0], waiting)
        side_version: dict[str, Version] = {}
        for version in measured:
            side = "runner" if version.label == "current" else f"runner [{version.label}]"
            side_version[side] = version
            commands[side] = ([*version.runner(), "run", "-q", str(SPEC), "--set", f"training.epochs={args.epochs}",
                               "--device", args.device], version.env())
        if lightning is not None:
            commands["lightning"] = ([str(lightning), str(LIGHTNING_LOOP), *common], Version("current", ROOT).env())

        runs: dict[str, list[Any]] = {side: [] for side in commands}
        losses: dict[str, list[Any]] = {side: [] for side in commands}
        for i, side in alternating(args.rounds, list(commands)):
            command, env = commands[side]
            work = tmp / f"side{list(commands).index(side)}-round{i}"
            work.mkdir(exist_ok=True)
            if side.startswith("runner"):
                command = [*command, "--db", str(work / "results.db")]
            elif side == "lightning":
                command = [*command, "--workdir", str(work)]
            result = measure(command, env=env, cwd=work)
            runs[side].append(result)
            if side.startswith("runner"):
                losses[side].append(runner_losses(result.stdout.strip().splitlines()[-1], work / "results.db", side_version[side]))
            else:
                out = json.loads(result.stdout.strip().splitlines()[-1])
                losses[side].append({"epochs": out["epochs"], "test": {k: out["test"][k] for k in ("loss", "accuracy", "f1_macro")}})
            print(f"round {i + 1}: {side:24} {result.wall_s:7.2f} s  peak {result.peak_rss_bytes / 2**20:6.0f} MiB", flush=True)

    reference = losses["plain"][0]
    print(header("at the end"))
    print(f"{'side':28} {'median s':>9} {'min s':>7} {'max s':>7} {'peak MiB':>9}  same losses as the plain loop")
    for side in commands:
        walls = [r.wall_s for r in runs[side]]
        same = all(o == reference for o in losses[side])
        print(f"{side:28} {median(walls):9.2f} {min(walls):7.2f} {max(walls):7.2f} {max(r.peak_rss_bytes for r in runs[side]) / 2**20:9.0f}  "
              f"{'yes, to the last digit' if same else 'NO'}")

    def ratio(side: str, over: str = "plain") -> float:
        return median([a.wall_s / b.wall_s for a, b in zip(runs[side], runs[over])])

    def memory(side: str) -> float:
        return max(r.peak_rss_bytes for r in runs[side]) / max(r.peak_rss_bytes for r in runs["plain"])

    if PLAIN_AS_RUNNER in commands:
        print(f"{PLAIN_AS_RUNNER} / plain: {ratio(PLAIN_AS_RUNNER):.3f} (what the runner's OpenMP waiting costs the loop alone); "
              f"runner / {PLAIN_AS_RUNNER}: {ratio('runner', over=PLAIN_AS_RUNNER):.3f} "
              "(the runner's own overhead)")
    for version in measured[1:]:
        side = f"runner [{version.label}]"
        print(f"[{version.label}] runner / plain: {ratio(side):.3f}; peak RSS runner / plain: {memory(side):.3f}")
    print(f"peak RSS runner / plain: {memory('runner'):.3f} (target <= {MEMORY_TARGET}): {'met' if memory('runner') <= MEMORY_TARGET else 'NOT met'}"
          + (f"; lightning / plain: {memory('lightning'):.3f}" if "lightning" in commands else ""))
    speed_met = ratio("runner") <= SPEED_TARGET and ("lightning" not in commands or ratio("runner") < ratio("lightning"))
    print(f"runner / plain <= {SPEED_TARGET} and below lightning / plain: {'met' if speed_met else 'NOT met'}"
          + ("" if "lightning" in commands else f" (lightning not measured: {why})"))
    print(f"runner / plain: {ratio('runner'):.3f}")
    print(f"lightning / plain: {ratio('lightning'):.3f}" if "lightning" in commands else f"lightning / plain: skipped ({why})")


def runner_losses(run_id: str, db: Path, version: Version) -> dict[str, Any]:
    code = ("import json, sys\nfrom runner.reports import run_details\nfrom runner.store import Store\n"
            "d = run_details(Store(sys.argv[1], create=False), sys.argv[2])\n"
            "print(json.dumps({'epochs': [{k: e[k] for k in ('train_loss', 'val_loss', 'val_accuracy')} for e in d['epochs']],"
            " 'test': {k: d['test'][k] for k in ('loss', 'accuracy', 'f1_macro')}}))")
    shown = subprocess.run([*version.python(), "-c", code, str(db), run_id], env=version.env(), capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)


if __name__ == "__main__":
    main()
