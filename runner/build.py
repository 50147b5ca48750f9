"""From a run plan to the torch objects that train: the model with its weights, loaders, strategy.

Building obeys the plan; it decides nothing. Everything that could be refused was refused by
:func:`runner.plan.plan`; what remains to fail here is what changed since (a dataset whose classes
are no longer the plan's, a weights file replaced since it was hashed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runner import data as data_mod
from runner.errors import RunnerError
from runner.files import sha256_file
from runner.interfaces import Strategy
from runner.models import build_model, load_state_dict_checked
from runner.plan import RunPlan, WeightsPlan, build_strategy
from runner.tensor_files import load_state_dict_file
from runner.transforms import build_transform

if TYPE_CHECKING:
    from runner.registries import Registries


@dataclass
class RunParts:
    """What a run trains with, built from its plan. Only torch objects; the decisions are the plan's."""

    model: nn.Module
    strategy: Strategy
    train_loader: Any
    val_loader: Any
    test_loader: Any
    device: torch.device


def build(
    run_plan: RunPlan,
    registries: Registries,
    *,
    data: data_mod.LoadedData | None = None,
    load_weights: bool = True,
    verify_weights: bool = False,
    device: torch.device | None = None,
    shard: data_mod.Shard | None = None,
) -> RunParts:
    """The model (initialised from the global generators, then its weights loaded), loaders and strategy.

    :param data: the plan's dataset when the caller already loaded it.
    :param load_weights: load the plan's initial weights (not when a checkpoint replaces them).
    :param verify_weights: check the weights file still has the sha256 the plan recorded (resume).
    :param device: another device than the plan's (``runner eval --device``; a process's own GPU).
    :param shard: the part of each split this process iterates, in a distributed run.
    """
    spec = run_plan.spec
    device = device or torch.device(run_plan.device)
    data = data if data is not None else data_mod.load_data(spec, registries, run_plan.spec_dir)
    if tuple(data.class_names) != run_plan.data.class_names:
        raise RunnerError(f"the data's classes {data.class_names} are not the run's {list(run_plan.data.class_names)}")
    model = build_run_model(run_plan, registries, load_weights=load_weights, verify_weights=verify_weights)
    if run_plan.performance.channels_last:  # here, so training, resume, eval and predict all see the same memory format
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(run_plan, registries, data, device, shard)
    return RunParts(model=model, strategy=build_strategy(spec, registries), device=device, **loaders)


def build_run_model(run_plan: RunPlan, registries: Registries, *, load_weights: bool = True, verify_weights: bool = False) -> nn.Module:
    """The plan's model on the CPU, with its initial weights when ``load_weights``."""
    weights = run_plan.weights if load_weights else None
    named = weights.name if weights is not None and weights.kind == "named" else None
    if weights is not None and verify_weights:
        check_unchanged(weights)
    model, _ = build_model(run_plan.spec, registries, run_plan.data.data_shape, weights_name=named)  # type: ignore[arg-type]
    if weights is not None and weights.kind != "named":
        state = load_state_dict_file(Path(weights.path or ""), weights.source)
        load_state_dict_checked(model, state, run_plan.model.replaced, weights.source)
    return model


def check_unchanged(weights: WeightsPlan) -> None:
    if weights.sha256 is None or weights.path is None:
        return
    if not Path(weights.path).is_file():
        raise RunnerError(f"the run's initial weights ({weights.source}) are gone: {weights.path}")
    if sha256_file(weights.path) != weights.sha256:
        raise RunnerError(f"the run's initial weights ({weights.source}) changed since it was planned (sha256 differs): {weights.path}")


def build_loaders(run_plan: RunPlan, registries: Registries, data: data_mod.LoadedData, device: torch.device,
                  shard: data_mod.Shard | None = None) -> dict[str, Any]:
    """Train, val and test batches, split and transformed as the plan says (``shard``: this process's part of each split)."""
    spec = run_plan.spec
    split = data_mod.split_indices(data, spec)
    sizes = {"train": len(split.train), "val": len(split.val), "test": len(split.test)}
    if sizes != run_plan.data.split_sizes:
        raise RunnerError(f"the data changed since the run was planned: split sizes {sizes}, planned {run_plan.data.split_sizes}")
    expand = run_plan.data.rgb_expanded
    train_transform = build_transform(registries, list(spec.transforms.train), "transforms.train", expand_rgb=expand)
    eval_transform = build_transform(registries, list(spec.transforms.eval or []), "transforms.eval", expand_rgb=expand)
    on_device = device if run_plan.data.batches_on_device and device.type == "cuda" else None
    pin = run_plan.performance.pin_memory and device.type == "cuda"
    eval_batch = spec.data.eval_batch_size or spec.data.batch_size
    random_train = run_plan.data.train_transform_random

    def loader(indices: Any, transform: Any, deterministic: bool, batch: int, shuffle: bool, offset: int) -> Any:
        subset = data_mod.Relabelled(data.dataset, indices, data.label_map, None)
        return data_mod.make_loader(subset, transform, deterministic, batch, shuffle, spec.seed + offset, spec.data.num_workers, pin, on_device,
                                    shard)

    return {
        "train_loader": loader(split.train, train_transform, not random_train, spec.data.batch_size, True, 0),
        "val_loader": loader(split.val, eval_transform, True, eval_batch, False, 1),
        "test_loader": loader(split.test, eval_transform, True, eval_batch, False, 2),
    }


def whole_data_loader(run_plan: RunPlan, registries: Registries, data: data_mod.LoadedData, device: torch.device) -> Any:
    """Every image of the data (its selected classes only), through the run's evaluation transforms."""
    import numpy as np

    spec = run_plan.spec
    indices = np.flatnonzero(np.isin(data.targets, list(data.label_map)))
    transform = build_transform(registries, list(spec.transforms.eval or []), "transforms.eval", expand_rgb=run_plan.data.rgb_expanded)
    subset = data_mod.Relabelled(data.dataset, indices, data.label_map, None)
    batch = spec.data.eval_batch_size or spec.data.batch_size
    return data_mod.make_loader(subset, transform, True, batch, False, spec.seed, spec.data.num_workers, device.type == "cuda")


__all__ = ["RunParts", "build", "build_run_model", "build_loaders", "whole_data_loader", "check_unchanged"]
