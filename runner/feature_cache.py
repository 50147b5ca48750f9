"""Frozen-feature cache: train a head on backbone features computed once.

When only the classification head trains and nothing random happens before it (deterministic
transforms, no dropout in the backbone, no batch-level augmentation), every epoch would push the same
images through the same frozen backbone. Computing those features once (eval mode, no grad) and
training the head on them gives the same updates at a fraction of the cost. Features are cached on
disk beside the store, keyed on the backbone's weights, the transforms and the data, so a second
head-only experiment on the same backbone skips the extraction too.

On the CPU the extraction runs the backbone as PyTorch's inference optimizer leaves it
(``torch.jit.optimize_for_inference``: batch norms folded into the convolutions, weights packed for
oneDNN), checked against the model itself on the first batch: resnet18 at 64x64 took 1.53 s of CPU
time per 512 images instead of 2.68 s (a loaded 2-core machine, best of 3). A model that cannot be
scripted, or whose optimized features differ, is run as it is.

In a distributed run rank 0 alone extracts (or reads) the features of every split, once, and hands
them to the other ranks by broadcast (no shared filesystem needed); each rank then trains and
evaluates on its shard of them, as it would on images.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from runner.data import TensorBatches
from runner.distributed import ONE_PROCESS, Collective
from runner.interfaces import Strategy
from runner.models import head_names, select_trainable
from runner.performance import OPENMP_WAITING
from runner.spec import Spec
from runner.tensor_files import load_tensors, save_tensors

if TYPE_CHECKING:
    from runner.build import RunParts
    from runner.plan import RunPlan

_RANDOM_IN_TRAIN_MODE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, StochasticDepth)


@dataclass
class CachedFeatures:
    """The head to train and loaders of (feature, label) batches for each split."""

    head: nn.Module
    train_loader: TensorBatches
    val_loader: TensorBatches
    test_loader: TensorBatches
    reused: bool
    key: str


def blocker(spec: Spec, model: nn.Module, strategy: Strategy, train_transform_random: bool,
            input_shape: tuple[int, int, int]) -> str | None:
    """Why the cache cannot be used for this run, or None when it can.

    ``model`` may live on the ``meta`` device: only its structure and one forward pass of shapes
    are looked at. Raises ``NotImplementedError`` when that forward pass needs an operation the
    model's device does not implement (the caller then retries with a CPU model).
    """
    if spec.training.feature_cache == "off":
        return "switched off in the spec"
    if train_transform_random:
        return "the training transforms are random"
    if type(strategy).on_batch is not Strategy.on_batch:
        return "the strategy transforms batches"
    heads = head_names(model)
    if len(heads) != 1:
        return "the model has more than one head"
    prefix = f"{heads[0]}."
    if all(name.startswith(prefix) for name, _ in model.named_parameters()):
        return "the model has no backbone outside its head"
    for epoch in range(1, spec.training.epochs + 1):
        trainable = select_trainable(model, strategy.stage(epoch).trainable)
        if any(not name.startswith(prefix) for name in trainable):
            return f"the backbone trains (epoch {epoch})"
    for name, module in model.named_modules():
        if isinstance(module, _RANDOM_IN_TRAIN_MODE) and not name.startswith(prefix) and name != heads[0]:
            return f"the backbone has a random layer in train mode ({name})"
    if not _head_is_applied_last(model, getattr(model, heads[0]), input_shape):
        return "the model computes more after its head"
    return None


def _head_is_applied_last(model: nn.Module, head: nn.Module, input_shape: tuple[int, int, int]) -> bool:
    """Is the model's output the very tensor its head returns (nothing computed after the head)?

    Identity, not closeness: it needs no real numbers, so it works on the ``meta`` device.
    """
    produced: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, output: produced.append(output))
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            output = model(torch.zeros((2, *input_shape), device=device))
    finally:
        handle.remove()
        model.train(was_training)
    logits = output.logits if hasattr(output, "logits") else output
    return len(produced) == 1 and logits is produced[0]


class _HeadInput:
    """Forward pre-hook that keeps what the head receives."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.batches.append(args[0].detach().cpu())


def _ordered_batches(loader: Any) -> Any:
    """The loader's samples in dataset order (training order does not matter for extraction)."""
    if isinstance(loader, TensorBatches):
        return TensorBatches(loader.images, loader.labels, loader.batch_size, shuffle=False, generator=None)
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers)


@torch.inference_mode()
def _head_inputs(model: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the head receives for ``images``, running the model itself."""
    capture = _HeadInput()
    handle = head.register_forward_pre_hook(capture)
    try:
        model(images)
    finally:
        handle.remove()
    return capture.batches[0]


def _optimized_backbone(model: nn.Module, head_name: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model up to its head, compiled to TorchScript and optimized for inference; None where that fails or changes the features.

    The head is applied last (see :func:`blocker`), so with it made an identity the model returns
    what the head receives. Scripting (not tracing) keeps any control flow of the model's own; the
    optimized features must still match the model's on ``example`` to 1e-4 (relative) to be used.
    """
    backbone = copy.deepcopy(model).eval()
    setattr(backbone, head_name, nn.Identity())
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notes are not the user's concern
            optimized = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(backbone)))
            with torch.inference_mode():
                got = optimized(example).reshape(len(example), -1)
    except Exception:  # a model TorchScript cannot compile: extract with the model itself
        return None
    expected = _head_inputs(model, getattr(model, head_name), example).reshape(len(example), -1)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
        return None
    return optimized


def extraction_method(device: torch.device) -> str:
    """How features are computed on ``device`` (part of the cache key: the methods round differently)."""
    return "optimized for inference" if device.type == "cpu" else "the model"


@torch.inference_mode()
def _extract(model: nn.Module, head: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], device: torch.device,
             backbone: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head receives for every sample of ``batches`` (in dataset order), and the labels."""
    features, labels = [], []
    for images, batch_labels in batches:
        images = images.to(device)
        features.append((backbone(images) if backbone is not None else _head_inputs(model, head, images)).detach().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(features), torch.cat(labels)


def cache_key(plan: RunPlan, model: nn.Module) -> str:
    """Backbone weights, eval transforms, data selection and device: what the features depend on."""
    digest = hashlib.sha256()
    prefix = f"{head_names(model)[0]}."
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(prefix):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    spec = plan.spec
    described = {
        "model": spec.model.name, "options": spec.model.options, "surgery": spec.model.surgery,
        "transforms": [s.model_dump() for s in spec.transforms.eval or []],
        "rgb_expanded": plan.data.rgb_expanded,
        "data": spec.data.model_dump(exclude={"batch_size", "eval_batch_size", "num_workers"}),
        "seed": spec.seed, "device": torch.device(plan.device).type,
        "performance": {k: v for k, v in plan.performance.as_dict().items() if k not in OPENMP_WAITING},  # memory format, precision
        "extraction": extraction_method(torch.device(plan.device)),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def build(plan: RunPlan, parts: RunParts, cache_dir: Path, collective: Collective = ONE_PROCESS) -> CachedFeatures:
    """Features for every split, from disk when cached (see :func:`blocker` for when this is exact)."""
    model, device = parts.model, parts.device
    head = getattr(model, head_names(model)[0])
    splits = {"train": parts.train_loader, "val": parts.val_loader, "test": parts.test_loader}
    features, reused, key = collective.from_rank0(lambda: _features(plan, model, head, splits, device, cache_dir))
    loaders = {}
    for split, loader in splits.items():
        inputs, labels = features[split]
        if device.type == "cuda":
            inputs, labels = inputs.to(device), labels.to(device)
        train = split == "train"
        loaders[split] = TensorBatches(
            inputs, labels, loader.batch_size, shuffle=train,
            generator=getattr(loader, "generator", None) if train else None,
            draws_base_seed=train and not isinstance(loader, TensorBatches),
            sampler=collective.shard.sampler(len(labels), train, plan.spec.seed) if collective.shard else None,
        )
    return CachedFeatures(head, loaders["train"], loaders["val"], loaders["test"], reused, key)


def _features(plan: RunPlan, model: nn.Module, head: nn.Module, splits: dict[str, Any], device: torch.device,
              cache_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool, str]:
    """(features, labels) of every whole split on the CPU, read from the cache or extracted and saved; reused?; the key."""
    key = cache_key(plan, model)
    path = cache_dir / f"{key}.pt"
    reused = path.is_file()
    if reused:
        stored = load_tensors(path, f"feature cache {path}")
        features = {k: (v["features"], v["labels"]) for k, v in stored.items()}
    else:
        was_training = model.training
        model.eval()
        features = {}
        try:
            backbone = None
            if extraction_method(device) == "optimized for inference":
                first_images = next(iter(_ordered_batches(splits["train"])))[0].to(device)
                backbone = _optimized_backbone(model, head_names(model)[0], first_images)
            for split, loader in splits.items():
                features[split] = _extract(model, head, _ordered_batches(loader), device, backbone)
        finally:
            model.train(was_training)
        save_tensors({k: {"features": f, "labels": y} for k, (f, y) in features.items()}, path)
    return features, reused, key
