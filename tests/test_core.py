"""Issue 2: spec → plugin registries → training → results store → CLI, end to end."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_SPEC, builtin_registries, plan_and_build

PY = sys.executable


def _count_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from runs").fetchone()[0]


def _spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- 1. layout ------------------------------------------------------------------------------


def test_distribution_installs_runner_and_its_console_script_but_no_generic_top_level_names() -> None:
    from importlib import metadata

    dist = metadata.distribution("runner-dl")
    assert any(ep.name == "runner" and ep.value == "runner.cli:main" for ep in dist.entry_points if ep.group == "console_scripts")
    top_level = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith(("runner_dl", "__editable__", "..", "/"))}
    assert "plugins" not in top_level
    for path in ("runner", "plugins", "experiments", "tests", "pyproject.toml", "README.md"):
        assert (ROOT / path).exists(), path
    assert "results.db" in (ROOT / ".gitignore").read_text()


# ---- 2. plugins and registries --------------------------------------------------------------


def test_builtins_register_through_the_hooks_and_lists_are_sorted() -> None:
    from runner.registries import load_registries

    registries = load_registries(plugins=())
    assert registries.problems == []
    assert registries.models.entry("cnn").plugin == "runner.plugins.models"
    assert registries.strategies.list() == sorted(registries.strategies.list())
    assert {"cnn", "torchvision:resnet18", "hub:*", "hub-local:*"} <= set(registries.models.list())
    assert {"full_finetune", "head_only", "gradual"} <= set(registries.strategies.list())
    assert {"mnist_bundled", "image_folder", "torchvision:MNIST", "torchvision:FakeData"} <= set(registries.datasets.list())
    assert {"Resize", "Normalize", "RandomRotation", "GrayscaleToRgb"} <= set(registries.transforms.list())


def test_blocking_a_builtin_plugin_removes_its_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.registries import load_registries

    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", "runner.plugins.strategies")
    registries = load_registries()
    assert registries.strategies.list() == []
    assert "cnn" in registries.models


def test_unknown_names_suggest_the_closest_and_duplicates_name_both_plugins() -> None:
    from runner.errors import DuplicateNameError, UnknownNameError
    from runner.registry import Registry

    registry: Registry[int] = Registry("model")
    registry.register("torchvision:resnet18", 1, plugin="a")
    with pytest.raises(UnknownNameError, match="did you mean 'torchvision:resnet18'"):
        registry.get("resnet18")
    with pytest.raises(DuplicateNameError, match="'a' and 'b'"):
        registry.register("torchvision:resnet18", 2, plugin="b")
    with pytest.raises(DuplicateNameError):
        registry.get("torchvision:resnet18")


# ---- 3. spec --------------------------------------------------------------------------------


def test_misspelled_key_exits_2_with_one_line_suggestion_and_stores_nothing(tmp_path: Path, run_cli, db: Path) -> None:
    spec = _spec(tmp_path, TINY_SPEC.read_text().replace("  epochs: 2", "  epochz: 2"))
    result = run_cli("run", spec, "--db", db)
    assert result.exit_code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert "training.epochz" in result.err and "'training.epochs'" in result.err
    assert "Traceback" not in result.err
    assert _count_runs(db) == 0


def test_unknown_model_exits_2_naming_the_closest_model(tmp_path: Path, run_cli, db: Path) -> None:
    spec = _spec(tmp_path, TINY_SPEC.read_text().replace("name: cnn", "name: torchvision:resnet81"))
    result = run_cli("run", spec, "--db", db)
    assert result.exit_code == 2
    assert "torchvision:resnet81" in result.err and "torchvision:resnet18" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert _count_runs(db) == 0


def test_wrong_type_names_the_key_path(run_cli, tiny_spec: Path) -> None:
    result = run_cli("validate", tiny_spec, "--set", "data.batch_size=many")
    assert result.exit_code == 2
    assert "data.batch_size" in result.err


def test_overrides_are_yaml_scalars_and_validate_reports_ok(run_cli, tiny_spec: Path) -> None:
    from runner.spec import load_spec

    spec = load_spec(tiny_spec, ["training.epochs=5", "training.optimizer.lr=1e-2", "deterministic=true", "data.classes=[1, 7]"])
    assert spec.training.epochs == 5 and spec.training.optimizer.options["lr"] == 0.01
    assert spec.deterministic is True and spec.data.classes == [1, 7]
    assert run_cli("validate", tiny_spec).exit_code == 0
    bad = run_cli("validate", tiny_spec, "--set", "training.optimizer.lrr=0.1")
    assert bad.exit_code == 2 and "did you mean 'lr'" in bad.err


def test_yaml_is_read_safely(tmp_path: Path, run_cli) -> None:
    spec = _spec(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    result = run_cli("validate", spec)
    assert result.exit_code == 2 and "not allowed" in result.err


# ---- 4. models ------------------------------------------------------------------------------


def test_custom_cnn_declares_every_seed_layer_with_residual_blocks() -> None:
    import torch

    from runner.layers import Residual, build_layers

    layers = [
        {"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "stride": 1, "padding": 2, "dilation": 2},
        {"type": "BatchNorm2d"}, "ReLU",
        {"type": "Residual", "layers": [{"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1}, "ReLU"]},
        {"type": "Residual", "layers": [{"type": "Conv2d", "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1}]},
        {"type": "MaxPool2d", "kernel_size": 2}, {"type": "AvgPool2d", "kernel_size": 1},
        {"type": "AdaptiveAvgPool2d", "output_size": 2}, {"type": "Dropout", "p": 0.1},
        "Flatten", {"type": "Linear", "out_features": 32}, "ReLU", {"type": "Linear", "out_features": "num_classes"},
    ]
    model = build_layers(layers, (1, 28, 28), num_classes=4)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 4)
    assert model[0].dilation == (2, 2) and model[10].in_features == 64
    assert isinstance(model[3], Residual) and isinstance(model[4].shortcut, torch.nn.Conv2d)


def test_torchvision_backbone_gets_its_final_layer_sized_for_num_classes() -> None:
    import torch

    from runner.interfaces import ModelRequest
    from runner.registries import load_registries

    model = load_registries().models.get("torchvision:resnet18")(ModelRequest(name="torchvision:resnet18", num_classes=3))
    assert model.fc.out_features == 3
    model.eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


# ---- 5. data --------------------------------------------------------------------------------


def test_bundled_digits_split_is_seeded_stratified_and_filtered() -> None:
    import numpy as np

    from runner.data import dataset_targets, stratified_split
    from runner.interfaces import DatasetRequest
    from runner.plugins.datasets import load_bundled_mnist

    dataset = load_bundled_mnist(DatasetRequest(name="mnist_bundled"))
    targets = dataset_targets(dataset)
    assert len(dataset) == 5000 and np.bincount(targets).tolist() == [500] * 10
    a = stratified_split(targets, (0.7, 0.15, 0.15), seed=0)
    b = stratified_split(targets, (0.7, 0.15, 0.15), seed=0)
    c = stratified_split(targets, (0.7, 0.15, 0.15), seed=1)
    assert all((x == y).all() for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))
    assert not (a.train == c.train).all()
    assert np.bincount(targets[a.train]).tolist() == [350] * 10
    assert not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    few = stratified_split(targets, (0.7, 0.15, 0.15), seed=0, train_per_class=20)
    assert np.bincount(targets[few.train]).tolist() == [20] * 10 and (few.test == a.test).all()


def test_class_filter_and_rgb_expansion_for_a_torchvision_model(tmp_path: Path) -> None:
    from runner.spec import load_spec

    spec = load_spec(TINY_SPEC, ["data.classes=[3, 8]", "model.name=torchvision:resnet18", "model.options={}", "data.train_per_class=8"])
    run_plan, parts = plan_and_build(spec)
    assert list(run_plan.data.class_names) == ["3", "8"] and run_plan.spec.model.num_classes == 2
    assert run_plan.data.rgb_expanded and run_plan.data.input_shape == (3, 28, 28)
    images, labels = next(iter(parts.train_loader))
    assert images.shape[1:] == (3, 28, 28) and set(labels.tolist()) <= {0, 1}


def test_image_folder_and_torchvision_datasets_by_name(tmp_path: Path, run_cli, db: Path) -> None:
    import numpy as np
    from PIL import Image

    from runner.interfaces import DatasetRequest
    from runner.plugins.datasets import load_bundled_mnist

    digits = load_bundled_mnist(DatasetRequest(name="mnist_bundled"))
    for label in (0, 1):
        folder = tmp_path / "images" / f"digit{label}"
        folder.mkdir(parents=True)
        indices = np.flatnonzero(digits.targets.numpy() == label)[:30]
        for i in indices:
            Image.fromarray(digits.images[i, 0].numpy()).save(folder / f"{i}.png")
    spec = _spec(tmp_path, TINY_SPEC.read_text().replace("dataset: mnist_bundled", "dataset: image_folder\n  options: {root: images}")
                 .replace("  classes: [0, 1, 2]\n", "") .replace("- {name: ToImage}", "- {name: ToImage}\n    - {name: Grayscale}"))
    result = run_cli("run", spec, "--db", db, "-q")
    assert result.exit_code == 0, result.err
    shown = run_cli("show", result.out.strip(), "--db", db, "--format", "json").json()
    assert shown["status"] == "completed" and shown["class_names"] == ["digit0", "digit1"]

    fake = _spec(tmp_path, TINY_SPEC.read_text().replace("dataset: mnist_bundled", "dataset: torchvision:FakeData\n  options: {size: 90, image_size: [1, 28, 28], num_classes: 3}")
                 .replace("  classes: [0, 1, 2]\n", ""), name="fake.yaml")
    assert run_cli("run", fake, "--db", db, "-q").exit_code == 0
    missing = _spec(tmp_path, TINY_SPEC.read_text().replace("dataset: mnist_bundled", "dataset: torchvision:MNIST\n  options: {root: nowhere}"), name="missing.yaml")
    result = run_cli("run", missing, "--db", db, "-q")
    assert result.exit_code == 2 and "not found" in result.err and len(result.err.strip().splitlines()) == 1


# ---- 6. transforms --------------------------------------------------------------------------


def test_training_and_evaluation_transforms_are_composed_separately(tmp_path: Path) -> None:
    import torch

    from runner.spec import load_spec

    spec = load_spec(TINY_SPEC, ["transforms.train=[{name: ToImage}, {name: RandomRotation, degrees: 30}, {name: ToDtype, dtype: float32, scale: true}, {name: Resize, size: 20}]"])
    run_plan, parts = plan_and_build(spec)
    assert [s.name for s in run_plan.spec.transforms.eval] == ["ToImage", "ToDtype", "Resize"]
    assert run_plan.data.input_shape == (1, 20, 20)
    train_a = next(iter(parts.train_loader))[0]
    assert train_a.dtype == torch.float32 and train_a.shape[-1] == 20
    val_1 = next(iter(parts.val_loader))[0]
    val_2 = next(iter(parts.val_loader))[0]
    assert torch.equal(val_1, val_2)  # evaluation has no random step


# ---- 7 and 8. training and reproducibility --------------------------------------------------


def test_same_seed_gives_identical_epochs_and_another_seed_differs(run_cli, tiny_spec: Path, db: Path) -> None:
    ids = [run_cli("run", tiny_spec, "--db", db, "-q", *extra).out.strip() for extra in ((), (), ("--set", "seed=7"))]
    epochs = [run_cli("show", i, "--db", db, "--format", "json").json()["epochs"] for i in ids]
    assert len(epochs[0]) == 2 and set(epochs[0][0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert epochs[0] == epochs[1]
    assert epochs[0] != epochs[2]


@pytest.mark.parametrize("overrides", [
    ["training.optimizer={name: SGD, lr: 0.05, momentum: 0.9}", "training.scheduler={name: StepLR, step_size: 1, gamma: 0.5}"],
    ["training.optimizer={name: AdamW, lr: 0.003, weight_decay: 0.01}", "training.loss={name: CrossEntropyLoss, label_smoothing: 0.1, weight: [1.0, 2.0, 1.0]}", "training.grad_clip=1.0"],
])
def test_optimizers_schedulers_losses_and_clipping_train(overrides: list[str], tmp_path: Path) -> None:
    from runner.execute import run_experiment
    from runner.reports import run_details
    from runner.store import Store

    store = Store(tmp_path / "r.db")
    outcome = run_experiment(TINY_SPEC, overrides, store=store, registries=builtin_registries())
    details = run_details(store, outcome.run_id)
    assert details["status"] == "completed"
    assert details["epochs"][-1]["train_loss"] < details["epochs"][0]["train_loss"]
    assert details["test"]["accuracy"] > 0.8 and 0 < details["test"]["f1_macro"] <= 1


def test_deterministic_flag_turns_on_torch_deterministic_algorithms() -> None:
    import torch

    from runner.rng import seed_everything

    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


# ---- 9. the results store -------------------------------------------------------------------


def test_run_rows_hold_what_reproduction_needs(trained_tiny_run) -> None:
    import torch

    with sqlite3.connect(trained_tiny_run.db) as conn:
        conn.row_factory = sqlite3.Row
        run = conn.execute("select * from runs where id = ?", (trained_tiny_run.run_id,)).fetchone()
        metric_rows = conn.execute("select count(*) from epoch_metrics where run_id = ?", (trained_tiny_run.run_id,)).fetchone()[0]
        version = conn.execute("select value from meta where key = 'schema_version'").fetchone()[0]
    assert run["status"] == "completed" and run["model"] == "cnn" and run["strategy"] == "full_finetune"
    assert run["torch_version"] == torch.__version__ and run["python_version"] and run["host"]
    assert run["params_total"] == run["params_trainable"] > 0 and "Conv2d" in run["model_summary"]
    spec = json.loads(run["spec_json"])
    assert spec["model"]["num_classes"] == 3 and spec["training"]["epochs"] == 2 and "epochs: 2" in run["spec_yaml"]
    assert metric_rows == 2 * 4 and int(version) >= 1
    assert run["artifacts_dir"] == trained_tiny_run.run_id  # relative to runs/ beside the store, which may move
    assert (trained_tiny_run.db.parent / "runs" / run["artifacts_dir"] / "best.pt").is_file()


def test_db_option_and_environment_variable_choose_the_store(run_cli, tiny_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_DB", str(tmp_path / "env.db"))
    run_id = run_cli("run", tiny_spec, "-q", "--set", "training.epochs=1").out.strip()
    assert _count_runs(tmp_path / "env.db") == 1 and not (tmp_path / "results.db").exists()
    assert (tmp_path / "runs" / run_id / "last.pt").is_file()
    listed = run_cli("runs", "--format", "json").json()
    assert [r["id"] for r in listed] == [run_id]


# ---- 10. the CLI ----------------------------------------------------------------------------


def test_json_contracts_of_runs_report_and_show(trained_tiny_run, run_cli) -> None:
    keys = {"id", "name", "status", "seed", "model", "strategy", "epochs_run", "best_val_accuracy", "test_accuracy", "duration_s"}
    for command in ("runs", "report"):
        rows = run_cli(command, "--db", trained_tiny_run.db, "--format", "json").json()
        assert isinstance(rows, list) and keys <= set(rows[0]) and rows[0]["status"] == "completed"
    shown = run_cli("show", trained_tiny_run.run_id[:6], "--db", trained_tiny_run.db, "--format", "json").json()
    assert keys | {"spec", "epochs", "test"} <= set(shown)
    assert set(shown["test"]) == {"loss", "accuracy", "f1_macro"} and shown["test"]["accuracy"] == shown["test_accuracy"]
    assert shown["weights"] is None


def test_plugins_models_and_summary_commands(run_cli, tiny_spec: Path) -> None:
    plugins = run_cli("plugins", "--format", "json").json()
    assert {"kind": "strategy", "name": "head_only"}.items() <= next(r for r in plugins["names"] if r["name"] == "head_only").items()
    models = run_cli("models", "vgg1*")
    assert "torchvision:vgg16" in models.out and "runner.plugins.models" in models.out
    summary = run_cli("summary", tiny_spec)
    assert summary.exit_code == 0 and "trainable parameters:" in summary.out and "Conv2d" in summary.out


@pytest.mark.parametrize("argv", [["--help"], ["runs"], ["show", "nope"], ["report"]])
def test_light_commands_never_import_torch(argv: list[str], trained_tiny_run) -> None:
    code = (
        "import sys\nfrom runner.cli import main\n"
        f"try:\n    main({argv + ['--db', str(trained_tiny_run.db)] if argv != ['--help'] else argv!r})\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- 11. errors -----------------------------------------------------------------------------


def test_failure_during_training_marks_the_run_failed_keeps_metrics_and_exits_1(tmp_path: Path, run_cli, db: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "import torch\n"
        "class Fragile(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            self.calls += 1\n"
        "            if self.calls > 20:\n"  # 17 training batches per epoch: fails in epoch 2
        "                raise RuntimeError('exploded in epoch 2')\n"
        "        return self.net(x)\n"
        "def fragile(**kwargs):\n"
        "    return Fragile()\n"
    )
    spec = _spec(tmp_path, TINY_SPEC.read_text().replace("name: cnn", f"name: hub-local:{hub}/fragile\n  trust_repo: true"))
    result = run_cli("run", spec, "--db", db, "-q")
    assert result.exit_code == 1 and "exploded in epoch 2" in result.err
    rows = run_cli("runs", "--db", db, "--format", "json").json()
    assert rows[0]["status"] == "failed" and rows[0]["epochs_run"] == 1
    shown = run_cli("show", rows[0]["id"], "--db", db, "--format", "json").json()
    assert len(shown["epochs"]) == 1 and "exploded" in shown["error"] and "Traceback" in shown["traceback"]


# ---- 12. the quickstart ---------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_reaches_097_test_accuracy(run_cli, db: Path) -> None:
    result = run_cli("run", ROOT / "experiments" / "quickstart.yaml", "--db", db, "-q")
    assert result.exit_code == 0, result.err
    shown = run_cli("show", result.out.strip(), "--db", db, "--format", "json").json()
    assert shown["status"] == "completed" and len(shown["epochs"]) == shown["spec"]["training"]["epochs"]
    assert shown["test"]["accuracy"] >= 0.97


# ---- 13. README and CI ----------------------------------------------------------------------


def test_readme_opens_with_install_then_test_and_ci_runs_them() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1].strip().splitlines()
    assert first_block == ['pip install -e ".[test]"', "python -m pytest -q -n 2"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "venv" in ci and "README.md" in ci
