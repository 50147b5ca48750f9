"""A testing kit for plugin authors: the checks runner's own contract needs, and a pytest fixture.

A plugin's test suite loads the registries with only its own plugin (and runner's built-ins) and
runs the checks over every name it registers, the way timm's tests run every registered model::

    # tests/conftest.py
    pytest_plugins = ["runner.testing"]          # the runner_sandbox fixture

    # tests/test_hello.py
    import pytest
    from runner import testing

    REGISTRIES = testing.plugin_registries("hello")

    def test_the_plugin_loads_cleanly():
        testing.check_plugin_loads(REGISTRIES, "hello")

    @pytest.mark.parametrize("name", testing.names(REGISTRIES, "model", plugin="hello"))
    def test_every_model(name):
        testing.check_model(REGISTRIES, name, input_shape=(1, 28, 28))

Each ``check_*`` function raises ``AssertionError`` naming what is wrong (pytest shows it) and
builds everything the way runner does. ``runner_sandbox`` gives a test its own results store,
``TORCH_HOME`` and working directory, and runs ``runner`` commands in-process with only the plugins
the test names. Everything here is public and documented in ``docs/plugins.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pytest

from runner.errors import RunnerError

if TYPE_CHECKING:
    import torch

    from runner.registries import Registries

KINDS = ("model", "dataset", "transform", "strategy")


# ------------------------------------------------------------------------------------------
# Registries with only the plugins a test names


def plugin_registries(*plugins: str, allow_problems: bool = False) -> Registries:
    """runner's built-ins plus only the named third-party plugins (entry-point or distribution names).

    Other installed plugins are left out, as if they were not installed, so a test does not depend on
    them. A problem loading the named plugins fails here unless ``allow_problems``.
    """
    from runner.registries import load_registries

    registries = load_registries(plugins=plugins)
    missing = [p for p in plugins if p not in registries.plugins and not any(p == i.distribution for i in registries.plugins.values())]
    assert allow_problems or not registries.problems, "plugin problems: " + "; ".join(map(str, registries.problems))
    skipped = {p: why for p, why in registries.skipped.items() if p in missing}
    assert not missing, f"not loaded: {skipped}" if skipped else f"not installed (no entry point in group 'runner'): {', '.join(missing)}"
    return registries


def names(registries: Registries, kind: str, plugin: str | None = None) -> list[str]:
    """The registered names of one kind (``model``, ``dataset``, ``transform``, ``strategy``), of one plugin if given."""
    registry = registries.by_kind()[kind]
    return [e.name for e in registry.entries() if plugin is None or plugin in (e.plugin, e.distribution)]


def check_plugin_loads(registries: Registries, plugin: str) -> None:
    """The plugin loaded without a warning and registered at least one name, each with its own prefix."""
    assert plugin in registries.plugins, f"plugin {plugin!r} is not loaded (skipped: {registries.skipped})"
    own = [str(p) for p in registries.problems if p.plugin == plugin]
    assert not own, "; ".join(own)
    registered = [n for kind in KINDS for n in names(registries, kind, plugin)]
    assert registered, f"plugin {plugin!r} registered no names"
    assert all(n.startswith(f"{plugin}:") for n in registered), registered


# ------------------------------------------------------------------------------------------
# Models


def check_model(
    registries: Registries,
    name: str,
    *,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: Sequence[int] = (1, 5),
    options: dict[str, Any] | None = None,
    on_meta: bool = False,
    trust_repo: bool = False,
) -> None:
    """The model builds for each class count, its head is found, and a batch of two gives one logit per class.

    ``on_meta`` builds and runs it on PyTorch's ``meta`` device (shapes only: no memory, for big
    models); otherwise it runs on the CPU and every trainable parameter must receive a gradient.
    Named weights the builder offers must resolve without being fetched. ``options`` and
    ``trust_repo`` are what the spec's ``model.options`` and ``model.trust_repo`` would give.
    """
    import torch

    from runner.interfaces import ModelRequest
    from runner.models import head_names

    entry = registries.models.entry(name)
    for classes in num_classes:
        request = ModelRequest(name=name, num_classes=classes, input_shape=input_shape, options=dict(options or {}),
                               trust_repo=trust_repo)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = _built(entry, request)
            assert head_names(model), f"{name}: no classification head found"
            model.train()
            output = model(torch.zeros(2, *input_shape))
        logits = output.logits if hasattr(output, "logits") else output  # Inception's auxiliary outputs
        assert isinstance(logits, torch.Tensor) and tuple(logits.shape) == (2, classes), (
            f"{name} with {classes} classes gives {getattr(logits, 'shape', type(logits).__name__)} for a batch of 2, "
            f"not (2, {classes})")
        if not on_meta:
            logits.float().sum().backward()
            idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not idle, f"{name}: parameters that get no gradient: {idle[:5]}"
    check_named_weights(registries, name)


def _built(entry: Any, request: Any) -> Any:
    from torch import nn

    with entry.blamed("model", request.name):
        model = entry.obj(request)
    assert isinstance(model, nn.Module), f"{request.name} built a {type(model).__name__}, not a torch.nn.Module"
    return model


def check_named_weights(registries: Registries, name: str) -> None:
    """Every weights name the builder lists resolves to :class:`NamedWeights` (nothing is fetched); others are refused."""
    from runner.interfaces import NamedWeights

    builder = registries.models.get(name)
    listed = getattr(builder, "weights_names", None)
    resolve = getattr(builder, "named_weights", None)
    assert (listed is None) == (resolve is None), f"{name}: a builder offering named weights needs both weights_names and named_weights"
    if listed is None:
        return
    weights_names = listed()
    assert isinstance(weights_names, list) and all(isinstance(w, str) for w in weights_names), weights_names
    for weights_name in weights_names:
        weights = resolve(weights_name)
        assert isinstance(weights, NamedWeights) and weights.name == weights_name and weights.source, weights
    with _raises(RunnerError, f"{name}: named_weights of an unknown name"):
        resolve("NO_SUCH_WEIGHTS")


# ------------------------------------------------------------------------------------------
# Datasets


def check_dataset(registries: Registries, name: str, *, options: dict[str, Any] | None = None, base_dir: str | Path = ".",
                  on_corrupt: str = "error", protocol: bool = True) -> Any:
    """The dataset is a non-empty ``LabelledImages``: targets and classes agree with its samples; returns it.

    ``protocol=False`` accepts a dataset without ``targets`` or ``classes`` (runner then reads every
    label and numbers the classes), as some of torchvision's are; a plugin's datasets should have both.
    """
    import torch
    from PIL import Image

    from runner.data import dataset_classes, dataset_targets
    from runner.interfaces import DatasetRequest, LabelledImages

    entry = registries.datasets.entry(name)
    with entry.blamed("data", name):
        dataset = entry.obj(DatasetRequest(name=name, options=dict(options or {}), base_dir=str(base_dir), on_corrupt=on_corrupt))  # type: ignore[arg-type]
    assert isinstance(dataset, LabelledImages) or not protocol, f"{name}: needs __len__, __getitem__, targets and classes"
    size = len(dataset)
    assert size > 0, f"{name}: empty"
    targets = dataset_targets(dataset)
    assert len(targets) == size, f"{name}: {len(targets)} targets for {size} samples"
    classes = dataset_classes(dataset, targets)
    assert all(isinstance(c, str) for c in getattr(dataset, "classes", classes)), f"{name}: class names must be strings"
    assert targets.min() >= 0 and targets.max() < len(classes), f"{name}: labels outside 0..{len(classes) - 1}"
    for index in sorted({0, size - 1}):
        image, label = dataset[index]
        assert int(label) == int(targets[index]), f"{name}[{index}]: label {label} but targets says {targets[index]}"
        if isinstance(image, torch.Tensor):
            assert image.ndim == 3, f"{name}[{index}]: a tensor image must be (C, H, W), got {tuple(image.shape)}"
        else:
            assert isinstance(image, Image.Image), f"{name}[{index}]: images are PIL images or (C, H, W) tensors, got {type(image).__name__}"
    return dataset


def check_dataset_refuses(registries: Registries, name: str, *, options: dict[str, Any] | None = None,
                          base_dir: str | Path = ".", match: str | None = None) -> str:
    """Missing or bad data is refused with a :class:`RunnerError` (one line for the user), never a download; returns it."""
    from runner.interfaces import DatasetRequest

    entry = registries.datasets.entry(name)
    with _raises(RunnerError, f"{name} with {options}") as caught:
        entry.obj(DatasetRequest(name=name, options=dict(options or {}), base_dir=str(base_dir)))
    message = str(caught[0])
    assert "\n" not in message, f"{name}: a message of several lines: {message!r}"
    assert match is None or match in message, f"{name}: {message!r} does not say {match!r}"
    return message


# ------------------------------------------------------------------------------------------
# Transforms


def check_transform(registries: Registries, name: str, *, options: dict[str, Any] | None = None,
                    image_shape: tuple[int, int, int] = (3, 16, 16), dtypes: Iterable[str] = ("uint8", "float32")) -> None:
    """The transform declares whether it is random, turns one ``(C, H, W)`` image into one, and, when it is not
    random, gives a batch ``(N, C, H, W)`` what it gives each image (runner applies it to a whole split at once).
    """
    import torch

    builder = registries.transforms.get(name)
    random = getattr(builder, "random", False)
    assert isinstance(random, bool), f"{name}: 'random' must be True or False, got {random!r}"
    entry = registries.transforms.entry(name)
    with entry.blamed("transform", name):
        transform = builder(**dict(options or {}))
    generator = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        batch = _images(3, image_shape, getattr(torch, dtype), generator)
        with entry.blamed("transform", name):
            one = transform(batch[0])
        assert isinstance(one, torch.Tensor) and one.ndim == 3, (
            f"{name}: a {dtype} image of shape {image_shape} became {getattr(one, 'shape', type(one).__name__)}, not (C, H, W)")
        if random:
            continue
        with entry.blamed("transform", name):
            together = transform(batch)
        assert isinstance(together, torch.Tensor) and tuple(together.shape) == (3, *one.shape), (
            f"{name}: a batch of shape {tuple(batch.shape)} became {getattr(together, 'shape', None)}, not {(3, *one.shape)}")
        assert together.dtype == one.dtype, f"{name}: a batch becomes {together.dtype}, one image {one.dtype}"
        for i in range(len(batch)):
            alone = transform(batch[i])
            assert torch.allclose(together[i].float(), alone.float(), atol=1e-5), f"{name}: image {i} of a batch differs from it alone"


def _images(n: int, shape: tuple[int, int, int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    import torch

    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)
    return torch.rand((n, *shape), generator=generator).to(dtype)


# ------------------------------------------------------------------------------------------
# Strategies


def reference_model(num_classes: int = 3, channels: int = 3) -> torch.nn.Module:
    """A small CNN with the usual layout: backbone blocks ``stem``, ``layer1``, ``layer2``, then the head ``fc``."""
    from torch import nn

    return nn.Sequential(_named([
        ("stem", nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())),
        ("layer1", nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())),
        ("layer2", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8, num_classes)),
    ]))


def _named(items: list[tuple[str, Any]]) -> Any:
    from collections import OrderedDict

    return OrderedDict(items)


def check_strategy(registries: Registries, name: str, *, options: dict[str, Any] | None = None, epochs: int = 6,
                   model: torch.nn.Module | None = None, num_classes: int = 3) -> None:
    """The strategy builds, describes itself as JSON, gives a :class:`Stage` per epoch (the same when asked again)
    whose ``trainable`` selects parameters of ``model`` (default :func:`reference_model`), and after
    ``setup`` keeps the batch size in ``on_batch`` with class or probability targets and floats in ``epoch_metrics``.
    """
    import torch

    from runner.interfaces import Stage, Strategy, TrainingContext
    from runner.models import select_trainable

    entry = registries.strategies.entry(name)
    with entry.blamed("training.strategy", name):
        strategy = entry.obj(**dict(options or {}))
    assert isinstance(strategy, Strategy), f"{name} built a {type(strategy).__name__}, not a Strategy"
    described = strategy.describe()
    assert isinstance(described, dict) and described.get("name") == name, f"{name}: describe() gave {described!r}"
    json.dumps(described)
    model = model if model is not None else reference_model(num_classes)
    for epoch in range(1, epochs + 1):
        stage = strategy.stage(epoch)
        assert isinstance(stage, Stage), f"{name}: stage({epoch}) gave {type(stage).__name__}, not a Stage"
        assert stage == strategy.stage(epoch), f"{name}: stage({epoch}) changes when asked again; make it a function of the epoch"
        assert select_trainable(model, stage.trainable), f"{name}: stage({epoch}) trains nothing"
        assert stage.backbone_lr_mult >= 0, f"{name}: stage({epoch}) has a negative backbone_lr_mult"
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]) % num_classes
    loader = [(images, labels)]
    strategy.setup(TrainingContext(model=model, num_classes=num_classes, class_names=tuple(str(i) for i in range(num_classes)),
                                   device=torch.device("cpu"), epochs=epochs, train_loader=loader, val_loader=loader))
    mixed, targets = strategy.on_batch(images, labels)
    assert mixed.shape[0] == 4 and mixed.shape[1:] == images.shape[1:], f"{name}: on_batch changed the batch's shape"
    assert tuple(targets.shape) in ((4,), (4, num_classes)), f"{name}: targets of shape {tuple(targets.shape)}"
    torch.nn.functional.cross_entropy(model(mixed), targets)  # what the default loss does with them
    metrics = strategy.epoch_metrics(1)
    assert isinstance(metrics, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items()), metrics


# ------------------------------------------------------------------------------------------
# The sandbox fixture


@contextlib.contextmanager
def _raises(kind: type[BaseException], what: str) -> Any:
    caught: list[BaseException] = []
    try:
        yield caught
    except kind as exc:
        caught.append(exc)
    assert caught, f"{what}: expected {kind.__name__}"


@dataclass
class CliResult:
    """What one ``runner`` command did: its exit code and what it printed."""

    exit_code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def invoke(*args: Any) -> CliResult:
    """``runner ARGS…`` run in this process (torch is imported once, not per command), its output captured."""
    from runner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


class Sandbox:
    """A test's own results store, ``TORCH_HOME`` and working directory, with only the plugins it names.

    :param directory: the test's temporary directory (also the working directory).
    """

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self.db = directory / "results.db"
        self._monkeypatch = monkeypatch
        for variable in ("RUNNER_DISABLE_PLUGINS", "RUNNER_BLOCK_PLUGINS"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("RUNNER_DB", str(self.db))
        monkeypatch.setenv("TORCH_HOME", str(directory / "torch_home"))
        monkeypatch.chdir(directory)
        monkeypatch.setenv("RUNNER_LOAD_PLUGINS", "")  # no third-party plugin until load() names some

    def load(self, *plugins: str, allow_problems: bool = False) -> Registries:
        """Registries of the built-ins and these plugins; commands run by :meth:`cli` (and subprocesses) see the same."""
        self._monkeypatch.setenv("RUNNER_LOAD_PLUGINS", ",".join(plugins))
        return plugin_registries(*plugins, allow_problems=allow_problems)

    def cli(self, *args: Any) -> CliResult:
        """``runner ARGS…`` run in-process (against this sandbox's store unless ``--db`` says otherwise)."""
        return invoke(*args)

    @property
    def store(self) -> Any:
        from runner.store import Store

        return Store(self.db)


@pytest.fixture
def runner_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """An isolated store, ``TORCH_HOME`` and working directory; no third-party plugin until ``sandbox.load(...)`` names it."""
    return Sandbox(tmp_path, monkeypatch)


__all__ = [
    "plugin_registries", "names", "check_plugin_loads", "check_model", "check_named_weights", "check_dataset",
    "check_dataset_refuses", "check_transform", "check_strategy", "reference_model", "Sandbox", "CliResult", "invoke",
    "runner_sandbox",
]
