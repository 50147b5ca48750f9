"""``extras:mixup``: MixUp and CutMix on every training batch, as a training strategy.

MixUp (Zhang et al., 2018) trains on convex combinations of two images and of their one-hot
labels; CutMix (Yun et al., 2019) pastes a patch of one image into another and mixes the labels
by the patch's area. Both regularise small-data training. The strategy mixes in
:meth:`Strategy.on_batch` and returns class-probability targets, which runner's default loss,
``CrossEntropyLoss``, accepts as they are (label smoothing included). Validation and test batches
are never mixed, and training accuracy is counted against the unmixed labels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from runner.plugin_api import SpecError, Stage, Strategy, TrainableSpec, TrainingContext


class MixUp(Strategy):
    """Mix each training batch with a shuffled copy of itself.

    :param mixup_alpha: MixUp's Beta(α, α) parameter; 0 turns MixUp off.
    :param cutmix_alpha: CutMix's Beta(α, α) parameter; 0 turns CutMix off.
    :param prob: probability that a batch is mixed at all.
    :param switch_prob: with both on, probability that a mixed batch uses CutMix rather than MixUp.
    :param train: which parameters train (``all``, ``head``, name patterns or ``{last: N}``).
    :param lr_mult: learning-rate multiplier of trainable parameters outside the head.
    """

    name = "extras:mixup"

    def __init__(self, mixup_alpha: float = 0.2, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, train: TrainableSpec = "all", lr_mult: float = 1.0) -> None:
        for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not isinstance(value, (int, float)) or value < 0:
                raise SpecError(f"training.strategy.{key} must be a number ≥ 0, got {value!r}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise SpecError("training.strategy: extras:mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        for key, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise SpecError(f"training.strategy.{key} must be in [0, 1], got {value!r}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.train, self.lr_mult = train, float(lr_mult)
        self.num_classes: int | None = None
        self._mixed_batches = 0
        self._batches = 0
        self._strength_sum = 0.0

    def setup(self, context: TrainingContext) -> None:
        self.num_classes = context.num_classes

    def stage(self, epoch: int) -> Stage:
        return Stage(trainable=self.train, backbone_lr_mult=self.lr_mult)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha,
                "prob": self.prob, "switch_prob": self.switch_prob, "train": self.train, "lr_mult": self.lr_mult}

    def on_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes is None:
            raise RuntimeError("extras:mixup: setup() must be called before on_batch() (runner does this)")
        targets = F.one_hot(labels, self.num_classes).to(torch.float32)
        self._batches += 1
        if self.prob < 1.0 and torch.rand(()).item() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        order = torch.randperm(labels.shape[0]).to(images.device)
        if use_cutmix:
            images, lam = self._cutmix(images, order, lam)
        else:
            images = lam * images + (1.0 - lam) * images[order]
        self._mixed_batches += 1
        self._strength_sum += min(lam, 1.0 - lam)
        return images, lam * targets + (1.0 - lam) * targets[order]

    @staticmethod
    def _cutmix(images: torch.Tensor, order: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        """Paste a box covering about ``1 - lam`` of the area; return the images and the exact ratio kept."""
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
        return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """``mix_fraction``: share of batches mixed; ``mix_strength``: mean weight of the minor image.

        ``mix_strength`` is ``min(λ, 1 - λ)`` averaged over mixed batches: 0 means the batches were
        left as they were, 0.5 means every image was an even blend of two.
        """
        metrics = {"mix_fraction": self._mixed_batches / self._batches if self._batches else 0.0}
        if self._mixed_batches:
            metrics["mix_strength"] = self._strength_sum / self._mixed_batches
        self._mixed_batches, self._batches, self._strength_sum = 0, 0, 0.0
        return metrics
