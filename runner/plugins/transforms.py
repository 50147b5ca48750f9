"""Built-in transforms: every ``torchvision.transforms.v2`` transform, plus a few the runner needs."""

from __future__ import annotations

from typing import Any, Callable

from runner.errors import SpecError
from runner.hookspecs import hookimpl
from runner.transforms import GrayscaleToRgb

# v2 transforms whose output is random although their names do not start with "Random"
_RANDOM_V2 = {
    "AugMix", "AutoAugment", "ColorJitter", "CutMix", "ElasticTransform", "GaussianBlur", "GaussianNoise",
    "MixUp", "RandAugment", "ScaleJitter", "TrivialAugmentWide", "JPEG",
}


def _dtype(value: Any) -> Any:
    import torch

    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise SpecError(f"transforms: unknown dtype {value!r} (e.g. float32, uint8)")
        return dtype
    return value


def _v2_builder(cls: type) -> Callable[..., Any]:
    def build(**options: Any) -> Any:
        if "dtype" in options:
            options["dtype"] = _dtype(options["dtype"])
        return cls(**options)

    build.__doc__ = f"torchvision.transforms.v2.{cls.__name__}"
    build.target = cls  # type: ignore[attr-defined]  # for argument checking
    build.random = cls.__name__.startswith("Random") or cls.__name__ in _RANDOM_V2  # type: ignore[attr-defined]
    return build


def weights_preset(model: str, weights: str = "DEFAULT") -> Any:
    """The preprocessing that torchvision records with pretrained weights (``weights.transforms()``)."""
    from runner.plugins.models import resolve_torchvision_weights

    resolved = resolve_torchvision_weights(model.removeprefix("torchvision:"), weights)
    return resolved.transforms()


weights_preset.random = False  # type: ignore[attr-defined]


def v2_transform_classes() -> dict[str, type]:
    from torchvision.transforms import v2

    return {
        name: getattr(v2, name)
        for name in dir(v2)
        if not name.startswith("_") and isinstance(getattr(v2, name), type) and issubclass(getattr(v2, name), v2.Transform)
        and name not in ("Transform",)
    }


@hookimpl
def runner_register_transforms(register: Callable[[str, Any], None]) -> None:
    for name, cls in sorted(v2_transform_classes().items()):
        register(name, _v2_builder(cls))
    register("GrayscaleToRgb", GrayscaleToRgb)
    register("WeightsPreset", weights_preset)
