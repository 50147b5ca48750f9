"""The quickstart experiment written for PyTorch Lightning: the third side of ``bench/peers.py``.

The model, data split, normalisation, optimizer, per-epoch OneCycleLR and seeds are those of
``bench/plain_loop.py`` (imported from it), and the training batches come in the same order (one
``torch.randperm`` per epoch from a generator seeded with the seed, batched by indexing the
transformed tensor, as the plain loop and the runner batch in-memory data). The loader gets a
generator of its own, so Lightning's loader draws nothing from the global generator that dropout
uses. The Trainer keeps Lightning's defaults (its checkpoint after every epoch, its logger, the
sanity validation) except the progress bar, off as the runner's ``-q`` has it. On CUDA the
precision is ``bf16-mixed`` where supported, else ``16-mixed``: the runner's ``amp: auto``.

Runs in a Python environment that has ``lightning`` (``bench/peers.py`` makes one); prints one JSON
object as the plain loop does.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from plain_loop import build_cnn, split_tensors


class IndexedTensors(Dataset):
    """A whole batch per item: the images and labels at a tensor of indices."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


class Batches(Sampler):
    """Index batches in order, or from one ``torch.randperm`` per epoch of ``generator`` (the plain loop's order)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator | None) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator) if self.generator is not None else torch.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            yield order[start:start + self.batch_size]


class Quickstart(L.LightningModule):
    def __init__(self, num_classes: int, args: argparse.Namespace, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.model = build_cnn(num_classes).to(memory_format=memory_format)
        self.args, self.memory_format, self.num_classes = args, memory_format, num_classes
        self.loss_fn = nn.CrossEntropyLoss()
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.history: list[dict[str, float]] = []
        self.test_result: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.args.lr, weight_decay=self.args.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.args.max_lr, total_steps=self.args.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _add(self, key: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        confusion = torch.bincount(y * self.num_classes + logits.argmax(1), minlength=self.num_classes ** 2)
        sums = self.sums.setdefault(key, [torch.zeros((), device=y.device), torch.zeros_like(confusion), 0])
        sums[0] += loss.detach().float() * y.shape[0]
        sums[1] += confusion
        sums[2] += y.shape[0]

    def _take(self, key: str) -> dict[str, float]:
        loss_sum, confusion, seen = self.sums.pop(key)
        matrix = confusion.view(self.num_classes, self.num_classes).cpu()
        tp = matrix.diag().double()
        precision, recall = tp / matrix.sum(0).clamp(min=1), tp / matrix.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
        return {"loss": loss_sum.item() / seen, "accuracy": tp.sum().item() / seen, "f1_macro": f1.mean().item()}

    def training_step(self, batch, _index):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        sums = self.sums.setdefault("train", [torch.zeros((), device=y.device), 0])
        sums[0] += loss.detach() * y.shape[0]
        sums[1] += y.shape[0]
        return loss

    def validation_step(self, batch, _index):
        x, y = batch
        logits = self(x)
        self._add("val", self.loss_fn(logits, y), logits, y)

    def on_validation_epoch_end(self) -> None:
        val = self._take("val")
        if self.trainer.sanity_checking:
            return
        loss_sum, seen = self.sums.pop("train")
        self.history.append({"train_loss": loss_sum.item() / seen, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})

    def test_step(self, batch, _index):
        x, y = batch
        logits = self(x)
        self._add("test", self.loss_fn(logits, y), logits, y)

    def on_test_epoch_end(self) -> None:
        self.test_result = self._take("test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-lr", type=float, default=3e-3)
    parser.add_argument("--total-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    parts, num_classes = split_tensors(args.data, args.seed, device)

    def loader(name: str, generator: torch.Generator | None) -> DataLoader:
        data = IndexedTensors(*parts[name])
        # its own generator: the loader's base seed is not drawn from the global one (dropout's)
        return DataLoader(data, batch_size=None, sampler=Batches(len(data), args.batch_size, generator), generator=torch.Generator())

    torch.manual_seed(args.seed)
    module = Quickstart(num_classes, args, memory_format)
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if cuda else "32-true"
    trainer = L.Trainer(accelerator="cuda" if cuda else "cpu", devices=1, max_epochs=args.epochs, precision=precision,
                        enable_progress_bar=False, default_root_dir=args.workdir, benchmark=cuda)
    trainer.fit(module, loader("train", torch.Generator().manual_seed(args.seed)), loader("val", None))
    trainer.test(module, loader("test", None), verbose=False)
    print(json.dumps({"epochs": module.history, "test": module.test_result, "seconds_in_process": time.perf_counter() - started,
                      "precision": precision, "lightning": L.__version__}))


if __name__ == "__main__":
    main()
