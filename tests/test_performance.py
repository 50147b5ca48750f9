"""The speed switches (spec ``performance``): each takes effect, is recorded in the run, and is undone after.

No timings are asserted here; bench/parity.py, bench/startup.py and bench/overhead.py measure speed.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import sqlite3
import subprocess
import sys
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import ROOT, TINY_SPEC, builtin_registries, plan_and_build

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
# three channels: with one, a batch's (and a 3x3 kernel's) two memory layouts are the same strides
RGB = "transforms.train=[{name: ToImage}, {name: GrayscaleToRgb}, {name: ToDtype, dtype: float32, scale: true}]"
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"


def _spy_on_training(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """What the first convolution sees in each training step of the next run (summary passes left out)."""
    from runner import execute

    seen: list[dict] = []
    real_build = execute.build

    def build(*args, **kwargs):
        parts = real_build(*args, **kwargs)
        conv = next(m for m in parts.model.modules() if isinstance(m, nn.Conv2d))

        def record(module, inputs, output):
            if module.training and torch.is_grad_enabled() and inputs[0].shape[0] > 1:
                seen.append({
                    "channels_last_input": inputs[0].is_contiguous(memory_format=torch.channels_last)
                    and not inputs[0].is_contiguous(),
                    "output_dtype": output.dtype,
                    "autocast": torch.is_autocast_enabled("cpu"),
                    "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "threads": torch.get_num_threads(),
                })

        conv.register_forward_hook(record)
        return parts

    monkeypatch.setattr(execute, "build", build)
    return seen


def _run(tmp_path: Path, overrides: list[str], spec: Path = TINY_SPEC) -> dict:
    from runner.execute import run_experiment
    from runner.reports import run_details
    from runner.store import Store

    tmp_path.mkdir(parents=True, exist_ok=True)
    store = Store(tmp_path / "results.db")
    outcome = run_experiment(spec, ["training.epochs=1", *overrides], store=store, registries=builtin_registries())
    return run_details(store, outcome.run_id)


# ---- the spec section ---------------------------------------------------------------------------


def test_performance_section_reads_on_off_and_stays_out_of_the_spec_hash() -> None:
    from runner.spec import load_spec, parse_yaml

    default = load_spec(TINY_SPEC)
    assert default.performance.model_dump() == {
        "threads": None, "channels_last": "auto", "amp": "auto", "cudnn_benchmark": "auto", "pin_memory": "auto", "compile": False,
        "sync_batchnorm": "auto",
    }
    raw = parse_yaml((TINY_SPEC.read_text() + "performance: {channels_last: off, amp: bf16, cudnn_benchmark: on, threads: 1}\n"))
    tuned = load_spec(raw)
    assert (tuned.performance.channels_last, tuned.performance.amp, tuned.performance.cudnn_benchmark) == ("off", "bf16", "on")
    assert load_spec(TINY_SPEC, ["performance.channels_last=true"]).performance.channels_last == "on"
    # how fast a run goes is not what it trains: equal experiments keep equal hashes (resume and upstream lookups rely on it)
    assert tuned.spec_hash() == default.spec_hash()


@pytest.mark.parametrize("override, message", [
    ("performance.amp=fp8", "performance.amp"),
    ("performance.threads=0", "performance.threads"),
    ("performance.channel_last=on", "did you mean 'performance.channels_last'"),
])
def test_bad_performance_values_are_one_line_errors(run_cli, tiny_spec, db, override, message) -> None:
    result = run_cli("run", tiny_spec, "--db", db, "--set", override)
    assert result.exit_code == 2 and message in result.err and "Traceback" not in result.err
    assert not db.exists()


@pytest.mark.parametrize("overrides, message", [
    (["performance.pin_memory=on"], "performance.pin_memory: on needs a CUDA device"),
    (["deterministic=true", "performance.cudnn_benchmark=on"], "contradicts deterministic: true"),
])
def test_contradictory_switches_stop_before_a_run_exists(run_cli, tiny_spec, db, overrides, message) -> None:
    args = [a for o in overrides for a in ("--set", o)]
    result = run_cli("run", tiny_spec, "--db", db, *args)
    assert result.exit_code == 2 and message in result.err and "Traceback" not in result.err
    if db.exists():  # the store may have been opened, but no run was created
        assert run_cli("runs", "--db", db, "--format", "json").json() == []


# ---- resolution -------------------------------------------------------------------------------


def test_auto_on_cpu_is_channels_last_for_conv_models_and_full_precision() -> None:
    from runner.performance import resolve
    from runner.spec import load_spec

    spec = load_spec(TINY_SPEC)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    chosen = resolve(spec, torch.device("cpu"), conv)
    assert chosen.channels_last and chosen.amp is None and not chosen.grad_scaler
    assert not chosen.cudnn_benchmark and not chosen.pin_memory and not chosen.compile
    assert chosen.threads == torch.get_num_threads()
    assert not resolve(spec, torch.device("cpu"), nn.Sequential(nn.Flatten(), nn.Linear(4, 2))).channels_last
    fp16 = resolve(load_spec(TINY_SPEC, ["performance.amp=fp16"]), torch.device("cpu"), conv)
    assert fp16.amp == "fp16" and fp16.grad_scaler  # fp16 needs loss scaling; bf16 does not
    assert not resolve(load_spec(TINY_SPEC, ["performance.amp=bf16"]), torch.device("cpu"), conv).grad_scaler


@pytest.mark.parametrize("capability, wide_channels_last", [("AVX2", True), ("AVX512", False), ("DEFAULT", False)])
def test_auto_on_cpu_puts_wide_convolutions_in_channels_last_only_where_avx2_runs_them_faster(
        monkeypatch, capability, wide_channels_last) -> None:
    import runner.performance
    from runner.performance import resolve
    from runner.spec import load_spec

    monkeypatch.setattr(runner.performance, "cpu_capability", lambda: capability)
    spec = load_spec(TINY_SPEC)
    narrow = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Flatten())
    wide = torchvision.models.resnet18(num_classes=2)  # up to 512 channels
    assert resolve(spec, torch.device("cpu"), narrow).channels_last
    assert resolve(spec, torch.device("cpu"), wide).channels_last is wide_channels_last
    assert resolve(load_spec(TINY_SPEC, ["performance.channels_last=off"]), torch.device("cpu"), wide).channels_last is False


def test_the_trained_run_records_its_switches(run_cli, trained_tiny_run) -> None:
    shown = run_cli("show", trained_tiny_run.run_id, "--db", trained_tiny_run.db, "--format", "json").json()
    performance = shown["settings"]["performance"]
    assert performance == {
        "threads": performance["threads"], "channels_last": True, "amp": None, "grad_scaler": False,
        "cudnn_benchmark": False, "pin_memory": False, "compile": False, "batches": "in-memory tensors, on cpu",
        "omp_wait_policy": performance["omp_wait_policy"], "gomp_spincount": performance["gomp_spincount"],
        "kmp_blocktime": performance["kmp_blocktime"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    assert isinstance(performance["threads"], int) and performance["threads"] >= 1


# ---- contention: how OpenMP threads wait -----------------------------------------------------------


def test_openmp_threads_spin_briefly_unless_the_user_chose() -> None:
    from runner.performance import contention_environment

    assert contention_environment({}) == {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "0"}
    for chosen in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "0"}):
        assert contention_environment(chosen) == {}


def test_the_command_line_sets_the_wait_policy_before_torch_loads(tmp_path) -> None:
    """In a fresh process the CLI's entry sets it (torch not loaded yet); once torch is loaded nothing changes."""
    code = ("import os, sys\nfrom runner.cli import main\n"
            "try:\n    main(['runs', '--db', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'))\n"
            "import torch\nfrom runner.performance import contention_defaults\n"
            "os.environ.pop('GOMP_SPINCOUNT', None)\nprint(contention_defaults())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    fresh = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none.db")], capture_output=True, text=True, env=env, timeout=300)
    assert fresh.stdout.splitlines() == ["3000 0", "{}"], fresh.stderr
    chosen = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none.db")], capture_output=True, text=True,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=300)
    assert chosen.stdout.splitlines() == ["None None", "{}"], chosen.stderr  # the user's ACTIVE alone


def test_a_run_records_its_wait_policy_and_older_runs_read_back_without_one(tmp_path, monkeypatch) -> None:
    from runner.performance import Performance

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    performance = _run(tmp_path, [])["settings"]["performance"]
    assert (performance["omp_wait_policy"], performance["gomp_spincount"], performance["kmp_blocktime"]) == ("PASSIVE", "3000", None)
    stored_before = {"threads": 2, "channels_last": True, "amp": None, "grad_scaler": False, "cudnn_benchmark": False,
                     "pin_memory": False, "compile": False, "batches": "in-memory tensors, on cpu"}
    assert Performance.from_dict(stored_before).omp_wait_policy is None


# ---- the switches take effect in training --------------------------------------------------------


def test_forced_switches_take_effect_during_training_and_are_undone_after(tmp_path, monkeypatch) -> None:
    seen = _spy_on_training(monkeypatch)
    threads_before, benchmark_before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    details = _run(tmp_path, [RGB, "performance.channels_last=on", "performance.amp=bf16",
                              "performance.cudnn_benchmark=on", "performance.threads=1"])
    assert details["status"] == "completed"
    assert seen and all(s == {"channels_last_input": True, "output_dtype": torch.bfloat16, "autocast": True,
                              "cudnn_benchmark": True, "threads": 1} for s in seen)
    recorded = details["settings"]["performance"]
    assert (recorded["channels_last"], recorded["amp"], recorded["cudnn_benchmark"], recorded["threads"]) == (True, "bf16", True, 1)
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == (threads_before, benchmark_before)
    assert all(isinstance(v, float) and v == v for e in details["epochs"] for k, v in e.items() if k != "epoch")


def test_switched_off_training_is_plain_float32_contiguous(tmp_path, monkeypatch) -> None:
    seen = _spy_on_training(monkeypatch)
    details = _run(tmp_path, [RGB, "performance.channels_last=off", "performance.amp=off",
                              "performance.cudnn_benchmark=off"])
    assert seen and all(not s["channels_last_input"] and s["output_dtype"] == torch.float32 and not s["autocast"]
                        and not s["cudnn_benchmark"] for s in seen)
    assert details["settings"]["performance"]["channels_last"] is False


def test_channels_last_switch_sets_the_memory_format_of_the_parameters() -> None:
    from runner.spec import load_spec

    for switch, expected in (("on", True), ("off", False)):
        run_plan, parts = plan_and_build(load_spec(TINY_SPEC, [RGB, f"performance.channels_last={switch}"]))
        weight = next(m for m in parts.model.modules() if isinstance(m, nn.Conv2d)).weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert weight.is_contiguous() is not expected
        assert run_plan.performance.channels_last is expected


def test_fp16_training_scales_the_loss_and_still_learns() -> None:
    from runner.data import TensorBatches
    from runner.performance import Performance
    from runner.training import evaluate, train_one_epoch

    torch.manual_seed(0)
    images = torch.randn(96, 1, 8, 8)
    labels = (images.mean((1, 2, 3)) > 0).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    before = [p.detach().clone() for p in model.parameters()]
    speed = Performance(threads=0, channels_last=False, amp="fp16", grad_scaler=True, cudnn_benchmark=False,
                        pin_memory=False, compile=False)
    scaler = speed.new_grad_scaler(torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = TensorBatches(images, labels, 32, shuffle=True, generator=torch.Generator().manual_seed(0))
    with speed.autocast(torch.device("cpu")):
        untrained = evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), 2)
    epochs = [train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), 1.0,
                              lambda x, y: (x, y), speed=speed, scaler=scaler) for _ in range(8)]
    assert scaler.get_scale() > 0 and scaler._scale is not None  # the scaler did scale the losses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with speed.autocast(torch.device("cpu")):
        metrics = evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), 2)
    # it learns: the loss falls epoch over epoch and the sign of the mean is found
    assert epochs[-1]["loss"] < epochs[0]["loss"] and metrics["loss"] < untrained["loss"]
    assert metrics["accuracy"] >= 0.9 > untrained["accuracy"]


def test_compile_trains_through_torch_compile_with_the_same_numbers(tmp_path, monkeypatch) -> None:
    # the eager backend traces with dynamo but runs the same kernels: numbers equal, and no C++ build in tests
    compiled: list[nn.Module] = []
    real_compile = torch.compile

    def compile_eagerly(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    with_compile = _run(tmp_path / "a", ["performance.compile=true"])
    without = _run(tmp_path / "b", [])
    torch._dynamo.reset()  # compiled frames are process-wide; later tests start clean
    assert len(compiled) == 1 and with_compile["settings"]["performance"]["compile"] is True
    assert with_compile["epochs"] == without["epochs"] and with_compile["test"] == without["test"]


def test_in_memory_batches_stay_on_the_cpu_without_an_accelerator() -> None:
    from runner.data import fits_on_device
    from runner.plan import describe_batches

    cpu = torch.device("cpu")
    assert not fits_on_device(640, None) and not fits_on_device(640, cpu)
    assert describe_batches(True, False, False, 0, cpu) == "in-memory tensors, on cpu"
    assert describe_batches(False, False, False, 0, cpu) == "DataLoader, 0 workers"
    assert describe_batches(False, False, False, 2, cpu) == "DataLoader, 2 workers, persistent"
    assert describe_batches(True, True, True, 0, torch.device("cuda")) == "in-memory tensors, on cuda"
    assert describe_batches(True, False, True, 0, torch.device("cuda")) == "in-memory tensors, pinned"


# ---- parity with a hand-written loop ------------------------------------------------------------


def test_the_plain_loop_of_the_parity_bench_reproduces_the_runner_exactly(tmp_path, monkeypatch) -> None:
    """bench/parity.py compares wall times of equal work: the same losses prove the work is equal."""
    details = _run(tmp_path, ["performance.threads=1"], spec=QUICKSTART)  # one thread: fast on a busy machine too
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--epochs", "1", "--threads", "1", "--channels-last",
                                      "--data", str(ROOT / "runner" / "data" / "mnist_5k.npz")])
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(out):
            runpy.run_path(str(PLAIN_LOOP), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    plain = json.loads(out.getvalue())
    [epoch] = details["epochs"]
    assert plain["epochs"] == [{k: epoch[k] for k in ("train_loss", "val_loss", "val_accuracy")}]
    assert plain["test"] == {k: details["test"][k] for k in ("loss", "accuracy", "f1_macro")}


# ---- leaving the process quickly ------------------------------------------------------------------


def test_a_cli_run_leaves_a_whole_store_behind(tmp_path) -> None:
    """The exit hook skips garbage collection only after the store's connection is closed: no -wal left."""
    db = tmp_path / "results.db"
    result = subprocess.run([sys.executable, "-m", "runner", "run", "-q", str(TINY_SPEC), "--db", str(db), "--set", "training.epochs=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not Path(f"{db}-wal").exists()
    with sqlite3.connect(db) as conn:
        [(status,)] = conn.execute("SELECT status FROM runs").fetchall()
    assert status == "completed"


@pytest.mark.parametrize("command", [["report"], ["runs"], ["show", "RUN"]])
def test_a_reading_command_freezes_its_imports_only_when_it_is_the_whole_process(trained_tiny_run, command) -> None:
    """On the command line (argv from the process) the reading commands leave SQLAlchemy's and pandas'
    objects frozen, so no collection traverses them again; called from a user's script they freeze
    nothing, since the script's own objects would never be collected after."""
    args = [trained_tiny_run.run_id if arg == "RUN" else arg for arg in command] + ["--db", str(trained_tiny_run.db)]
    code = ("import gc, sys\nfrom runner.cli import main\nwhole = sys.argv[1] == 'whole'\nargs = sys.argv[2:]\n"
            "if whole:\n    sys.argv = ['runner', *args]\n"
            "try:\n    main(None if whole else args)\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print(code, gc.get_freeze_count(), gc.isenabled(), 'pandas' in sys.modules, file=sys.stderr)\n")
    for mode in ("whole", "library"):
        result = subprocess.run([sys.executable, "-c", code, mode, *args], capture_output=True, text=True, timeout=300)
        code_, frozen, enabled, pandas_loaded = result.stderr.splitlines()[-1].split()
        assert (code_, enabled) == ("0", "True"), result.stderr
        assert trained_tiny_run.run_id[:8] in result.stdout  # the command did its work
        assert pandas_loaded == ("True" if command == ["report"] else "False")  # runs and show never import pandas
        if mode == "whole":
            assert int(frozen) > 20_000  # about 70,000 objects after SQLAlchemy alone, 150,000 with pandas
        else:
            assert frozen == "0"


def test_checkpoint_files_skip_zip_checksums_yet_load_exactly_and_leave_torch_save_alone(tmp_path) -> None:
    """The runner's own files are written without the zip CRC-32 (torch.load never checks it; the store
    keeps a sha256); what the user saves with torch.save in the same process still gets it."""
    serialization = pytest.importorskip("torch.utils.serialization")
    from runner.tensor_files import load_tensors, save_tensors

    state = nn.Linear(64, 32).state_dict()
    save_tensors(state, tmp_path / "ours.pt")
    torch.save(state, tmp_path / "theirs.pt")

    loaded = load_tensors(tmp_path / "ours.pt", "checkpoint")
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and loaded.keys() == state.keys()
    with zipfile.ZipFile(tmp_path / "ours.pt") as ours, zipfile.ZipFile(tmp_path / "theirs.pt") as theirs:
        assert {i.CRC for i in ours.infolist()} == {0}
        assert theirs.testzip() is None and all(i.CRC for i in theirs.infolist() if i.file_size)
    assert serialization.config.save.compute_crc32 is True


def test_a_failed_checkpoint_write_leaves_torch_saves_checksums_on(tmp_path) -> None:
    serialization = pytest.importorskip("torch.utils.serialization")
    from runner.tensor_files import save_tensors

    with pytest.raises(TypeError, match="cannot pickle 'generator'"):  # refused halfway through the write
        save_tensors({"w": torch.ones(3), "g": (n for n in ())}, tmp_path / "x.pt")
    assert serialization.config.save.compute_crc32 is True
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary left
