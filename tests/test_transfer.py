"""Issue 3: model sources, surgery, weights, strategies, early stopping, feature cache, examples."""

from __future__ import annotations

import gc
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import ROOT, TINY_SPEC, builtin_registries, plan_and_build

EXPERIMENTS = ROOT / "experiments"

# A VGG with the upstream surgery of experiments/vgg_pretrain.yaml, small enough for tests.
SMALL_VGG = [
    "model.name=torchvision:vgg11_bn",
    "model.options={}",
    "model.surgery={avgpool: Identity, classifier: {type: Linear, in_features: 512, out_features: num_classes}}",
    "transforms.train=[{name: ToImage}, {name: Resize, size: 32}, {name: ToDtype, dtype: float32, scale: true}]",
    "data.train_per_class=12",
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- 1. every torchvision classification model ----------------------------------------------


def _smallest_input(name: str) -> int:
    if name.startswith(("vit_", "maxvit")):
        return 224  # fixed by their position embeddings / partitioning
    if name == "inception_v3":
        return 75
    return 64


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_model_gets_its_head_replaced_and_nothing_else(name: str) -> None:
    from runner.models import replace_head

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **({"init_weights": False} if name in ("googlenet", "inception_v3") else {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = replace_head(model, 3)
    assert replaced, f"{name}: no classification layer found"
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith(tuple(f"{r}." for r in replaced)):
            assert torch.equal(after[key], value), f"{name}: {key} changed"
    for r in replaced:  # the old 1000-class outputs are gone, every head now gives 3
        assert (model.get_submodule(r).out_features if hasattr(model.get_submodule(r), "out_features") else model.get_submodule(r).out_channels) == 3
    model.eval()
    size = _smallest_input(name)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 3)
    del model, before, after
    gc.collect()


def test_heads_of_each_family_are_the_expected_layers() -> None:
    from runner.models import head_names, replace_head

    expected = {
        "vgg11": (["classifier.6"], ["classifier"]), "alexnet": (["classifier.6"], ["classifier"]),
        "resnet18": (["fc"], ["fc"]), "densenet121": (["classifier"], ["classifier"]),
        "squeezenet1_0": (["classifier.1"], ["classifier"]), "vit_b_16": (["heads.head"], ["heads"]),
        "swin_t": (["head"], ["head"]), "convnext_tiny": (["classifier.2"], ["classifier"]),
        "maxvit_t": (["classifier.5"], ["classifier"]), "mobilenet_v3_small": (["classifier.3"], ["classifier"]),
        "efficientnet_b0": (["classifier.1"], ["classifier"]), "mnasnet0_5": (["classifier.1"], ["classifier"]),
        "regnet_y_400mf": (["fc"], ["fc"]), "shufflenet_v2_x0_5": (["fc"], ["fc"]),
        "googlenet": (["aux1.fc2", "aux2.fc2", "fc"], ["fc"]), "inception_v3": (["AuxLogits.fc", "fc"], ["fc"]),
    }
    for name, (layers, heads) in expected.items():
        kwargs = {"init_weights": False, "aux_logits": True} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        assert sorted(replace_head(model, 5)) == sorted(layers), name
        assert head_names(model) == heads, name


# ---- 2. layer surgery -----------------------------------------------------------------------


def test_surgery_replaces_submodules_by_dotted_path_as_in_the_seed() -> None:
    from torch import nn

    from runner.models import apply_surgery

    model = torchvision.models.vgg16(weights=None)
    apply_surgery(model, {"classifier.6": {"type": "Linear", "in_features": 4096, "out_features": 2}, "classifier.3": "Identity"}, num_classes=2)
    assert isinstance(model.classifier[6], nn.Linear) and model.classifier[6].out_features == 2
    assert isinstance(model.classifier[3], nn.Identity)


def test_a_surgery_path_that_does_not_exist_is_a_spec_error(tmp_path: Path, run_cli, db: Path) -> None:
    result = run_cli("run", TINY_SPEC, "--db", db, "--set", "model.surgery={classifer.6: Identity}")
    assert result.exit_code == 2 and "classifer.6" in result.err
    assert not db.exists() or sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 0


# ---- 3. weights ------------------------------------------------------------------------------


def test_named_torchvision_weights_load_from_torch_home_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from runner.files import sha256_file
    from runner.spec import load_spec

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, cache / Path(weights.url).name)  # the file name torchvision expects

    spec = load_spec(TINY_SPEC, ["model.name=torchvision:resnet18", "model.options={}", "model.weights=IMAGENET1K_V1", "data.train_per_class=4"])
    run_plan, parts = plan_and_build(spec)
    loaded = parts.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items() if not k.startswith("fc."))
    assert run_plan.weights.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert run_plan.weights.sha256 == sha256_file(cache / Path(weights.url).name)


def test_missing_weights_offline_fail_fast_naming_the_file_and_where_to_put_it(run_cli, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    result = run_cli("run", TINY_SPEC, "--db", db, "--set", "model.name=torchvision:resnet18", "--set", "model.options={}", "--set", "model.weights=IMAGENET1K_V1")
    assert result.exit_code == 2
    assert "resnet18-f37072fd.pth" in result.err and str(Path(torch.hub.get_dir()) / "checkpoints") in result.err
    bad = run_cli("run", TINY_SPEC, "--db", db, "--set", "model.name=torchvision:resnet18", "--set", "model.options={}", "--set", "model.weights=IMAGENET1K_V9")
    assert bad.exit_code == 2 and "IMAGENET1K_V1" in bad.err


def test_weights_from_a_run_and_never_random_by_accident(tmp_path: Path, run_cli, db: Path) -> None:
    first = run_cli("run", TINY_SPEC, "--db", db, "-q").out.strip()
    upstream = run_cli("show", first, "--db", db, "--format", "json").json()
    second = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", f"model.weights={{run: {first}}}").out.strip()
    shown = run_cli("show", second, "--db", db, "--format", "json").json()
    assert shown["weights"] == {"source": f"run:{first}", "sha256": upstream["checkpoints"]["best"]["sha256"]}

    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    wrong = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", f"model.weights={{file: {other}}}")
    assert wrong.exit_code == 2 and "weights from file:" in wrong.err


def test_a_run_id_of_digits_only_names_its_run_in_a_spec_and_new_ids_always_start_with_a_letter(run_cli, db: Path, monkeypatch) -> None:
    """YAML reads ``{run: 257400778786}`` as a number: such an id, made before, still names its run. One that YAML
    reads as another number (``5351e9053013``, an infinite float: found as a flaky CI run) is answered with how to
    quote it, quoted it works, and a new id always starts with a letter, so YAML reads it as a string."""
    import uuid

    from runner.spec import parse_yaml
    from runner.store import database, runs

    for old_id in ("257400778786", "5351e9053013"):  # as an older runner could have made them
        monkeypatch.setattr(database, "new_id", lambda old_id=old_id: old_id)
        made = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", "training.epochs=1")
        assert made.exit_code == 0 and made.out.strip() == old_id, made.err
    monkeypatch.undo()

    second = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", "model.weights={run: 257400778786}")
    assert second.exit_code == 0, second.err
    assert run_cli("show", second.out.strip(), "--db", db, "--format", "json").json()["weights"]["source"] == "run:257400778786"

    unquoted = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", "model.weights={run: 5351e9053013}")
    assert unquoted.exit_code == 2 and unquoted.out == ""
    assert "model.weights.run: YAML read this run id as a number (inf); put the id in quotes" in unquoted.err
    assert len(unquoted.err.strip().splitlines()) == 1 and "Traceback" not in unquoted.err
    quoted = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", "model.weights={run: '5351e9053013'}")
    assert quoted.exit_code == 0, quoted.err
    assert run_cli("show", quoted.out.strip(), "--db", db, "--format", "json").json()["weights"]["source"] == "run:5351e9053013"

    numeric_draws = [0x257400778786, 0x5351E9053013, 0x0B0101010101, 0x0123456789AB]
    drawn = iter([uuid.UUID(int=bits << 80) for bits in numeric_draws + [0xE0123456789A]])
    monkeypatch.setattr(runs.uuid, "uuid4", lambda: next(drawn))
    assert [parse_yaml(f"{bits:012x}") for bits in numeric_draws[:3]] == [257400778786, float("inf"), 0b0101010101]
    assert runs.new_id() == "e0123456789a"  # every draw that starts with a digit was thrown away
    monkeypatch.undo()
    assert all(isinstance(parse_yaml(new), str) for new in (runs.new_id() for _ in range(2000)))


# ---- 4. strategies ----------------------------------------------------------------------------


def _backbone_and_head(state: dict[str, torch.Tensor], head: str) -> tuple[dict, dict]:
    backbone = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    return backbone, {k: v for k, v in state.items() if k.startswith(head + ".")}


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_head_only_leaves_every_backbone_tensor_bit_identical(cache: str, tmp_path: Path) -> None:
    from runner.execute import run_experiment
    from runner.reports import run_details
    from runner.store import Store

    torch.manual_seed(5)
    model = torchvision.models.vgg11_bn(weights=None)
    model.avgpool = torch.nn.Identity()
    model.classifier = torch.nn.Linear(512, 3)
    weights = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), weights)

    store = Store(tmp_path / "r.db")
    overrides = [*SMALL_VGG, f"model.weights={{file: {weights}}}", "training.strategy={name: head_only}", f"training.feature_cache={cache}"]
    outcome = run_experiment(TINY_SPEC, overrides, store=store, registries=builtin_registries())
    details = run_details(store, outcome.run_id)
    assert details["settings"]["feature_cache"] == ("on" if cache == "auto" else "off: switched off in the spec")
    assert details["params"]["trainable"] == 512 * 3 + 3
    loaded_backbone, loaded_head = _backbone_and_head(torch.load(weights, weights_only=True), "classifier")
    trained = torch.load(details["checkpoints"]["last"]["path"], weights_only=True)["model"]
    trained_backbone, trained_head = _backbone_and_head(trained, "classifier")
    assert loaded_backbone.keys() == trained_backbone.keys()
    assert all(torch.equal(loaded_backbone[k], trained_backbone[k]) for k in loaded_backbone)  # BN statistics too
    assert not torch.equal(loaded_head["classifier.weight"], trained_head["classifier.weight"])


def test_feature_cache_gives_the_same_metrics_and_is_reused(tmp_path: Path) -> None:
    from runner.execute import run_experiment
    from runner.reports import run_details
    from runner.store import Store

    store = Store(tmp_path / "r.db")
    overrides = [*SMALL_VGG, "training.strategy={name: head_only}", "training.epochs=3"]
    cached = run_details(store, run_experiment(TINY_SPEC, overrides, store=store, registries=builtin_registries()).run_id)
    plain = run_details(store, run_experiment(TINY_SPEC, [*overrides, "training.feature_cache=off"], store=store, registries=builtin_registries()).run_id)
    assert cached["settings"]["feature_cache"] == "on"
    assert len(cached["epochs"]) == len(plain["epochs"]) == 3
    for a, b in zip(cached["epochs"], plain["epochs"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert abs(cached["test"]["accuracy"] - plain["test"]["accuracy"]) < 1e-4
    assert len(list((tmp_path / "runs" / ".feature_cache").glob("*.pt"))) == 1
    again = run_details(store, run_experiment(TINY_SPEC, overrides, store=store, registries=builtin_registries()).run_id)
    assert again["epochs"] == cached["epochs"]
    assert len(list((tmp_path / "runs" / ".feature_cache").glob("*.pt"))) == 1

    augmented = run_experiment(TINY_SPEC, [*overrides, "transforms.train=[{name: ToImage}, {name: RandomCrop, size: 28, padding: 2}, {name: Resize, size: 32}, {name: ToDtype, dtype: float32, scale: true}]", "training.epochs=1"], store=store, registries=builtin_registries())
    assert run_details(store, augmented.run_id)["settings"]["feature_cache"] == "off: the training transforms are random"


def test_trainable_patterns_override_the_head_like_the_seed_article() -> None:
    from runner.models import select_trainable
    from runner.plugins.strategies import HeadOnly

    model = torchvision.models.vgg16(weights=None)
    head = select_trainable(model, HeadOnly().stage(1).trainable)
    assert head == {n for n, _ in model.named_parameters() if "classifier" in n}  # the seed's rule
    only_last = select_trainable(model, HeadOnly(trainable=["classifier.6"]).stage(1).trainable)
    assert only_last == {"classifier.6.weight", "classifier.6.bias"}
    resnet = torchvision.models.resnet18(weights=None)
    assert select_trainable(resnet, "head") == {"fc.weight", "fc.bias"}
    last_block = select_trainable(resnet, {"last": 1})
    assert {n.split(".")[0] for n in last_block} == {"fc", "layer4"}


def test_discriminative_learning_rates_and_gradual_unfreezing(tmp_path: Path) -> None:
    from runner.execute import run_experiment
    from runner.interfaces import Stage
    from runner.plugins.strategies import Gradual
    from runner.reports import run_details
    from runner.store import Store
    from runner.optim import param_groups

    resnet = torchvision.models.resnet18(weights=None)
    groups = param_groups(resnet, Stage("all", backbone_lr_mult=0.1), lr=1e-2)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3] and len(groups[0]["params"]) == 2

    gradual = Gradual(stages=[{"epochs": 1, "train": "head"}, {"train": "all", "lr_mult": 0.1}])
    assert gradual.stage(1).trainable == "head" and gradual.stage(2) == Stage("all", 0.1) == gradual.stage(9)

    torch.manual_seed(0)
    from runner.layers import build_layers
    from runner.spec import load_spec

    layers = load_spec(TINY_SPEC).model.options["layers"]
    init = build_layers(layers, (1, 28, 28), num_classes=3)
    weights = tmp_path / "init.pt"
    torch.save(init.state_dict(), weights)
    store = Store(tmp_path / "r.db")
    outcome = run_experiment(TINY_SPEC, [f"model.weights={{file: {weights}}}", "training.strategy={name: gradual, stages: [{epochs: 1, train: head}, {train: all, lr_mult: 0.1}]}", "checkpoints={keep: all}", "training.feature_cache=off"], store=store, registries=builtin_registries())
    details = run_details(store, outcome.run_id)
    after_1 = torch.load(details["checkpoints"]["epoch-001"]["path"], weights_only=True)
    after_2 = torch.load(details["checkpoints"]["epoch-002"]["path"], weights_only=True)
    start = init.state_dict()
    assert torch.equal(after_1["0.weight"], start["0.weight"]) and not torch.equal(after_1["5.weight"], start["5.weight"])
    assert not torch.equal(after_2["0.weight"], start["0.weight"])


# ---- 4b. early stopping -----------------------------------------------------------------------


def test_early_stopping_counts_patience_with_min_delta() -> None:
    from runner.training import EarlyStopping

    stopper = EarlyStopping(monitor="val_loss", mode="min", patience=2, min_delta=0.01)
    stops = []
    for epoch, value in enumerate([1.0, 0.8, 0.795, 0.9, 0.7], start=1):
        stopper.update(epoch, {"val_loss": value})
        stops.append(stopper.should_stop)
    assert stops == [False, False, False, True, False]  # 0.795 is not 0.01 better than 0.8


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runner.training as training
    from runner.spec import load_spec

    spec = load_spec(TINY_SPEC, ["training.epochs=8", "training.early_stopping={monitor: val_loss, patience: 2}"])
    run_plan, parts = plan_and_build(spec)
    scripted = iter([0.9, 0.5, 0.5, 0.6])  # improves until epoch 2, then a plateau
    real_evaluate = training.evaluate

    def evaluate(model, loader, loss_fn, device, num_classes, **kwargs):
        result = real_evaluate(model, loader, loss_fn, device, num_classes, **kwargs)
        if loader is parts.val_loader:
            result["loss"] = next(scripted)
        return result

    monkeypatch.setattr(training, "evaluate", evaluate)

    class Recorder:
        def epoch_done(self, *args, **kwargs): pass
        def checkpoint_saved(self, *args, **kwargs): pass
        def check_owner(self): pass

    result = training.fit(run_plan, parts, Recorder(), tmp_path / "run")
    assert result.epochs_run == 4 and result.best_epoch == 2
    assert result.stop_reason == "early stopping: val_loss did not improve for 2 epochs"
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    final = parts.model.state_dict()
    assert all(torch.equal(final[k].cpu(), best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)


# ---- 1b. torch.hub ----------------------------------------------------------------------------


def test_hub_local_loads_and_github_hub_needs_trust_before_any_download(tmp_path: Path, run_cli, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "myhub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "dependencies = ['torch']\n"
        "import torch\n"
        "def tiny_mlp(hidden=32):\n"
        "    '''A two-layer MLP for 28x28 images.'''\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1000))\n"
    )
    result = run_cli("run", TINY_SPEC, "--db", db, "-q", "--set", f"model.name=hub-local:{hub}/tiny_mlp", "--set", "model.options={hidden: 16}",
                     "--set", "model.trust_repo=true")
    assert result.exit_code == 0, result.err
    shown = run_cli("show", result.out.strip(), "--db", db, "--format", "json").json()
    assert shown["status"] == "completed" and shown["params"]["total"] == 784 * 16 + 16 + 16 * 3 + 3

    def no_download(*args, **kwargs):
        raise AssertionError("torch.hub.load was called")

    monkeypatch.setattr(torch.hub, "load", no_download)
    refused = run_cli("run", TINY_SPEC, "--db", db, "--set", "model.name=hub:pytorch/vision:v0.10.0/alexnet")
    assert refused.exit_code == 2 and "trust_repo" in refused.err


# ---- 6 and 7. commands and examples --------------------------------------------------------


def test_summary_of_the_seed_vgg16_prints_the_expected_counts_offline(run_cli) -> None:
    result = run_cli("summary", EXPERIMENTS / "vgg16_imagenet.yaml")
    assert result.exit_code == 0, result.err
    assert "total parameters: 134,268,738" in result.out
    assert "trainable parameters: 119,554,050" in result.out


def test_example_specs_validate(run_cli) -> None:
    for spec in sorted(EXPERIMENTS.glob("*.yaml")):
        result = run_cli("validate", spec)
        assert result.exit_code == 0, (spec, result.err)


@pytest.mark.slow
def test_vgg_transfer_pretrains_upstream_once_then_reuses_it(run_cli, db: Path, tmp_path: Path) -> None:
    # The real experiment files, with fewer epochs so the suite stays short (the full main job's
    # timing is measured by hand and quoted in the README).
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "vgg_pretrain.yaml").write_text(re.sub(r"\n  epochs: \d+[^\n]*\n", "\n  epochs: 1\n", (EXPERIMENTS / "vgg_pretrain.yaml").read_text()))
    (experiments / "vgg_transfer.yaml").write_text((EXPERIMENTS / "vgg_transfer.yaml").read_text().replace("  epochs: 60\n", "  epochs: 4\n"))
    first = run_cli("run", experiments / "vgg_transfer.yaml", "--db", db, "-q")
    assert first.exit_code == 0, first.err
    assert "running it first" in first.err
    runs = run_cli("runs", "--db", db, "--format", "json").json()
    assert sorted(r["name"] for r in runs) == ["vgg_pretrain", "vgg_transfer"]
    upstream = next(r for r in runs if r["name"] == "vgg_pretrain")
    assert upstream["epochs_run"] == 1 and upstream["status"] == "completed"
    upstream_best = run_cli("show", upstream["id"], "--db", db, "--format", "json").json()["checkpoints"]["best"]

    second = run_cli("run", experiments / "vgg_transfer.yaml", "--db", db, "-q")
    assert second.exit_code == 0 and "reusing upstream run" in second.err
    assert len(run_cli("runs", "--db", db, "--format", "json").json()) == 3
    for run_id in (first.out.strip(), second.out.strip()):
        shown = run_cli("show", run_id, "--db", db, "--format", "json").json()
        assert shown["status"] == "completed" and shown["weights"]["source"].startswith(f"run:{upstream['id']}")
        assert shown["weights"]["sha256"] == upstream_best["sha256"]
        assert shown["settings"]["feature_cache"] == "on" and shown["stop_reason"]


def test_cpu_features_come_from_the_inference_optimized_backbone_or_else_the_model_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from runner import feature_cache

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(8, 2))
    model.eval()
    first, other = torch.randn(4, 3, 16, 16), torch.randn(5, 3, 16, 16)
    backbone = feature_cache._optimized_backbone(model, "fc", first)
    assert backbone is not None and not isinstance(backbone, nn.Sequential)  # TorchScript, batch norm folded in
    with torch.inference_mode():
        expected = feature_cache._head_inputs(model, model.fc, other)
        assert torch.allclose(backbone(other), expected, rtol=1e-4, atol=1e-6)
    assert [p.requires_grad for p in model.parameters()] == [True] * 6 and isinstance(model.fc, nn.Linear)  # the model is untouched

    def cannot_script(module):
        raise RuntimeError("not scriptable")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    assert feature_cache._optimized_backbone(model, "fc", first) is None  # extraction then runs the model itself
    features, labels = feature_cache._extract(model, model.fc, [(other, torch.arange(5))], torch.device("cpu"), None)
    assert torch.equal(features, expected) and labels.tolist() == [0, 1, 2, 3, 4]
