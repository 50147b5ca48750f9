"""``runner export``: a run's model as a state dict, TorchScript or ONNX file, with a JSON sidecar.

The sidecar (``FILE.json``) records what a user of the file needs and cannot see inside it: the
class names in output order, the input shape, and the preprocessing the run applied before the
model. TorchScript and ONNX files are checked before they are kept: loaded back, they must give
the checkpoint's logits to 1e-4 (ONNX through onnxruntime, when it is installed).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from runner.errors import RunnerError
from runner.files import atomic_write, atomic_write_bytes, sha256_file
from runner.inference import RunModel, load_run_model
from runner.store import Store, utcnow
from runner.version import __version__

if TYPE_CHECKING:
    from runner.registries import Registries

FORMATS = ("state_dict", "torchscript", "onnx")
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(RunnerError):
    """The model cannot be exported in the requested format, or the export does not reproduce it."""


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    max_abs_diff: float | None  # between the exported file's logits and the checkpoint's; None if not checked
    checked_with: str | None  # what ran the exported file for the check


def example_batch(run_model: RunModel, size: int) -> torch.Tensor:
    """Inputs for tracing and checking: seeded noise of the model's input shape, on the CPU."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((size, *run_model.input_shape), generator=generator)


def _check(expected: torch.Tensor, actual: Any, what: str) -> float:
    actual = torch.as_tensor(actual, dtype=expected.dtype)
    if actual.shape != expected.shape:
        raise ExportError(f"the {what} file gives logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    diff = float((actual - expected).abs().max())
    if not torch.allclose(actual, expected, atol=TOLERANCE, rtol=TOLERANCE):
        raise ExportError(f"the {what} file does not reproduce the model's logits (max difference {diff:.3g} > {TOLERANCE:g}); nothing written")
    return diff


def write_state_dict(run_model: RunModel, tmp: Path) -> tuple[float | None, str | None]:
    state = {k: v.detach().cpu() for k, v in run_model.model.state_dict().items()}
    torch.save(state, tmp)
    reloaded = torch.load(tmp, map_location="cpu", weights_only=True)
    same = reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state)
    if not same:
        raise ExportError("the written state dict differs from the checkpoint's; nothing written")
    return 0.0, "torch.load(weights_only=True)"


def write_torchscript(run_model: RunModel, tmp: Path) -> tuple[float | None, str | None]:
    model = run_model.model
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript files are what C++
        # (libtorch) and many serving stacks still load; the check below guards the result
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example_batch(run_model, 2), check_trace=False)
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    batch = example_batch(run_model, 3)  # another batch size than traced: the batch dimension must stay free
    with torch.inference_mode():
        return _check(run_model.logits(batch), loaded(batch), "TorchScript"), "torch.jit.load"


def write_onnx(run_model: RunModel, tmp: Path) -> tuple[float | None, str | None]:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"ONNX export needs the optional extra: pip install 'runner-dl[onnx]' ({module} is not installed)") from None
    # the exporter narrates its steps on stdout, which carries this command's own output
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            run_model.model, (example_batch(run_model, 2),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False,
        )
        program.save(str(tmp))
    try:
        import onnxruntime
    except ImportError:
        return None, None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    batch = example_batch(run_model, 3)
    with torch.inference_mode():
        expected = run_model.logits(batch)
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    return _check(expected, actual, "ONNX"), f"onnxruntime {onnxruntime.__version__}"


WRITERS: dict[str, Callable[[RunModel, Path], tuple[float | None, str | None]]] = {
    "state_dict": write_state_dict,
    "torchscript": write_torchscript,
    "onnx": write_onnx,
}


def sidecar(run_model: RunModel, fmt: str, output: Path, result: tuple[float | None, str | None]) -> dict[str, Any]:
    channels, height, width = run_model.input_shape
    return {
        "format": fmt,
        "file": output.name,
        "sha256": sha256_file(output),
        "run_id": run_model.run_id,
        "checkpoint": run_model.checkpoint,
        "checkpoint_epoch": run_model.epoch,
        "model": run_model.spec.model.name,
        "class_names": run_model.class_names,
        "input": {"name": INPUT_NAME, "shape": ["batch", channels, height, width], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(run_model.class_names)],
                   "meaning": "unnormalised class scores in class_names order; softmax gives probabilities"},
        "image": {"mode": run_model.image_mode, "read_as": run_model.image_type},
        "preprocessing": run_model.preprocessing,
        "check": {"max_abs_logit_diff": result[0], "tolerance": TOLERANCE, "with": result[1]},
        "runner_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": utcnow().isoformat(timespec="seconds"),
    }


def export_run(store: Store, run_id: str, fmt: str, output: Path, registries: Registries, checkpoint: str = "best") -> ExportResult:
    """Write the run's model to ``output`` and its sidecar to ``output.json``; nothing is left half written."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"{output} is a directory; give a file name")
    if not output.parent.is_dir():
        raise ExportError(f"cannot write {output}: directory {output.parent} does not exist")
    run_model = load_run_model(store, run_id, registries, checkpoint=checkpoint, device="cpu")
    outcome: list[tuple[float | None, str | None]] = []
    atomic_write(output, lambda tmp: outcome.append(WRITERS[fmt](run_model, tmp)))
    side = output.with_name(output.name + ".json")
    atomic_write_bytes(side, json.dumps(sidecar(run_model, fmt, output, outcome[0]), indent=2) + "\n")
    return ExportResult(output, side, outcome[0][0], outcome[0][1])


__all__ = ["export_run", "ExportResult", "ExportError", "FORMATS"]
