"""One run across processes: `runner run --nproc 2` (torchrun's launcher), gloo on the CPU.

Every launch is a subprocess with a timeout, so a hang on a collective fails the test instead of the
session. Each rank writes what it saw through a test plugin (tests/ddp_probe_plugin.py, installed on
PYTHONPATH for torchrun's workers): the sha256 of its weights after every epoch, the images its
backbone saw. The processes use one thread each (OMP_NUM_THREADS=1), as torchrun sets for several.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import builtin_registries

from runner.store import Store

SPECS = Path(__file__).resolve().parent / "specs"
SPEC = SPECS / "ddp.yaml"  # 4 epochs, the probe strategy
PLUGIN = Path(__file__).resolve().parent / "ddp_probe_plugin.py"
LAUNCH_TIMEOUT = 420  # seconds for one launch of two processes on a loaded 2-core machine
NO_BATCHNORM_NOR_DROPOUT = ("model.options={layers: [{type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}, ReLU, "
                            "{type: MaxPool2d, kernel_size: 2}, Flatten, {type: Linear, out_features: num_classes}]}")

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------
# Launching


@pytest.fixture(scope="module")
def probe_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The probe plugin as an installed distribution: on PYTHONPATH for subprocesses, on sys.path here."""
    site = tmp_path_factory.mktemp("probe_site")
    shutil.copy(PLUGIN, site / "ddp_probe_plugin.py")
    info = site / "runner_ddp_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: runner-ddp-probe\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[runner]\nprobe = ddp_probe_plugin\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))  # `runner eval` in this process rebuilds the probe's strategy and model
        yield site
    sys.modules.pop("ddp_probe_plugin", None)


@pytest.fixture(autouse=True)
def _probe_loads_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's commands (show, eval, reproduce) load the probe plugin too, and no other."""
    monkeypatch.setenv("RUNNER_LOAD_PLUGINS", "probe")


def environment(site: Path, probe_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", **extra}
    env.pop("RUNNER_DISABLE_PLUGINS", None)
    env["RUNNER_LOAD_PLUGINS"] = "probe"  # the probe alone, whichever other plugins are installed
    if probe_dir is not None:
        probe_dir.mkdir(parents=True, exist_ok=True)
        env["RUNNER_PROBE_DIR"] = str(probe_dir)
    return env


def start(args: list[Any], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runner", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc: subprocess.Popen[str], timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str, str]:
    """The launcher's exit code and output; on a hang, SIGTERM (torchrun stops its workers), then the test fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the launcher did not finish within {timeout} s (a hang?)\nstdout: {out}\nstderr: {err}")
    return proc.returncode, out, err


def launch(args: list[Any], env: dict[str, str], timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str, str]:
    return finish(start(args, env), timeout)


def details(run_cli: Any, db: Path, run_id: str) -> dict[str, Any]:
    shown = run_cli("show", run_id, "--db", db, "--format", "json")
    assert shown.exit_code == 0, shown.err
    return shown.json()


def left_in(temporary: Path) -> list[str]:
    """What a launch left in its TMPDIR, but for torch's compile cache (kept across processes by design)."""
    return sorted(p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_"))


def weights_by_rank(probe_dir: Path) -> dict[int, dict[int, str]]:
    """{rank: {epoch: sha256 of the rank's weights after that epoch}} from the probe's records."""
    found: dict[int, dict[int, str]] = {}
    for path in sorted(probe_dir.glob("weights-rank*.txt")):
        rank = int(path.stem.removeprefix("weights-rank"))
        found[rank] = {int(e): digest for e, digest in (line.split() for line in path.read_text().splitlines())}
    return found


def backbone_images(probe_dir: Path, rank: int) -> int:
    path = probe_dir / f"backbone-rank{rank}.txt"
    return sum(int(n) for n in path.read_text().split()) if path.exists() else 0


@dataclass
class Launched:
    db: Path
    run_id: str
    probe: Path
    err: str


@pytest.fixture(scope="module")
def two_process_run(probe_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Launched:
    """tests/specs/ddp.yaml trained by `runner run --nproc 2`, uninterrupted; each rank recorded its weights."""
    directory = tmp_path_factory.mktemp("ddp_run")
    db = directory / "results.db"
    (directory / "tmp").mkdir()
    code, out, err = launch(["run", SPEC, "--nproc", 2, "--db", db, "-q"],
                            environment(probe_site, directory / "probe", TMPDIR=str(directory / "tmp")))
    assert code == 0, err
    return Launched(db, out.strip(), directory / "probe", err)


# ------------------------------------------------------------------------------------------
# One run, one writer, the same weights everywhere


def test_a_launch_leaves_nothing_in_the_temporary_directory(two_process_run: Launched) -> None:
    """torchrun makes a directory per launch for its workers' error files and never removes it."""
    assert left_in(two_process_run.db.parent / "tmp") == []


def test_two_processes_make_one_run_recording_world_size_and_identical_weights(two_process_run: Launched, run_cli: Any) -> None:
    import torch

    runs = run_cli("runs", "--db", two_process_run.db, "--format", "json").json()
    assert [r["id"] for r in runs] == [two_process_run.run_id]  # rank 0 printed the id; one row
    shown = details(run_cli, two_process_run.db, two_process_run.run_id)
    assert shown["status"] == "completed"
    assert [e["epoch"] for e in shown["epochs"]] == [1, 2, 3, 4]
    assert shown["settings"]["distributed"] == {
        "world_size": 2, "backend": "gloo", "batch_size_per_process": 16, "global_batch_size": 32,
        "sync_batchnorm": False, "sync_batchnorm_reason": "PyTorch's SyncBatchNorm runs on CUDA only, this run uses cpu",
    }
    by_rank = weights_by_rank(two_process_run.probe)
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0] == by_rank[1]  # every epoch, bit for bit
    assert sorted(by_rank[0]) == [1, 2, 3, 4]
    assert len(set(by_rank[0].values())) == 4  # and they did train

    from ddp_probe_plugin import state_sha256  # on sys.path: the probe_site fixture

    last = torch.load(shown["checkpoints"]["last"]["path"], weights_only=True)
    assert state_sha256(last["model"]) == by_rank[0][4]  # the checkpoint rank 0 wrote holds both ranks' weights


def test_metrics_of_the_whole_split_equal_runner_eval_of_the_final_weights(two_process_run: Launched, run_cli: Any) -> None:
    shown = details(run_cli, two_process_run.db, two_process_run.run_id)
    test = run_cli("eval", two_process_run.run_id, "--db", two_process_run.db, "--checkpoint", "last", "--format", "json").json()
    val = run_cli("eval", two_process_run.run_id, "--db", two_process_run.db, "--checkpoint", "last", "--split", "val",
                  "--format", "json").json()
    assert test["samples"] == shown["settings"]["split_sizes"]["test"]  # eval sees every image; the ranks shared them out
    for key in ("loss", "accuracy", "f1_macro"):
        assert abs(test[key] - shown["test"][key]) < 1e-6, key
    last_epoch = shown["epochs"][-1]
    assert abs(val["loss"] - last_epoch["val_loss"]) < 1e-6
    assert abs(val["accuracy"] - last_epoch["val_accuracy"]) < 1e-6


def test_show_and_reproduce_say_how_many_processes_trained_the_run(two_process_run: Launched, run_cli: Any, tmp_path: Path) -> None:
    from conftest import copy_store

    shown = run_cli("show", two_process_run.run_id, "--db", two_process_run.db)
    assert "processes          2 (gloo), global batch 32 (16 per process)" in shown.out.splitlines()
    db = copy_store(two_process_run.db, tmp_path / "copy.db")
    reproduced = run_cli("reproduce", two_process_run.run_id, "--db", db, "-q")  # one process: other batches
    assert reproduced.exit_code == 1
    assert f"warning: processes were 2 (gloo) for run {two_process_run.run_id}, now 1 (no torchrun)" in reproduced.err.splitlines()


def test_two_processes_of_16_train_like_one_of_32_on_the_same_batches(probe_site: Path, tmp_path: Path, run_cli: Any) -> None:
    """Without BatchNorm and dropout, the ranks' step-i batches together are one process's batch i of twice the size
    (the sampler's order depends on the seed and the epoch only), and DDP averages their gradients."""
    db = tmp_path / "results.db"
    plain = [NO_BATCHNORM_NOR_DROPOUT, "training.epochs=3"]
    ids = {}
    for nproc, batch in ((2, 16), (1, 32)):
        sets = [a for s in [*plain, f"data.batch_size={batch}"] for a in ("--set", s)]
        code, out, err = launch(["run", SPEC, "--nproc", nproc, "--db", db, "-q", *sets], environment(probe_site))
        assert code == 0, err
        ids[nproc] = out.strip()
    two, one = (details(run_cli, db, ids[n]) for n in (2, 1))
    assert two["settings"]["distributed"]["global_batch_size"] == one["settings"]["distributed"]["global_batch_size"] == 32
    assert len(two["epochs"]) == len(one["epochs"]) == 3
    for a, b in zip(two["epochs"], one["epochs"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
        assert a["train_accuracy"] == b["train_accuracy"] and a["val_accuracy"] == b["val_accuracy"]


def test_early_stopping_stops_both_ranks_at_the_same_epoch(probe_site: Path, tmp_path: Path, run_cli: Any) -> None:
    db, probe = tmp_path / "results.db", tmp_path / "probe"
    never_enough = "training.early_stopping={monitor: val_loss, patience: 1, min_delta: 10}"  # epoch 2 cannot improve by 10
    code, out, err = launch(["run", SPEC, "--nproc", 2, "--db", db, "-q", "--set", never_enough], environment(probe_site, probe))
    assert code == 0, err
    shown = details(run_cli, db, out.strip())
    assert shown["status"] == "completed" and shown["epochs_run"] == 2
    assert shown["stop_reason"] == "early stopping: val_loss did not improve for 1 epochs"
    by_rank = weights_by_rank(probe)
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [1, 2]


# ------------------------------------------------------------------------------------------
# Failures and signals


def test_a_rank_that_raises_fails_the_run_with_its_error_and_the_launcher_exits_non_zero(
    probe_site: Path, tmp_path: Path, run_cli: Any,
) -> None:
    db = tmp_path / "results.db"
    failing = "training.strategy={name: 'probe:recorder', fail_on_rank: 1, fail_in_epoch: 2}"
    (tmp_path / "tmp").mkdir()
    code, out, err = launch(["run", SPEC, "--nproc", 2, "--db", db, "-q", "--set", failing],
                            environment(probe_site, TMPDIR=str(tmp_path / "tmp")))
    assert code == 1, err
    assert left_in(tmp_path / "tmp") == []  # rank 1's error file was read, then removed with its directory
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    assert len(runs) == 1
    shown = details(run_cli, db, runs[0]["id"])
    assert shown["status"] == "failed"
    assert shown["error"] == "rank 1: ValueError: probe failure on rank 1 in epoch 2"
    assert "ddp_probe_plugin.py" in shown["traceback"]  # rank 1's traceback, not rank 0's broken connection
    assert [e["epoch"] for e in shown["epochs"]] == [1]
    assert out == ""
    assert err.strip().splitlines() == [f"error: run {runs[0]['id']} failed: rank 1: ValueError: probe failure on rank 1 in epoch 2"]


def test_torchruns_sigterm_while_rank_0_records_another_ranks_failure_does_not_interrupt_it(
    tmp_path: Path, tiny_spec: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race behind a flaky launch (exit 143, "SIGTERM"): rank 0 finds its connection broken by a
    rank that failed, and torchrun's SIGTERM arrives while rank 0 asks for that rank's error."""
    from runner import execute
    from runner.distributed import Collective, RankFailure
    from runner.execute import TrainingFailed
    from runner.lifecycle import late_signal
    from runner.reports import run_details

    class BrokenByRank1(Collective):  # one process, as rank 0 of a launch whose rank 1 failed
        def failure_elsewhere(self) -> RankFailure:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, in the middle of asking
            return RankFailure(rank=1, error="ValueError: probe failure", traceback="rank 1's traceback", exit_code=1)

    def fit(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(execute, "fit", fit)
    late_signal()
    store = Store(tmp_path / "results.db")
    try:
        with pytest.raises(TrainingFailed) as failed:
            execute.run_experiment(tiny_spec, store=store, registries=builtin_registries(), collective=BrokenByRank1())
    except KeyboardInterrupt as exc:  # what the launcher printed ("SIGTERM") before exiting 143
        pytest.fail(f"the signal cut recording the failure short: {exc!r}")
    assert str(failed.value).endswith("rank 1: ValueError: probe failure")
    [run] = store.query.runs_table()
    shown = run_details(store, run["id"])
    assert (shown["status"], shown["error"], shown["traceback"]) == ("failed", "rank 1: ValueError: probe failure", "rank 1's traceback")
    assert late_signal() == signal.SIGTERM


def test_ranks_whose_weights_drift_apart_fail_the_run_at_its_end(probe_site: Path, tmp_path: Path, run_cli: Any) -> None:
    """The run's own check: every rank's sha256 of its weights after training must be rank 0's."""
    db = tmp_path / "results.db"
    drifting = ["--set", "training.strategy={name: 'probe:recorder', drift_on_rank: 1}", "--set", "training.epochs=2"]
    code, _, err = launch(["run", SPEC, "--nproc", 2, "--db", db, "-q", *drifting], environment(probe_site))
    assert code == 1, err
    shown = details(run_cli, db, run_cli("runs", "--db", db, "--format", "json").json()[0]["id"])
    assert shown["status"] == "failed" and len(shown["epochs"]) == 2
    assert shown["error"].startswith("RunnerError: the processes hold different weights after training (sha256 rank 0 ")


def test_gradual_unfreezing_through_a_dataloader_keeps_the_ranks_in_step(probe_site: Path, tmp_path: Path, run_cli: Any) -> None:
    """tests/specs/resume.yaml: random crops through a DataLoader (torch's DistributedSampler), dropout, and a
    new DistributedDataParallel wrapper when the backbone unfreezes in epoch 2. The run completes only if
    every rank ends with rank 0's weights (the check above)."""
    db = tmp_path / "results.db"
    code, out, err = launch(["run", SPECS / "resume.yaml", "--nproc", 2, "--db", db, "-q"], environment(probe_site))
    assert code == 0, err
    shown = details(run_cli, db, out.strip())
    assert shown["status"] == "completed" and len(shown["epochs"]) == 4
    assert shown["settings"]["performance"]["batches"] == "DataLoader, 0 workers"
    assert [s["trainable"] for s in shown["settings"]["model"]["stages"]] == ["head", "all"]


def wait_for_epoch(db: Path, proc: subprocess.Popen[str], timeout: float = LAUNCH_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        if db.exists():
            rows = Store(db, create=False).query.runs_table()
            if rows and rows[0]["epochs_run"] >= 1:
                return rows[0]["id"]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    raise AssertionError("no epoch was stored in time")


def test_sigint_to_the_launcher_interrupts_and_resume_with_nproc_2_completes_as_if_never_stopped(
    probe_site: Path, tmp_path: Path, run_cli: Any, two_process_run: Launched,
) -> None:
    import torch

    db = tmp_path / "results.db"
    env = environment(probe_site)
    proc = start(["run", SPEC, "--nproc", 2, "--db", db, "-q"], env)
    run_id = wait_for_epoch(db, proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)

    assert code == 130, err
    stopped = details(run_cli, db, run_id)
    assert stopped["status"] == "interrupted" and stopped["stop_reason"] == "interrupted by SIGINT"
    kept = torch.load(tmp_path / "runs" / run_id / "last.pt", weights_only=True)["epoch"]
    assert 1 <= kept < 4
    assert f"run {run_id} interrupted by SIGINT; its last checkpoint is epoch {kept}: " \
           f"continue it with 'runner resume {run_id} --nproc 2'" in err
    assert "Traceback" not in err

    alone = run_cli("resume", run_id, "--db", db, "-q")  # one process cannot continue a two-process run
    assert alone.exit_code == 2
    assert alone.err == (f"error: run {run_id} was trained by 2 processes (global batch 32): resume it with --nproc 2 "
                         "(or torchrun with 2 processes)\n")

    code, out, err = launch(["resume", run_id, "--nproc", 2, "--db", db, "-q"], env)
    assert code == 0, err
    assert out.strip() == run_id
    resumed = details(run_cli, db, run_id)
    reference = details(run_cli, two_process_run.db, two_process_run.run_id)
    assert resumed["status"] == "completed"
    assert len(run_cli("runs", "--db", db, "--format", "json").json()) == 1
    # every rank re-derives its generators from (seed, rank, epoch): the epochs after the resume are
    # those of the run that was never stopped, bit for bit
    assert resumed["epochs"] == reference["epochs"]
    assert resumed["test"] == reference["test"]


# ------------------------------------------------------------------------------------------
# The feature cache


def test_head_only_with_the_feature_cache_builds_it_once_and_tests_like_one_process(
    probe_site: Path, tmp_path: Path, run_cli: Any,
) -> None:
    head_only = ["model.name=probe:cnn", "model.options={}", "training.strategy={name: head_only}", "training.epochs=3",
                 "training.scheduler=null"]
    results = {}
    for nproc, batch in ((2, 16), (1, 32)):
        where = tmp_path / f"nproc{nproc}"
        sets = [a for s in [*head_only, f"data.batch_size={batch}"] for a in ("--set", s)]
        code, out, err = launch(["run", SPEC, "--nproc", nproc, "--db", where / "results.db", "-q", *sets],
                                environment(probe_site, where / "probe"))
        assert code == 0, err
        results[nproc] = (where, details(run_cli, where / "results.db", out.strip()))

    where, two = results[2]
    assert two["settings"]["feature_cache"] == "on"
    assert len(list((where / "runs" / ".feature_cache").glob("*.pt"))) == 1
    sizes = two["settings"]["split_sizes"]
    assert backbone_images(where / "probe", rank=0) >= sizes["train"] + sizes["val"] + sizes["test"]
    assert backbone_images(where / "probe", rank=1) == 0  # rank 1 trained the head on rank 0's features

    one = results[1][1]
    assert abs(two["test"]["accuracy"] - one["test"]["accuracy"]) < 1e-6
    assert abs(two["test"]["loss"] - one["test"]["loss"]) < 1e-5
    for a, b in zip(two["epochs"], one["epochs"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5


# ------------------------------------------------------------------------------------------
# Without a process group: what needs none


def test_shards_share_out_each_split_as_one_process_would_batch_it() -> None:
    """Training: the ranks' step-i batches together are the step-i batch of one process with the global
    batch size, and set_epoch reshuffles. Evaluation: the shards cover the split exactly once."""
    import torch

    from runner.data import Shard, TensorBatches

    images, labels = torch.arange(40).float().view(40, 1), torch.arange(40)

    def batches(world: int, batch: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        per_rank = []
        for rank in range(world):
            loader = TensorBatches(images, labels, batch, shuffle, None, sampler=Shard(rank, world).sampler(40, shuffle, seed=7))
            if shuffle:
                loader.sampler.set_epoch(epoch)
            per_rank.append([b.tolist() for _, b in loader])
        return per_rank

    (one,) = batches(1, 8, epoch=3)
    two = batches(2, 4, epoch=3)
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in one]
    assert batches(1, 8, epoch=4) != [one]  # another epoch, another order
    evaluated = batches(3, 5, epoch=0, shuffle=False)
    assert sorted(i for rank in evaluated for b in rank for i in b) == list(range(40))  # 40 = 14 + 13 + 13, none twice


def test_joining_pins_a_cuda_rank_to_its_local_gpu_with_nccl_and_a_cpu_rank_to_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path without a GPU: torch's process group and CUDA calls replaced by recorders."""
    import torch
    import torch.distributed as dist

    from runner import distributed
    from runner.errors import RunnerError

    store = dist.HashStore()
    calls: dict[str, Any] = {}
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(store, -1, -1)]))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))

    def rank(number: int, local: int, device: str, restart: int) -> distributed.ProcessGroup:
        calls.clear()
        launch = distributed.Launch(rank=number, world_size=4, local_rank=local, local_world_size=2, restart=restart)
        return distributed.join(launch, lambda: device)

    cuda = rank(0, 0, "cuda", restart=0)
    assert cuda.device == torch.device("cuda", 0) and calls["set_device"] == torch.device("cuda", 0)
    second = rank(3, 1, "cuda", restart=0)  # rank 0 decided "cuda"; rank 3 runs on its node's second GPU
    assert calls["backend"] == "nccl" and calls["device_id"] == torch.device("cuda", 1) and calls["rank"] == 3
    assert second.device == torch.device("cuda", 1) and second.shard == distributed.Shard(3, 4)
    with pytest.raises(RunnerError, match="LOCAL_RANK 2 has no GPU: this node has 2 CUDA device"):
        rank(0, 2, "cuda", restart=1)

    cpu = rank(0, 0, "cpu", restart=2)
    assert calls["backend"] == "gloo" and calls["device_id"] is None and "set_device" not in calls
    assert cpu.device == torch.device("cpu")

    wrapped: dict[str, Any] = {}
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda module, **kw: wrapped.update(kw) or module)
    second.wrap(torch.nn.Linear(2, 2))
    assert wrapped == {"device_ids": [1], "init_sync": False}  # the rank's GPU; no broadcast per stage
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert second.wrap(frozen) is frozen  # nothing to synchronise

    def fails() -> str:
        raise RunnerError("no such run")

    with pytest.raises(RunnerError, match="no such run"):
        distributed.join(distributed.Launch(0, 2, 0, 2, 4), fails)
    with pytest.raises(distributed.Rank0Stopped) as stopped:  # the others leave quietly, with rank 0's exit code
        distributed.join(distributed.Launch(1, 2, 1, 2, 4), fails)
    assert stopped.value.code == 2


def test_pytorch_refuses_syncbatchnorm_on_the_cpu_which_is_why_auto_is_off_there() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2)))
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            model.train()(torch.zeros(2, 2, 3, 3))
    finally:
        dist.destroy_process_group()


def test_the_launcher_says_why_only_when_rank_0_could_not(capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from runner.distributed import _exit_code_of_workers

    def failure(code: int, at: int) -> Any:
        return SimpleNamespace(exitcode=code, pid=100 + at, timestamp=at, signal_name=lambda: "SIGKILL")

    assert _exit_code_of_workers({0: failure(2, 1), 1: failure(1, 2)}) == 2  # rank 0 printed its error
    assert _exit_code_of_workers({0: failure(130, 2), 1: failure(1, 1)}) == 130
    assert capsys.readouterr().err == ""
    assert _exit_code_of_workers({0: failure(-9, 2), 1: failure(1, 1)}) == 1  # killed: it could not say
    assert _exit_code_of_workers({1: failure(-9, 1)}) == 1
    assert capsys.readouterr().err == "error: rank 0 (pid 102) was killed by SIGKILL\nerror: rank 1 (pid 101) was killed by SIGKILL\n"


def test_a_signal_ending_the_launch_stops_the_rendezvous_keep_alive_thread_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a signal torchrun leaves its rendezvous handler to the garbage collector; collected later by a
    pass its keep-alive thread triggered, the finalizer cannot join that thread and prints a traceback.
    The launch collects it at once: the thread has stopped when ``launch`` returns."""
    from datetime import timedelta

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.utils import _PeriodicTimer

    from runner import distributed

    keep_alive = []

    class Handler:  # as torchrun's rendezvous handler: a keep-alive timer, and garbage only in a cycle
        def __init__(self) -> None:
            self.cycle = self
            self.timer = _PeriodicTimer(timedelta(seconds=600), lambda: None)
            self.timer.start()
            keep_alive.append(self.timer._thread)

    def interrupted_run(args: Any) -> None:
        handler = Handler()  # noqa: F841 (held by this frame until the exception leaves it)
        raise SignalException("Process got signal: 2", signal.SIGINT)

    monkeypatch.setattr(torchrun, "run", interrupted_run)
    assert distributed.launch(2, ["run", "spec.yaml"]) == 130
    assert not keep_alive[0].is_alive()


def test_nproc_is_refused_below_one_and_under_torchrun(run_cli: Any, tiny_spec: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = run_cli("run", tiny_spec, "--db", db, "--nproc", "0")
    assert refused.exit_code == 2 and refused.err == "error: --nproc must be at least 1, got 0\n"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    nested = run_cli("run", tiny_spec, "--db", db, "--nproc", "2")
    assert nested.exit_code == 2
    assert nested.err == "error: --nproc starts torchrun, but this process already runs under torchrun; leave --nproc out\n"
    assert not db.exists()


def test_the_plan_records_one_process_and_refuses_what_several_cannot_share(tiny_spec: Path) -> None:
    import torch

    from conftest import builtin_registries
    from runner.distributed import sync_batchnorm_decision
    from runner.errors import SpecError
    from runner.plan import plan
    from runner.spec import load_spec

    one = plan(load_spec(tiny_spec), builtin_registries(), read_weights=False)
    assert one.to_json()["distributed"] == {"world_size": 1, "backend": None, "batch_size_per_process": 64, "global_batch_size": 64,
                                            "sync_batchnorm": False, "sync_batchnorm_reason": "one process"}
    two = plan(load_spec(tiny_spec), builtin_registries(), read_weights=False, world_size=2)
    assert (two.distributed.backend, two.distributed.global_batch_size) == ("gloo", 128)
    with pytest.raises(SpecError, match="performance.sync_batchnorm: on needs CUDA devices"):
        plan(load_spec(tiny_spec, ["performance.sync_batchnorm=on"]), builtin_registries(), read_weights=False, world_size=2)

    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    cuda = torch.device("cuda", 0)
    assert sync_batchnorm_decision("auto", cuda, bn, 2) == (True, None)
    assert sync_batchnorm_decision("off", cuda, bn, 2) == (False, "switched off in the spec")
    assert sync_batchnorm_decision("auto", cuda, bn, 1) == (False, "one process")
    assert sync_batchnorm_decision("on", cuda, torch.nn.Linear(2, 2), 2) == (False, "the model has no BatchNorm layer")


def test_stored_plans_without_a_distributed_part_read_as_one_process(trained_tiny_run: Any) -> None:
    from conftest import builtin_registries
    from runner.plan import stored_plan

    store = Store(trained_tiny_run.db, create=False)
    row = store.query.run_row(trained_tiny_run.run_id)
    settings = json.loads(row["settings_json"])
    settings.pop("distributed")
    old = stored_plan({**row, "settings_json": json.dumps(settings)}, builtin_registries())
    assert old.distributed.world_size == 1 and old.distributed.backend is None
