"""Datasets, seeded stratified splits and batch iterators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from runner.errors import RunnerError, SpecError
from runner.interfaces import DatasetRequest
from runner.spec import Spec

if TYPE_CHECKING:
    from runner.registries import Registries


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``; samples are ``(C, H, W)`` uint8 tensors.

    Being in memory lets the runner apply deterministic transforms to all images at once and batch
    by indexing instead of collating sample by sample.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str]) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def dataset_targets(dataset: Any) -> np.ndarray:
    """One int label per sample, read without decoding images where the dataset allows."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(torch.as_tensor(targets).tolist(), dtype=np.int64).reshape(-1)


def dataset_classes(dataset: Any, targets: np.ndarray) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(int(targets.max()) + 1 if len(targets) else 0)]


@dataclass(frozen=True)
class SplitIndices:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(
    targets: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
    train_per_class: int | None = None,
) -> SplitIndices:
    """Per class, shuffle with ``seed`` and cut into train/val/test by the fractions.

    ``train_per_class`` keeps only the first N training samples of each class (few-label
    experiments) while val and test stay as they are, so results remain comparable.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(targets):
        idx = np.flatnonzero(targets == label)
        rng.shuffle(idx)
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        if n_train == 0 or n_val == 0 or len(idx) - n_train - n_val <= 0:
            raise SpecError(f"data.split: class {label} has {len(idx)} samples, too few for the split fractions")
        train = idx[:n_train]
        if train_per_class is not None:
            train = train[:train_per_class]
        parts["train"].append(train)
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return SplitIndices(*(np.sort(np.concatenate(parts[k])) for k in ("train", "val", "test")))


@dataclass(frozen=True)
class LoadedData:
    """A spec's dataset, read once and shared by planning and building (no image is decoded here)."""

    dataset: Any
    targets: np.ndarray  # the dataset's label of every sample
    label_map: dict[int, int]  # dataset label -> class index 0..K-1 (data.classes, in the spec's order)
    class_names: list[str]  # one per class index


def load_data(spec: Spec, registries: Registries, base_dir: str) -> LoadedData:
    """Call the spec's dataset builder and select ``data.classes``."""
    try:
        entry = registries.datasets.entry(spec.data.dataset)
    except RunnerError as exc:
        raise SpecError(f"data.dataset: {exc}") from None
    with entry.blamed("data", spec.data.dataset):  # the dataset's own code: its builder, len, targets and classes
        dataset = entry.obj(DatasetRequest(name=spec.data.dataset, options=dict(spec.data.options), base_dir=base_dir,
                                           on_corrupt=spec.data.on_corrupt))
        if len(dataset) == 0:
            raise SpecError(f"data.dataset: {spec.data.dataset} is empty")
        targets = dataset_targets(dataset)
        names = dataset_classes(dataset, targets)
    present = sorted(set(int(t) for t in targets))
    wanted = spec.data.classes if spec.data.classes is not None else present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise SpecError(f"data.classes: {missing} not in the dataset (labels present: {present})")
    if len(wanted) < 2:
        only = f" ({names[wanted[0]] if wanted[0] < len(names) else wanted[0]})" if wanted else ""
        raise SpecError(f"data: {len(wanted)} class{only} selected; a classifier needs at least 2 (check data.classes or the class folders)")
    label_map = {orig: new for new, orig in enumerate(wanted)}
    return LoadedData(dataset, targets, label_map, [names[c] if c < len(names) else str(c) for c in wanted])


def split_indices(data: LoadedData, spec: Spec) -> SplitIndices:
    """The seeded, stratified train/val/test split of the selected classes (dataset indices)."""
    kept = np.flatnonzero(np.isin(data.targets, list(data.label_map)))
    split_seed = spec.seed if spec.data.split.seed is None else spec.data.split.seed
    inner = stratified_split(
        data.targets[kept], (spec.data.split.train, spec.data.split.val, spec.data.split.test),
        seed=split_seed, train_per_class=spec.data.train_per_class,
    )
    return SplitIndices(kept[inner.train], kept[inner.val], kept[inner.test])


def image_mode(image: Any) -> str | None:
    """The PIL mode a dataset's images have: a new image is converted to it before preprocessing."""
    if isinstance(image, torch.Tensor):
        return {1: "L", 3: "RGB", 4: "RGBA"}.get(int(image.shape[-3])) if image.ndim >= 3 else "L"
    return getattr(image, "mode", None)


def batches_in_memory(data: LoadedData, deterministic_transform: bool) -> bool:
    """Whether a split's batches come from pre-transformed tensors (:class:`TensorBatches`) rather than a DataLoader."""
    return isinstance(data.dataset, InMemoryImages) and deterministic_transform


class Relabelled(Dataset):
    """A subset whose labels are mapped to 0..K-1 (class filtering) and whose images are transformed."""

    def __init__(self, base: Any, indices: np.ndarray, label_map: dict[int, int], transform: Callable | None) -> None:
        self.base = base
        self.indices = indices
        self.label_map = label_map
        self.transform = transform
        self.targets = torch.as_tensor([label_map[int(t)] for t in dataset_targets(base)[indices]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[int(self.indices[i])]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.label_map[int(label)]


@dataclass(frozen=True)
class Shard:
    """The part of every split one process of a distributed run iterates (rank ``rank`` of ``world_size``).

    Training: torch's :class:`DistributedSampler`, seeded with the run's seed, reshuffled by
    ``set_epoch``: the ranks' batches of step ``i`` together are batch ``i`` of one process with
    ``world_size`` times the batch size, the same samples whatever the number of processes (when
    ``world_size`` divides the split; otherwise the sampler repeats a few samples to even the
    shards). Evaluation: every ``world_size``-th sample from ``rank``, no sample twice and none
    left out, so sums over the shards are sums over the split.
    """

    rank: int
    world_size: int

    def sampler(self, size: int, shuffle: bool, seed: int) -> Any:
        if shuffle:
            return DistributedSampler(range(size), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                                      drop_last=False)
        return range(self.rank, size, self.world_size)


class TensorBatches:
    """Batches of a pre-transformed in-memory split: a seeded permutation and tensor indexing.

    It replaces a DataLoader when every sample is already a tensor in memory; the permutation comes
    from the same kind of seeded generator, so runs stay reproducible. With a ``sampler`` (a
    :class:`Shard`'s, in a distributed run) the order and the samples are the sampler's, as a
    DataLoader with that sampler would give them.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
        generator: torch.Generator | None, draws_base_seed: bool = False, sampler: Any = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        # a DataLoader draws a worker base seed from its generator before shuffling; standing in for
        # one (the feature cache), the same draw keeps the order of samples identical
        self.draws_base_seed = draws_base_seed
        self.sampler = sampler  # as a DataLoader's: ``set_epoch`` reshuffles a distributed one
        self.dataset = images  # len(loader.dataset), as with a DataLoader

    def __len__(self) -> int:
        size = len(self.sampler) if self.sampler is not None else len(self.labels)
        return (size + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                yield self.images[idx], self.labels[idx]
            return
        n = len(self.labels)
        if self.draws_base_seed:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.images[idx], self.labels[idx]


def pretransform(subset: Relabelled, transform: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a deterministic transform to every image of an in-memory subset once, in one call."""
    base: InMemoryImages = subset.base
    images = base.images[torch.as_tensor(subset.indices)]
    return transform(images).contiguous(), subset.targets.clone()


def seed_worker(worker_id: int) -> None:
    """DataLoader workers get seeds derived from the loader's generator (PyTorch's recipe)."""
    import random

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def fits_on_device(nbytes: int, device: Any) -> bool:
    """Whether ``nbytes`` of pre-transformed images may live on a CUDA device: at most a quarter of its free memory.

    Shuffled batches of pinned host memory are gathered into pageable memory, so their copies would
    not overlap; on the device, a batch is one index operation.
    """
    if device is None or torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return nbytes < free // 4


def make_loader(
    subset: Relabelled,
    transform: Callable,
    deterministic_transform: bool,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    on_device: Any = None,
    shard: Shard | None = None,
) -> Any:
    """Batches of ``subset``: pre-transformed tensors for in-memory data with deterministic transforms, else a DataLoader.

    ``on_device``: a device the pre-transformed tensors move to once (batches are then indexed there,
    no copy per batch); the plan decides whether they fit. ``shard``: this process's part of a
    distributed run (see :class:`Shard`; its sampler is seeded with ``seed``).
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = shard.sampler(len(subset), shuffle, seed) if shard is not None else None
    if isinstance(subset.base, InMemoryImages) and deterministic_transform:
        images, labels = pretransform(subset, transform)
        if on_device is not None:
            images, labels = images.to(on_device), labels.to(on_device)
        elif pin_memory:
            images, labels = images.pin_memory(), labels.pin_memory()
        return TensorBatches(images, labels, batch_size, shuffle, generator, sampler=sampler)
    subset.transform = transform
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers else None,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


__all__ = [
    "InMemoryImages", "SplitIndices", "stratified_split", "Relabelled", "Shard", "TensorBatches", "make_loader",
    "dataset_targets", "dataset_classes", "Subset", "LoadedData", "load_data", "split_indices", "image_mode",
    "batches_in_memory",
]
