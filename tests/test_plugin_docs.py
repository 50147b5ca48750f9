"""docs/plugins.md's walkthrough, executed: its files are extracted, the plugin is installed with pip into a fresh
virtual environment, and every command it shows is run there, its output compared with what the page prints.

A file is a code block whose first line is a comment naming its path (``# src/runner_hello/__init__.py``);
a command block is a fence without a language whose lines are commands, and the fence after it, when it
holds no command, is the output the page promises.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import clean_env, make_venv, pip_install_offline

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
COMMAND = re.compile(r"^(pip install|runner |python -m pytest)")
WALKTHROUGH_COMMANDS = [
    "pip install -e .",
    "runner plugins --plugin hello",
    "runner validate examples/mlp.yaml",
    "runner run examples/mlp.yaml",
    "runner show <run id>",
    'pip install -e ".[test]"',
    "python -m pytest -q",
]


def walkthrough() -> str:
    text = DOCS.read_text(encoding="utf-8")
    return text[text.index("## A plugin from scratch"):text.index("## The public API")]


def fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]


def files(text: str) -> dict[str, str]:
    found = {}
    for language, body in fences(text):
        first = body.splitlines()[0] if body else ""
        if language and re.fullmatch(r"# [\w./-]+\.\w+", first):
            found[first[2:]] = body
    return found


def commands_and_outputs(text: str) -> list[tuple[str, str | None]]:
    """Each command with the output block that follows its block (for the block's last command), if any."""
    blocks = [body for language, body in fences(text) if not language]
    steps: list[tuple[str, str | None]] = []
    for i, body in enumerate(blocks):
        lines = [line for line in body.splitlines() if line.strip()]
        if not lines or not all(COMMAND.match(line) for line in lines):
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        output = following if following is not None and not any(COMMAND.match(line) for line in following.splitlines()) else None
        steps += [(line.split("  #")[0].strip(), None) for line in lines[:-1]] + [(lines[-1].split("  #")[0].strip(), output)]
    return steps


def test_the_walkthrough_gives_every_file_of_its_layout_and_a_test_extra() -> None:
    text = walkthrough()
    layout = next(body for language, body in fences(text) if "runner-hello/" in body)
    listed = {line.split("── ")[1] for line in layout.splitlines() if "── " in line}
    assert set(files(text)) == listed
    pyproject = files(text)["pyproject.toml"]
    assert '[project.optional-dependencies]\ntest = ["pytest>=7.4"]' in pyproject  # `pip install -e ".[test]"` needs it
    assert [command for command, _ in commands_and_outputs(text)] == WALKTHROUGH_COMMANDS


def test_every_python_example_on_the_page_compiles() -> None:
    blocks = [body for language, body in fences(DOCS.read_text(encoding="utf-8")) if language == "python"]
    signatures = [body for body in blocks if re.fullmatch(r"runner_\w+\(.*\) -> None\n", body)]  # the hooks' exact signatures
    assert len(signatures) == 4 and len(blocks) > 8
    for body in blocks:
        if body not in signatures:
            compile(body, "docs/plugins.md", "exec")


@pytest.mark.slow
def test_the_walkthrough_plugin_installs_runs_and_passes_its_own_tests(tmp_path: Path) -> None:
    plugin = tmp_path / "runner-hello"
    for path, body in files(walkthrough()).items():
        (plugin / path).parent.mkdir(parents=True, exist_ok=True)
        (plugin / path).write_text(body, encoding="utf-8")
    env = clean_env(tmp_path / "torch_home", load_plugins="hello")
    env["RUNNER_DB"] = str(tmp_path / "results.db")
    venv = tmp_path / "venv"
    make_venv(venv, env)
    pip_install_offline(venv, env, "-e", str(ROOT), cwd=tmp_path)

    run_id = None
    for command, output in commands_and_outputs(walkthrough()):
        if command.startswith("pip install"):  # offline: runner and its dependencies are already there
            pip_install_offline(venv, env, *[a.strip('"') for a in command.split()[2:]], cwd=plugin)
            continue
        argv = command.replace("<run id>", run_id or "").split()
        executable = venv / "bin" / argv[0]
        result = subprocess.run([str(executable), *argv[1:]], cwd=plugin, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if command.startswith("runner run"):
            run_id = result.stdout.strip()
        if output is not None:
            expected = [line.rstrip() for line in output.strip().splitlines()]
            shown = [line.rstrip() for line in result.stdout.strip().splitlines()]
            assert all(line in shown for line in expected), f"{command} printed:\n{result.stdout}\nthe page shows:\n{output}"
    assert run_id is not None
