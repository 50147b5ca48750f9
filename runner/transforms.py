"""Image transforms from the spec's steps, built through the transform registry.

The one transform the core adds itself is :class:`GrayscaleToRgb`: when one-channel images meet a
model (or preprocessing) made for three, the runner repeats the channel right after the step that
makes a tensor. It is part of the core, not of a plugin, so blocking a plugin never breaks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from runner.errors import PluginError, RunnerError, SpecError, one_line
from runner.optim import check_arguments
from runner.spec import TransformStep

if TYPE_CHECKING:
    from runner.registries import Registries

TENSOR_MAKERS = ("ToImage", "PILToTensor", "ToTensor")
RGB_EXPANSION = "GrayscaleToRgb"


class GrayscaleToRgb:
    """Repeat a single channel three times, for models pretrained on RGB images."""

    random = False

    def __call__(self, image: Any) -> Any:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image

    def __repr__(self) -> str:
        return "GrayscaleToRgb()"


class Steps:
    """The spec's transforms applied in order (``v2.Compose`` for one image), each failure naming its step.

    An exception from a step becomes a :class:`PluginError` such as ``transforms.train[2]
    (acme:GaussianNoise from plugin 'acme'): ValueError: …``, also inside DataLoader workers (it
    holds only the steps and strings, so it pickles) and when runner applies a deterministic
    pipeline to a whole in-memory split at once.
    """

    def __init__(self, transforms: list[Callable[[Any], Any]], labels: list[str | None]) -> None:
        self.transforms = transforms
        self.labels = labels  # per step, its spec key and name for messages; None for runner's own steps

    def __call__(self, image: Any) -> Any:
        for transform, label in zip(self.transforms, self.labels):
            try:
                image = transform(image)
            except RunnerError:
                raise
            except Exception as exc:
                if label is None:
                    raise
                raise PluginError(f"{label}: {one_line(exc)}") from exc
        return image

    def __repr__(self) -> str:
        return f"Steps({', '.join(map(repr, self.transforms))})"


def transform_builder(registries: Registries, step: TransformStep, key: str) -> Callable[..., Any]:
    """The registered builder of one step, its arguments checked against its signature."""
    try:
        builder = registries.transforms.get(step.name)
    except RunnerError as exc:
        raise SpecError(f"{key}: {exc}") from None
    check_arguments(getattr(builder, "target", builder), step.options, key)
    return builder


def is_random(registries: Registries, steps: Sequence[TransformStep]) -> bool:
    return any(bool(getattr(registries.transforms.get(s.name), "random", False)) for s in steps)


def without_random(registries: Registries, steps: Sequence[TransformStep]) -> list[TransformStep]:
    """The default evaluation transforms: the training ones, random steps left out."""
    return [s for s in steps if not getattr(registries.transforms.get(s.name), "random", False)]


def rgb_position(steps: Sequence[TransformStep]) -> int:
    """Where :class:`GrayscaleToRgb` goes: right after the step that makes a tensor (or first, for tensor data)."""
    makers = [i for i, s in enumerate(steps) if s.name in TENSOR_MAKERS]
    return makers[-1] + 1 if makers else 0


def build_transform(registries: Registries, steps: Sequence[TransformStep], key: str, expand_rgb: bool = False) -> Steps:
    """The steps, built, in order (with the RGB expansion inserted when ``expand_rgb``)."""
    built: list[Any] = []
    labels: list[str | None] = []
    for i, step in enumerate(steps):
        builder = transform_builder(registries, step, f"{key}[{i}]")
        entry = registries.transforms.entry(step.name)
        with entry.blamed(f"{key}[{i}]", step.name):
            try:
                built.append(builder(**step.options))
            except (TypeError, ValueError) as exc:  # an option the builder refuses
                raise SpecError(f"{key}[{i}] ({entry.label(step.name)}): {exc}") from None
        labels.append(f"{key}[{i}] ({entry.label(step.name)})")
    if expand_rgb:
        position = rgb_position(steps)
        built.insert(position, GrayscaleToRgb())
        labels.insert(position, None)
    return Steps(built, labels)


def describe(steps: Sequence[TransformStep], expand_rgb: bool = False) -> list[dict[str, Any]]:
    """The steps as a user would write them (with the RGB expansion where the runner adds it)."""
    described = [{"name": s.name, **s.options} for s in steps]
    if expand_rgb:
        described.insert(rgb_position(steps), {"name": RGB_EXPANSION})
    return described


def transform_sample(transform: Callable[[Any], Any], image: Any, key: str, raise_errors: bool = False) -> Any:
    """One image through ``transform``: a (C, H, W) tensor, or None when the transform fails on it."""
    import torch

    try:
        sample = transform(image)
    except RunnerError:
        if raise_errors:
            raise  # names the step that failed
        return None
    except Exception as exc:
        if raise_errors:
            raise SpecError(f"{key} failed on a sample image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return None
    if not isinstance(sample, torch.Tensor) or sample.ndim != 3:
        raise SpecError(f"{key} must turn an image into a (C, H, W) tensor (add ToImage and ToDtype)")
    return sample


__all__ = [
    "Steps", "GrayscaleToRgb", "transform_builder", "is_random", "without_random", "build_transform", "describe",
    "transform_sample", "rgb_position",
]
