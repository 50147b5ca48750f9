"""runner-extras' own tests. Run them after installing the plugin:

    pip install -e ./plugins/runner-extras
    python -m pytest plugins/runner-extras/tests -q

They use only runner's public API for plugins: ``runner.plugin_api``, the testing kit
``runner.testing`` (its checks run over every name the plugin registers, and its
``runner_sandbox`` fixture runs ``runner`` commands against a store of the test's own), and the
``runner`` command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import runner_extras
from runner import testing
from runner.plugin_api import DatasetRequest, LabelledImages, ModelRequest, SpecError, TrainingContext

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shapes_mixup.yaml"

# runner's built-ins and this plugin only, whatever else is installed
REGISTRIES = testing.plugin_registries("extras")
MODELS = {name: REGISTRIES.models.get(name) for name in testing.names(REGISTRIES, "model", plugin="extras")}
DATASETS = {name: REGISTRIES.datasets.get(name) for name in testing.names(REGISTRIES, "dataset", plugin="extras")}
TRANSFORMS = {name: REGISTRIES.transforms.get(name) for name in testing.names(REGISTRIES, "transform", plugin="extras")}
STRATEGIES = {name: REGISTRIES.strategies.get(name) for name in testing.names(REGISTRIES, "strategy", plugin="extras")}


def test_the_plugin_loads_cleanly_and_every_name_carries_its_prefix() -> None:
    testing.check_plugin_loads(REGISTRIES, "extras")
    assert set(MODELS) | set(DATASETS) | set(TRANSFORMS) | set(STRATEGIES) == {
        "extras:resnet_small", "extras:npz", "extras:shapes", "extras:Cutout", "extras:PerImageStandardize", "extras:mixup"}


# ------------------------------------------------------------------------------------------
# the testing kit's checks, over every registered name (timm's way)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_passes_the_kits_checks(name: str, input_shape: tuple[int, int, int]) -> None:
    testing.check_model(REGISTRIES, name, input_shape=input_shape)  # 1 and 5 classes, head found, every parameter learns


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_passes_the_kits_checks(name: str) -> None:
    testing.check_transform(REGISTRIES, name, dtypes=("float32",))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_passes_the_kits_checks(name: str) -> None:
    testing.check_strategy(REGISTRIES, name)


def test_shapes_passes_the_kits_dataset_checks() -> None:
    testing.check_dataset(REGISTRIES, "extras:shapes", options={"n_per_class": 5, "size": 16})


def test_npz_passes_the_kits_dataset_checks_and_refuses_a_missing_file_in_one_line(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((6, 4, 4), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    testing.check_dataset(REGISTRIES, "extras:npz", options={"path": "d.npz"}, base_dir=tmp_path)
    testing.check_dataset_refuses(REGISTRIES, "extras:npz", options={"path": "gone.npz"}, base_dir=tmp_path, match="no such file")


# ------------------------------------------------------------------------------------------
# models


def test_resnet_small_blocks_option_deepens_the_network() -> None:
    build = MODELS["extras:resnet_small"]
    shallow = build(ModelRequest(name="extras:resnet_small", num_classes=3, input_shape=(1, 28, 28)))
    deep = build(ModelRequest(name="extras:resnet_small", num_classes=3, input_shape=(1, 28, 28), options={"blocks": 3}))
    assert sum(p.numel() for p in deep.parameters()) > 2 * sum(p.numel() for p in shallow.parameters())
    assert [n for n, _ in shallow.named_children()][-1] == "fc"  # the head runner's strategies find


@pytest.mark.parametrize(
    "options, message",
    [({"depth": 3}, "unknown: depth"), ({"widths": []}, "widths"), ({"blocks": 0}, "blocks"), ({"dropout": 1.5}, "dropout")],
)
def test_resnet_small_refuses_bad_options_by_name(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        MODELS["extras:resnet_small"](ModelRequest(name="extras:resnet_small", num_classes=3, options=options))


def test_resnet_small_has_no_named_weights() -> None:
    with pytest.raises(SpecError, match="no named weights"):
        MODELS["extras:resnet_small"](ModelRequest(name="extras:resnet_small", num_classes=3, weights="DEFAULT"))


# ------------------------------------------------------------------------------------------
# datasets


def shapes(**options: Any) -> Any:
    return DATASETS["extras:shapes"](DatasetRequest(name="extras:shapes", options=options))


def test_shapes_is_a_balanced_labelled_dataset_of_uint8_images() -> None:
    data = shapes(n_per_class=10, size=28)
    assert isinstance(data, LabelledImages)
    assert len(data) == 40 and list(data.classes) == ["circle", "square", "triangle", "cross"]
    assert np.bincount(np.asarray(data.targets)).tolist() == [10, 10, 10, 10]
    image, label = data[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 0
    assert image.max() > 100  # a shape is drawn, not only noise


def test_shapes_are_the_same_for_the_same_seed_and_differ_for_another() -> None:
    first, again, other = shapes(n_per_class=5, seed=3), shapes(n_per_class=5, seed=3), shapes(n_per_class=5, seed=4)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_shapes_classes_differ_in_ink() -> None:
    # a square covers more of its bounding circle than a cross does: the classes are visibly different
    data = shapes(n_per_class=50, noise=0.0)
    ink = [(data.images[np.asarray(data.targets) == k] > 0).float().mean().item() for k in range(4)]
    assert ink[1] > ink[3] and ink[0] > ink[2]


def test_shapes_refuses_unknown_options() -> None:
    with pytest.raises(SpecError, match="unknown: colour"):
        shapes(colour="red")


def npz(tmp_path: Path, **options: Any) -> Any:
    return DATASETS["extras:npz"](DatasetRequest(name="extras:npz", options=options, base_dir=str(tmp_path)))


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_npz_reads_images_in_any_layout_relative_to_the_spec(tmp_path: Path, layout: str) -> None:
    pixels = np.arange(6 * 4 * 5, dtype=np.uint8).reshape(6, 4, 5)
    stored = {"NHW": pixels, "NCHW": pixels[:, None], "NHWC": pixels[..., None]}[layout]
    np.savez(tmp_path / "data.npz", images=stored, labels=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    data = npz(tmp_path, path="data.npz")
    assert len(data) == 6 and list(data.classes) == ["a", "b", "c"]
    image, label = data[4]
    assert image.shape == (1, 4, 5) and torch.equal(image[0], torch.from_numpy(pixels[4])) and label == 1


def test_npz_converts_unit_floats_and_takes_class_names_from_the_spec(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=np.full((2, 3, 3), 0.5), y=np.array([1, 0]))
    data = npz(tmp_path, path="f.npz", images_key="x", labels_key="y", classes=["cat", "dog"])
    assert data[0][0].dtype == torch.uint8 and int(data[0][0][0, 0, 0]) == 128
    assert list(data.classes) == ["cat", "dog"]


def test_npz_refuses_pickled_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", images=np.array([object()], dtype=object), labels=np.array([0]))
    with pytest.raises(SpecError, match="cannot be read safely"):
        npz(tmp_path, path="evil.npz")


@pytest.mark.parametrize(
    "options, message",
    [({}, "path is required"), ({"path": "missing.npz"}, "no such file"), ({"path": "d.npz", "images_key": "pixels"}, "no array 'pixels'")],
)
def test_npz_errors_name_what_is_wrong(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3, 3), dtype=np.uint8), labels=np.array([0, 1]))
    with pytest.raises(SpecError, match=message):
        npz(tmp_path, **options)


# ------------------------------------------------------------------------------------------
# transforms


def test_cutout_blanks_one_square_of_the_given_size_at_most() -> None:
    torch.manual_seed(0)
    blanked = [(TRANSFORMS["extras:Cutout"](size=4)(torch.ones(1, 12, 12)) == 0).sum().item() for _ in range(50)]
    assert max(blanked) == 16  # a whole 4×4 square
    assert min(blanked) < 16  # clipped at the border sometimes, as in the paper


def test_cutout_is_random_and_p_zero_leaves_the_image_alone() -> None:
    torch.manual_seed(0)
    cutout = TRANSFORMS["extras:Cutout"](size=4, holes=2, fill=0.5)
    assert not torch.equal(cutout(torch.ones(1, 12, 12)), cutout(torch.ones(1, 12, 12)))
    image = torch.rand(1, 12, 12)
    assert torch.equal(TRANSFORMS["extras:Cutout"](p=0.0)(image), image)
    assert TRANSFORMS["extras:Cutout"].random is True


def test_cutout_refuses_bad_arguments() -> None:
    with pytest.raises(SpecError, match="size"):
        TRANSFORMS["extras:Cutout"](size=0)


def test_per_image_standardize_gives_zero_mean_unit_std_per_image_also_in_batches() -> None:
    standardize = TRANSFORMS["extras:PerImageStandardize"]()
    batch = torch.rand(4, 3, 8, 8) * torch.tensor([1.0, 5.0, 10.0, 2.0]).view(4, 1, 1, 1) + torch.arange(4.0).view(4, 1, 1, 1)
    out = standardize(batch)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.allclose(standardize(batch[2]), out[2])  # runner may apply it to one image or a whole split
    assert torch.isfinite(standardize(torch.zeros(1, 4, 4))).all()  # blank image: no division by zero


# ------------------------------------------------------------------------------------------
# strategies


def context(num_classes: int) -> TrainingContext:
    return TrainingContext(model=torch.nn.Identity(), num_classes=num_classes, class_names=tuple("abc"[:num_classes]),
                           device=torch.device("cpu"), epochs=1, train_loader=[], val_loader=[])


def test_mixup_trains_everything_by_default() -> None:
    assert STRATEGIES["extras:mixup"]().stage(1).trainable == "all"


def test_mixup_blends_images_and_labels_with_the_same_weight() -> None:
    torch.manual_seed(0)
    mixup = STRATEGIES["extras:mixup"](mixup_alpha=1.0)
    mixup.setup(context(3))
    labels = torch.tensor([0, 1, 2, 0, 2])
    images = labels.float().view(5, 1, 1, 1).expand(5, 1, 2, 2).clone()  # every pixel holds its label
    mixed, targets = mixup.on_batch(images, labels)
    assert targets.shape == (5, 3) and torch.allclose(targets.sum(1), torch.ones(5))
    # lam * (own label) + (1 - lam) * (partner's label), in pixels and in targets alike
    expected_pixels = (targets * torch.arange(3.0)).sum(1)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected_pixels, atol=1e-6)
    assert not torch.equal(mixed, images)
    metrics = mixup.epoch_metrics(1)
    assert metrics["mix_fraction"] == 1.0 and 0.0 < metrics["mix_strength"] <= 0.5
    assert mixup.epoch_metrics(2) == {"mix_fraction": 0.0}  # counters restart every epoch


def test_cutmix_pastes_a_patch_and_mixes_labels_by_its_area() -> None:
    cutmix = STRATEGIES["extras:mixup"](mixup_alpha=0.0, cutmix_alpha=1.0)
    cutmix.setup(context(2))
    images = torch.cat([torch.zeros(1, 1, 10, 10), torch.ones(1, 1, 10, 10)])
    pasted = 0
    for seed in range(10):
        torch.manual_seed(seed)
        mixed, targets = cutmix.on_batch(images, torch.tensor([0, 1]))
        for i in range(2):
            own_share = mixed[i].eq(float(i)).float().mean().item()  # pixels still its own
            assert targets[i, i].item() == pytest.approx(own_share)
            pasted += own_share < 1.0
    assert pasted  # some seeds did paste a patch from the other image


def test_mixup_with_prob_zero_changes_nothing_but_the_label_format() -> None:
    mixup = STRATEGIES["extras:mixup"](prob=0.0)
    mixup.setup(context(3))
    images = torch.rand(4, 1, 5, 5)
    mixed, targets = mixup.on_batch(images, torch.tensor([0, 1, 2, 1]))
    assert torch.equal(mixed, images)
    assert torch.equal(targets, torch.eye(3)[[0, 1, 2, 1]])


def test_mixup_needs_setup_and_valid_options() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        STRATEGIES["extras:mixup"]().on_batch(torch.rand(2, 1, 3, 3), torch.tensor([0, 1]))
    with pytest.raises(SpecError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        STRATEGIES["extras:mixup"](mixup_alpha=0.0)
    with pytest.raises(SpecError, match="prob"):
        STRATEGIES["extras:mixup"](prob=2)


# ------------------------------------------------------------------------------------------
# end to end, through the installed plugin


def runner_cli(*args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_end_to_end_runner_lists_the_plugin_names_with_distribution_and_version(tmp_path: Path) -> None:
    result = runner_cli("plugins", "--plugin", "extras", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["names"]}
    assert set(rows) == {*MODELS, *DATASETS, *TRANSFORMS, *STRATEGIES}, "is runner-extras installed? (pip install -e .)"
    assert {(r["distribution"], r["version"]) for r in rows.values()} == {("runner-extras", runner_extras.__version__)}


def test_end_to_end_example_spec_trains_one_epoch_to_completed(runner_sandbox: testing.Sandbox) -> None:
    runner_sandbox.load("extras")
    result = runner_sandbox.cli("run", EXAMPLE, "--set", "training.epochs=1", "-q")
    assert result.exit_code == 0, result.err
    details = runner_sandbox.cli("show", result.out.strip(), "--format", "json").json()
    assert details["status"] == "completed"
    assert {"distribution": "runner-extras", "version": runner_extras.__version__, "plugin": "extras"} in details["plugins"]
