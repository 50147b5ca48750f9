"""Bad input: one clear line, exit code 2, no traceback, no run stored; mid-run problems fail the run (exit 1).

Every case here is also a row of docs/errors.md, which this module writes:
``python tests/test_bad_input.py > docs/errors.md``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from runner.store import SCHEMA_VERSION, Store

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"

# A valid, fast spec that each case breaks in one place.
BASE = """\
name: bad-input
seed: 0
device: cpu
data:
  classes: [0, 1, 2]
  train_per_class: 20
model:
  name: cnn
  options:
    layers: [Flatten, {type: Linear, out_features: num_classes}]
training:
  epochs: 1
"""


def spec(tmp: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def image_folder(root: Path, per_class: int = 8, fmt: str = "PNG", size: int = 8) -> Path:
    """``root/<class>/<n>.png``: small random images in three classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "fox"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{n}.{fmt.lower()}", fmt)
    return root


def folder_spec(tmp: Path, root: Path, extra: str = "") -> Path:
    return spec(tmp, f"""\
seed: 0
device: cpu
data:
  dataset: image_folder
  options: {{root: {root}}}
  batch_size: 4
{extra}model:
  name: cnn
  options:
    layers: [{{type: Conv2d, out_channels: 4, kernel_size: 3}}, Flatten, {{type: Linear, out_features: num_classes}}]
training:
  epochs: 1
""")


class RunsCode:
    """Pickles to a call of ``os.mkdir(marker)``: loading it unsafely would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def weights_file(tmp: Path, content: Any) -> str:
    import torch

    path = tmp / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return BASE.replace("model:\n  name: cnn\n", f"model:\n  name: cnn\n  weights: {{file: {path}}}\n")


@dataclass
class Case:
    """A bad input: how to make it (CLI arguments in a fresh directory) and a fragment of its message."""

    id: str
    what: str
    make: Callable[[Path], list[Any]]
    expect: str
    env: dict[str, str] = field(default_factory=dict)
    no_code_ran: bool = False  # the input tried to run code: its marker file must not exist


def _run(path: Path, *extra: Any) -> list[Any]:
    return ["run", path, "--db", path.parent / "results.db", *extra]


def _store_case(make_store: Callable[[Path], Path]) -> Callable[[Path], list[Any]]:
    return lambda tmp: ["run", spec(tmp, BASE), "--db", make_store(tmp)]


def _garbage_store(tmp: Path) -> Path:
    path = tmp / "results.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    return path


def _foreign_store(tmp: Path) -> Path:
    path = tmp / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    return path


def _hub_local_untrusted(tmp: Path) -> list[Any]:
    """A local hubconf.py that would leave a marker if anything imported it, named without trust_repo."""
    hub = tmp / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).resolve().parent.parent.joinpath('marker').mkdir()\n"
        "def m(num_classes=2):\n"
        "    import torch\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, num_classes))\n"
    )
    return _run(spec(tmp, BASE.replace("  name: cnn\n", f"  name: 'hub-local:{hub}/m'\n")))


def _one_class_folder(tmp: Path) -> Path:
    root = image_folder(tmp / "images")
    for label in ("dog", "fox"):
        for image in (root / label).iterdir():
            image.unlink()
        (root / label).rmdir()
    return root


def _newer_store(tmp: Path) -> Path:
    path = tmp / "results.db"
    Store(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    return path


CASES = [
    Case("missing-spec", "a spec file that does not exist", lambda t: _run(t / "nowhere.yaml"), "spec file not found"),
    Case("malformed-yaml", "malformed YAML", lambda t: _run(spec(t, "model: {name: cnn\nseed: 1\n")), "malformed YAML at line"),
    Case("duplicate-key", "a key given twice in one mapping", lambda t: _run(spec(t, BASE + "seed: 2\n")), "duplicate key 'seed' at line 13"),
    Case("empty-file", "an empty spec file", lambda t: _run(spec(t, "")), "the spec is empty"),
    Case("not-a-mapping", "a spec that is not a mapping", lambda t: _run(spec(t, "- cnn\n- 3 epochs\n")), "a spec must be a mapping of keys to values, got list"),
    Case("wrong-type", "a value of the wrong type", lambda t: _run(spec(t, BASE.replace("epochs: 1", "epochs: three"))), "training.epochs: Input should be a valid integer"),
    Case("zero-epochs", "zero epochs", lambda t: _run(spec(t, BASE.replace("epochs: 1", "epochs: 0"))), "training.epochs: Input should be greater than 0"),
    Case("negative-batch-size", "a negative batch size", lambda t: _run(spec(t, BASE.replace("  train_per_class: 20\n", "  train_per_class: 20\n  batch_size: -8\n"))), "data.batch_size: Input should be greater than 0"),
    Case("split-fractions", "split fractions that do not add up to 1", lambda t: _run(spec(t, BASE.replace("  train_per_class: 20\n", "  train_per_class: 20\n  split: {train: 0.6, val: 0.3, test: 0.3}\n"))), "split fractions must add up to 1, got 1.2"),
    Case("unknown-key", "an unknown key", lambda t: _run(spec(t, BASE.replace("training:", "trainig:"))), "unknown key 'trainig'; did you mean 'training'?"),
    Case("unknown-nested-key", "an unknown nested key", lambda t: _run(spec(t, BASE + "  learning_rate: 0.1\n")), "unknown key 'training.learning_rate'"),
    Case("unknown-model", "an unknown model name", lambda t: _run(spec(t, BASE.replace("name: cnn", "name: resnet5O"))), "model.name: "),
    Case("unknown-dataset", "an unknown dataset name", lambda t: _run(spec(t, BASE.replace("  classes:", "  dataset: mnist_bundle\n  classes:"))), "data.dataset: "),
    Case("unknown-transform", "an unknown transform name", lambda t: _run(spec(t, BASE + "transforms:\n  train: [{name: ToImage}, {name: RandomFlip}]\n")), "transforms.train[1]"),
    Case("unknown-strategy", "an unknown strategy name", lambda t: _run(spec(t, BASE + "  strategy: {name: head_onyl}\n")), "training.strategy.name: "),
    Case("missing-dataset-path", "a dataset path that does not exist", lambda t: _run(folder_spec(t, t / "no" / "such" / "dir")), "data.options.root: no such directory"),
    Case("image-folder-without-classes", "an ImageFolder with no class folders", lambda t: _run(folder_spec(t, _mkdir(t / "images"))), "Couldn't find any class folder"),
    Case("empty-image-folder", "an ImageFolder whose class folders hold no images", lambda t: _run(folder_spec(t, _mkdir(t / "images" / "cat").parent)), "Found no valid file for the classes cat"),
    Case("corrupt-image", "a corrupt image file in an ImageFolder (`data.on_corrupt: error`, the default)", lambda t: _run(folder_spec(t, _with_corrupt_png(image_folder(t / "images")))), "broken.png (UnidentifiedImageError"),
    Case("num-classes-mismatch", "`num_classes` not matching the dataset", lambda t: _run(spec(t, BASE.replace("  name: cnn\n", "  name: cnn\n  num_classes: 5\n"))), "model.num_classes is 5 but the data has 3 classes"),
    Case("gradual-negative-epochs", "a gradual strategy stage with negative epochs", lambda t: _run(spec(t, BASE.replace("  epochs: 1", "  epochs: 3\n  strategy: {name: gradual, stages: [{epochs: -2, train: head}, {train: all}]}"))), "training.strategy.stages[0].epochs: must be a whole number of epochs, at least 1, got -2"),
    Case("negative-lr-mult", "a negative backbone learning-rate multiplier", lambda t: _run(spec(t, BASE + "  strategy: {name: full_finetune, lr_mult: -1}\n")), "training.strategy.lr_mult: must be a number ≥ 0, got -1"),
    Case("transform-fails-on-an-image", "a transform option that fails only when applied (here a negative noise level)", lambda t: _run(spec(t, BASE + "transforms:\n  train: [{name: ToImage}, {name: ToDtype, dtype: float32, scale: true}, {name: GaussianNoise, sigma: -1}]\n")), "transforms.train[2] (GaussianNoise): ValueError: sigma shouldn't be negative. Got -1"),
    Case("model-input-size", "images of a size the model cannot take", lambda t: _run(spec(t, "device: cpu\ndata: {classes: [0, 1]}\nmodel: {name: 'torchvision:vit_b_16'}\ntraining: {epochs: 1}\n")), "model (torchvision:vit_b_16) cannot take images of shape (3, 28, 28): AssertionError: Wrong image height! Expected 224 but got 28!"),
    Case("loss-option", "a loss option out of range", lambda t: _run(spec(t, BASE + "  loss: {name: CrossEntropyLoss, label_smoothing: 1.5}\n")), "training.loss (CrossEntropyLoss): RuntimeError: label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    Case("loss-class-weights", "class weights not one per class", lambda t: _run(spec(t, BASE + "  loss: {name: CrossEntropyLoss, weight: [1, 2]}\n")), "training.loss (CrossEntropyLoss): RuntimeError: weight tensor should be defined either for all 3 classes or no classes"),
    Case("optimizer-option", "an optimizer option out of range", lambda t: _run(spec(t, BASE + "  optimizer: {name: SGD, lr: 0.1, momentum: -0.5}\n")), "training.optimizer: SGD does not work with these arguments (ValueError: Invalid momentum value: -0.5)"),
    Case("scheduler-missing-argument", "a scheduler without an argument it needs", lambda t: _run(spec(t, BASE + "  scheduler: {name: StepLR}\n")), "training.scheduler: StepLR does not work with these arguments (TypeError: StepLR.__init__() missing 1 required positional argument: 'step_size')"),
    Case("weights-name", "a weights name not valid for the model", lambda t: _run(spec(t, "device: cpu\ndata: {classes: [0, 1]}\nmodel: {name: 'torchvision:resnet18', weights: IMAGENET_V9}\n")), "'IMAGENET_V9' is not a weights name for resnet18 (valid: DEFAULT, IMAGENET1K_V1)"),
    Case("weights-file-missing", "a weights file that does not exist", lambda t: _run(spec(t, BASE.replace("  name: cnn\n", f"  name: cnn\n  weights: {{file: {t / 'none.pt'}}}\n"))), "weights file not found"),
    Case("weights-not-a-state-dict", "a weights file that is not a state dict", lambda t: _run(spec(t, weights_file(t, [1, 2, 3]))), "is not a state dict (a mapping of names to tensors)"),
    Case("weights-not-torch", "a weights file that is not a PyTorch file", lambda t: _run(spec(t, weights_file(t, b"hello, not a tensor\n"))), "cannot be read as a PyTorch file"),
    Case("weights-pickled-code", "a weights file carrying pickled code", lambda t: _run(spec(t, weights_file(t, RunsCode(t / "marker")))), "refused: it holds pickled code", no_code_ran=True),
    Case("untrusted-hub", "a torch.hub model without `trust_repo: true`", lambda t: _run(spec(t, "model: {name: 'hub:pytorch/vision/resnet18'}\n")), "set model.trust_repo: true if you trust that repository"),
    Case("cuda-unavailable", "CUDA requested where there is none", lambda t: _run(spec(t, BASE.replace("device: cpu", "device: cuda"))), "device: cuda was requested but this machine has no usable CUDA device"),
    Case("store-directory-missing", "a store path in a directory that does not exist", _store_case(lambda t: t / "no" / "dir" / "results.db"), "directory"),
    Case("store-unwritable", "a store path that cannot be written", _store_case(lambda t: Path("/proc/results.db")), "cannot use the store /proc/results.db: unable to open database file"),
    Case("store-not-a-database", "a store file that is not a database", _store_case(_garbage_store), "file is not a database"),
    Case("store-of-another-program", "an SQLite file of another program", _store_case(_foreign_store), "holds tables but is not a runner results store"),
    Case("store-too-new", "a store written by a newer runner", _store_case(_newer_store), "newer than this runner understands"),
    Case("store-server-without-artifacts", "a PostgreSQL store without `--artifacts DIR` (or `RUNNER_ARTIFACTS`)", lambda t: ["run", spec(t, BASE), "--db", "postgresql://runner:s3cret@127.0.0.1:1/runs"], "is not a local file, so run artefacts (checkpoints) need a directory every worker can reach: give --artifacts DIR (or set RUNNER_ARTIFACTS)"),
    Case("store-server-unreachable", "a PostgreSQL server that does not answer (the password is masked)", lambda t: ["run", spec(t, BASE), "--db", "postgresql://runner:s3cret@127.0.0.1:1/runs", "--artifacts", t / "runs"], "cannot use the store postgresql+psycopg://runner:***@127.0.0.1:1/runs: connection failed: "),
    Case("set-unknown-key", "`--set` for a key that does not exist", lambda t: _run(spec(t, BASE), "--set", "training.epoch=3"), "unknown key 'training.epoch'; did you mean 'training.epochs'?"),
    Case("set-without-value", "`--set` without `=`", lambda t: _run(spec(t, BASE), "--set", "training.epochs"), "--set expects KEY=VALUE"),
    Case("yaml-python-tag", "a YAML tag that constructs a Python object", lambda t: _run(spec(t, f"model: !!python/object/apply:os.mkdir ['{t / 'marker'}']\n")), "YAML tag not allowed", no_code_ran=True),
    Case("heartbeat-setting", "a `RUNNER_HEARTBEAT_S` that is not a positive number", lambda t: _run(spec(t, BASE)), "RUNNER_HEARTBEAT_S must be a positive number of seconds", env={"RUNNER_HEARTBEAT_S": "0"}),
    Case("heartbeat-too-often", "a `RUNNER_HEARTBEAT_S` below a second (live runs would flicker to lost)", lambda t: _run(spec(t, BASE)), "RUNNER_HEARTBEAT_S must be at least 1 s (each beat writes to the store), got '1e-6'", env={"RUNNER_HEARTBEAT_S": "1e-6"}),
    Case("upstream-cycle", "upstream experiments that form a cycle (a spec whose weights come from itself)", lambda t: _run(spec(t, BASE.replace("  name: cnn\n", "  name: cnn\n  weights: {experiment: spec.yaml}\n"))), "model.weights: the upstream experiments form a cycle: "),
    Case("untrusted-hub-local", "a local `hub-local:` model without `trust_repo: true` (its hubconf.py is never run)", _hub_local_untrusted, "set model.trust_repo: true if you trust that repository", no_code_ran=True),
    Case("optimizer-argument-type", "an optimizer argument of the wrong type (`betas: 5`)", lambda t: _run(spec(t, BASE + "  optimizer: {name: Adam, betas: 5}\n")), "training.optimizer: Adam does not work with these arguments (TypeError: 'int' object is not subscriptable)"),
    Case("learning-rate-text", "a learning rate that is not a number (`lr: fast`)", lambda t: _run(spec(t, BASE + "  optimizer: {name: Adam, lr: fast}\n")), "training.optimizer.lr: must be a finite number >= 0, got 'fast'"),
    Case("learning-rate-nan", "a learning rate that is NaN (`lr: .nan`)", lambda t: _run(spec(t, BASE + "  optimizer: {name: SGD, lr: .nan}\n")), "training.optimizer.lr: must be a finite number >= 0, got nan"),
    Case("scheduler-argument-type", "a scheduler argument of the wrong type (`step_size: fast`)", lambda t: _run(spec(t, BASE + "  scheduler: {name: StepLR, step_size: fast}\n")), "training.scheduler: StepLR does not work with these arguments (TypeError: "),
    Case("seed-negative", "a negative seed", lambda t: _run(spec(t, BASE.replace("seed: 0", "seed: -1"))), "seed: Input should be greater than or equal to 0 (got -1)"),
    Case("seed-too-large", "a seed above 2**63-1", lambda t: _run(spec(t, BASE.replace("seed: 0", f"seed: {2**63}"))), "seed: Input should be less than or equal to 9223372036854775807"),
    Case("yaml-too-deep", "YAML nested thousands of levels deep", lambda t: _run(spec(t, BASE + "description: " + "[" * 5000 + "]" * 5000 + "\n")), "the YAML is nested more than 32 levels deep"),
    Case("spec-too-large", "a spec file of several megabytes", lambda t: _run(spec(t, BASE + "# padding\n" * 300_000)), "a spec may be at most 1 MiB"),
    Case("duplicate-classes", "a class listed twice in `data.classes`", lambda t: _run(spec(t, BASE.replace("classes: [0, 1, 2]", "classes: [1, 1]"))), "data.classes: class 1 is listed more than once"),
    Case("single-class", "an ImageFolder with a single class", lambda t: _run(folder_spec(t, _one_class_folder(t))), "data: 1 class (cat) selected; a classifier needs at least 2"),
    Case("sweep-bad-value", "a sweep value that makes one combination invalid (nothing is queued)", lambda t: _run(spec(t, BASE), "--sweep", "data.batch_size=32,0", "--seeds", "2"), "run 3 of 4 (data.batch_size=0 seed=0): data.batch_size: Input should be greater than 0"),
    Case("sweep-bad-key", "a swept key the spec does not have", lambda t: _run(spec(t, BASE), "--sweep", "training.epoch=1,2"), "run 1 of 2 (training.epoch=1): unknown key 'training.epoch'; did you mean 'training.epochs'?"),
    Case("sweep-unknown-section-key", "an unknown key in the `sweep:` section", lambda t: _run(spec(t, BASE + "sweep: {gird: {seed: [1, 2]}}\n")), "unknown key 'sweep.gird'; did you mean 'sweep.grid'?"),
    Case("sweep-key-twice", "a key swept both in the grid and in the variants", lambda t: _run(spec(t, BASE + "sweep:\n  grid: {training.epochs: [1, 2]}\n  variants: [{training.epochs: 3}]\n")), "sweep key 'training.epochs' is in both grid and variants"),
    Case("sweep-empty-grid", "a grid key without values", lambda t: _run(spec(t, BASE + "sweep: {grid: {training.epochs: []}}\n")), "sweep: grid.training.epochs: give at least one value"),
    Case("sweep-bad-random", "a random-search distribution that is not one of choice/uniform/loguniform/int", lambda t: _run(spec(t, BASE + "sweep: {random: {n: 2, space: {training.optimizer.lr: {normal: [0, 1]}}}}\n")), "unknown key 'sweep.random.space.training.optimizer.lr.normal'"),
    Case("seeds-not-integers", "`seeds:` that are not integers", lambda t: _run(spec(t, BASE + "seeds: [0, one]\n")), "seeds: give a number of seeds (3 means 0, 1, 2) or a list of integers, got [0, 'one']"),
    Case("sweep-flag-without-values", "`--sweep` without `=`", lambda t: _run(spec(t, BASE), "--sweep", "training.epochs"), "--sweep expects KEY=VALUE[,VALUE...]"),
    Case("jobs-without-sweep", "`-j` for a spec that is not a sweep", lambda t: _run(spec(t, BASE), "-j", "2"), "-j and --devices run the workers of a sweep"),
    Case("worker-unknown-sweep", "`runner worker --sweep` naming no sweep of the store", lambda t: ["worker", "--db", _new_store(t), "--sweep", "nope"], "no sweep 'nope' (an id, id prefix or name) in "),
    Case("nproc-zero", "`--nproc` below 1", lambda t: _run(spec(t, BASE), "--nproc", "0"), "--nproc must be at least 1, got 0"),
    Case("nproc-under-torchrun", "`--nproc` in a process torchrun started", lambda t: _run(spec(t, BASE), "--nproc", "2"), "--nproc starts torchrun, but this process already runs under torchrun; leave --nproc out", env={"RANK": "0", "WORLD_SIZE": "2"}),
    Case("torchrun-env-incomplete", "torchrun's `RANK` and `WORLD_SIZE` without `MASTER_ADDR`", lambda t: _run(spec(t, BASE)), "cannot join the other processes: Error initializing torch.distributed using env:// rendezvous: environment variable MASTER_ADDR expected, but not set", env={"RANK": "0", "WORLD_SIZE": "2"}),
]


def _new_store(tmp: Path) -> Path:
    Store(tmp / "results.db")
    return tmp / "results.db"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _with_corrupt_png(root: Path) -> Path:
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _skip_reason(case: Case) -> str | None:
    if case.id == "cuda-unavailable":
        import torch

        if torch.cuda.is_available():
            return "this machine has CUDA"
    if case.id == "store-unwritable" and not Path("/proc").is_dir():
        return "needs /proc"
    return None


def _store_of(args: list[Any]) -> Path:
    return Path(args[args.index("--db") + 1])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_stores_nothing(case: Case, run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if reason := _skip_reason(case):
        pytest.skip(reason)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    args = case.make(tmp_path)
    store_existed = _store_of(args).exists()

    result = run_cli(*args)

    assert result.exit_code == 2, result.err
    assert result.err.startswith("error: ") and result.err.endswith("\n")
    assert result.err.count("\n") == 1, result.err  # one line, so no traceback
    assert case.expect in result.err
    assert result.out == ""
    store = _store_of(args)
    if store.exists() and not store_existed:
        assert Store(store).query.count_runs() == 0  # no run row was written
    assert not (tmp_path / "runs").exists()
    if case.no_code_ran:
        assert not (tmp_path / "marker").exists()


def test_debug_shows_the_traceback_of_a_bad_input(run_cli: Any, tmp_path: Path) -> None:
    from runner.errors import SpecError

    with pytest.raises(SpecError, match="the spec is empty"):
        run_cli("--debug", "run", spec(tmp_path, ""))


def test_a_corrupt_image_is_skipped_and_counted_when_the_spec_says_so(run_cli: Any, tmp_path: Path) -> None:
    root = _with_corrupt_png(image_folder(tmp_path / "images"))
    path = folder_spec(tmp_path, root, extra="  on_corrupt: skip\n")
    result = run_cli("run", path, "--db", tmp_path / "results.db", "-q")

    assert result.exit_code == 0, result.err
    assert f"warning: data: skipped 1 unreadable image file(s), e.g. {root / 'dog' / 'broken.png'}" in result.err
    details = run_cli("show", result.out.strip(), "--db", tmp_path / "results.db", "--format", "json").json()
    assert details["status"] == "completed"
    assert details["settings"]["skipped_corrupt"] == [str(root / "dog" / "broken.png")]
    assert sum(details["settings"]["split_sizes"].values()) == 24  # 25 files, 1 left out


def truncated_test_image(tmp: Path) -> tuple[Path, Path]:
    """An ImageFolder of JPEGs where one test-split image is cut short: its header reads, its pixels do not."""
    from torchvision.datasets import ImageFolder

    from runner.data import dataset_targets, stratified_split

    root = image_folder(tmp / "images", per_class=8, fmt="JPEG", size=32)
    dataset = ImageFolder(str(root))
    split = stratified_split(dataset_targets(dataset), (0.7, 0.15, 0.15), seed=0)
    victim = Path(dataset.samples[int(split.test[0])][0])
    victim.write_bytes(victim.read_bytes()[:-10])  # the end of the pixel data and the end marker
    return folder_spec(tmp, root), victim


def test_an_image_that_fails_to_decode_mid_run_fails_the_run_naming_the_file_and_keeps_its_epochs(run_cli: Any, tmp_path: Path) -> None:
    path, victim = truncated_test_image(tmp_path)
    db = tmp_path / "results.db"
    result = run_cli("run", path, "--db", db, "-q")

    assert result.exit_code == 1
    assert result.err.count("\n") == 1
    assert f"cannot decode image {victim}: OSError: image file is truncated" in result.err
    run = run_cli("runs", "--db", db, "--format", "json").json()[0]
    details = run_cli("show", run["id"], "--db", db, "--format", "json").json()
    assert details["status"] == "failed"
    assert str(victim) in details["error"]
    assert [e["epoch"] for e in details["epochs"]] == [1]  # the epoch trained before the test split failed


# ------------------------------------------------------------------------------------------
# docs/errors.md, written from the messages the cases actually get


def _message(case: Case, workdir: Path) -> str:
    from runner.cli import main

    previous = {key: os.environ.get(key) for key in case.env}
    os.environ.update(case.env)
    args = [str(a) for a in case.make(workdir)]
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(args)
            except SystemExit:
                pass
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return err.getvalue().strip().replace(str(workdir), "DIR")


def errors_markdown(base: Path) -> str:
    rows = []
    for case in CASES:
        workdir = base / case.id
        workdir.mkdir(parents=True)
        os.chdir(workdir)
        message = _message(case, workdir).replace("|", "\\|")
        rows.append(f"| {case.what} | `` {message} `` |")
    mid_run_dir = base / "mid-run"
    mid_run_dir.mkdir()
    os.chdir(mid_run_dir)
    path, _ = truncated_test_image(mid_run_dir)
    mid_run = Case("truncated", "", lambda t: ["run", path, "--db", t / "results.db", "-q"], "")
    failed = re.sub(r"run [0-9a-f]{12} failed", "run RUN_ID failed", _message(mid_run, mid_run_dir))
    cnn = BASE.replace("[Flatten,", "[{type: Conv2d, out_channels: 4, kernel_size: 3}, BatchNorm2d, ReLU, Flatten,")
    diverging = Case("diverging", "", lambda t: _run(spec(t, cnn + "  optimizer: {name: SGD, lr: 1e30}\n"), "-q", "--set", "data.batch_size=8"), "")
    diverged = re.sub(r"run [0-9a-f]{12} failed", "run RUN_ID failed", _message(diverging, mid_run_dir))
    return "\n".join([
        "# Bad input and the messages it gets",
        "",
        "What can be checked before training starts is refused with one line on stderr, exit code 2,",
        "no traceback (add `--debug` for one) and no run stored. `DIR` stands for the directory of the",
        "spec or store. Every row is a test in `tests/test_bad_input.py`, and this file is written from",
        "the messages those inputs really get: `python tests/test_bad_input.py > docs/errors.md`.",
        "",
        "| Bad input | Message (`runner run SPEC`) |",
        "|---|---|",
        *rows,
        "",
        "## Problems that surface during a run",
        "",
        "The run is stored as `failed` with the error and its traceback (`runner show RUN_ID`), the",
        "epochs it finished stay in the store, and the exit code is 1. After fixing the cause,",
        "`runner resume RUN_ID` continues it from its last checkpoint.",
        "",
        "| Problem | Message |",
        "|---|---|",
        f"| an image that passes the file check but cannot be decoded (here a truncated JPEG in the test split) | `` {failed} `` |",
        f"| training that diverges (here SGD with `lr: 1e30` on a small CNN): the epoch is stored with its NaN loss as null, no checkpoint of it | `` {diverged} `` |",
        "",
        "When the store itself fails mid-run (a damaged page, a full disk), the one line names the store",
        "or the file and the cause, and the run is marked `failed` if the store can still take that.",
        "",
        "A run stopped by Ctrl-C or SIGTERM is stored as `interrupted` (exit code 130 or 143), and one",
        "whose process died without a word (SIGKILL, out of memory) shows as `lost` once it has missed",
        "two heartbeats (`RUNNER_HEARTBEAT_S`, 10 s by default); both can be resumed.",
        "",
    ])


def test_docs_errors_md_is_written_from_these_cases(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    for case in CASES:
        assert f"| {case.what} |" in text, f"docs/errors.md lacks the case {case.id}: regenerate it"
        assert case.expect in text, f"docs/errors.md has an old message for {case.id}: regenerate it"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TORCH_HOME"] = str(Path(scratch) / "torch_home")
        sys.stdout.write(errors_markdown(Path(scratch)))
