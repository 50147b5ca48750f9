"""The Python API in runner/__init__.py: every function, used as the README shows it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import runner

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def test_run_a_mapping_with_overrides_and_get_the_run_back(tmp_path):
    mapping = yaml.safe_load(TINY.read_text())
    run = runner.run(mapping, ["training.epochs=1", "seed=3"], db=tmp_path / "api.db")
    assert isinstance(run, runner.Run)
    assert (run.status, run.epochs_run, run.seed, run.name) == ("completed", 1, 3, "tiny")
    assert run.class_names == ["0", "1", "2"]
    assert 0.5 < run.test["accuracy"] <= 1
    assert run.spec["training"]["epochs"] == 1 and mapping["training"]["epochs"] == 2  # the caller's mapping is untouched
    assert runner.get_run(run.id[:5], db=tmp_path / "api.db") == run

    evaluation = runner.evaluate(run.id, db=tmp_path / "api.db")
    assert evaluation["accuracy"] == run.test["accuracy"]
    assert runner.get_run(run.id, db=tmp_path / "api.db").details["evaluations"][0]["accuracy"] == run.test["accuracy"]


def test_run_a_typed_spec(tmp_path):
    from runner.spec import load_spec

    spec = load_spec(TINY)
    assert isinstance(spec, runner.Spec)
    spec.training.epochs = 1
    run = runner.run(spec, db=tmp_path / "typed.db", device="cpu")
    assert run.status == "completed" and run.epochs_run == 1


def test_runs_and_metrics_as_dataframes(trained_tiny_run):
    import pandas as pd

    frame = runner.runs(db=trained_tiny_run.db)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["id"]) == [trained_tiny_run.run_id]
    assert {"id", "name", "status", "test_accuracy", "started_at", "tags"} <= set(frame.columns)
    assert pd.api.types.is_datetime64_any_dtype(frame["started_at"])
    assert runner.runs(db=trained_tiny_run.db, tags=["absent"]).empty
    assert runner.runs(db=trained_tiny_run.db, status="failed").empty

    metrics = runner.metrics(trained_tiny_run.run_id, db=trained_tiny_run.db)
    assert list(metrics["epoch"]) == [1, 2]
    assert {"run_id", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(metrics.columns)
    shown = runner.get_run(trained_tiny_run.run_id, db=trained_tiny_run.db).details["epochs"]
    assert list(metrics["val_accuracy"]) == [e["val_accuracy"] for e in shown]
    assert runner.metrics(db=trained_tiny_run.db).equals(metrics)  # every run: here the one


def test_load_model_and_predict(trained_tiny_run, tmp_path):
    import torch
    from PIL import Image

    loaded = runner.load_model(trained_tiny_run.run_id, db=trained_tiny_run.db)
    assert isinstance(loaded, runner.RunModel)
    assert loaded.class_names == ["0", "1", "2"] and not loaded.model.training
    assert loaded.input_shape == (1, 28, 28)

    blank = tmp_path / "blank.png"
    Image.new("L", (28, 28)).save(blank)
    [prediction] = runner.predict(trained_tiny_run.run_id, [blank], db=trained_tiny_run.db, top_k=3)
    assert prediction["path"] == str(blank)
    assert [t["class"] for t in prediction["top"]] and sorted(t["class"] for t in prediction["top"]) == ["0", "1", "2"]
    probabilities = loaded.probabilities(loaded.preprocess(Image.open(blank)).unsqueeze(0))[0]
    assert prediction["top"][0]["prob"] == pytest.approx(float(probabilities.max()))
    assert float(probabilities.sum()) == pytest.approx(1.0)
    assert torch.equal(loaded.preprocess(Image.open(blank)), torch.zeros(1, 28, 28))


def test_unknown_runs_raise_runner_errors(trained_tiny_run):
    with pytest.raises(runner.RunnerError, match="no run 'zzz'"):
        runner.get_run("zzz", db=trained_tiny_run.db)
    with pytest.raises(runner.RunnerError, match="no results store"):
        runner.runs(db=Path("absent.db"))


def test_every_exported_name_resolves_and_every_function_is_documented_and_typed():
    for name in runner.__all__:
        obj = getattr(runner, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
            signature = inspect.signature(obj)
            assert signature.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name
    assert "Python API" in (ROOT / "README.md").read_text()


def test_import_runner_stays_light():
    code = ("import sys, runner; from runner.cli import cli; "
            "print(sorted(m for m in ('torch', 'torchvision', 'pandas', 'sqlalchemy', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
