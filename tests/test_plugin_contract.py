"""The plugin contract, kept honest as datasette keeps its own.

Every hookspec in ``runner/hookspecs.py`` has a ``test_hook_<hook name>`` test that exercises it
through the runner, and every hook's exact signature appears in ``docs/plugins.md``; adding or
changing a hook without both fails here. Every public name of ``runner.plugin_api`` is documented
too. The stability tests show that hooks can grow without breaking the plugins written for them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from runner import hookspecs, plugin_api
from runner.hookspecs import hookimpl, hookspec
from runner.registries import PluginManager, get_plugin_manager, load_registries

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
TESTS = ROOT / "tests"


# ------------------------------------------------------------------------------------------
# the checks, written to run on any hookspecs module so that their failure can be shown too


def hook_specs(module: Any) -> dict[str, Callable[..., Any]]:
    """Every function of ``module`` marked with runner's ``@hookspec``."""
    return {name: fn for name, fn in vars(module).items() if callable(fn) and hasattr(fn, "runner_spec")}


def hook_signature(name: str, fn: Callable[..., Any]) -> str:
    """``runner_register_models(register: RegisterModel) -> None``, as the docs must show it."""
    return f"{name}{inspect.signature(fn)}".replace("'", "")


def undocumented_hooks(module: Any, docs: str) -> list[str]:
    return [name for name, fn in hook_specs(module).items() if hook_signature(name, fn) not in docs]


def untested_hooks(module: Any, test_sources: str) -> list[str]:
    tested = set(re.findall(r"^def (test_hook_\w+)\(", test_sources, flags=re.MULTILINE))
    return [name for name in hook_specs(module) if f"test_hook_{name}" not in tested]


def all_test_sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(TESTS.glob("test_*.py")))


def with_extra_hook(extra: Callable[..., Any]) -> ModuleType:
    """A copy of runner's hookspecs with one more hook, as if a developer had just added it."""
    module = ModuleType("future_hookspecs")
    vars(module).update({name: fn for name, fn in hook_specs(hookspecs).items()})
    setattr(module, extra.__name__, extra)
    return module


@hookspec
def runner_register_losses(register: Any) -> None:
    """A hook nobody has documented or tested yet."""


@hookspec
def runner_register_models(register: Any, context: Any) -> None:  # noqa: F811 - a drifted signature on purpose
    """The models hook with an argument the docs do not show."""


# ------------------------------------------------------------------------------------------
# the contract


def test_hookspecs_module_declares_the_four_registration_hooks() -> None:
    assert sorted(hook_specs(hookspecs)) == sorted(hookspecs.HOOK_KINDS)


def test_every_hook_has_a_test_hook_test() -> None:
    assert untested_hooks(hookspecs, all_test_sources()) == []


def test_every_hook_signature_appears_exactly_in_the_plugin_docs() -> None:
    assert undocumented_hooks(hookspecs, DOCS.read_text(encoding="utf-8")) == []


def test_a_hook_added_without_a_test_or_docs_is_caught() -> None:
    future = with_extra_hook(runner_register_losses)
    assert untested_hooks(future, all_test_sources()) == ["runner_register_losses"]
    assert undocumented_hooks(future, DOCS.read_text(encoding="utf-8")) == ["runner_register_losses"]


def test_a_hook_whose_signature_drifts_from_the_docs_is_caught() -> None:
    drifted = with_extra_hook(runner_register_models)
    assert undocumented_hooks(drifted, DOCS.read_text(encoding="utf-8")) == ["runner_register_models"]


def test_every_public_plugin_api_name_is_importable_and_documented() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    assert [name for name in plugin_api.__all__ if not hasattr(plugin_api, name)] == []
    assert [name for name in plugin_api.__all__ if f"`{name}`" not in docs] == []


def test_plugin_api_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, runner.plugin_api; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------
# one plugin implementing every hook with small real components, exercised through the runner


class Stripes(torch.utils.data.Dataset):
    """Horizontal (label 0) or vertical (label 1) stripes, with a phase per sample: easy to learn."""

    classes = ["horizontal", "vertical"]

    def __init__(self, n: int) -> None:
        self.targets = [i % 2 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        line = ((torch.arange(12) + index) % 4 < 2).to(torch.uint8) * 255
        image = line.view(12, 1).expand(12, 12) if label == 0 else line.view(1, 12).expand(12, 12)
        return image.unsqueeze(0).contiguous(), label


class Invert:
    """255 - x for uint8 images, 1 - x for float ones."""

    random = False

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return 255 - image if image.dtype == torch.uint8 else 1 - image


class HeadThenAll(plugin_api.Strategy):
    """Train the head for ``head_epochs``, then everything; counts batches and logs them."""

    name = "contract:head_then_all"

    def __init__(self, head_epochs: int = 1) -> None:
        self.head_epochs = head_epochs
        self.context: plugin_api.TrainingContext | None = None
        self.batches = 0

    def setup(self, context: plugin_api.TrainingContext) -> None:
        self.context = context

    def stage(self, epoch: int) -> plugin_api.Stage:
        return plugin_api.Stage(trainable="head" if epoch <= self.head_epochs else "all")

    def on_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        return images, labels

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        return {"batches_seen": float(self.batches), "val_loss": -1.0}  # val_loss is the runner's: ignored


def build_mlp(request: plugin_api.ModelRequest) -> torch.nn.Module:
    channels, height, width = request.input_shape
    hidden = int(request.options.get("hidden", 16))
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * height * width, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, request.num_classes))


class ContractPlugin:
    """Implements every hook; ``strategies`` keeps each strategy it built so tests can look inside."""

    def __init__(self) -> None:
        self.strategies: list[HeadThenAll] = []

    @hookimpl
    def runner_register_models(self, register: plugin_api.RegisterModel) -> None:
        register("contract:mlp", build_mlp)

    @hookimpl
    def runner_register_datasets(self, register: plugin_api.RegisterDataset) -> None:
        register("contract:stripes", lambda request: Stripes(int(request.options.get("n", 60))))

    @hookimpl
    def runner_register_transforms(self, register: plugin_api.RegisterTransform) -> None:
        register("contract:Invert", Invert)

    @hookimpl
    def runner_register_strategies(self, register: plugin_api.RegisterStrategy) -> None:
        def build(head_epochs: int = 1) -> HeadThenAll:
            self.strategies.append(HeadThenAll(head_epochs))
            return self.strategies[-1]

        register("contract:head_then_all", build)


CONTRACT_SPEC: dict[str, Any] = {
    "name": "contract",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "contract:stripes", "options": {"n": 60}, "batch_size": 16},
    "model": {"name": "contract:mlp", "options": {"hidden": 8}},
    "transforms": {"train": [{"name": "contract:Invert"}, {"name": "ToImage"}, {"name": "ToDtype", "dtype": "float32", "scale": True}]},
    "training": {"epochs": 2, "optimizer": {"name": "Adam", "lr": 0.01}, "strategy": {"name": "contract:head_then_all"}},
}


@pytest.fixture
def contract() -> SimpleNamespace:
    """The built-ins plus the contract plugin, loaded the way the runner loads any plugin."""
    plugin = ContractPlugin()
    pm = get_plugin_manager(only=())
    pm.register(plugin, name="contract")
    return SimpleNamespace(plugin=plugin, registries=load_registries(pm))


def spec(**changes: Any) -> Any:
    from runner.spec import load_spec

    return load_spec({**CONTRACT_SPEC, **changes})


def test_hook_runner_register_models(contract: SimpleNamespace) -> None:
    from runner.models import build_model

    entry = contract.registries.models.entry("contract:mlp")
    assert entry.plugin == "contract"
    the_spec = spec()
    the_spec.model.num_classes = 2
    model, replaced = build_model(the_spec, contract.registries, (1, 12, 12))
    assert model(torch.zeros(3, 1, 12, 12)).shape == (3, 2)
    assert replaced == ["3"]  # the runner found the plugin model's head


def test_hook_runner_register_datasets(contract: SimpleNamespace) -> None:
    from runner.data import load_data

    data = load_data(spec(), contract.registries, ".")
    assert isinstance(data.dataset, plugin_api.LabelledImages)
    assert len(data.dataset) == 60 and data.class_names == ["horizontal", "vertical"] and data.label_map == {0: 0, 1: 1}
    assert data.targets.tolist()[:4] == [0, 1, 0, 1]


def test_hook_runner_register_transforms(contract: SimpleNamespace) -> None:
    from runner.spec import TransformStep
    from runner.transforms import build_transform, is_random

    steps = [TransformStep(name="contract:Invert"), TransformStep(name="ToImage")]
    transform = build_transform(contract.registries, steps, "transforms.train")
    image = torch.zeros(1, 4, 4, dtype=torch.uint8)
    assert torch.equal(transform(image), torch.full((1, 4, 4), 255, dtype=torch.uint8))
    assert is_random(contract.registries, steps) is False


def test_hook_runner_register_strategies(contract: SimpleNamespace) -> None:
    from runner.plan import build_strategy

    strategy = build_strategy(spec(training={**CONTRACT_SPEC["training"], "strategy": {"name": "contract:head_then_all", "head_epochs": 3}}),
                              contract.registries)
    assert isinstance(strategy, HeadThenAll) and strategy.head_epochs == 3
    assert [strategy.stage(e).trainable for e in (1, 3, 4)] == ["head", "head", "all"]


def test_contract_plugin_trains_end_to_end_and_the_strategy_sees_what_it_needs(contract: SimpleNamespace, tmp_path: Path) -> None:
    from runner.execute import run_experiment
    from runner.reports import run_details
    from runner.store import Store

    store = Store(tmp_path / "results.db")
    outcome = run_experiment(CONTRACT_SPEC, store=store, registries=contract.registries)
    assert outcome.status == "completed"
    strategy = contract.plugin.strategies[-1]
    context = strategy.context
    assert context is not None and context.num_classes == 2 and context.class_names == ("horizontal", "vertical")
    assert context.epochs == 2 and context.device == torch.device("cpu") and context.model is not None
    assert sum(len(labels) for _, labels in context.train_loader) == 42  # 70% of 60: the real training split

    details = run_details(store, outcome.run_id)
    assert [e["batches_seen"] for e in details["epochs"]] == [3.0, 6.0]  # a strategy's own metric is stored
    assert all(e["val_loss"] >= 0 for e in details["epochs"])  # but cannot overwrite the runner's
    assert {"plugin": "contract", "distribution": None, "version": None} in details["plugins"]


# ------------------------------------------------------------------------------------------
# stability: hooks can grow without breaking the plugins written for them


def test_hookimpl_taking_fewer_arguments_than_its_spec_is_still_called() -> None:
    calls: list[str] = []

    class NoArguments:
        @hookimpl
        def runner_register_strategies(self) -> None:  # a plugin with setup side effects only
            calls.append("called")

    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(NoArguments(), name="no-arguments")
    registries = load_registries(pm)
    assert calls == ["called"]
    assert [p.stage for p in registries.problems] == ["empty"]  # it registered nothing, which is worth a warning


class FutureHookspecs:
    """runner's hooks as a later version might declare them: ``models`` gained a ``context`` argument."""

    @hookspec
    def runner_register_models(self, register: Any, context: Any) -> None: ...

    @hookspec
    def runner_register_datasets(self, register: Any) -> None: ...

    @hookspec
    def runner_register_transforms(self, register: Any) -> None: ...

    @hookspec
    def runner_register_strategies(self, register: Any) -> None: ...


def test_plugin_written_before_a_hook_gained_an_argument_keeps_working() -> None:
    pm = PluginManager()
    pm.add_hookspecs(FutureHookspecs)
    pm.register(ContractPlugin(), name="contract")  # its models hook takes only ``register``
    registered: list[str] = []
    pm.hook.runner_register_models(register=lambda name, builder: registered.append(name), context={"new": True})
    assert registered == ["contract:mlp"]
    assert "contract:mlp" in load_registries(pm).models


def test_plugin_asking_for_an_argument_this_runner_lacks_is_reported_not_fatal() -> None:
    class NewerPlugin:
        @hookimpl
        def runner_register_models(self, register: Any, context: Any) -> None:
            register("newer:model", build_mlp)

    pm = PluginManager()
    pm.add_hookspecs(FutureHookspecs)
    pm.register(NewerPlugin(), name="newer")
    pm.register(ContractPlugin(), name="contract")
    registries = load_registries(pm)  # this runner offers ``register`` only
    assert [str(p) for p in registries.problems] == [
        "plugin 'newer' failed while running runner_register_models: asks for context, which this runner version does not provide"
    ]
    assert "contract:mlp" in registries.models and "newer:model" not in registries.models


@pytest.mark.parametrize("optional", [True, False])
def test_plugin_implementing_a_hook_this_runner_does_not_have_still_loads(optional: bool) -> None:
    class FromTheFuture:
        @hookimpl(optionalhook=optional)  # optional: a newer runner's hook, no warning where it does not exist yet
        def runner_register_losses(self, register: Any) -> None:
            register("future:loss", object)

        @hookimpl
        def runner_register_models(self, register: Any) -> None:
            register("future:mlp", build_mlp)

    pm = get_plugin_manager(only=())
    pm.register(FromTheFuture(), name="future")
    registries = load_registries(pm)
    assert "future:mlp" in registries.models
    assert [str(p) for p in registries.problems] == ([] if optional else [
        "plugin 'future' implements runner_register_losses, which is not a hook of this runner "
        "(mark a newer runner's hook @hookimpl(optionalhook=True))"
    ])
