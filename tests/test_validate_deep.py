"""`runner validate` runs what can fail before training: builders, transforms, a forward pass, the strategy, the loss.

The plugin here is the one a stranger wrote from the docs (a LeNet, a digits dataset, a noise
transform, a bias-only strategy), installed as a distribution. Each case breaks one thing that
`runner run` used to find only after it had started; validate must now refuse it with exit code 2,
one line naming the spec key (and, for plugin code, the name and its plugin), without loading
weights or data it does not need.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

ACME = '''
import torch
from torch import nn
from runner.plugin_api import InMemoryImages, SpecError, Stage, Strategy, hookimpl


class LeNet5(nn.Module):
    def __init__(self, request):
        super().__init__()
        options = dict(request.options)
        width = int(options.pop("width", 6))
        hidden = 720 // width  # 120 for LeNet's own 6 maps
        activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[options.pop("activation", "tanh")]
        padding = int(options.pop("padding", 2))
        if options:
            raise SpecError(f"model.options: acme:lenet5 does not take {sorted(options)}")
        channels = request.input_shape[0]
        self.features = nn.Sequential(nn.Conv2d(channels, width, 5, padding=padding), activation(), nn.AvgPool2d(2),
                                      nn.Conv2d(width, 16, 5), activation(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, hidden), activation(),
                                        nn.Linear(hidden, request.num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_digits(request):
    n = int(request.options.get("n_per_class", 20))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3 * n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return InMemoryImages(images, [i % 3 for i in range(3 * n)], classes=["zero", "one", "two"])


class GaussianNoise:
    random = True

    def __init__(self, std=0.1):
        self.std = std

    def __call__(self, image):
        return image + torch.normal(0.0, self.std, size=tuple(image.shape))


class Center:
    random = False

    def __call__(self, image):
        channels, height, width = image.shape  # one image only: fails on a batch
        return image - image.mean()


class FailsLater:
    random = True

    def __init__(self, after=30):
        self.after, self.calls = after, 0

    def __call__(self, image):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError(f"gave up after {self.after} images")
        return image


class BiasOnly(Strategy):
    name = "acme:bias_only"

    def __init__(self, head_only_epochs=1):
        if head_only_epochs < 0:
            raise ValueError(f"head_only_epochs must be >= 0, got {head_only_epochs}")
        self.head_only_epochs = head_only_epochs

    def stage(self, epoch):
        return Stage(trainable="head" if epoch <= self.head_only_epochs else ["head", "*.bias"])


@hookimpl
def runner_register_models(register):
    register("acme:lenet5", LeNet5)


@hookimpl
def runner_register_datasets(register):
    register("acme:digits", load_digits)


@hookimpl
def runner_register_transforms(register):
    register("acme:GaussianNoise", GaussianNoise)
    register("acme:Center", Center)
    register("acme:FailsLater", FailsLater)


@hookimpl
def runner_register_strategies(register):
    register("acme:bias_only", BiasOnly)
'''

SPEC = """\
name: acme
seed: 0
device: cpu
data: {{dataset: 'acme:digits', options: {data}, batch_size: 16}}
model: {{name: 'acme:lenet5', options: {model}}}
transforms:
  train: [{{name: ToImage}}, {{name: ToDtype, dtype: float32, scale: true}}, {train}]
  eval: [{{name: ToImage}}, {{name: ToDtype, dtype: float32, scale: true}}{eval}]
training: {{epochs: 2, strategy: {{name: 'acme:bias_only', head_only_epochs: {head_only_epochs}}}}}
"""
GOOD = {"data": "{n_per_class: 20}", "model": "{}", "train": "{name: 'acme:GaussianNoise', std: 0.1}", "eval": "",
        "head_only_epochs": 1}

CASES = {
    "transform-std": ({"train": "{name: 'acme:GaussianNoise', std: -1}"},
                      "transforms.train[2] (acme:GaussianNoise from plugin 'acme'): RuntimeError: normal expects std >= 0.0, but found std -1"),
    "strategy-option": ({"head_only_epochs": -2},
                        "training.strategy (acme:bias_only from plugin 'acme'): ValueError: head_only_epochs must be >= 0, got -2"),
    "model-option": ({"model": "{activation: swish}"}, "model (acme:lenet5 from plugin 'acme'): KeyError: 'swish'"),
    "builder-bug": ({"model": "{width: 0}"}, "model (acme:lenet5 from plugin 'acme'): ZeroDivisionError: integer division or modulo by zero"),
    "forward": ({"model": "{padding: 0}"},
                "model (acme:lenet5 from plugin 'acme') cannot take images of shape (1, 28, 28): "
                "RuntimeError: a and b must have same reduction dim, but got [2, 256] X [400, 120]."),
    "batch-transform": ({"eval": ", {name: 'acme:Center'}"},
                        "transforms.eval[2] (acme:Center from plugin 'acme'): ValueError: too many values to unpack (expected 3)"),
    "dataset-bug": ({"data": "{n_per_class: -1}"},
                    "data (acme:digits from plugin 'acme'): RuntimeError: Trying to create tensor with negative dimension -3: [-3, 1, 28, 28]"),
}


def acme_spec(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "acme.yaml"
    path.write_text(SPEC.format(**{**GOOD, **changes}), encoding="utf-8")
    return path


@pytest.fixture
def acme(install: Callable[..., str]) -> None:
    install("acme", ACME)


def test_the_good_spec_validates_and_runs(acme: None, run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("validate", acme_spec(tmp_path))
    assert result.exit_code == 0, result.err
    assert result.err == ""
    run = run_cli("run", acme_spec(tmp_path), "--db", tmp_path / "results.db", "-q")
    assert run.exit_code == 0, run.err


@pytest.mark.parametrize("case", list(CASES))
def test_validate_refuses_what_run_would_fail_on_naming_the_key_the_name_and_the_plugin(
    acme: None, run_cli: Any, tmp_path: Path, case: str,
) -> None:
    changes, message = CASES[case]
    spec = acme_spec(tmp_path, **changes)
    result = run_cli("validate", spec)
    assert (result.exit_code, result.err.splitlines()) == (2, [f"error: {message}"])
    assert result.out == ""
    run = run_cli("run", spec, "--db", tmp_path / "results.db", "-q")  # the same line, before any run exists
    assert (run.exit_code, run.err.splitlines()) == (2, [f"error: {message}"])
    assert run_cli("runs", "--db", tmp_path / "results.db", "--format", "json").json() == []


def test_debug_shows_where_in_the_plugin_the_error_came_from(acme: None, run_cli: Any, tmp_path: Path) -> None:
    from runner.errors import PluginError

    with pytest.raises(PluginError) as caught:
        run_cli("--debug", "validate", acme_spec(tmp_path, model="{width: 0}"))
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_a_transform_failing_mid_run_fails_the_run_naming_its_step(acme: None, run_cli: Any, tmp_path: Path) -> None:
    spec = acme_spec(tmp_path, train="{name: 'acme:FailsLater', after: 30}")
    db = tmp_path / "results.db"
    result = run_cli("run", spec, "--db", db, "-q")
    assert result.exit_code == 1
    step = "transforms.train[2] (acme:FailsLater from plugin 'acme'): RuntimeError: gave up after 30 images"
    assert step in result.err and result.err.count("\n") == 1
    details = run_cli("show", run_cli("runs", "--db", db, "--format", "json").json()[0]["id"], "--db", db, "--format", "json").json()
    assert details["status"] == "failed" and step in details["error"]


# ------------------------------------------------------------------------------------------
# cheap: no weights read, no model in memory


VGG16_SPEC = """\
seed: 0
device: cpu
data: {classes: [0, 1]}
model: {name: 'torchvision:vgg16', weights: IMAGENET1K_V1, surgery: {classifier.6: {type: Linear, out_features: 2}}}
transforms:
  train: [{name: ToImage}, {name: Resize, size: 224}, {name: ToDtype, dtype: float32, scale: true}]
training: {epochs: 2, strategy: {name: head_only}}
"""

PROBE = textwrap.dedent("""
    import json, os, resource, sys
    import torch, torchvision
    from runner.cli import main
    import runner.plan, runner.plugins.models, runner.plugins.transforms  # imported before the baseline
    torch_home = os.path.realpath(os.environ["TORCH_HOME"])
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                     and os.path.realpath(os.fsdecode(args[0])).startswith(torch_home) else None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        main(["validate", sys.argv[1]])
    except SystemExit as exit:
        code = exit.code
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "opened": opened, "grew_kib": after - before}))
""")


def test_validating_vgg16_with_imagenet_weights_opens_nothing_under_torch_home_and_stays_small(tmp_path: Path) -> None:
    import os

    torch_home = tmp_path / "torch_home"
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "vgg16-397923af.pth").write_bytes(b"not read by validate")  # opening it at all would show
    spec = tmp_path / "vgg16.yaml"
    spec.write_text(VGG16_SPEC, encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", PROBE, str(spec)], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "TORCH_HOME": str(torch_home)}, timeout=600)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, result.stderr
    assert report["opened"] == []
    # VGG16's 138 million parameters are 528 MiB as float32: built for real, the process would grow by that
    assert report["grew_kib"] < 100 * 1024, report


def test_a_loss_for_probability_targets_passes_validate(run_cli: Any, tmp_path: Path) -> None:
    # MixUp-style strategies give class probabilities, which BCEWithLogitsLoss takes and class labels it does not
    from conftest import TINY_SPEC

    result = run_cli("validate", TINY_SPEC, "--set", "training.loss.name=BCEWithLogitsLoss")
    assert (result.exit_code, result.err) == (0, ""), result.err
