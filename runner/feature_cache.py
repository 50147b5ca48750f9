"""Frozen-feature cache: train a head on backbone features computed once.

When only the classification head trains and nothing random happens before it (deterministic
transforms, no dropout in the backbone, no batch-level augmentation), every epoch would push the same
images through the same frozen backbone. Computing those features once (eval mode, no grad) and
training the head on them gives the same updates at a fraction of the cost. Features are cached on
disk beside the store, keyed on the backbone's weights, the transforms and the data, so a second
head-only experiment on the same backbone skips the extraction too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from runner.data import TensorBatches
from runner.interfaces import Strategy
from runner.models import head_names, select_trainable

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


def blocker(prepared: Any) -> str | None:
    """Why the cache cannot be used for this run, or None when it can."""
    spec, model = prepared.spec, prepared.model
    if spec.training.feature_cache == "off":
        return "switched off in the spec"
    if prepared.train_transform_random:
        return "the training transforms are random"
    if type(prepared.strategy).on_batch is not Strategy.on_batch:
        return "the strategy transforms batches"
    heads = head_names(model)
    if len(heads) != 1:
        return "the model has more than one head"
    prefix = f"{heads[0]}."
    if all(name.startswith(prefix) for name, _ in model.named_parameters()):
        return "the model has no backbone outside its head"
    for epoch in range(1, spec.training.epochs + 1):
        trainable = select_trainable(model, prepared.strategy.stage(epoch).trainable)
        if any(not name.startswith(prefix) for name in trainable):
            return f"the backbone trains (epoch {epoch})"
    for name, module in model.named_modules():
        if isinstance(module, _RANDOM_IN_TRAIN_MODE) and not name.startswith(prefix) and name != heads[0]:
            return f"the backbone has a random layer in train mode ({name})"
    if not _head_is_applied_last(model, getattr(model, heads[0]), prepared.val_loader, prepared.device):
        return "the model computes more after its head"
    return None


def _head_is_applied_last(model: nn.Module, head: nn.Module, loader: Any, device: torch.device) -> bool:
    """On one batch, does the head applied to what it receives give the model's own output?"""
    was_training, original_device = model.training, next(model.parameters()).device
    model.to(device).eval()
    try:
        images, _ = next(iter(_ordered_batches(loader)))
        inputs, _, logits = _extract(model, head, [(images[:8], torch.zeros(len(images[:8])))], device)
        with torch.inference_mode():
            again = head(inputs.to(device)).cpu()
        return again.shape == logits.shape and torch.allclose(again, logits, atol=1e-5, rtol=1e-4)
    finally:
        model.train(was_training).to(original_device)


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
def _extract(model: nn.Module, head: nn.Module, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head inputs, labels and full-model logits (to check the head really is applied last)."""
    capture = _HeadInput()
    handle = head.register_forward_pre_hook(capture)
    labels, logits = [], []
    try:
        for images, batch_labels in (loader if isinstance(loader, list) else _ordered_batches(loader)):
            out = model(images.to(device))
            logits.append((out.logits if hasattr(out, "logits") else out).cpu())
            labels.append(torch.as_tensor(batch_labels))
    finally:
        handle.remove()
    return torch.cat(capture.batches), torch.cat(labels), torch.cat(logits)


def cache_key(prepared: Any) -> str:
    """Backbone weights, eval transforms, data selection and device: what the features depend on."""
    digest = hashlib.sha256()
    prefix = f"{head_names(prepared.model)[0]}."
    for name, tensor in sorted(prepared.model.state_dict().items()):
        if not name.startswith(prefix):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    spec = prepared.spec
    described = {
        "model": spec.model.name, "options": spec.model.options, "surgery": spec.model.surgery,
        "transforms": [s.model_dump() for s in spec.transforms.eval or []],
        "rgb_expanded": prepared.settings.get("rgb_expanded"),
        "data": spec.data.model_dump(exclude={"batch_size", "eval_batch_size", "num_workers"}),
        "seed": spec.seed, "device": prepared.device.type,
        "performance": prepared.settings.get("performance"),  # memory format and precision change the numbers
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def build(prepared: Any, cache_dir: Path) -> CachedFeatures:
    """Features for every split, from disk when cached (see :func:`blocker` for when this is exact)."""
    model, device = prepared.model, prepared.device
    head = getattr(model, head_names(model)[0])
    key = cache_key(prepared)
    path = cache_dir / f"{key}.pt"
    splits = {"train": prepared.train_loader, "val": prepared.val_loader, "test": prepared.test_loader}
    reused = path.is_file()
    if reused:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features = {k: (v["features"], v["labels"]) for k, v in stored.items()}
    else:
        was_training = model.training
        model.eval()
        features = {}
        try:
            for split, loader in splits.items():
                inputs, labels, _ = _extract(model, head, loader, device)
                features[split] = (inputs, labels)
        finally:
            model.train(was_training)
        cache_dir.mkdir(parents=True, exist_ok=True)
        from runner.training import save_atomically

        save_atomically({k: {"features": f, "labels": y} for k, (f, y) in features.items()}, path)
    loaders = {}
    for split, loader in splits.items():
        inputs, labels = features[split]
        if device.type == "cuda":
            inputs, labels = inputs.to(device), labels.to(device)
        loaders[split] = TensorBatches(
            inputs, labels, loader.batch_size, shuffle=split == "train",
            generator=getattr(loader, "generator", None) if split == "train" else None,
            draws_base_seed=split == "train" and not isinstance(loader, TensorBatches),
        )
    return CachedFeatures(head, loaders["train"], loaders["val"], loaders["test"], reused, key)
