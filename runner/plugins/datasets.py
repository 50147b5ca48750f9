"""Built-in datasets: the bundled MNIST digits, ImageFolder directories, any torchvision dataset."""

from __future__ import annotations

import inspect
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from runner.errors import CorruptImageError, RunnerError, SpecError
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
        dataset = ImageFolder(str(root), **extra)
    except FileNotFoundError as exc:
        raise SpecError(f"data.options.root: {exc}") from None
    except TypeError as exc:
        raise SpecError(f"data.options: ImageFolder: {exc}") from None
    check_image_files(dataset, request.on_corrupt)
    return dataset


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def unreadable_reason(path: str) -> str | None:
    """Why PIL cannot read the image file at ``path``, or None (checks its structure, not every pixel)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a usable image
        return _one_line(exc)
    return None


class NamingLoader:
    """An image loader whose decoding errors name the file (a class, so DataLoader workers can pickle it)."""

    def __init__(self, loader: Callable[[str], Any]) -> None:
        self.loader = loader

    def __call__(self, path: str) -> Any:
        try:
            return self.loader(path)
        except Exception as exc:
            raise CorruptImageError(f"cannot decode image {path}: {_one_line(exc)}") from None


def check_image_files(dataset: Any, on_corrupt: str) -> None:
    """Before any training, refuse the first unreadable image file, or leave all of them out and count them.

    A file that passes this check but still fails to decode later (e.g. a truncated JPEG) fails the
    run with an error naming it.
    """
    good, skipped = [], []
    for path, target in dataset.samples:
        reason = unreadable_reason(path)
        if reason is None:
            good.append((path, target))
        elif on_corrupt == "skip":
            skipped.append(path)
        else:
            raise CorruptImageError(f"data: corrupt image {path} ({reason}); replace or remove it, or set data.on_corrupt: skip")
    if skipped:
        dataset.samples = dataset.imgs = good
        dataset.targets = [target for _, target in good]
        print(f"warning: data: skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]} (data.on_corrupt: skip)", file=sys.stderr)
    dataset.skipped_corrupt = skipped
    dataset.loader = NamingLoader(dataset.loader)


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
        except ImportError as exc:  # e.g. LSUN needs lmdb, PCAM h5py: optional packages torchvision does not install
            raise RunnerError(f"dataset {request.name} needs a package that is not installed: {exc}") from None
        except (RuntimeError, FileNotFoundError) as exc:
            raise RunnerError(f"dataset {request.name} not found under {options.get('root')}: {str(exc).splitlines()[0]}") from None

    build.__doc__ = f"torchvision.datasets.{cls.__name__} (never downloads)"
    return build


def torchvision_dataset_classes() -> dict[str, type]:
    import torchvision.datasets as tvd

    return {
        name: getattr(tvd, name)
        for name in tvd.__all__
        # VisionDataset itself is the abstract base: it "loads" anything and has no samples
        if isinstance(getattr(tvd, name), type) and issubclass(getattr(tvd, name), tvd.VisionDataset) and getattr(tvd, name) is not tvd.VisionDataset
    }


@hookimpl
def runner_register_datasets(register: Callable[[str, Any], None]) -> None:
    register("mnist_bundled", load_bundled_mnist)
    register("image_folder", load_image_folder)
    for name, cls in sorted(torchvision_dataset_classes().items()):
        register(f"torchvision:{name}", _torchvision_dataset_builder(cls))
