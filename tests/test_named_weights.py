"""A plugin model offering its own named weights (``model.weights: DIGITS_V1``), as torchvision's models do.

The builder declares them with ``weights_names()`` and ``named_weights(name) -> NamedWeights``;
runner lists them in ``runner models``, fetches them when they are missing, hashes the file, passes
the name to the builder in ``ModelRequest.weights`` and records source and sha256 with the run.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

PLUGIN = '''
import shutil
from pathlib import Path

import torch
from torch import nn
from runner.plugin_api import NamedWeights, SpecError, hookimpl

HERE = Path(__file__).resolve().parent
WEIGHTS = {"DIGITS_V1": HERE / "acme_weights" / "digits_v1.pt"}
MIRROR = HERE / "acme_mirror"  # where fetch() "downloads" from
REQUESTS = []  # what the builder was asked for, for the test to read


def build(request):
    REQUESTS.append(request.weights)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, request.num_classes))
    if request.weights is not None:
        state = torch.load(named_weights(request.weights).path, weights_only=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("3.")}, strict=False)
    return model


def named_weights(name):
    if name not in WEIGHTS:
        raise SpecError(f"model.weights: {name!r} is not a weights name of acme:tiny (valid: {', '.join(WEIGHTS)})")
    path = WEIGHTS[name]

    def fetch():
        path.parent.mkdir(exist_ok=True)
        shutil.copy(MIRROR / path.name, path)

    return NamedWeights(name=name, source=f"acme:tiny/{name}", path=str(path), fetch=fetch)


build.named_weights = named_weights
build.weights_names = lambda: list(WEIGHTS)


@hookimpl
def runner_register_models(register):
    register("acme:tiny", build)
'''

SPEC = """\
name: acme-weights
seed: 0
device: cpu
data: {{classes: [0, 1, 2], train_per_class: 20}}
model: {{name: 'acme:tiny', weights: {weights}}}
training: {{epochs: 1}}
"""


@pytest.fixture
def acme(install: Callable[..., str], tmp_path: Path) -> Any:
    import torch

    module = install("acme", PLUGIN)
    mirror = tmp_path / "site-packages" / "acme_mirror"
    mirror.mkdir()
    torch.manual_seed(0)
    torch.save({"1.weight": torch.full((16, 784), 0.01), "1.bias": torch.zeros(16)}, mirror / "digits_v1.pt")
    return module


def spec(tmp_path: Path, weights: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(weights=weights), encoding="utf-8")
    return path


def test_runner_models_lists_a_plugin_models_named_weights(acme: str, run_cli: Any) -> None:
    result = run_cli("models", "acme:*")
    assert result.out.splitlines()[1].split() == ["acme:tiny", "acme", "DIGITS_V1"]


def test_a_plugin_models_named_weights_are_fetched_passed_to_the_builder_and_recorded(acme: str, run_cli: Any, tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    result = run_cli("run", spec(tmp_path, "DIGITS_V1"), "--db", db, "-q")
    assert result.exit_code == 0, result.err
    fetched = tmp_path / "site-packages" / "acme_weights" / "digits_v1.pt"
    assert fetched.is_file()  # fetch() ran before the run was planned
    sha256 = hashlib.sha256(fetched.read_bytes()).hexdigest()
    details = run_cli("show", result.out.strip(), "--db", db, "--format", "json").json()
    assert details["status"] == "completed"
    assert details["weights"] == {"source": "acme:tiny/DIGITS_V1", "sha256": sha256}
    assert details["settings"]["weights"] == {"kind": "named", "source": "acme:tiny/DIGITS_V1", "sha256": sha256,
                                              "path": str(fetched), "name": "DIGITS_V1"}
    assert "DIGITS_V1" in sys.modules[acme].REQUESTS  # the name reached the builder


def test_a_weights_name_the_plugin_does_not_offer_is_its_own_one_line_error(acme: str, run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("validate", spec(tmp_path, "DIGITS_V9"))
    assert (result.exit_code, result.err.splitlines()) == (
        2, ["error: model.weights: 'DIGITS_V9' is not a weights name of acme:tiny (valid: DIGITS_V1)"])


def test_a_model_without_named_weights_refuses_a_weights_name_before_building(run_cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "cnn.yaml"
    path.write_text(SPEC.format(weights="DIGITS_V1").replace("'acme:tiny'", "cnn"), encoding="utf-8")
    result = run_cli("validate", path)
    assert (result.exit_code, result.err.splitlines()) == (
        2, ["error: model.weights: cnn offers no named weights ('DIGITS_V1'); use {file: …} or {run: …}"])


def test_the_plugin_api_exports_named_weights() -> None:
    from runner import interfaces, plugin_api

    assert plugin_api.NamedWeights is interfaces.NamedWeights and "NamedWeights" in plugin_api.__all__
