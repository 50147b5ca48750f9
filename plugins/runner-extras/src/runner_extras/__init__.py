"""runner-extras: a small ResNet for low-resolution images, NPZ and synthetic-shapes datasets,
Cutout and per-image standardization transforms, and a MixUp/CutMix strategy.

Every name is prefixed ``extras:`` so it can never collide with runner's built-ins. This module is
the plugin runner loads (entry point ``extras`` in group ``runner``); it imports runner only
through :mod:`runner.plugin_api`.
"""

from __future__ import annotations

from runner.plugin_api import RegisterDataset, RegisterModel, RegisterStrategy, RegisterTransform, hookimpl

from runner_extras.datasets import load_npz, load_shapes
from runner_extras.models import build_resnet_small
from runner_extras.strategies import MixUp
from runner_extras.transforms import Cutout, PerImageStandardize

__version__ = "0.1.0"


@hookimpl
def runner_register_models(register: RegisterModel) -> None:
    register("extras:resnet_small", build_resnet_small)


@hookimpl
def runner_register_datasets(register: RegisterDataset) -> None:
    register("extras:npz", load_npz)
    register("extras:shapes", load_shapes)


@hookimpl
def runner_register_transforms(register: RegisterTransform) -> None:
    register("extras:Cutout", Cutout)
    register("extras:PerImageStandardize", PerImageStandardize)


@hookimpl
def runner_register_strategies(register: RegisterStrategy) -> None:
    register("extras:mixup", MixUp)
