"""Loading third-party plugins: distributions and versions, broken plugins, blocking, collisions.

The plugins here are real installed distributions as far as ``importlib.metadata`` can tell: a
module and a ``.dist-info`` directory with an ``entry_points.txt`` in a folder put on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from runner.errors import DuplicateNameError
from runner.registries import load_registries

TINY_MODEL_SPEC = """
name: {name}
seed: 0
device: cpu
data: {{dataset: mnist_bundled, classes: [0, 1, 2], batch_size: 64}}
model: {{name: {model}}}
transforms:
  train: [{{name: ToImage}}, {{name: ToDtype, dtype: float32, scale: true}}]
training:
  epochs: 1
  optimizer: {{name: Adam, lr: 0.003}}
  strategy: {{name: {strategy}}}
"""

GOOD_PLUGIN = '''
import torch
from runner.plugin_api import ModelRequest, Stage, Strategy, hookimpl

class TinyLinear(torch.nn.Module):
    def __init__(self, request: ModelRequest) -> None:
        super().__init__()
        c, h, w = request.input_shape
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(c * h * w, request.num_classes)

    def forward(self, x):
        return self.fc(self.flatten(x))

class HeadFirst(Strategy):
    name = "acme:head_first"

    def stage(self, epoch):
        return Stage(trainable="head")

@hookimpl
def runner_register_models(register):
    register("acme:linear", TinyLinear)

@hookimpl
def runner_register_strategies(register):
    register("acme:head_first", HeadFirst)
'''

def model_plugin(name: str) -> str:
    return f'''
from runner.plugin_api import hookimpl

def build(request):
    raise NotImplementedError

@hookimpl
def runner_register_models(register):
    register({name!r}, build)
'''


# ------------------------------------------------------------------------------------------
# where names come from


def test_third_party_names_carry_their_plugin_distribution_and_version(install: Callable[..., str], run_cli: Any) -> None:
    install("acme", GOOD_PLUGIN, dist="acme-runner-models", version="2.3.4")
    registries = load_registries()
    entry = registries.models.entry("acme:linear")
    assert (entry.plugin, entry.distribution, entry.version) == ("acme", "acme-runner-models", "2.3.4")
    assert registries.used_plugins({"model": ["acme:linear"], "strategy": ["full_finetune"]}) == [
        {"plugin": "acme", "distribution": "acme-runner-models", "version": "2.3.4"},
        {"plugin": "runner.plugins.strategies", "distribution": "runner-dl", "version": registries.plugins["runner.plugins.strategies"].version},
    ]
    listed = run_cli("plugins", "--plugin", "acme-runner-models", "--format", "json").json()["names"]
    assert {(r["kind"], r["name"], r["version"]) for r in listed} == {("model", "acme:linear", "2.3.4"), ("strategy", "acme:head_first", "2.3.4")}


def test_a_run_records_the_third_party_distributions_that_built_it(install: Callable[..., str], run_cli: Any, tmp_path: Path) -> None:
    install("acme", GOOD_PLUGIN, dist="acme-runner-models", version="2.3.4")
    install("broken", "raise ImportError('needs libacme')")
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_MODEL_SPEC.format(name="acme", model="acme:linear", strategy="acme:head_first"), encoding="utf-8")
    result = run_cli("run", spec, "--db", tmp_path / "r.db", "-q")
    assert result.exit_code == 0, result.err
    # the broken plugin is one warning line; the run does not need it and completes
    assert result.err.splitlines() == ["warning: plugin 'broken' failed while importing: ImportError: needs libacme"]
    details = run_cli("show", result.out.strip(), "--db", tmp_path / "r.db", "--format", "json").json()
    assert details["status"] == "completed"
    assert {"plugin": "acme", "distribution": "acme-runner-models", "version": "2.3.4"} in details["plugins"]


# ------------------------------------------------------------------------------------------
# broken plugins


def test_plugin_raising_on_import_is_reported_by_name_while_the_others_load(install: Callable[..., str]) -> None:
    install("broken", "raise RuntimeError('bad install')")
    install("fine", model_plugin("fine:model"))
    registries = load_registries()
    assert [(p.plugin, p.stage) for p in registries.problems] == [("broken", "import")]
    assert str(registries.problems[0]) == "plugin 'broken' failed while importing: RuntimeError: bad install"
    assert "fine:model" in registries.models and "cnn" in registries.models


def test_hook_that_raises_registers_none_of_its_names_but_the_plugins_other_hooks_count(install: Callable[..., str]) -> None:
    install("half", '''
        from runner.plugin_api import hookimpl

        def build(request):
            return None

        @hookimpl
        def runner_register_models(register):
            register("half:first", build)
            raise KeyError("second")

        @hookimpl
        def runner_register_datasets(register):
            register("half:data", build)
    ''')
    registries = load_registries()
    assert "half:first" not in registries.models  # nothing half registered
    assert "half:data" in registries.datasets
    assert [str(p) for p in registries.problems] == ["plugin 'half' failed while running runner_register_models: KeyError: 'second'"]


@pytest.mark.parametrize("call, error", [
    ("register('', build)", "ValueError: register() needs a non-empty string name"),
    ("register('bad:model', 42)", "TypeError: register('bad:model', …) needs a callable builder, got int"),
])
def test_register_refuses_bad_names_and_builders_at_the_call(install: Callable[..., str], call: str, error: str) -> None:
    install("sloppy", f'''
        from runner.plugin_api import hookimpl

        def build(request):
            return None

        @hookimpl
        def runner_register_models(register):
            {call}
    ''')
    problems = [str(p) for p in load_registries().problems]
    assert len(problems) == 1 and problems[0].startswith(f"plugin 'sloppy' failed while running runner_register_models: {error}")


def test_spec_needing_a_broken_plugin_fails_in_one_line_after_the_warning(install: Callable[..., str], run_cli: Any, tmp_path: Path) -> None:
    install("acme", "raise ImportError('needs libacme')")
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_MODEL_SPEC.format(name="acme", model="acme:linear", strategy="full_finetune"), encoding="utf-8")
    result = run_cli("validate", spec)
    assert result.exit_code == 2
    assert result.err.splitlines() == [
        "warning: plugin 'acme' failed while importing: ImportError: needs libacme",
        "error: model.name: model 'acme:linear' comes from plugin 'acme', which failed to load",
    ]


@pytest.mark.parametrize("command", ["eval", "predict", "export", "summary"])
def test_every_command_that_loads_plugins_warns_about_a_broken_one(
    install: Callable[..., str], run_cli: Any, trained_tiny_run: Any, tmp_path: Path, command: str,
) -> None:
    from PIL import Image

    from conftest import TINY_SPEC, copy_store

    install("broken", "raise ImportError('needs libacme')")
    db = copy_store(trained_tiny_run.db, tmp_path / "copy.db")
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    args = {
        "eval": ["eval", trained_tiny_run.run_id, "--db", db],
        "predict": ["predict", trained_tiny_run.run_id, image, "--db", db],
        "export": ["export", trained_tiny_run.run_id, "--format", "state_dict", "-o", tmp_path / "model.pt", "--db", db],
        "summary": ["summary", TINY_SPEC],
    }[command]
    result = run_cli(*args)
    assert result.exit_code == 0, result.err
    assert result.err.splitlines()[0] == "warning: plugin 'broken' failed while importing: ImportError: needs libacme"


# ------------------------------------------------------------------------------------------
# switching plugins off


def test_disable_env_skips_every_third_party_plugin_but_keeps_builtins(install: Callable[..., str], monkeypatch: pytest.MonkeyPatch, run_cli: Any) -> None:
    install("acme", GOOD_PLUGIN)
    install("broken", "raise RuntimeError('x')")
    monkeypatch.setenv("RUNNER_DISABLE_PLUGINS", "1")
    registries = load_registries()
    assert "acme:linear" not in registries.models and "cnn" in registries.models
    assert registries.problems == []
    assert registries.skipped == {"acme": "RUNNER_DISABLE_PLUGINS=1", "broken": "RUNNER_DISABLE_PLUGINS=1"}
    result = run_cli("plugins", "--kind", "strategy")
    assert "note: plugin 'acme' not loaded (RUNNER_DISABLE_PLUGINS=1)" in result.err.splitlines()


@pytest.mark.parametrize("blocked", ["broken", "runner-broken", "runner_broken"])
def test_block_env_blocks_one_plugin_by_entry_point_or_distribution_name(
    install: Callable[..., str], monkeypatch: pytest.MonkeyPatch, blocked: str
) -> None:
    install("broken", "raise RuntimeError('x')", dist="runner-broken")
    install("acme", GOOD_PLUGIN)
    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", f" {blocked} ,unrelated")
    registries = load_registries()
    assert registries.problems == []
    assert registries.skipped == {"broken": "blocked by RUNNER_BLOCK_PLUGINS"}
    assert "acme:linear" in registries.models


def test_block_env_blocks_builtin_plugins_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", "runner.plugins.strategies")
    registries = load_registries()
    assert len(registries.strategies) == 0 and "cnn" in registries.models
    assert "runner.plugins.strategies" not in registries.plugins


# ------------------------------------------------------------------------------------------
# names: built-ins win, a plugin's names carry its own prefix, one name once


QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"


def test_a_plugin_registering_a_builtin_name_is_refused_at_the_call_and_the_builtin_keeps_working(
    install: Callable[..., str], run_cli: Any
) -> None:
    install("clash", model_plugin("cnn"))
    result = run_cli("validate", QUICKSTART)
    assert result.exit_code == 0, result.err
    assert result.out.startswith(f"{QUICKSTART}: ok (cnn,")
    assert result.err.splitlines() == [
        "warning: plugin 'clash' failed while running runner_register_models: ValueError: register('cnn', …): "
        "plugin 'clash' may only register names that start with 'clash:' (e.g. 'clash:cnn')"
    ]
    assert load_registries().models.entry("cnn").plugin == "runner.plugins.models"


def test_a_plugin_whose_prefix_is_a_builtin_one_is_refused_the_builtin_names_and_keeps_its_others(install: Callable[..., str]) -> None:
    install("torchvision", model_plugin("torchvision:resnet18").replace(
        "register('torchvision:resnet18', build)", "register('torchvision:resnet18', build)\n    register('torchvision:lenet', build)"))
    install("hub", model_plugin("hub:me/mine/model"))  # the built-in family hub:* covers it
    registries = load_registries()
    assert sorted(str(p) for p in registries.problems) == [
        "plugin 'hub' registered model 'hub:me/mine/model', which the built-in plugin 'runner.plugins.models' provides: "
        "refused, the built-in is used",
        "plugin 'torchvision' registered model 'torchvision:resnet18', which the built-in plugin 'runner.plugins.models' "
        "provides: refused, the built-in is used",
    ]
    assert registries.models.entry("torchvision:resnet18").plugin == "runner.plugins.models"
    assert registries.models.entry("torchvision:lenet").plugin == "torchvision"
    assert registries.models.entry("hub:me/mine/model").plugin == "runner.plugins.models"


def test_a_plugin_claiming_another_plugins_name_is_the_one_blamed_and_the_other_keeps_every_name(install: Callable[..., str]) -> None:
    install("acme", GOOD_PLUGIN)
    install("acmeclash", model_plugin("acme:linear"))
    registries = load_registries()
    assert [str(p) for p in registries.problems] == [
        "plugin 'acmeclash' failed while running runner_register_models: ValueError: register('acme:linear', …): "
        "plugin 'acmeclash' may only register names that start with 'acmeclash:' (e.g. 'acmeclash:linear')"
    ]
    assert registries.models.entry("acme:linear").plugin == "acme"
    assert registries.strategies.entry("acme:head_first").plugin == "acme"


def test_a_plugin_registering_a_name_twice_fails_at_the_second_call_naming_the_plugin_and_the_name(install: Callable[..., str]) -> None:
    install("twice", model_plugin("twice:model").replace("register('twice:model', build)",
                                                         "register('twice:model', build)\n    register('twice:model', build)"))
    registries = load_registries()
    assert [str(p) for p in registries.problems] == [
        "plugin 'twice' failed while running runner_register_models: ValueError: register('twice:model', …): "
        "plugin 'twice' registered model 'twice:model' twice"
    ]
    assert "twice:model" not in registries.models and registries.models.collisions() == {}


def test_two_distributions_with_one_plugin_name_load_once_and_the_other_is_named(install: Callable[..., str]) -> None:
    install("acme", model_plugin("acme:first"), dist="runner-acme")
    install("acme", model_plugin("acme:second"), dist="runner-acme-fork")
    registries = load_registries()
    assert len(registries.problems) == 1 and registries.problems[0].stage == "duplicate"
    message = str(registries.problems[0])
    loaded = registries.plugins["acme"].distribution
    other = {"runner-acme", "runner-acme-fork"} - {loaded}
    assert message == (f"plugin 'acme' of distribution {other.pop()!r} 1.0.0 is not loaded: "
                       f"distribution {loaded!r} 1.0.0 already provides a plugin of that name")
    assert len(registries.models.list("acme:*")) == 1


def test_registry_collisions_still_name_both_plugins_and_refuse_the_name() -> None:
    from runner.registry import Registry

    registry: Registry[int] = Registry("model")
    registry.register("a:b:model", 1, plugin="a")
    with pytest.raises(DuplicateNameError, match="registered by both 'a' and 'a:b'; block one of them"):
        registry.register("a:b:model", 2, plugin="a:b")
    with pytest.raises(DuplicateNameError):
        registry.get("a:b:model")


# ------------------------------------------------------------------------------------------
# hooks runner would never call, and plugins that register nothing


def test_a_hook_name_typo_a_missing_hookimpl_and_an_empty_plugin_each_get_a_warning(install: Callable[..., str], run_cli: Any) -> None:
    install("typo", """
        from runner.plugin_api import hookimpl

        @hookimpl
        def runner_register_model(register):
            register("typo:model", object)
    """)
    install("unmarked", """
        def runner_register_models(register):
            register("unmarked:model", object)
    """)
    install("idle", "HELPER = 1\n")
    install("acme", GOOD_PLUGIN)
    result = run_cli("plugins", "--format", "json")
    assert result.exit_code == 0
    assert sorted(result.err.splitlines()) == [
        "warning: plugin 'idle' loaded but registered no names (`runner plugins` lists what plugins register)",
        "warning: plugin 'typo' implements runner_register_model, which is not a hook of this runner; did you mean runner_register_models?",
        "warning: plugin 'unmarked' defines runner_register_models without @hookimpl, so runner never calls it",
    ]
    assert {p["plugin"] for p in result.json()["plugins"] if not p["builtin"]} == {"typo", "unmarked", "idle", "acme"}


# ------------------------------------------------------------------------------------------
# names of plugins that are not loaded


BLOCKED_DATASET_SPEC = """
seed: 0
device: cpu
data: {dataset: 'acme:sklearn_digits'}
model: {name: cnn}
training: {epochs: 1}
"""

ACME_DATASET = """
from runner.plugin_api import hookimpl

@hookimpl
def runner_register_datasets(register):
    register("acme:sklearn_digits", lambda request: None)
"""


@pytest.mark.parametrize("env, why", [
    ({"RUNNER_BLOCK_PLUGINS": "acme"}, "is blocked by RUNNER_BLOCK_PLUGINS"),
    ({"RUNNER_BLOCK_PLUGINS": "runner-acme"}, "is blocked by RUNNER_BLOCK_PLUGINS"),
    ({"RUNNER_DISABLE_PLUGINS": "1"}, "is not loaded (RUNNER_DISABLE_PLUGINS=1)"),
])
def test_a_name_of_a_blocked_or_disabled_plugin_says_so_instead_of_suggesting_another(
    install: Callable[..., str], run_cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], why: str,
) -> None:
    install("acme", ACME_DATASET, dist="runner-acme")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = tmp_path / "spec.yaml"
    spec.write_text(BLOCKED_DATASET_SPEC, encoding="utf-8")
    result = run_cli("validate", spec)
    assert result.exit_code == 2
    assert result.err.splitlines() == [f"error: data.dataset: dataset 'acme:sklearn_digits' comes from plugin 'acme', which {why}"]


def test_a_name_whose_hook_failed_says_so(install: Callable[..., str], run_cli: Any, tmp_path: Path) -> None:
    install("acme", ACME_DATASET.replace('register("acme:sklearn_digits", lambda request: None)',
                                         'register("acme:sklearn_digits", lambda request: None)\n    raise OSError("no sklearn")'))
    spec = tmp_path / "spec.yaml"
    spec.write_text(BLOCKED_DATASET_SPEC, encoding="utf-8")
    result = run_cli("validate", spec)
    assert result.exit_code == 2
    assert result.err.splitlines() == [
        "warning: plugin 'acme' failed while running runner_register_datasets: OSError: no sklearn",
        "error: data.dataset: dataset 'acme:sklearn_digits' comes from plugin 'acme', whose runner_register_datasets failed",
    ]


def test_runner_plugins_json_lists_every_loaded_plugin(install: Callable[..., str], run_cli: Any) -> None:
    install("acme", GOOD_PLUGIN, dist="acme-runner-models", version="2.3.4")
    listing = run_cli("plugins", "--format", "json").json()
    assert set(listing) >= {"names", "problems", "plugins", "skipped"}
    builtin = [p for p in listing["plugins"] if p["builtin"]]
    assert {p["plugin"] for p in builtin} == {"runner.plugins.models", "runner.plugins.datasets", "runner.plugins.transforms", "runner.plugins.strategies"}
    assert {"plugin": "acme", "distribution": "acme-runner-models", "version": "2.3.4", "builtin": False} in listing["plugins"]
    assert json.dumps(listing)  # plain JSON all the way down
