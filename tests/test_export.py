"""`runner export`: state dict, TorchScript and ONNX files that give the checkpoint's logits, with a sidecar."""

from __future__ import annotations

import json
import sys

import pytest

TOLERANCE = 1e-4


def real_batch(loaded, count: int = 16):
    """Held-out digits preprocessed as at evaluation: what an exported model will really be fed."""
    import torch

    from runner.interfaces import DatasetRequest
    from runner.plugins.datasets import load_bundled_mnist

    dataset = load_bundled_mnist(DatasetRequest(name="mnist_bundled", options={}, base_dir="."))
    wanted = [i for i in range(len(dataset)) if int(dataset.targets[i]) in (0, 1, 2)][:count]
    return torch.stack([loaded.transform(dataset.images[i]).as_subclass(torch.Tensor) for i in wanted])


@pytest.fixture
def loaded(trained_tiny_run):
    import runner

    return runner.load_model(trained_tiny_run.run_id, db=trained_tiny_run.db)


def export(run_cli, run, fmt, output):
    result = run_cli("export", run.run_id, "--format", fmt, "-o", output, "--db", run.db)
    assert result.exit_code == 0, result.err
    return result


def check_sidecar(path, fmt, loaded):
    from runner.files import sha256_file

    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["format"] == fmt
    assert sidecar["class_names"] == ["0", "1", "2"]
    assert sidecar["sha256"] == sha256_file(path)
    assert sidecar["run_id"] == loaded.run_id and sidecar["checkpoint"] == "best"
    assert sidecar["input"]["shape"] == ["batch", 1, 28, 28]
    assert [step["name"] for step in sidecar["preprocessing"]] == ["ToImage", "ToDtype"]
    assert sidecar["preprocessing"][1] == {"name": "ToDtype", "dtype": "float32", "scale": True}
    assert sidecar["image"] == {"mode": "L", "read_as": "tensor"}
    return sidecar


def test_state_dict_export_loads_safely_into_the_rebuilt_model(run_cli, trained_tiny_run, loaded, tmp_path):
    import torch

    path = tmp_path / "model.pt"
    export(run_cli, trained_tiny_run, "state_dict", path)
    check_sidecar(path, "state_dict", loaded)
    state = torch.load(path, weights_only=True)
    assert state.keys() == loaded.model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_gives_the_same_logits(run_cli, trained_tiny_run, loaded, tmp_path):
    import torch

    path = tmp_path / "model.ts"
    result = export(run_cli, trained_tiny_run, "torchscript", path)
    assert "same logits as the checkpoint" in result.out
    sidecar = check_sidecar(path, "torchscript", loaded)
    assert sidecar["check"]["max_abs_logit_diff"] <= TOLERANCE

    batch = real_batch(loaded)
    scripted = torch.jit.load(str(path))
    with torch.inference_mode():
        assert torch.allclose(scripted(batch), loaded.logits(batch), atol=TOLERANCE, rtol=0)
        # and the logits are the model's real answers, not zeros that trivially match
        assert (scripted(batch).argmax(1) == loaded.logits(batch).argmax(1)).all()
        assert scripted(batch).abs().max() > 1


def test_onnx_export_gives_the_same_logits_in_onnxruntime(run_cli, trained_tiny_run, loaded, tmp_path):
    pytest.importorskip("onnxscript", reason="the optional extra runner-dl[onnx] is not installed")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the optional extra runner-dl[onnx] is not installed")
    import torch

    path = tmp_path / "model.onnx"
    result = export(run_cli, trained_tiny_run, "onnx", path)
    assert "with onnxruntime" in result.out
    check_sidecar(path, "onnx", loaded)

    batch = real_batch(loaded, count=7)  # a batch size the export never saw
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [logits] = session.run(["logits"], {"input": batch.numpy()})
    with torch.inference_mode():
        assert torch.allclose(torch.from_numpy(logits), loaded.logits(batch), atol=TOLERANCE, rtol=0)


def test_onnx_export_without_the_extra_says_how_to_install_it(run_cli, trained_tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    path = tmp_path / "model.onnx"
    result = run_cli("export", trained_tiny_run.run_id, "--format", "onnx", "-o", path, "--db", trained_tiny_run.db)
    assert result.exit_code == 2
    assert "pip install 'runner-dl[onnx]'" in result.err
    assert not path.exists() and not list(tmp_path.glob("*.json"))


def test_export_refuses_a_missing_directory(run_cli, trained_tiny_run, tmp_path):
    result = run_cli("export", trained_tiny_run.run_id, "--format", "state_dict", "-o", tmp_path / "no" / "m.pt", "--db", trained_tiny_run.db)
    assert result.exit_code == 2
    assert "does not exist" in result.err
