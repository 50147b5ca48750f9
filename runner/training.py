"""The training loop, readable top to bottom: stage → train epoch → validate → record → stop?"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from runner.build import Prepared, losses, optimizers, schedulers
from runner.interfaces import Stage
from runner.models import freeze, head_names, select_trainable, set_train_mode
from runner.spec import EarlyStoppingSpec, Spec


class Recorder(Protocol):
    """Where the loop reports progress (the results store, in practice)."""

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None: ...

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None: ...


# ------------------------------------------------------------------------------------------
# Optimizer, scheduler, loss


def param_groups(model: nn.Module, stage: Stage, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters split into head and backbone groups, the backbone at ``lr * mult``."""
    heads = tuple(f"{h}." for h in head_names(model))
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(heads) else backbone).append(param)
    groups = [{"params": head, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * stage.backbone_lr_mult})
    return [g for g in groups if g["params"]]


def build_optimizer(spec: Spec, model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    options = spec.training.optimizer.options
    cls = optimizers()[spec.training.optimizer.name]
    lr = float(options.get("lr", cls.__init__.__defaults__[0] if cls.__init__.__defaults__ else 1e-3))
    groups = param_groups(model, stage, lr)
    if not groups:
        raise ValueError("no parameter is trainable in this stage")
    return cls(groups, **{k: v for k, v in options.items() if k != "lr"})


def build_scheduler(spec: Spec, optimizer: torch.optim.Optimizer) -> Any:
    if spec.training.scheduler is None:
        return None
    return schedulers()[spec.training.scheduler.name](optimizer, **spec.training.scheduler.options)


def build_loss(spec: Spec, device: torch.device) -> nn.Module:
    options = dict(spec.training.loss.options)
    if isinstance(options.get("weight"), list):  # class weights given in YAML
        options["weight"] = torch.tensor(options["weight"], dtype=torch.float32, device=device)
    return losses()[spec.training.loss.name](**options)


# ------------------------------------------------------------------------------------------
# Early stopping


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    @classmethod
    def from_spec(cls, spec: EarlyStoppingSpec | None) -> "EarlyStopping":
        if spec is None:  # still tracks the best epoch (for the best checkpoint), never stops
            return cls(monitor="val_accuracy", mode="max", patience=math.inf)  # type: ignore[arg-type]
        return cls(monitor=spec.monitor, mode=spec.resolved_mode, patience=spec.patience, min_delta=spec.min_delta)

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch; True when it is the new best."""
        value = metrics[self.monitor]
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# ------------------------------------------------------------------------------------------
# One epoch


def _logits(output: Any) -> torch.Tensor:
    # Inception/GoogLeNet return (logits, aux…) namedtuples in train mode
    return output.logits if hasattr(output, "logits") else output


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    grad_clip: float | None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    progress: Any = None,
) -> dict[str, float]:
    # sums stay on the device: no host sync (.item()) inside the loop
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images, targets = on_batch(images, labels)
        optimizer.zero_grad(set_to_none=True)
        logits = _logits(model(images))
        loss = loss_fn(logits, targets)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = labels.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
        if progress is not None:
            progress.update(1)
    return {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: nn.Module, device: torch.device, num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    seen = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = _logits(model(images))
        loss_sum += loss_fn(logits, labels) * labels.shape[0]
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        seen += labels.shape[0]
    matrix = confusion.view(num_classes, num_classes).cpu()
    true_pos = matrix.diag().double()
    precision = true_pos / matrix.sum(0).clamp(min=1)
    recall = true_pos / matrix.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return {
        "loss": loss_sum.item() / seen,
        "accuracy": true_pos.sum().item() / seen,
        "f1_macro": f1.mean().item(),
        "confusion": matrix.tolist(),
    }


# ------------------------------------------------------------------------------------------
# Checkpoints


def save_atomically(payload: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def training_state(epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, stopper: EarlyStopping) -> dict[str, Any]:
    """Everything needed to continue a run after ``epoch``: the last checkpoint."""
    import random

    import numpy as np

    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "early_stopping": stopper.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }


# ------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    epochs_run: int
    stop_reason: str
    best_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)


def apply_stage(model: nn.Module, stage: Stage) -> None:
    freeze(model, select_trainable(model, stage.trainable))


def fit(prepared: Prepared, recorder: Recorder, run_dir: Path, progress_factory: Callable[[int, str], Any] | None = None) -> FitResult:
    spec, model, device = prepared.spec, prepared.model, prepared.device
    model.to(device)
    loss_fn = build_loss(spec, device)
    stopper = EarlyStopping.from_spec(spec.training.early_stopping)
    epochs = spec.training.epochs
    stage: Stage | None = None
    optimizer: Any = None
    scheduler: Any = None
    history: list[dict[str, float]] = []
    stop_reason = f"completed {epochs} epochs"
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"

    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        next_stage = prepared.strategy.stage(epoch)
        if next_stage != stage:  # a new stage freezes/unfreezes and starts a fresh optimizer
            stage = next_stage
            apply_stage(model, stage)
            optimizer = build_optimizer(spec, model, stage)
            scheduler = build_scheduler(spec, optimizer)
        set_train_mode(model)
        progress = progress_factory(len(prepared.train_loader), f"epoch {epoch}/{epochs}") if progress_factory else None
        train = train_one_epoch(
            model, prepared.train_loader, optimizer, loss_fn, device, spec.training.grad_clip,
            prepared.strategy.on_batch, progress,
        )
        val = evaluate(model, prepared.val_loader, loss_fn, device, len(prepared.class_names))
        metrics = {"train_loss": train["loss"], "train_accuracy": train["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_acc=f"{metrics['val_accuracy']:.4f}")
            progress.close()
        if scheduler is not None:
            scheduler.step(metrics[stopper.monitor]) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
        history.append(metrics)

        if stopper.update(epoch, metrics):
            save_atomically(model.state_dict(), best_path)
            recorder.checkpoint_saved("best", epoch, best_path)
        save_atomically(training_state(epoch, model, optimizer, scheduler, stopper), last_path)
        recorder.checkpoint_saved("last", epoch, last_path)
        best_val = max(h["val_accuracy"] for h in history)
        recorder.epoch_done(epoch, metrics, time.perf_counter() - started, stopper.best_epoch, best_val)
        if stopper.should_stop:
            stop_reason = f"early stopping: {stopper.monitor} did not improve for {stopper.patience} epochs"
            break

    restore_best = spec.training.early_stopping is not None and spec.training.early_stopping.restore_best
    if restore_best and stopper.best_epoch is not None and stopper.best_epoch != len(history):
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    test = evaluate(model, prepared.test_loader, loss_fn, device, len(prepared.class_names))
    return FitResult(epochs_run=len(history), stop_reason=stop_reason, best_epoch=stopper.best_epoch, history=history, test=test)
