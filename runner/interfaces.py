"""The types that cross the plugin boundary: what builders receive and what strategies return.

Torch is only imported for type checking here, so the hookspecs stay importable by commands that
never train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelRequest:
    """What a model builder is asked to build.

    :param name: the registered name (or, for a family such as ``hub:*``, the full name asked for).
    :param num_classes: size of the classification head.
    :param input_shape: ``(channels, height, width)`` of one input image after the eval transforms.
    :param options: the spec's ``model.options`` mapping, passed through unchanged.
    :param weights: a builder-level weights name (e.g. torchvision's ``"IMAGENET1K_V1"``), or None.
        Weights from files or earlier runs are loaded by the runner after the builder returns.
    :param trust_repo: whether the spec trusts remote code (torch.hub).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int] = (3, 224, 224)
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    trust_repo: bool = False


@dataclass(frozen=True)
class NamedWeights:
    """Pretrained weights a model builder offers by name: what ``model.weights: NAME`` resolves to.

    A builder offers named weights with two attributes: ``builder.weights_names() -> list[str]``
    (listed by ``runner models``) and ``builder.named_weights(name) -> NamedWeights`` (raising
    :class:`SpecError` for a name it does not offer). The runner records ``source`` and the sha256 of
    ``path`` with every run, and passes the name to the builder in :attr:`ModelRequest.weights`.

    :param name: the weights' own name (``DEFAULT`` resolved to the one it stands for).
    :param source: what the run records as the weights' origin (``torchvision:ResNet18_Weights.IMAGENET1K_V1``).
    :param path: the local file the builder loads them from, or None when they are not one file.
    :param fetch: makes ``path`` exist (a download), called before a run is planned; None when the
        builder cannot fetch them (then a missing ``path`` is an error naming it).
    """

    name: str
    source: str
    path: str | None = None
    fetch: Callable[[], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DatasetRequest:
    """What a dataset builder is asked to load.

    :param name: the registered dataset name.
    :param options: the spec's ``data.options`` mapping (e.g. ``root``, ``train``).
    :param base_dir: directory of the spec file, for resolving relative paths.
    :param on_corrupt: the spec's ``data.on_corrupt``: ``"error"`` (refuse a dataset with an
        unreadable image, naming the file) or ``"skip"`` (leave such images out and count them).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."
    on_corrupt: Literal["error", "skip"] = "error"


@runtime_checkable
class LabelledImages(Protocol):
    """A map-style dataset of ``(image, label)`` with one target per sample and class names."""

    targets: Sequence[int]
    classes: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, int]: ...


TrainableSpec = Union[Literal["all", "head"], Sequence[str], dict]


@dataclass(frozen=True)
class Stage:
    """Which parameters train during a span of epochs, and at what learning rates.

    :param trainable: ``"all"``, ``"head"`` (the model's classification head), a list of parameter
        name patterns (``"classifier.6"`` or ``"layer4.*"``), or ``{"last": N}`` for the head plus the
        last N top-level blocks of the backbone.
    :param backbone_lr_mult: learning-rate multiplier for trainable parameters outside the head
        (discriminative learning rates).
    """

    trainable: TrainableSpec = "all"
    backbone_lr_mult: float = 1.0


@dataclass(frozen=True)
class TrainingContext:
    """What a strategy may see of the run it is about to train, given once to :meth:`Strategy.setup`.

    :param model: the model, already on ``device``, head sized and weights loaded.
    :param num_classes: number of classes (the width of the logits and of soft targets).
    :param class_names: one name per label ``0 .. num_classes - 1``.
    :param device: where batches and the model live.
    :param epochs: the number of epochs the spec asks for.
    :param train_loader: batches of ``(images, labels)`` for training (labels are class indices).
    :param val_loader: batches of ``(images, labels)`` the runner validates on after each epoch.
    """

    model: "torch.nn.Module"
    num_classes: int
    class_names: tuple[str, ...]
    device: "torch.device"
    epochs: int
    train_loader: Iterable[Any]
    val_loader: Iterable[Any]


class Strategy:
    """Decides what trains, epoch by epoch. Subclass and override :meth:`stage`.

    The runner asks for the stage at every epoch; when it changes, parameters are frozen or
    unfrozen, frozen BatchNorm layers are put in eval mode and the optimizer and scheduler are
    rebuilt (the stage is the optimizer factory's input). Because the stage is a function of the
    epoch, resuming needs no extra state. The runner calls, in order: :meth:`setup` once,
    then per epoch :meth:`stage`, :meth:`on_batch` for every training batch, and
    :meth:`epoch_metrics` after validation.
    """

    name: str = "strategy"

    def setup(self, context: TrainingContext) -> None:
        """Called once before the first epoch (and again when a run resumes); the default does nothing."""

    def stage(self, epoch: int) -> Stage:  # epoch counts from 1
        return Stage()

    def describe(self) -> dict[str, Any]:
        """What the run records about this strategy."""
        return {"name": self.name}

    def on_batch(self, images: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Transform one training batch; the default leaves it alone.

        The returned targets go to the loss as they are, so they may be class indices or, with
        ``CrossEntropyLoss``, class probabilities of shape ``(batch, num_classes)`` (MixUp, CutMix).
        Training accuracy is always counted against the original ``labels``.
        """
        return images, labels

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """Extra metrics stored with this epoch (e.g. a MixUp strategy's mean mixing weight).

        Names the runner already records (``train_loss``, ``val_accuracy``, …) are ignored.
        """
        return {}


ModelBuilder = Callable[[ModelRequest], Any]
DatasetBuilder = Callable[[DatasetRequest], LabelledImages]
TransformBuilder = Callable[..., Callable[[Any], Any]]
StrategyBuilder = Callable[..., Strategy]

# The ``register`` callback each registration hook receives: ``register(name, builder)``.
RegisterModel = Callable[[str, ModelBuilder], None]
RegisterDataset = Callable[[str, DatasetBuilder], None]
RegisterTransform = Callable[[str, TransformBuilder], None]
RegisterStrategy = Callable[[str, StrategyBuilder], None]
