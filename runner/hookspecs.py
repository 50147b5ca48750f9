"""The hooks a runner plugin implements.

Every hook receives a ``register`` callback instead of returning values, so the runner knows which
plugin registered which name (and can report collisions and failures by plugin). Implementations may
accept fewer arguments than a spec lists, so hooks can grow without breaking existing plugins.
Built-in models, datasets, transforms and strategies are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from runner.interfaces import RegisterDataset, RegisterModel, RegisterStrategy, RegisterTransform

hookspec = pluggy.HookspecMarker("runner")
hookimpl = pluggy.HookimplMarker("runner")


@hookspec
def runner_register_models(register: RegisterModel) -> None:
    """Register model builders with ``register(name, builder)``.

    :param register: call once per name. ``builder(request: ModelRequest) -> torch.nn.Module`` builds
        the model with its classification head sized for ``request.num_classes``. A name ending in
        ``*`` registers a family (``hub:*``): the builder receives the full name in ``request.name``.
    """


@hookspec
def runner_register_datasets(register: RegisterDataset) -> None:
    """Register dataset builders with ``register(name, builder)``.

    :param register: call once per name. ``builder(request: DatasetRequest) -> LabelledImages``
        returns a map-style dataset of ``(image, label)`` pairs with ``targets`` (one int per sample)
        and ``classes`` (one name per label). It must not download: a missing dataset is a
        :class:`runner.plugin_api.RunnerError` naming what is missing.
    """


@hookspec
def runner_register_transforms(register: RegisterTransform) -> None:
    """Register image transforms with ``register(name, builder)``.

    :param register: call once per name. ``builder(**options)`` returns a callable applied to one
        ``(C, H, W)`` tensor image (torchvision ``transforms.v2`` classes qualify as builders). Set
        ``builder.random = True`` on builders whose output is random, so the runner never caches
        their results.
    """


@hookspec
def runner_register_strategies(register: RegisterStrategy) -> None:
    """Register training strategies with ``register(name, builder)``.

    :param register: call once per name. ``builder(**options) -> Strategy`` where ``options`` come
        from the spec's ``training.strategy`` mapping.
    """


HOOK_KINDS: dict[str, str] = {
    "runner_register_models": "model",
    "runner_register_datasets": "dataset",
    "runner_register_transforms": "transform",
    "runner_register_strategies": "strategy",
}
"""Each registration hook and the kind of name it registers."""

__all__ = ["hookspec", "hookimpl", "HOOK_KINDS", *HOOK_KINDS]

