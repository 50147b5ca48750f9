"""What ``runner validate`` runs of training, cheaply, so that what fails in the first epoch fails before it.

:func:`runner.plan.plan` calls these after building the model on the ``meta`` device: the training
transforms on one training image (random ones too) and, for in-memory data, the deterministic ones
on a batch of two (runner applies them to a whole split at once); a forward pass of a batch of two
on the meta device (shapes only: no memory, no weights); the loss on a batch of logits. Each
failure names the spec key (and, for plugin code, the name and its plugin).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runner import data as data_mod
from runner.errors import SpecError, one_line
from runner.optim import build_loss
from runner.spec import Spec
from runner.transforms import build_transform, is_random, transform_sample

if TYPE_CHECKING:
    from runner.registries import Registries



def training_image(spec: Spec, registries: Registries, data: data_mod.LoadedData, split: data_mod.SplitIndices) -> Any:
    """The first training image, as the dataset gives it (its ``__getitem__`` is plugin code)."""
    with registries.datasets.entry(spec.data.dataset).blamed("data", spec.data.dataset):
        return data.dataset[int(split.train[0])][0]


def check_train_transforms(spec: Spec, registries: Registries, raw_image: Any, expand_rgb: bool,
                           input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Build the training transforms and apply them to one training image (random ones too); return its shape.

    Random draws are taken from generators :func:`plan` restores afterwards.
    """
    train = build_transform(registries, list(spec.transforms.train), "transforms.train", expand_rgb=expand_rgb)
    sample = transform_sample(train, raw_image, "transforms.train", raise_errors=True)
    if sample.shape[0] != input_shape[0]:
        raise SpecError(f"transforms.train gives {sample.shape[0]}-channel images but the model takes {input_shape[0]} "
                        f"(from transforms.eval)")
    return tuple(int(n) for n in sample.shape)


def check_whole_split_transforms(spec: Spec, registries: Registries, data: data_mod.LoadedData, split: data_mod.SplitIndices,
                                 expand_rgb: bool) -> None:
    """In-memory data goes through deterministic transforms a whole split at once: try them on two images at once."""
    if not data_mod.batches_in_memory(data, True):
        return
    images = data.dataset.images[torch.as_tensor(split.train[:2])]
    for key, steps in (("transforms.eval", list(spec.transforms.eval or [])), ("transforms.train", list(spec.transforms.train))):
        if key == "transforms.train" and is_random(registries, steps):
            continue  # applied image by image in a DataLoader
        batch = build_transform(registries, steps, key, expand_rgb=expand_rgb)(images)
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[0] != len(images):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise SpecError(f"{key} turned a batch of shape {tuple(images.shape)} into {shape}: deterministic transforms "
                            f"of in-memory data are applied to a whole split at once, so each must keep the leading dimensions")


def check_forward(model: nn.Module, spec: Spec, registries: Registries, input_shapes: list[tuple[int, ...]]) -> None:
    """A batch of two images of each shape gives one logit per class, run on the ``meta`` device (shapes only, no memory).

    Skipped for a model built on the CPU (its builder cannot build on ``meta``) and for one using an
    operation the meta device lacks: training then finds what this would have.
    """
    if any(p.device.type != "meta" for p in model.parameters()):
        return
    label = registries.models.entry(spec.model.name).label(spec.model.name)
    expected = (2, int(spec.model.num_classes or 0))
    was_training = model.training
    model.eval()  # Inception and GoogLeNet add auxiliary outputs in train mode
    try:
        for shape in dict.fromkeys(input_shapes):
            try:
                with torch.no_grad():
                    output = model(torch.empty((2, *shape), device="meta"))
            except Exception as exc:
                if isinstance(exc, NotImplementedError) or "meta" in str(exc).lower():
                    return
                raise SpecError(f"model ({label}) cannot take images of shape {shape}: {one_line(exc)}") from exc
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            if got != expected:
                raise SpecError(f"model ({label}) gives {got} for a batch of 2 images of shape {shape}, "
                                f"not {expected}: one logit per class")
    finally:
        model.train(was_training)


def check_loss(spec: Spec, num_classes: int) -> None:
    """The loss, built as training builds it, takes a batch of logits with class labels (class weights of the right
    length, options in range…) or, as a strategy such as MixUp may give them, class probabilities."""
    logits = torch.zeros(2, num_classes)
    targets = (torch.zeros(2, dtype=torch.long), torch.full((2, num_classes), 1.0 / num_classes))
    failures = []
    for target in targets:
        try:
            with warnings.catch_warnings():  # e.g. MSELoss on broadcast shapes: training would say so, validate need not
                warnings.simplefilter("ignore")
                build_loss(spec, torch.device("cpu"))(logits, target)
            return
        except Exception as exc:
            failures.append(exc)
    raise SpecError(f"training.loss ({spec.training.loss.name}): {one_line(failures[0])}") from None


__all__ = ["training_image", "check_train_transforms", "check_whole_split_transforms", "check_forward", "check_loss"]
