"""The training loop, readable top to bottom: stage → train epoch → validate → record → stop?"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from runner import feature_cache, rng
from runner.build import RunParts
from runner.distributed import ONE_PROCESS, Collective
from runner.interfaces import Stage, Strategy, TrainingContext
from runner.lifecycle import signals_deferred
from runner.models import freeze, select_trainable, set_train_mode
from runner.optim import build_loss, build_optimizer, build_scheduler, steps_on_metric
from runner.performance import DEFAULT as PLAIN, Performance
from runner.plan import RunPlan
from runner.spec import EarlyStoppingSpec
from runner.tensor_files import load_tensors, save_tensors


class Recorder(Protocol):
    """Where the loop reports progress (the results store, in practice)."""

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None: ...

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None: ...

    def check_owner(self) -> None:
        """Raise when this process may no longer write the run (another one took it over): called
        right before a checkpoint file replaces the previous one."""


class TrainingDiverged(RuntimeError):
    """A loss or metric of an epoch is NaN or infinite; the message names it, the epoch and the batch."""


DIVERGED_HINT = "lower the learning rate, or set training.grad_clip"


def check_finite(epoch: int, metrics: dict[str, float], first_bad_batch: int | None, validation: str) -> None:
    """Stop a run whose training loss is not a finite number; its validation metrics too unless ``validation`` is ``continue``.

    The epoch's metrics are stored before this check (non-finite values as null), its checkpoint is not.
    """
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        value = metrics[name]
        if math.isfinite(value) or (name.startswith("val_") and validation == "continue"):
            continue
        where = f"epoch {epoch}" + (f", batch {first_bad_batch}" if name == "train_loss" and first_bad_batch else "")
        also = " (or training.nonfinite_validation: continue to go on)" if name.startswith("val_") else ""
        raise TrainingDiverged(f"{name} is {value} at {where}: {DIVERGED_HINT}{also}")


class SilentRecorder:
    """The recorder of a process that records nothing: the ranks other than 0 of a distributed run."""

    def epoch_done(self, epoch: int, metrics: dict[str, float], duration_s: float, best_epoch: int | None, best_val_accuracy: float | None) -> None:
        pass

    def checkpoint_saved(self, kind: str, epoch: int, path: Path) -> None:
        pass


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
    speed: Performance = PLAIN,
    scaler: Any = None,
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] = ONE_PROCESS.sum,
) -> dict[str, float]:
    """One pass over ``loader``; ``speed`` adds autocast and the memory format, ``scaler`` fp16 loss scaling.

    ``reduce`` adds the sums of the other processes of a distributed run (each passed over its shard).
    """
    # sums stay on the device: no host sync (.item()) inside the loop
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    losses = []  # each batch's loss, looked at only when the epoch's is not finite
    for images, labels in loader:
        images = speed.batch_to(images, device)
        labels = labels.to(device, non_blocking=True)
        images, targets = on_batch(images, labels)
        optimizer.zero_grad(set_to_none=True)
        with speed.autocast(device):
            logits = _logits(model(images))
            loss = loss_fn(logits, targets)
        if scaler is None:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        n = labels.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
        losses.append(loss.detach())
        if progress is not None:
            progress.update(1)
    loss_sum, correct, count = reduce([loss_sum, correct, torch.tensor(seen, device=device)])
    seen = int(count.item())
    result = {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen}
    if not math.isfinite(result["loss"]):  # this process's first bad batch (another rank's, when it has none)
        bad = (~torch.isfinite(torch.stack(losses))).nonzero()
        result["first_nonfinite_batch"] = int(bad[0]) + 1 if len(bad) else 0
    return result


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: nn.Module, device: torch.device, num_classes: int,
             reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] = ONE_PROCESS.sum) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted).

    Mixed precision applies when called inside an autocast context; a channels_last model gets its
    batches converted by the convolutions themselves, with the same numbers. ``reduce`` adds the
    loss sums, counts and confusion matrices of the other processes of a distributed run, so the
    metrics are those of the whole split.
    """
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    seen = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = _logits(model(images))
        loss_sum += loss_fn(logits, labels).float() * labels.shape[0]
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        seen += labels.shape[0]
    loss_sum, confusion, count = reduce([loss_sum, confusion, torch.tensor(seen, device=device)])
    seen = int(count.item())
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


def training_state(
    epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, stopper: EarlyStopping,
    history: list[dict[str, float]] | None = None, train_loader: Any = None,
) -> dict[str, Any]:
    """Everything needed to continue a run after ``epoch``: the last checkpoint.

    Only tensors and plain Python values, so that it loads with ``weights_only=True``. The train
    loader's generator state makes the shuffling of the following epochs continue as it would have.
    """
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "early_stopping": stopper.state_dict(),
        "history": [dict(h) for h in history or []],
        "rng": rng.global_state(train_loader),
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


def training_context(run_plan: RunPlan, parts: RunParts) -> TrainingContext:
    """What :meth:`Strategy.setup` sees: the model, the classes, the device and the loaders."""
    return TrainingContext(
        model=parts.model, num_classes=run_plan.num_classes, class_names=tuple(run_plan.data.class_names),
        device=parts.device, epochs=run_plan.spec.training.epochs,
        train_loader=parts.train_loader, val_loader=parts.val_loader,
    )


def strategy_metrics(strategy: Strategy, epoch: int, recorded: dict[str, float]) -> dict[str, float]:
    """A strategy's own epoch metrics; it may add names but never overwrite the runner's."""
    return {str(k): float(v) for k, v in strategy.epoch_metrics(epoch).items() if k not in recorded}


def restore_training_state(
    state: dict[str, Any], run_plan: RunPlan, parts: RunParts, stopper: EarlyStopping, history: list[dict[str, float]],
) -> tuple[Stage, Any, Any]:
    """Model, stage, optimizer, scheduler, early stopping, history and RNGs as they were after ``state['epoch']``.

    The stage comes from the strategy (a function of the epoch). A scheduler writes its starting
    learning rate into the optimizer when it is built (OneCycleLR, warm-ups), so the optimizer's
    state is loaded after the scheduler exists, then the scheduler's own. The RNGs are restored
    last, so nothing done here shifts the random numbers the next epoch draws.
    """
    spec, model = run_plan.spec, parts.model
    stage = parts.strategy.stage(int(state["epoch"]))
    apply_stage(model, stage)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(spec, model, stage)
    scheduler = build_scheduler(spec, optimizer)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["early_stopping"])
    history.extend(dict(h) for h in state["history"])
    rng.restore_global_state(state["rng"], parts.train_loader)
    return stage, optimizer, scheduler


def save_checkpoint(recorder: Recorder, kind: str, epoch: int, payload: Any, path: Path) -> None:
    """Write a checkpoint file, replacing the previous one only while this process still owns the run, and record it."""
    save_tensors(payload, path, before_replace=recorder.check_owner)
    recorder.checkpoint_saved(kind, epoch, path)


def early_stop_reason(stopper: EarlyStopping) -> str:
    return f"early stopping: {stopper.monitor} did not improve for {stopper.patience} epochs"


def fit(
    run_plan: RunPlan, parts: RunParts, recorder: Recorder, run_dir: Path,
    progress_factory: Callable[[int, str], Any] | None = None, resume_from: dict[str, Any] | None = None,
    collective: Collective = ONE_PROCESS,
) -> FitResult:
    """Train, validate and checkpoint epoch by epoch, then evaluate on the test split.

    ``resume_from`` (a run's last checkpoint, see :func:`training_state`) continues after its epoch
    exactly as the run would have gone on. In a distributed run (``collective``) every rank trains
    its shard through DistributedDataParallel, metrics are summed over the ranks, every rank takes
    rank 0's decisions, and only rank 0 records and writes checkpoints.
    """
    spec, model, device, strategy = run_plan.spec, parts.model, parts.device, parts.strategy
    num_classes = run_plan.num_classes
    model.to(device)
    strategy.setup(training_context(run_plan, parts))
    loss_fn = build_loss(spec, device)
    # what the loop feeds: the model on images, or only its head on cached backbone features
    net, train_loader, val_loader, test_loader = model, parts.train_loader, parts.val_loader, parts.test_loader
    if run_plan.feature_cache.enabled:
        cached = feature_cache.build(run_plan, parts, run_dir.parent / ".feature_cache", collective)
        net, train_loader, val_loader, test_loader = cached.head, cached.train_loader, cached.val_loader, cached.test_loader
    speed = run_plan.performance  # AMP, memory format, torch.compile: decided by the plan
    net, scaler = speed.compiled(net), speed.new_grad_scaler(device)
    stopper = EarlyStopping.from_spec(spec.training.early_stopping)
    epochs = spec.training.epochs
    stage: Stage | None = None
    optimizer: Any = None
    scheduler: Any = None
    history: list[dict[str, float]] = []
    stop_reason = f"completed {epochs} epochs"
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    first_epoch = 1
    trained = net  # what the optimizer steps through: DistributedDataParallel around `net` in a distributed run
    if resume_from is not None:
        stage, optimizer, scheduler = restore_training_state(resume_from, run_plan, parts, stopper, history)
        trained = collective.wrap(net)
        first_epoch = int(resume_from["epoch"]) + 1
        if stopper.should_stop:  # it had stopped early: only the test evaluation was left
            first_epoch, stop_reason = epochs + 1, early_stop_reason(stopper)

    for epoch in range(first_epoch, epochs + 1):
        started = time.perf_counter()
        next_stage = strategy.stage(epoch)
        if next_stage != stage:  # a new stage freezes/unfreezes and starts a fresh optimizer
            stage = next_stage
            apply_stage(model, stage)
            trained = collective.wrap(net)  # over the parameters that train now
            optimizer = build_optimizer(spec, model, stage)
            scheduler = build_scheduler(spec, optimizer)
        collective.start_epoch(epoch, train_loader, spec.seed)
        set_train_mode(model)
        progress = progress_factory(len(train_loader), f"epoch {epoch}/{epochs}") if progress_factory else None
        train = train_one_epoch(
            trained, train_loader, optimizer, loss_fn, device, spec.training.grad_clip,
            strategy.on_batch, progress, speed=speed, scaler=scaler, reduce=collective.sum,
        )
        collective.share_buffers(model)
        with speed.autocast(device):
            val = evaluate(net, val_loader, loss_fn, device, num_classes, reduce=collective.sum)
        metrics = {"train_loss": train["loss"], "train_accuracy": train["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        metrics.update(strategy_metrics(strategy, epoch, metrics))
        metrics = collective.from_rank0(lambda: metrics)  # early stopping and schedulers decide alike on every rank
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_acc=f"{metrics['val_accuracy']:.4f}")
            progress.close()
        if scheduler is not None:
            scheduler.step(metrics[stopper.monitor]) if steps_on_metric(scheduler) else scheduler.step()
        history.append(metrics)

        # A stop signal waits until the epoch is recorded whole. The store hears of an epoch before
        # its checkpoint exists: after a crash it may be one epoch ahead (resume deletes that
        # epoch's rows), never behind.
        with signals_deferred():
            improved = stopper.update(epoch, metrics)
            if collective.is_writer:  # one process writes a run: rank 0 of a distributed one
                best_val = max(h["val_accuracy"] for h in history)
                recorder.epoch_done(epoch, metrics, time.perf_counter() - started, stopper.best_epoch, best_val)
            # every rank holds rank 0's metrics: all of them stop here alike
            check_finite(epoch, metrics, train.get("first_nonfinite_batch"), spec.training.nonfinite_validation)
            if collective.is_writer:
                if improved:
                    save_checkpoint(recorder, "best", epoch, model.state_dict(), best_path)
                save_checkpoint(recorder, "last", epoch, training_state(epoch, model, optimizer, scheduler, stopper, history, parts.train_loader),
                                last_path)
                if spec.checkpoints.keep == "all":  # one model state dict per epoch, kept after the run
                    save_checkpoint(recorder, f"epoch-{epoch:03d}", epoch, model.state_dict(), run_dir / f"epoch-{epoch:03d}.pt")
        if stopper.should_stop:
            stop_reason = early_stop_reason(stopper)
            break

    restore_best = spec.training.early_stopping is not None and spec.training.early_stopping.restore_best
    if restore_best and stopper.best_epoch is not None and stopper.best_epoch != len(history):
        model.load_state_dict(collective.from_rank0(lambda: load_tensors(best_path, f"best checkpoint {best_path}")))
    with speed.autocast(device):
        test = evaluate(net, test_loader, loss_fn, device, num_classes, reduce=collective.sum)
    return FitResult(epochs_run=len(history), stop_reason=stop_reason, best_epoch=stopper.best_epoch, history=history, test=test)
