"""Built-in datasets: the bundled MNIST digits, ImageFolder directories, any torchvision dataset."""

from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from runner.errors import RunnerError, SpecError
from runner.hookspecs import hookimpl
from runner.interfaces import DatasetRequest


def load_bundled_mnist(request: DatasetRequest) -> Any:
    """5,000 real MNIST digits shipped inside the package (see runner/data/README.md)."""
    import numpy as np
    import torch

    from runner.data import InMemoryImages

    if request.options:
        raise SpecError(f"data.options: mnist_bundled takes no options, got {sorted(request.options)}")
    with resources.files("runner").joinpath("data/mnist_5k.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"].astype("int64"))
    return InMemoryImages(images, labels, classes=[str(d) for d in range(10)])


def _resolve_root(request: DatasetRequest, key: str = "root") -> Path:
    if key not in request.options:
        raise SpecError(f"data.options.{key} is required for {request.name}")
    root = Path(str(request.options[key])).expanduser()
    return root if root.is_absolute() else Path(request.base_dir) / root


def load_image_folder(request: DatasetRequest) -> Any:
    """``root/<class>/<image>`` directories, read with torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    root = _resolve_root(request)
    if not root.is_dir():
        raise SpecError(f"data.options.root: no such directory: {root}")
    extra = {k: v for k, v in request.options.items() if k != "root"}
    try:
        return ImageFolder(str(root), **extra)
    except FileNotFoundError as exc:
        raise SpecError(f"data.options.root: {exc}") from None


def _torchvision_dataset_builder(cls: type) -> Callable[[DatasetRequest], Any]:
    def build(request: DatasetRequest) -> Any:
        options = dict(request.options)
        if "root" in inspect.signature(cls).parameters:
            options["root"] = str(_resolve_root(request))
        if "download" in inspect.signature(cls).parameters:
            options["download"] = False  # never download at run time
        try:
            return cls(**options)
        except TypeError as exc:
            raise SpecError(f"data.options: {cls.__name__}: {exc}") from None
        except (RuntimeError, FileNotFoundError) as exc:
            raise RunnerError(f"dataset {request.name} not found under {options.get('root')}: {str(exc).splitlines()[0]}") from None

    build.__doc__ = f"torchvision.datasets.{cls.__name__} (never downloads)"
    return build


def torchvision_dataset_classes() -> dict[str, type]:
    import torchvision.datasets as tvd

    return {
        name: getattr(tvd, name)
        for name in tvd.__all__
        if isinstance(getattr(tvd, name), type) and issubclass(getattr(tvd, name), tvd.VisionDataset)
    }


@hookimpl
def runner_register_datasets(register: Callable[[str, Any], None]) -> None:
    register("mnist_bundled", load_bundled_mnist)
    register("image_folder", load_image_folder)
    for name, cls in sorted(torchvision_dataset_classes().items()):
        register(f"torchvision:{name}", _torchvision_dataset_builder(cls))
