"""A runner plugin for tests/test_distributed.py: each rank of a distributed run writes what it saw.

Installed by the tests as a distribution in a temporary folder put on ``PYTHONPATH``, so torchrun's
worker processes load it like any plugin. Records go to ``$RUNNER_PROBE_DIR`` (nothing without it):

- ``probe:recorder`` (a strategy: everything trains) appends ``EPOCH SHA256`` of its rank's model
  after every epoch to ``weights-rank{RANK}.txt``; with ``fail_on_rank`` and ``fail_in_epoch`` that
  rank raises during that epoch; with ``drift_on_rank`` that rank's weights move away from the
  others' after the last epoch;
- ``probe:cnn`` (a model: a convolution backbone and a Linear head) appends the number of images
  its backbone sees in each forward pass to ``backbone-rank{RANK}.txt``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from runner.plugin_api import Stage, Strategy, hookimpl


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def record(name: str, line: str) -> None:
    directory = os.environ.get("RUNNER_PROBE_DIR")
    if directory:
        with open(Path(directory) / name, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def state_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).numpy().tobytes())
    return digest.hexdigest()


class Recorder(Strategy):
    name = "probe:recorder"

    def __init__(self, fail_on_rank: int | None = None, fail_in_epoch: int | None = None, drift_on_rank: int | None = None) -> None:
        self.fail_on_rank, self.fail_in_epoch, self.drift_on_rank = fail_on_rank, fail_in_epoch, drift_on_rank
        self.epochs_done = 0
        self.epochs = 0
        self.model: nn.Module | None = None

    def setup(self, context) -> None:
        self.model, self.epochs = context.model, context.epochs

    def stage(self, epoch: int) -> Stage:
        return Stage(trainable="all")

    def on_batch(self, images, labels):
        epoch = self.epochs_done + 1
        if rank() == self.fail_on_rank and epoch == self.fail_in_epoch:
            raise ValueError(f"probe failure on rank {rank()} in epoch {epoch}")
        return images, labels

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        self.epochs_done = epoch
        record(f"weights-rank{rank()}.txt", f"{epoch} {state_sha256(self.model.state_dict())}")
        if rank() == self.drift_on_rank and epoch == self.epochs:
            with torch.no_grad():
                next(self.model.parameters()).add_(1.0)
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "fail_on_rank": self.fail_on_rank, "fail_in_epoch": self.fail_in_epoch,
                "drift_on_rank": self.drift_on_rank}


def _count_images(module: nn.Module, args: tuple) -> None:
    if args[0].device.type != "meta":  # planning looks at shapes on the meta device
        record(f"backbone-rank{rank()}.txt", str(args[0].shape[0]))


def counting_cnn(request) -> nn.Module:
    channels, height, width = request.input_shape
    model = nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * (height // 2) * (width // 2), request.num_classes),
    )
    model[0].register_forward_pre_hook(_count_images)
    return model


@hookimpl
def runner_register_strategies(register) -> None:
    register("probe:recorder", Recorder)


@hookimpl
def runner_register_models(register) -> None:
    register("probe:cnn", counting_cnn)
