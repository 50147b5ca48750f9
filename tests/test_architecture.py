"""The shape of the code: no import cycles, planning that never acts, one registries object per command.

What these tests hold is what lets later work (sweeps, workers, other stores, several processes per
run) build on the plan: a plan is a value, computed without side effects, that training takes.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_SPEC, builtin_registries

PACKAGE = ROOT / "runner"


# ---- imports ------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """Every runner module a module imports, at module level or in functions (type-checking imports aside)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "runner":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path)
        graph[name] = _imported_modules(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle_not_even_through_function_level_imports() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "runner.plan" in graph["runner.execute"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_a_builtin_plugin_module() -> None:
    graph = import_graph()
    core = {name: targets for name, targets in graph.items() if not name.startswith("runner.plugins")}
    offenders = {name: sorted(t for t in targets if t.startswith("runner.plugins.")) for name, targets in core.items()}
    assert {name: t for name, t in offenders.items() if t} == {}


@pytest.mark.parametrize("module", ["runner.plan", "runner.build"])
def test_planning_and_building_import_no_module_that_trains(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('runner')))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.replace("'", '"'))
    assert module in loaded
    assert not {"runner.training", "runner.execute", "runner.resume", "runner.store"} & set(loaded)


def test_the_readme_architecture_names_every_module_and_only_modules_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:runner/)?([\w/]+\.py|[\w]+/)`", section))
    basenames = {n.rstrip("/").split("/")[-1] + ("/" if n.endswith("/") else "") for n in named}
    core = {p.name for p in PACKAGE.glob("*.py")} | {p.name for p in (PACKAGE / "store").glob("*.py")}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert core | packages <= basenames | {"__init__.py"}
    existing = {p.name for p in PACKAGE.rglob("*.py")} | packages
    assert basenames <= existing, f"README names {sorted(basenames - existing)}, which are not in runner/"


# ---- a plan is a value --------------------------------------------------------------------------


def _rng_snapshot() -> tuple[Any, ...]:
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def test_a_plan_touches_no_random_generator_and_writes_nothing(tmp_path: Path) -> None:
    from runner.plan import plan
    from runner.spec import load_spec

    spec = load_spec(TINY_SPEC, ["model.name=torchvision:resnet18", "model.options={}", "training.strategy={name: head_only}"])
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = _rng_snapshot()
    files_before = sorted(tmp_path.rglob("*"))
    run_plan = plan(spec, builtin_registries(), base_dir=str(tmp_path))
    after = _rng_snapshot()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
    assert sorted(tmp_path.rglob("*")) == files_before
    # what was decided, without building the real model: resnet18's parameters, its head, the cache
    assert run_plan.model.params_total == 11_178_051 and run_plan.model.heads == ("fc",)
    assert run_plan.model.params_trainable == 1_539 and run_plan.feature_cache.enabled
    assert run_plan.data.rgb_expanded and run_plan.data.input_shape == (3, 28, 28)


def test_a_plan_survives_the_store_as_json(tmp_path: Path) -> None:
    from runner.plan import RunPlan, plan
    from runner.spec import load_spec

    run_plan = plan(load_spec(TINY_SPEC, ["training.strategy={name: gradual, stages: [{epochs: 1, train: head}, {train: all}]}"]),
                    builtin_registries(), base_dir=str(tmp_path))
    stored = json.loads(json.dumps(run_plan.to_json()))
    assert RunPlan.from_json(load_spec(run_plan.spec.resolved()), stored) == run_plan
    assert [(s.first_epoch, s.last_epoch, s.trainable) for s in run_plan.model.stages] == [(1, 1, "head"), (2, 2, "all")]


def _upstream_pair(tmp_path: Path) -> Path:
    upstream = tmp_path / "upstream.yaml"
    upstream.write_text(TINY_SPEC.read_text().replace("epochs: 2", "epochs: 1"), encoding="utf-8")
    downstream = tmp_path / "downstream.yaml"
    downstream.write_text(TINY_SPEC.read_text().replace("  name: cnn", "  name: cnn\n  weights: {experiment: upstream.yaml}"),
                          encoding="utf-8")
    return downstream


def test_planning_a_spec_with_an_upstream_experiment_on_an_empty_store_trains_and_stores_nothing(tmp_path: Path) -> None:
    from runner.errors import SpecError
    from runner.plan import plan
    from runner.spec import load_spec
    from runner.store import Store
    from runner.upstream import find_upstream

    downstream = _upstream_pair(tmp_path)
    spec = load_spec(downstream)
    store = Store(tmp_path / "results.db")
    assert find_upstream(spec, store, builtin_registries(), str(tmp_path)) is None
    with pytest.raises(SpecError, match="experiment upstream.yaml has no completed run"):
        plan(spec, builtin_registries(), base_dir=str(tmp_path))
    assert store.query.count_runs() == 0 and not (tmp_path / "runs").exists()


def test_validate_reports_nothing_missing_for_an_upstream_it_does_not_need(run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("validate", _upstream_pair(tmp_path))
    assert result.exit_code == 0, result.err
    assert not (tmp_path / "results.db").exists()


def test_one_command_loads_the_plugins_once_even_when_it_runs_an_upstream_experiment(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner import registries

    calls = []
    real = registries.load_registries
    monkeypatch.setattr(registries, "load_registries", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = run_cli("run", _upstream_pair(tmp_path), "--db", tmp_path / "results.db", "-q")
    assert result.exit_code == 0, result.err
    assert "running it first" in result.err and len(run_cli("runs", "--db", tmp_path / "results.db", "--format", "json").json()) == 2
    assert calls == [1]


def test_a_bad_downstream_spec_fails_before_its_upstream_experiment_trains(run_cli: Any, tmp_path: Path) -> None:
    downstream = _upstream_pair(tmp_path)
    # a mistake only the plan finds (the spec itself is valid): surgery on a layer the model lacks
    downstream.write_text(downstream.read_text().replace("  name: cnn", "  name: cnn\n  surgery: {nonexistent_layer: Identity}"),
                          encoding="utf-8")
    result = run_cli("run", downstream, "--db", tmp_path / "results.db", "-q")
    assert result.exit_code == 2, result.err
    assert "running it first" not in result.err and len(result.err.strip().splitlines()) == 1
    assert run_cli("runs", "--db", tmp_path / "results.db", "--format", "json").json() == []


def test_an_upstream_cycle_is_refused_before_any_work(run_cli: Any, tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.write_text(TINY_SPEC.read_text().replace("  name: cnn", "  name: cnn\n  weights: {experiment: loop.yaml}"), encoding="utf-8")
    result = run_cli("run", loop, "--db", tmp_path / "results.db")
    assert result.exit_code == 2
    assert result.err.strip() == f"error: model.weights: the upstream experiments form a cycle: {loop} -> {loop}"
    assert run_cli("runs", "--db", tmp_path / "results.db", "--format", "json").json() == []


# ---- built-ins are plugins for real ---------------------------------------------------------------


def test_blocking_the_builtin_models_blocks_cnn_with_one_line_saying_so(run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", "runner.plugins.models")
    result = run_cli("validate", ROOT / "experiments" / "quickstart.yaml")
    assert result.exit_code == 2
    assert result.err.strip().splitlines() == [
        "error: model.name: model 'cnn' comes from plugin 'runner.plugins.models', which is blocked by RUNNER_BLOCK_PLUGINS"
    ]


def test_the_rgb_expansion_is_the_cores_own_and_works_with_the_builtin_transforms_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.registries import load_registries
    from runner.transforms import GrayscaleToRgb, build_transform

    monkeypatch.setenv("RUNNER_BLOCK_PLUGINS", "runner.plugins.transforms")
    registries = load_registries()
    assert "GrayscaleToRgb" not in registries.transforms
    transform = build_transform(registries, [], "transforms.eval", expand_rgb=True)
    assert transform(torch.zeros(1, 4, 4)).shape == (3, 4, 4) and isinstance(transform.transforms[0], GrayscaleToRgb)


# ---- process exit -------------------------------------------------------------------------------


EXIT_PROBE = textwrap.dedent("""
    import atexit, sys
    registered = []
    real = atexit.register
    atexit.register = lambda f, *a, **k: (registered.append(getattr(f, "__name__", "")), real(f, *a, **k))[1]
    from runner.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    print("HOOK" if "_collect_then_freeze" in registered else "NO HOOK", file=sys.stderr)
""")


@pytest.mark.parametrize(("args", "env", "hooked"), [
    (["validate", str(TINY_SPEC)], {}, True),
    (["plugins", "--format", "json"], {}, True),
    (["validate", str(TINY_SPEC)], {"RUNNER_FAST_EXIT": "0"}, False),
    (["runs", "--db", "none.db"], {}, True),
    (["runs", "--db", "none.db"], {"RUNNER_FAST_EXIT": "0"}, False),
])
def test_every_command_gets_the_fast_exit_hook_unless_switched_off(tmp_path: Path, args: list[str], env: dict[str, str],
                                                                              hooked: bool) -> None:
    result = subprocess.run([sys.executable, "-c", EXIT_PROBE, *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **env}, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == ("HOOK" if hooked else "NO HOOK")


# Runs `runner run` in a fresh interpreter, as the command line (argv from sys.argv) or as a call
# with an explicit argv (a test, a user's script); then says how many objects the collector froze
GC_PROBE = textwrap.dedent("""
    import gc, sys
    from runner.cli import main
    as_command_line = sys.argv[1] == "command-line"
    sys.argv = ["runner", *sys.argv[2:]]
    try:
        main(None if as_command_line else sys.argv[1:])
    except SystemExit:
        pass
    print(gc.get_freeze_count(), gc.isenabled(), file=sys.stderr)
""")


@pytest.mark.parametrize(("how", "frozen"), [("command-line", True), ("call", False)])
def test_a_run_freezes_its_imports_only_when_it_is_the_whole_process(tmp_path: Path, how: str, frozen: bool) -> None:
    # frozen objects are never collected: in a user's own process they could leak, so a call only pauses
    env = {**os.environ, "RUNNER_FAST_EXIT": "0"}  # the exit hook freezes too, at exit: keep it out of the count
    result = subprocess.run([sys.executable, "-c", GC_PROBE, how, "run", str(TINY_SPEC), "--db", str(tmp_path / "r.db"), "-q"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    count, enabled = result.stderr.strip().splitlines()[-1].split()
    assert (int(count) > 100_000) is frozen and enabled == "True", result.stderr[-2000:]
    assert (tmp_path / "r.db").exists() and "completed" in subprocess.run(
        [sys.executable, "-m", "runner", "runs", "--db", str(tmp_path / "r.db")], capture_output=True, text=True, env=env).stdout
