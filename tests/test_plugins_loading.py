"""Loading third-party plugins: distributions and versions, broken plugins, blocking, collisions.

The plugins here are real installed distributions as far as ``importlib.metadata`` can tell: a
module and a ``.dist-info`` directory with an ``entry_points.txt`` in a folder put on ``sys.path``.
"""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
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

_counter = itertools.count()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``install(entry_point, source, dist=…, version=…)``: a plugin distribution visible to entry points."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def install_plugin(entry_point: str, source: str, dist: str | None = None, version: str = "1.0.0") -> str:
        module = f"fake_runner_plugin_{next(_counter)}"
        dist = dist or f"runner-{entry_point.replace('_', '-')}"
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[runner]\n{entry_point} = {module}\n", encoding="utf-8")
        created.append(module)
        return module

    yield install_plugin
    for module in created:
        sys.modules.pop(module, None)


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
# collisions


def test_collision_is_flagged_in_runner_plugins_and_the_name_refused_until_one_is_blocked(
    install: Callable[..., str], monkeypatch: pytest.MonkeyPatch, run_cli: Any
) -> None:
    install("one", model_plugin("shared:model"))
    install("two", model_plugin("shared:model"))
    result = run_cli("plugins", "--kind", "model", "--format", "json")
    flagged = [(r["plugin"], r["collision"]) for r in result.json()["names"] if r["name"] == "shared:model"]
    assert sorted(flagged) == [("one", "COLLISION"), ("two", "COLLISION")]
    assert any("registered by both 'one' and 'two'" in p for p in result.json()["problems"])
    table = run_cli("plugins", "--kind", "model").out.splitlines()
    assert sum(1 for line in table if "shared:model" in line and line.rstrip().endswith("COLLISION")) == 2
    with pytest.raises(DuplicateNameError, match="block one of them"):
        load_registries().models.get("shared:model")

    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", "two")
    assert load_registries().models.entry("shared:model").plugin == "one"


def test_runner_plugins_json_lists_every_loaded_plugin(install: Callable[..., str], run_cli: Any) -> None:
    install("acme", GOOD_PLUGIN, dist="acme-runner-models", version="2.3.4")
    listing = run_cli("plugins", "--format", "json").json()
    assert set(listing) >= {"names", "problems", "plugins", "skipped"}
    builtin = [p for p in listing["plugins"] if p["builtin"]]
    assert {p["plugin"] for p in builtin} == {"runner.plugins.models", "runner.plugins.datasets", "runner.plugins.transforms", "runner.plugins.strategies"}
    assert {"plugin": "acme", "distribution": "acme-runner-models", "version": "2.3.4", "builtin": False} in listing["plugins"]
    assert json.dumps(listing)  # plain JSON all the way down
