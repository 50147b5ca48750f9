"""The runner-extras plugin package, installed for real with pip into a fresh virtual environment.

The environment reuses the packages of the one running the tests (torch is 5 GB): a ``.pth`` file
adds this interpreter's site-packages, which is what ``--system-site-packages`` would do if torch
lived in the base interpreter rather than in a virtual environment. Then the README's install
command (offline: ``--no-deps --no-build-isolation``) installs runner, and ``pip install
./plugins/runner-extras`` the plugin, next to two deliberately broken plugin distributions.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import clean_env, make_venv, pip_install_offline

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "plugins" / "runner-extras"
EXAMPLE = Path("examples") / "shapes_mixup.yaml"
EXTRAS_NAMES = {
    "model": {"extras:resnet_small"},
    "dataset": {"extras:npz", "extras:shapes"},
    "transform": {"extras:Cutout", "extras:PerImageStandardize"},
    "strategy": {"extras:mixup"},
}

BROKEN_ON_IMPORT = '''
raise RuntimeError("libfoo is missing")
'''
BROKEN_ON_REGISTER = '''
from runner.plugin_api import hookimpl

def build(request):
    raise AssertionError("never built")

@hookimpl
def runner_register_models(register):
    register("broken_register:model", build)
    raise ValueError("model table is corrupt")
'''


@dataclass
class PluginEnv:
    venv: Path
    plugin_copy: Path
    env: dict[str, str]

    def runner(self, *args: Any, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "runner"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
            env={**self.env, **(extra_env or {})}, timeout=600,
        )

    def python(self, *args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "python"), *map(str, args)], cwd=cwd, capture_output=True,
                              text=True, env=self.env, timeout=600)


def _broken_dist(directory: Path, dist: str, module: str, entry_point: str, source: str) -> Path:
    directory.mkdir(parents=True)
    (directory / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    (directory / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.0.1"
        [project.entry-points.runner]
        {entry_point} = "{module}"
        [tool.setuptools]
        py-modules = ["{module}"]
    '''), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> PluginEnv:
    base = tmp_path_factory.mktemp("plugin_env")
    # the venv also sees this environment's packages: plugins installed here must not count there
    env = clean_env(base / "torch_home", load_plugins="extras,broken_import,broken_register")
    venv = base / "venv"
    make_venv(venv, env)
    # install from a copy, so the build's egg-info and build/ never land in the repository
    plugin_copy = base / "runner-extras"
    shutil.copytree(PLUGIN_DIR, plugin_copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    broken = [
        _broken_dist(base / "broken-import", "runner-broken-import", "broken_import_plugin", "broken_import", BROKEN_ON_IMPORT),
        _broken_dist(base / "broken-register", "runner-broken-register", "broken_register_plugin", "broken_register", BROKEN_ON_REGISTER),
    ]
    pip_install_offline(venv, env, "-e", str(ROOT), cwd=base)
    pip_install_offline(venv, env, str(plugin_copy), *map(str, broken), cwd=base)
    return PluginEnv(venv, plugin_copy, env)


@pytest.fixture(scope="module")
def plugins_listing(plugin_env: PluginEnv, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """``runner plugins --format json`` in the venv (one run shared by the tests that read it)."""
    return plugin_env.runner("plugins", "--format", "json", cwd=tmp_path_factory.mktemp("listing"))


def test_fresh_venv_has_its_own_runner_command_and_sees_this_runner(plugin_env: PluginEnv, tmp_path: Path) -> None:
    assert (plugin_env.venv / "bin" / "runner").is_file()
    result = plugin_env.python("-c", "import runner, torch; print(runner.__file__)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == ROOT / "runner" / "__init__.py"


def test_runner_plugins_lists_the_packages_names_with_distribution_and_version(
    plugin_env: PluginEnv, plugins_listing: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    assert plugins_listing.returncode == 0, plugins_listing.stderr
    listing = json.loads(plugins_listing.stdout)
    extras = [r for r in listing["names"] if r["plugin"] == "extras"]
    by_kind = {kind: {r["name"] for r in extras if r["kind"] == kind} for kind in EXTRAS_NAMES}
    assert by_kind == EXTRAS_NAMES
    assert {(r["distribution"], r["version"], r["collision"]) for r in extras} == {("runner-extras", "0.1.0", "")}
    assert {"plugin": "extras", "distribution": "runner-extras", "version": "0.1.0", "builtin": False} in listing["plugins"]

    table = plugin_env.runner("plugins", "--plugin", "runner-extras", cwd=tmp_path).stdout.splitlines()
    assert len(table) == 1 + sum(len(n) for n in EXTRAS_NAMES.values())
    assert all(line.split()[2:5] == ["extras", "runner-extras", "0.1.0"] for line in table[1:])


def test_broken_plugins_are_reported_by_name_and_hide_nothing_else(plugins_listing: subprocess.CompletedProcess[str]) -> None:
    result = plugins_listing
    problems = json.loads(result.stdout)["problems"]
    assert any("'broken_import'" in p and "importing" in p and "libfoo is missing" in p for p in problems)
    assert any("'broken_register'" in p and "runner_register_models" in p and "model table is corrupt" in p for p in problems)
    names = {r["name"] for r in json.loads(result.stdout)["names"]}
    assert "broken_register:model" not in names  # registered before the hook raised: dropped with it
    assert {"cnn", "mnist_bundled", "extras:mixup"} <= names
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("broken_" in w for w in warnings)


def test_example_spec_runs_to_completed_and_the_run_records_the_plugin(plugin_env: PluginEnv, tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    result = plugin_env.runner("run", plugin_env.plugin_copy / EXAMPLE, "--db", db, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the broken plugins warn, one line each, but a spec that does not need them runs
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert sorted(w.split("'")[1] for w in warnings) == ["broken_import", "broken_register"]
    assert "Traceback" not in result.stderr

    shown = plugin_env.runner("show", result.stdout.strip(), "--db", db, "--format", "json", cwd=tmp_path)
    details = json.loads(shown.stdout)
    assert details["status"] == "completed" and details["model"] == "extras:resnet_small"
    assert {"plugin": "extras", "distribution": "runner-extras", "version": "0.1.0"} in details["plugins"]
    assert any(p["distribution"] == "runner-dl" for p in details["plugins"])  # ToImage and friends
    assert {"mix_fraction", "mix_strength"} <= set(details["epochs"][0])  # the strategy's own metrics


def test_disabling_third_party_plugins_leaves_the_builtins(plugin_env: PluginEnv, tmp_path: Path) -> None:
    result = plugin_env.runner("plugins", "--format", "json", cwd=tmp_path, extra_env={"RUNNER_DISABLE_PLUGINS": "1"})
    listing = json.loads(result.stdout)
    assert result.returncode == 0 and listing["problems"] == []
    assert {r["distribution"] for r in listing["names"]} == {"runner-dl"}
    assert set(listing["skipped"]) == {"extras", "broken_import", "broken_register"}


def test_plugin_package_passes_its_own_tests_when_installed(plugin_env: PluginEnv, tmp_path: Path) -> None:
    # its end-to-end tests repeat what the tests above check through the venv's runner command
    result = plugin_env.python("-m", "pytest", plugin_env.plugin_copy / "tests", "-q", "-p", "no:cacheprovider",
                               "-k", "not end_to_end", cwd=plugin_env.plugin_copy)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def _runner_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "runner":  # from runner import testing
            modules.extend(f"runner.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
    return [m for m in modules if m == "runner" or m.startswith("runner.")]


def test_plugin_package_uses_runner_only_through_the_public_plugin_api() -> None:
    sources = sorted((PLUGIN_DIR / "src").rglob("*.py"))
    tests = sorted((PLUGIN_DIR / "tests").rglob("*.py"))
    assert sources and tests
    imports = {str(p.relative_to(PLUGIN_DIR)): _runner_imports(p) for p in sources}
    assert {path: mods for path, mods in imports.items() if set(mods) - {"runner.plugin_api"}} == {}
    # its tests may also use the testing kit, which is public too
    test_imports = {str(p.relative_to(PLUGIN_DIR)): _runner_imports(p) for p in tests}
    assert {path: mods for path, mods in test_imports.items() if set(mods) - {"runner.plugin_api", "runner.testing"}} == {}
    assert any(imports.values()) and any("runner.testing" in mods for mods in test_imports.values())
    assert 'pytest_plugins = ["runner.testing"]' in (PLUGIN_DIR / "tests" / "conftest.py").read_text(encoding="utf-8")


def test_ci_runs_the_suite_twice_the_second_time_with_runner_extras_installed() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install ./plugins/runner-extras" in readme.splitlines()
    steps = [line.split(";")[0] for line in script.splitlines() if line.startswith('echo "+ $')]
    assert steps == ['echo "+ $install_cmd"', 'echo "+ $test_cmd"', 'echo "+ $extras_cmd"', 'echo "+ $test_cmd"']
