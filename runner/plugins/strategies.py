"""Built-in training strategies: full fine-tuning, head-only transfer, gradual unfreezing."""

from __future__ import annotations

from typing import Any, Callable

from runner.errors import SpecError
from runner.hookspecs import hookimpl
from runner.interfaces import Stage, Strategy


def learning_rate_multiplier(value: Any, key: str) -> float:
    """A backbone learning-rate multiplier: a number ≥ 0 (0 freezes the backbone's updates but keeps its gradients)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SpecError(f"{key}: must be a number ≥ 0, got {value!r}")
    return float(value)


class FullFinetune(Strategy):
    """Every parameter trains; ``lr_mult`` scales the backbone's learning rate (discriminative LRs)."""

    name = "full_finetune"

    def __init__(self, lr_mult: float = 1.0) -> None:
        self.lr_mult = learning_rate_multiplier(lr_mult, "training.strategy.lr_mult")

    def stage(self, epoch: int) -> Stage:
        return Stage(trainable="all", backbone_lr_mult=self.lr_mult)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lr_mult": self.lr_mult}


class HeadOnly(Strategy):
    """Only the classification head trains (for VGG the whole ``classifier``, as in the seed article).

    ``trainable`` (a list of parameter-name patterns such as ``[classifier.6]``) overrides the head.
    """

    name = "head_only"

    def __init__(self, trainable: list[str] | None = None) -> None:
        if trainable is not None and (not isinstance(trainable, list) or not trainable):
            raise SpecError("training.strategy.trainable must be a non-empty list of parameter name patterns")
        self.trainable = trainable

    def stage(self, epoch: int) -> Stage:
        return Stage(trainable=self.trainable or "head")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable or "head"}


class Gradual(Strategy):
    """Stages of epochs, e.g. the head for 2 epochs, then everything at a tenth of the backbone LR.

    ``stages: [{epochs: 2, train: head}, {train: all, lr_mult: 0.1}]``; ``train`` is ``head``,
    ``all``, a list of name patterns or ``{last: N}`` (the head and the last N backbone blocks). The
    last stage may omit ``epochs`` and lasts until training ends (like fastai's ``fine_tune``).
    """

    name = "gradual"

    def __init__(self, stages: list[dict[str, Any]] | None = None) -> None:
        stages = stages or [{"epochs": 1, "train": "head"}, {"train": "all", "lr_mult": 0.1}]
        self.stages: list[tuple[int | None, Stage]] = []
        for i, raw in enumerate(stages):
            unknown = set(raw) - {"epochs", "train", "lr_mult"}
            if unknown:
                raise SpecError(f"training.strategy.stages[{i}]: unknown keys {sorted(unknown)} (epochs, train, lr_mult)")
            epochs = raw.get("epochs")
            if epochs is None and i != len(stages) - 1:
                raise SpecError(f"training.strategy.stages[{i}]: only the last stage may omit 'epochs'")
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
                raise SpecError(f"training.strategy.stages[{i}].epochs: must be a whole number of epochs, at least 1, got {epochs!r}")
            lr_mult = learning_rate_multiplier(raw.get("lr_mult", 1.0), f"training.strategy.stages[{i}].lr_mult")
            self.stages.append((epochs, Stage(trainable=raw.get("train", "all"), backbone_lr_mult=lr_mult)))

    def stage(self, epoch: int) -> Stage:
        end = 0
        for epochs, stage in self.stages:
            if epochs is None:
                return stage
            end += int(epochs)
            if epoch <= end:
                return stage
        return self.stages[-1][1]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stages": [{"epochs": e, "train": s.trainable, "lr_mult": s.backbone_lr_mult} for e, s in self.stages]}


@hookimpl
def runner_register_strategies(register: Callable[[str, Any], None]) -> None:
    register("full_finetune", FullFinetune)
    register("head_only", HeadOnly)
    register("gradual", Gradual)
