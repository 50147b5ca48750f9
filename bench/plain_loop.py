"""The quickstart experiment as a user would write it by hand: plain PyTorch, no runner.

It is the baseline of ``bench/parity.py``. It does the work a user's own script does (a seeded
stratified split, per-epoch validation, final test metrics) and nothing more: no results store, no
checkpoints, no model summary. To make the per-epoch losses comparable to the last digit it draws
random numbers exactly as the runner does:

* ``torch.manual_seed(seed)``, then the layers are built in order (that is what initialises them),
  then ``torch.manual_seed(seed)`` again (the runner re-seeds after its model summary, so dropout
  starts from the same state);
* the training batches are a ``torch.randperm`` per epoch from ``torch.Generator().manual_seed(seed)``;
* the images are transformed once, as one tensor, with the same arithmetic as torchvision's
  ``ToDtype(float32, scale=True)`` and ``Normalize`` (``mul(1/255)``, ``sub(mean)``, ``div(std)``).

The speed switches are options (``--threads``, ``--channels-last``, ``--device``, ``--amp``,
``--cudnn-benchmark``); ``bench/parity.py`` passes the ones the runner recorded for its run. On CUDA
the split tensors live on the GPU, as the runner keeps them.

Prints one JSON object: ``{"epochs": [{"train_loss": …, "val_loss": …, "val_accuracy": …}], "test": {…},
"seconds_in_process": …, "epoch_seconds": […]}`` (seconds counted after the imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch
from torch import nn

from runner.data import stratified_split

MEAN, STD = 0.1307, 0.3081


def build_cnn(num_classes: int) -> nn.Sequential:
    """experiments/quickstart.yaml's CNN, written out (28x28 inputs: two 2x2 poolings leave 7x7)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Flatten(),
        nn.Dropout(p=0.25),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def normalised(images: torch.Tensor) -> torch.Tensor:
    x = images.unsqueeze(1).to(torch.float32).mul_(1.0 / 255)
    return x.sub(torch.tensor([MEAN]).view(-1, 1, 1)).div_(torch.tensor([STD]).view(-1, 1, 1)).contiguous()


def split_tensors(data: str, seed: int, device: torch.device) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """The bundled digits' train/val/test split (the runner's stratified split), normalised, on ``device``; and the class count."""
    arrays = np.load(data)
    images, targets = torch.from_numpy(arrays["images"]), arrays["labels"].astype("int64")
    split = stratified_split(targets, (0.7, 0.15, 0.15), seed=seed)
    labels = torch.from_numpy(targets)
    parts = {name: (normalised(images[torch.as_tensor(idx)]).to(device), labels[torch.as_tensor(idx)].to(device))
             for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))}
    return parts, int(targets.max()) + 1


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(labels), generator=generator) if generator is not None else None
    for start in range(0, len(labels), batch_size):
        if order is None:
            yield images[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield images[idx], labels[idx]


def train_epoch(model, images, labels, batch_size, generator, optimizer, loss_fn, memory_format, autocast, scaler):
    model.train()
    loss_sum = torch.zeros((), device=images.device)
    seen = 0
    for x, y in batches(images, labels, batch_size, generator):
        x = x.contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach() * y.shape[0]
        seen += y.shape[0]
    return loss_sum.item() / seen


@torch.inference_mode()
def evaluate(model, images, labels, batch_size, loss_fn, memory_format, num_classes, autocast):
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=images.device)
    for x, y in batches(images, labels, batch_size, None):
        with autocast():
            logits = model(x.contiguous(memory_format=memory_format))
            loss = loss_fn(logits, y)
        loss_sum += loss.float() * y.shape[0]
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    matrix = confusion.view(num_classes, num_classes).cpu()
    tp = matrix.diag().double()
    precision, recall = tp / matrix.sum(0).clamp(min=1), tp / matrix.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return {"loss": loss_sum.item() / len(labels), "accuracy": tp.sum().item() / len(labels), "f1_macro": f1.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runner/data/mnist_5k.npz")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-lr", type=float, default=3e-3, help="OneCycleLR's peak, stepped once per epoch")
    parser.add_argument("--total-steps", type=int, default=8, help="OneCycleLR's length in epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    parts, num_classes = split_tensors(args.data, args.seed, device)

    torch.manual_seed(args.seed)
    model = build_cnn(num_classes).to(memory_format=memory_format).to(device)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.max_lr, total_steps=args.total_steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)

    history, epoch_seconds = [], []
    for _ in range(args.epochs):
        epoch_started = time.perf_counter()
        train_loss = train_epoch(model, *parts["train"], args.batch_size, generator, optimizer, loss_fn, memory_format, autocast, scaler)
        val = evaluate(model, *parts["val"], args.batch_size, loss_fn, memory_format, num_classes, autocast)
        scheduler.step()
        history.append({"train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        epoch_seconds.append(time.perf_counter() - epoch_started)
    test = evaluate(model, *parts["test"], args.batch_size, loss_fn, memory_format, num_classes, autocast)
    print(json.dumps({"epochs": history, "test": test, "seconds_in_process": time.perf_counter() - started,
                      "epoch_seconds": epoch_seconds}))


if __name__ == "__main__":
    main()
