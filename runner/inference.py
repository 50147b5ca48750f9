"""A trained run's model, loaded back: evaluate it, or classify new images with it.

The model is rebuilt from the run's stored resolved spec (no pretrained weights are fetched),
then its checkpoint is loaded with ``torch.load(weights_only=True)``. Images are read and
preprocessed exactly as the run's evaluation data was: converted to the dataset's image mode,
given as the same type (PIL image or uint8 tensor), then passed through the run's evaluation
transforms (with ``GrayscaleToRgb`` where the run expanded grey images for an RGB model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from runner import data as data_mod
from runner import performance
from runner.build import build_loaders, build_run_model, whole_data_loader
from runner.errors import RunnerError
from runner.files import sha256_file
from runner.optim import build_loss
from runner.plan import RunPlan, plan, resolve_device, stored_plan
from runner.spec import Spec, load_spec
from runner.store import Store, missing_artifacts
from runner.tensor_files import load_state_dict_file
from runner.training import evaluate
from runner.transforms import build_transform, describe

if TYPE_CHECKING:
    from runner.registries import Registries

CHECKPOINTS = ("best", "last")
SPLITS = ("test", "val", "all")  # all: every image of the data, e.g. another dataset given with --set
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class InferenceError(RunnerError):
    """A run's model cannot be loaded or used as asked (no checkpoint, unreadable image, bad option)."""


@dataclass
class RunModel:
    """A run's trained model in eval mode, with everything needed to feed it new images."""

    run_id: str
    model: nn.Module
    class_names: list[str]
    spec: Spec
    checkpoint: str  # best | last
    epoch: int | None  # the epoch the checkpoint was saved at
    preprocessing: list[dict[str, Any]]  # the evaluation transform steps, as the spec names them
    transform: Callable[[Any], torch.Tensor]
    input_shape: tuple[int, int, int]  # (C, H, W) that the model takes
    image_mode: str  # PIL mode new images are converted to ("L", "RGB")
    image_type: str  # what the dataset gave the transforms: "PIL" or "tensor"
    device: torch.device

    def preprocess(self, image: Any, source: str = "image") -> torch.Tensor:
        """One PIL image → the (C, H, W) float tensor the model takes, as at evaluation time."""
        from torchvision.transforms.v2 import functional as F

        image = image.convert(self.image_mode) if image.mode != self.image_mode else image
        tensor = self.transform(F.pil_to_tensor(image) if self.image_type == "tensor" else image)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self.input_shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InferenceError(
                f"{source}: the run's evaluation transforms make it {shape}, but the model takes "
                f"{self.input_shape} (images of the size the run was trained on, or a run whose transforms resize)"
            )
        return tensor.as_subclass(torch.Tensor)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.model(batch.to(self.device))
        return output.logits if hasattr(output, "logits") else output

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(batch).float(), dim=1)


# ------------------------------------------------------------------------------------------
# Loading


def default_device(row: dict[str, Any]) -> str:
    """A CPU run is used on the CPU (so eval recomputes its numbers exactly); others on the best device."""
    return "cpu" if (row.get("device") or "").startswith("cpu") else "auto"


def checkpoint_path(store: Store, run_id: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """The file of a run's ``best`` or ``last`` checkpoint, checked to exist and be the one the run wrote."""
    if kind not in CHECKPOINTS:
        raise InferenceError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {kind!r}")
    kept = store.query.checkpoints(run_id)
    record = kept.get(kind)
    if record is not None and not record["path"].parent.is_dir():
        raise InferenceError(missing_artifacts(run_id, record["path"].parent))
    if record is None or not record["path"].is_file():
        others = [k for k in CHECKPOINTS if k != kind and k in kept and kept[k]["path"].is_file()]
        hint = f"; it has a {others[0]} checkpoint (--checkpoint {others[0]})" if others else ""
        raise InferenceError(f"run {run_id} has no {kind} checkpoint on disk{hint}")
    return record["path"], record


def load_checkpoint_state(store: Store, run_id: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path, record = checkpoint_path(store, run_id, kind)
    if sha256_file(path) != record["sha256"]:
        raise InferenceError(f"the {kind} checkpoint of run {run_id} ({path}) changed since the run wrote it (sha256 differs)")
    return load_state_dict_file(path, f"{kind} checkpoint of run {run_id}"), record


def load_run_model(store: Store, run_id: str, registries: Registries, checkpoint: str = "best", device: str | None = None) -> RunModel:
    """Rebuild a run's model from its plan, load its ``best`` (or ``last``) checkpoint, and ready it for inference."""
    row = store.query.run_row(run_id)
    run_id = row["id"]
    run_plan = stored_plan(row, registries)
    state, record = load_checkpoint_state(store, run_id, checkpoint)
    model = build_run_model(run_plan, registries, load_weights=False)
    model.load_state_dict(state)
    target = resolve_device(device or default_device(row))
    model.to(target).eval()
    steps = list(run_plan.spec.transforms.eval or [])
    expanded = run_plan.data.rgb_expanded
    return RunModel(
        run_id=run_id,
        model=model,
        class_names=list(run_plan.data.class_names),
        spec=run_plan.spec,
        checkpoint=checkpoint,
        epoch=record["epoch"],
        preprocessing=describe(steps, expanded),
        transform=build_transform(registries, steps, "transforms.eval", expand_rgb=expanded),
        input_shape=tuple(run_plan.data.input_shape),  # type: ignore[arg-type]
        image_mode=run_plan.data.image_mode or ("L" if run_plan.data.data_shape[0] == 1 else "RGB"),
        image_type=run_plan.data.image_type,
        device=target,
    )


# ------------------------------------------------------------------------------------------
# Evaluation


def check_data_overrides(overrides: Sequence[str]) -> None:
    """Evaluation may point at other data, never change the model or its preprocessing."""
    for text in overrides:
        key = text.partition("=")[0].strip()
        if not key.startswith("data."):
            raise InferenceError(f"--set {key}: eval takes only data.* keys (the model and its transforms are the run's)")


def evaluate_run(
    store: Store,
    run_id: str,
    registries: Registries,
    split: str = "test",
    overrides: Sequence[str] = (),
    checkpoint: str = "best",
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on its own split (the same seeded split) or on other data, and store it.

    Returns the stored evaluation: ``split``, ``loss``, ``accuracy``, ``f1_macro`` and where it came from.
    """
    if split not in SPLITS:
        raise InferenceError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_data_overrides(overrides)
    row = store.query.run_row(run_id)
    run_id = row["id"]
    run_plan = stored_plan(row, registries)
    state, record = load_checkpoint_state(store, run_id, checkpoint)
    target = resolve_device(device or default_device(row))
    eval_plan, data = plan_for_data(run_plan, registries, overrides, target)
    model = build_run_model(run_plan, registries, load_weights=False)
    if run_plan.performance.channels_last:  # the memory format the run trained and tested in
        model.to(memory_format=torch.channels_last)
    model.load_state_dict(state)
    model.to(target)
    if split == "all":
        loader = whole_data_loader(eval_plan, registries, data, target)
    else:
        loader = build_loaders(eval_plan, registries, data, target)[f"{split}_loader"]
    speed = run_plan.performance if target.type == torch.device(run_plan.device).type else performance.resolve(run_plan.spec, target, model)
    with speed.autocast(target):  # the precision the run was evaluated in (AMP on CUDA)
        result = evaluate(model, loader, build_loss(run_plan.spec, target), target, run_plan.num_classes)
    evaluation = {
        "split": split,
        "loss": result["loss"] if math.isfinite(result["loss"]) else None,  # null, as the store keeps a loss that diverged
        "accuracy": result["accuracy"],
        "f1_macro": result["f1_macro"],
        "checkpoint": checkpoint,
        "checkpoint_epoch": record["epoch"],
        "dataset": eval_plan.spec.data.dataset,
        "overrides": list(overrides),
        "device": str(target),
        "samples": int(sum(sum(r) for r in result["confusion"])),
    }
    evaluation["id"] = store.runs.save_evaluation(
        run_id, **{k: v for k, v in evaluation.items() if k != "overrides"}, overrides_json=json.dumps(list(overrides)),
    )
    return {"run_id": run_id, **evaluation}


def plan_for_data(run_plan: RunPlan, registries: Registries, overrides: Sequence[str],
                  device: torch.device) -> tuple[RunPlan, data_mod.LoadedData]:
    """The run's plan, or for other data (``data.*`` overrides) a plan of that data checked to fit the run's model."""
    if not overrides:
        return run_plan, data_mod.load_data(run_plan.spec, registries, run_plan.spec_dir)
    spec = load_spec(run_plan.spec.resolved(), [*overrides, f"device={device}"])
    data = data_mod.load_data(spec, registries, run_plan.spec_dir)
    other = plan(spec, registries, base_dir=run_plan.spec_dir, data=data, read_weights=False)  # e.g. another class count
    if list(data.class_names) != list(run_plan.data.class_names):
        raise InferenceError(f"the data's classes {data.class_names} are not the run's {list(run_plan.data.class_names)}")
    if other.data.input_shape != run_plan.data.input_shape:
        raise InferenceError(f"the data gives the model {other.data.input_shape} inputs, the run was trained on {run_plan.data.input_shape}")
    return other, data


# ------------------------------------------------------------------------------------------
# Prediction


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The images named, with each directory replaced by the images under it (recursively, sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InferenceError(f"{path}: no images in this directory ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InferenceError(f"{path}: no such file or directory")
    return files


def read_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InferenceError(f"{path}: cannot read it as an image ({type(exc).__name__}: {str(exc)[:120]})") from None


def predict_images(run_model: RunModel, inputs: Sequence[str | Path], top_k: int = 5, batch_size: int | None = None) -> list[dict[str, Any]]:
    """For each image: its path and the ``top_k`` classes with their probabilities, best first.

    Images are read and preprocessed one batch at a time, so a large directory does not have to fit
    in memory at once.
    """
    if top_k < 1:
        raise InferenceError(f"--top-k must be at least 1, got {top_k}")
    files = image_files(inputs)
    k = min(top_k, len(run_model.class_names))
    size = batch_size or run_model.spec.data.eval_batch_size or run_model.spec.data.batch_size
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(files), size):
        chunk = files[start:start + size]
        batch = torch.stack([run_model.preprocess(read_image(p), str(p)) for p in chunk])
        probs, indices = run_model.probabilities(batch).topk(k, dim=1)
        for path, row_probs, row_indices in zip(chunk, probs.tolist(), indices.tolist()):
            top = [{"class": run_model.class_names[i], "prob": p} for p, i in zip(row_probs, row_indices)]
            predictions.append({"path": str(path), "top": top})
    return predictions


__all__ = ["RunModel", "InferenceError", "load_run_model", "evaluate_run", "predict_images", "image_files"]
