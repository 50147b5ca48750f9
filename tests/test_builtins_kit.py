"""runner's testing kit (``runner.testing``) run over every built-in name, parametrized over the registries as
timm's ``test_models`` is: a new built-in model, dataset, transform or strategy is checked the day it is
registered. The checks are the ones a third-party plugin's own suite calls.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from conftest import builtin_registries
from runner import testing
from runner.errors import SpecError

REGISTRIES = builtin_registries()


def test_the_builtins_load_cleanly() -> None:
    assert REGISTRIES.problems == [] and REGISTRIES.skipped == {}
    assert all(REGISTRIES.plugins[p].builtin for p in REGISTRIES.plugins)


# ------------------------------------------------------------------------------------------
# models: torchvision's on the meta device (no memory: ViT-H has 632 million parameters), at the smallest size they take


def torchvision_input_shape(name: str) -> tuple[int, int, int]:
    import torchvision

    if name.startswith("torchvision:vit_"):  # built without weights a ViT takes 224 pixels (ViT-H's default weights, 518)
        return (3, 224, 224)
    if name == "torchvision:inception_v3":  # its auxiliary head, which runs in training, pools 17x17 maps: 299 pixels
        return (3, 299, 299)
    height, width = torchvision.models.get_model_weights(name.removeprefix("torchvision:")).DEFAULT.meta.get("min_size", (1, 1))
    return (3, max(height, 32), max(width, 32))


# one model per kind of head is also built with a single class (a meta forward pass takes a second or more on 2 cores)
ONE_CLASS_TOO = {"torchvision:resnet18", "torchvision:vgg11", "torchvision:squeezenet1_0", "torchvision:inception_v3",
                 "torchvision:vit_b_16", "torchvision:convnext_tiny", "torchvision:mobilenet_v3_small"}
# RegNet's builder computes its widths with tensors, so it cannot build on the meta device: the small ones run on the CPU
CPU_ONLY = {"torchvision:regnet_x_400mf", "torchvision:regnet_y_400mf", "torchvision:regnet_x_800mf", "torchvision:regnet_y_800mf"}
TOO_BIG_FOR_THE_CPU = {f"torchvision:regnet_{kind}_{size}" for kind in "xy" for size in ("1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")}


@pytest.mark.slow
@pytest.mark.parametrize("name", testing.names(REGISTRIES, "model", plugin="runner.plugins.models"))
def test_every_builtin_model(name: str, tmp_path: Path) -> None:
    if name == "hub:*":
        pytest.skip("hub: models come from GitHub (the family is tested offline through hub-local:)")
    if name in TOO_BIG_FOR_THE_CPU:
        pytest.skip("builds on the CPU only (see CPU_ONLY), and is too big for a test there")
    if name == "hub-local:*":
        (tmp_path / "hubconf.py").write_text(HUBCONF, encoding="utf-8")
        testing.check_model(REGISTRIES, f"hub-local:{tmp_path}/tiny", input_shape=(1, 8, 8), options={"width": 4}, trust_repo=True)
    elif name in CPU_ONLY:
        testing.check_model(REGISTRIES, name, input_shape=(3, 32, 32), num_classes=(5,))
    elif name.startswith("torchvision:"):
        classes = (1, 5) if name in ONE_CLASS_TOO else (5,)
        testing.check_model(REGISTRIES, name, input_shape=torchvision_input_shape(name), num_classes=classes, on_meta=True)
    else:
        testing.check_model(REGISTRIES, name, input_shape=(1, 28, 28))


HUBCONF = """
import torch

def tiny(width=4):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
"""


def test_hub_local_models_need_trust(tmp_path: Path) -> None:
    (tmp_path / "hubconf.py").write_text(HUBCONF, encoding="utf-8")
    with pytest.raises(SpecError, match="set model.trust_repo: true"):
        testing.check_model(REGISTRIES, f"hub-local:{tmp_path}/tiny", input_shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------
# datasets: the bundled digits, image folders and FakeData load; every other torchvision dataset,
# absent from disk, is refused in one line and never downloaded


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dataset tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def image_folder(root: Path) -> Path:
    from PIL import Image

    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for n in range(2):
            Image.new("RGB", (6, 6), (n * 100, 50, 0)).save(root / label / f"{n}.png")
    return root


@pytest.mark.parametrize("name", testing.names(REGISTRIES, "dataset", plugin="runner.plugins.datasets"))
def test_every_builtin_dataset(name: str, tmp_path: Path, no_network: None) -> None:
    if name == "mnist_bundled":
        data = testing.check_dataset(REGISTRIES, name)
        assert len(data) == 5000
    elif name in ("image_folder", "torchvision:ImageFolder"):
        data = testing.check_dataset(REGISTRIES, name, options={"root": str(image_folder(tmp_path / "images"))})
        assert list(data.classes) == ["cat", "dog"]
    elif name == "torchvision:FakeData":  # torchvision's own: no targets or classes, which runner tolerates
        testing.check_dataset(REGISTRIES, name, options={"size": 6, "image_size": [1, 8, 8], "num_classes": 3}, protocol=False)
    else:
        empty = tmp_path / "empty"
        empty.mkdir()
        testing.check_dataset_refuses(REGISTRIES, name, options={"root": str(empty)})


# ------------------------------------------------------------------------------------------
# transforms: each with the options it needs; those made for other data than one image say so

TRANSFORM_OPTIONS: dict[str, dict[str, Any]] = {
    "CenterCrop": {"size": 8}, "ConvertBoundingBoxFormat": {"format": "XYXY"}, "GaussianBlur": {"kernel_size": 3},
    "JPEG": {"quality": 90}, "Normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "Pad": {"padding": 2},
    "RandomAdjustSharpness": {"sharpness_factor": 2}, "RandomAffine": {"degrees": 10}, "RandomCrop": {"size": 8},
    "RandomPosterize": {"bits": 4}, "RandomResize": {"min_size": 8, "max_size": 12}, "RandomResizedCrop": {"size": 8},
    "RandomRotation": {"degrees": 10}, "RandomShortestSize": {"min_size": 8}, "RandomSolarize": {"threshold": 100},
    "Resize": {"size": 8}, "ScaleJitter": {"target_size": [16, 16]}, "ToDtype": {"dtype": "float32", "scale": True},
    "WeightsPreset": {"model": "torchvision:resnet18"}, "SetClampingMode": {"clamping_mode": "soft"},
}
UINT8_ONLY = {"JPEG", "RandomEqualize", "RandomPosterize", "RandomSolarize"}
FLOAT_ONLY = {"GaussianNoise", "Normalize", "WeightsPreset"}
NOT_FOR_ONE_IMAGE = {
    "CutMix": "mixes a batch with its labels", "MixUp": "mixes a batch with its labels",
    "FiveCrop": "gives five images", "TenCrop": "gives ten images",
    "ToPILImage": "gives a PIL image (a step before ToImage)",
    "Compose": "takes transforms, not YAML values", "RandomApply": "takes transforms", "RandomChoice": "takes transforms",
    "RandomOrder": "takes transforms", "Lambda": "takes a Python function",
    "LinearTransformation": "needs a matrix the size of the flattened image",
    "UniformTemporalSubsample": "is for videos", "RandomIoUCrop": "needs bounding boxes",
    "SanitizeBoundingBoxes": "needs labels and bounding boxes", "SanitizeKeyPoints": "needs key points",
}
IDENTITY_ON_IMAGES = {"ClampBoundingBoxes", "ClampKeyPoints", "ConvertBoundingBoxFormat", "SetClampingMode"}
IMAGE_SHAPE = {"ElasticTransform": (3, 48, 48)}  # its displacement field is padded by 4 sigma on each side


@pytest.mark.parametrize("name", testing.names(REGISTRIES, "transform", plugin="runner.plugins.transforms"))
def test_every_builtin_transform(name: str) -> None:
    if name in NOT_FOR_ONE_IMAGE:
        pytest.skip(f"{name} {NOT_FOR_ONE_IMAGE[name]}")
    dtypes = ("uint8",) if name in UINT8_ONLY else ("float32",) if name in FLOAT_ONLY else ("uint8", "float32")
    testing.check_transform(REGISTRIES, name, options=TRANSFORM_OPTIONS.get(name), dtypes=dtypes,
                            image_shape=IMAGE_SHAPE.get(name, (3, 16, 16)))


def test_transforms_for_boxes_and_key_points_leave_plain_images_alone() -> None:
    import torch

    image = torch.rand(3, 5, 5)
    for name in sorted(IDENTITY_ON_IMAGES):
        transform = REGISTRIES.transforms.get(name)(**TRANSFORM_OPTIONS.get(name, {}))
        assert torch.equal(transform(image), image), name


# ------------------------------------------------------------------------------------------
# strategies


STRATEGY_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "full_finetune": [{}, {"lr_mult": 0.1}],
    "head_only": [{}, {"trainable": ["fc", "layer2.*"]}],
    "gradual": [{}, {"stages": [{"epochs": 2, "train": "head"}, {"epochs": 2, "train": {"last": 1}}, {"train": ["head", "stem.*"], "lr_mult": 0.1}]}],
}


@pytest.mark.parametrize("name", testing.names(REGISTRIES, "strategy", plugin="runner.plugins.strategies"))
def test_every_builtin_strategy(name: str) -> None:
    for options in STRATEGY_OPTIONS.get(name, [{}]):
        testing.check_strategy(REGISTRIES, name, options=options)
