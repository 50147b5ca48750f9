"""Torch's own optimizers, learning-rate schedulers and losses, by name, checked and built.

These are not plugins: any class torch exports is usable by its name (``AdamW``, ``OneCycleLR``,
``CrossEntropyLoss``) with its own keyword arguments, which are checked against its signature
before anything is built.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from runner.errors import SpecError
from runner.interfaces import Stage
from runner.models import head_names
from runner.spec import Spec

# ------------------------------------------------------------------------------------------
# The tables


def _subclasses_in(module: Any, base: type, names: list[str]) -> dict[str, type]:
    found = {}
    for name in names:
        obj = getattr(module, name, None)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
            found[name] = obj
    return found


def optimizers() -> dict[str, type]:
    return _subclasses_in(torch.optim, torch.optim.Optimizer, list(torch.optim.__all__))


def schedulers() -> dict[str, type]:
    sched = torch.optim.lr_scheduler
    table = _subclasses_in(sched, sched.LRScheduler, list(sched.__all__))
    table["ReduceLROnPlateau"] = sched.ReduceLROnPlateau
    return table


def losses() -> dict[str, type]:
    return {n: c for n, c in _subclasses_in(nn, nn.Module, list(nn.modules.loss.__all__)).items() if n.endswith("Loss")}


def lookup(table: dict[str, type], name: str, what: str, key: str) -> type:
    if name in table:
        return table[name]
    matches = difflib.get_close_matches(name, list(table), n=1)
    hint = f"; did you mean {matches[0]!r}?" if matches else ""
    raise SpecError(f"{key}: unknown {what} {name!r}{hint}")


def check_arguments(target: Any, options: dict[str, Any], key: str, skip: tuple[str, ...] = ()) -> None:
    """Unknown keyword arguments are spec errors with a "did you mean", before anything is built."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n not in skip and n != "self"]
    for name in options:
        if name not in accepted:
            matches = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {matches[0]!r}?" if matches else f" (accepted: {', '.join(accepted)})"
            raise SpecError(f"unknown key '{key}.{name}'{hint}")


def check_training_names(spec: Spec) -> None:
    """The optimizer, scheduler and loss exist, take the spec's arguments, and can be built with their values."""
    t = spec.training
    check_arguments(lookup(optimizers(), t.optimizer.name, "optimizer", "training.optimizer.name"), t.optimizer.options,
                    "training.optimizer", skip=("params",))
    if t.scheduler is not None:
        check_arguments(lookup(schedulers(), t.scheduler.name, "scheduler", "training.scheduler.name"), t.scheduler.options,
                        "training.scheduler", skip=("optimizer",))
    check_arguments(lookup(losses(), t.loss.name, "loss", "training.loss.name"), t.loss.options, "training.loss")
    check_buildable(spec)


def _built(key: str, name: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise SpecError(f"{key}: {name} does not work with these arguments ({type(exc).__name__}: {exc})") from None


def _step_once(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    optimizer.step()  # no gradients: changes nothing, but the scheduler then steps as it will after an epoch
    scheduler.step(0.0) if steps_on_metric(scheduler) else scheduler.step()


def check_buildable(spec: Spec) -> None:
    """Build the optimizer, scheduler and loss once, on a stand-in parameter, and step them: values of
    the wrong type or range (``betas: 5``, ``lr: "fast"``, ``lr: .nan``) fail here, before any run exists."""
    t = spec.training
    lr = learning_rate(spec)
    stand_in = nn.Parameter(torch.zeros(1))
    optimizer = _built("training.optimizer", t.optimizer.name, lambda: optimizer_for(spec, [{"params": [stand_in], "lr": lr}]))
    if t.scheduler is not None:
        scheduler = _built("training.scheduler", t.scheduler.name, lambda: build_scheduler(spec, optimizer))
        _built("training.scheduler", t.scheduler.name, lambda: _step_once(optimizer, scheduler))
    _built("training.loss", t.loss.name, lambda: build_loss(spec, torch.device("cpu")))


# ------------------------------------------------------------------------------------------
# Building them for a stage of training


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


def learning_rate(spec: Spec) -> float:
    """The optimizer's base learning rate (the spec's ``lr``, else the optimizer's default): a finite number >= 0."""
    options = spec.training.optimizer.options
    cls = optimizers()[spec.training.optimizer.name]
    value = options.get("lr", cls.__init__.__defaults__[0] if cls.__init__.__defaults__ else 1e-3)
    try:
        lr = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        lr = math.nan
    if not (math.isfinite(lr) and lr >= 0):
        raise SpecError(f"training.optimizer.lr: must be a finite number >= 0, got {value!r}")
    return lr


def optimizer_for(spec: Spec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The spec's optimizer over these parameter groups (each with its ``lr``) and the spec's other arguments."""
    options = spec.training.optimizer.options
    return optimizers()[spec.training.optimizer.name](groups, **{k: v for k, v in options.items() if k != "lr"})


def build_optimizer(spec: Spec, model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    groups = param_groups(model, stage, learning_rate(spec))
    if not groups:
        raise ValueError("no parameter is trainable in this stage")
    return optimizer_for(spec, groups)


def build_scheduler(spec: Spec, optimizer: torch.optim.Optimizer) -> Any:
    if spec.training.scheduler is None:
        return None
    return schedulers()[spec.training.scheduler.name](optimizer, **spec.training.scheduler.options)


def build_loss(spec: Spec, device: torch.device) -> nn.Module:
    options = dict(spec.training.loss.options)
    if isinstance(options.get("weight"), list):  # class weights given in YAML
        options["weight"] = torch.tensor(options["weight"], dtype=torch.float32, device=device)
    return losses()[spec.training.loss.name](**options)


def steps_on_metric(scheduler: Any) -> bool:
    """ReduceLROnPlateau steps on the monitored metric; every other scheduler once per epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


__all__ = [
    "optimizers", "schedulers", "losses", "lookup", "check_arguments", "check_training_names", "check_buildable",
    "param_groups", "learning_rate", "optimizer_for", "build_optimizer", "build_scheduler", "build_loss", "steps_on_metric",
]
