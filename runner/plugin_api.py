"""The public API for runner plugins: import everything a plugin needs from here, and nothing else.

A plugin is a module (or object) with functions marked :data:`hookimpl` whose names are hooks of
:mod:`runner.hookspecs`; each receives a ``register(name, builder)`` callback::

    from runner.plugin_api import ModelRequest, RegisterModel, hookimpl

    @hookimpl
    def runner_register_models(register: RegisterModel) -> None:
        register("mine:mlp", build_mlp)

Everything listed in ``__all__`` is stable across minor versions of ``runner``; the rest of the
``runner`` package is private and may change without notice. See ``docs/plugins.md``.

Importing this module does not import torch: :class:`InMemoryImages` and :func:`head_names` (which
need it) are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError, SpecError
from runner.hookspecs import hookimpl
from runner.interfaces import (
    DatasetBuilder,
    DatasetRequest,
    LabelledImages,
    ModelBuilder,
    ModelRequest,
    NamedWeights,
    RegisterDataset,
    RegisterModel,
    RegisterStrategy,
    RegisterTransform,
    Stage,
    Strategy,
    StrategyBuilder,
    TrainableSpec,
    TrainingContext,
    TransformBuilder,
)

if TYPE_CHECKING:
    from runner.data import InMemoryImages
    from runner.models import head_names

__all__ = [
    # marking hook implementations
    "hookimpl",
    # the register callbacks each hook receives, and the builders they take
    "RegisterModel",
    "RegisterDataset",
    "RegisterTransform",
    "RegisterStrategy",
    "ModelBuilder",
    "DatasetBuilder",
    "TransformBuilder",
    "StrategyBuilder",
    # what builders receive and return
    "ModelRequest",
    "NamedWeights",
    "DatasetRequest",
    "LabelledImages",
    "InMemoryImages",
    # training strategies
    "Strategy",
    "Stage",
    "TrainableSpec",
    "TrainingContext",
    "head_names",
    # errors a builder raises for bad options or missing data (one line to the user, exit code 2)
    "RunnerError",
    "SpecError",
]


def __getattr__(name: str) -> Any:
    # both need torch; loading them lazily keeps this module torch-free
    if name == "InMemoryImages":
        from runner.data import InMemoryImages

        return InMemoryImages
    if name == "head_names":
        from runner.models import head_names

        return head_names
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
