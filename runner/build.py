"""From a validated spec to everything training needs, checking all of it before any work.

Every problem found here is a :class:`RunnerError` (exit code 2) raised before a run row exists.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from runner import data as data_mod
from runner.errors import RunnerError, SpecError
from runner.interfaces import DatasetRequest, ModelRequest, Strategy
from runner.models import apply_surgery, head_names, input_channels, select_trainable
from runner.plugins import Registries
from runner.spec import Spec, TransformStep


# ------------------------------------------------------------------------------------------
# Names that are not plugins: torch's own optimizers, schedulers and losses


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


def _lookup(table: dict[str, type], name: str, what: str, key: str) -> type:
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


# ------------------------------------------------------------------------------------------
# Transforms


def _transform_builder(registries: Registries, step: TransformStep, key: str) -> Callable[..., Any]:
    try:
        builder = registries.transforms.get(step.name)
    except RunnerError as exc:
        raise SpecError(f"{key}: {exc}") from None
    check_arguments(getattr(builder, "target", builder), step.options, key)
    return builder


def is_random(registries: Registries, steps: list[TransformStep]) -> bool:
    return any(bool(getattr(registries.transforms.get(s.name), "random", False)) for s in steps)


def build_transform(registries: Registries, steps: list[TransformStep], key: str) -> Callable[[Any], Any]:
    from torchvision.transforms import v2

    built = []
    for i, step in enumerate(steps):
        builder = _transform_builder(registries, step, f"{key}[{i}]")
        try:
            built.append(builder(**step.options))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{key}[{i}] ({step.name}): {exc}") from None
    return v2.Compose(built)


def with_rgb_expansion(steps: list[TransformStep]) -> list[TransformStep]:
    """Insert GrayscaleToRgb right after the step that makes a tensor (or first, for tensor data)."""
    makers = [i for i, s in enumerate(steps) if s.name in ("ToImage", "PILToTensor", "ToTensor")]
    at = makers[-1] + 1 if makers else 0
    return [*steps[:at], TransformStep(name="GrayscaleToRgb"), *steps[at:]]


# ------------------------------------------------------------------------------------------
# Devices and seeds


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpecError(f"device: {requested} was requested but this machine has no usable CUDA device")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise SpecError(f"device: {requested} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SpecError("device: mps was requested but is not available")
    return torch.device(requested)


def seed_everything(seed: int, deterministic: bool) -> None:
    import os
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)


# ------------------------------------------------------------------------------------------
# Weights


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unsafe_load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that do not invite an unsafe retry."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        # torch's first paragraph suggests weights_only=False; the useful line names what was refused
        detail = next((line.strip() for line in text.splitlines()[1:] if "GLOBAL" in line or "Unsupported" in line), "")
        return ("refused: it holds pickled code or objects other than tensors, and is only ever loaded with "
                f"weights_only=True{f' ({detail[:160]})' if detail else ''}")
    first = text.splitlines()[0][:160] if text else ""
    return f"cannot be read as a PyTorch file ({type(exc).__name__}{f': {first}' if first else ''})"


def load_state_dict_file(path: Path, source: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: files carrying pickled code are refused, never retried unsafely."""
    if not path.is_file():
        raise SpecError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled code; RuntimeError for non-torch files
        raise SpecError(f"weights {source} {unsafe_load_reason(exc)}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a runner checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"weights {source} is not a state dict (a mapping of names to tensors)")
    return state


@dataclass
class WeightsOrigin:
    source: str
    sha256: str
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256}


# ------------------------------------------------------------------------------------------
# Everything together


@dataclass
class Prepared:
    """What a run needs, built and checked. Plain data plus torch objects; no behaviour."""

    spec: Spec
    device: torch.device
    model: nn.Module
    class_names: list[str]
    input_shape: tuple[int, int, int]
    strategy: Strategy
    train_loader: Any
    val_loader: Any
    test_loader: Any
    weights: WeightsOrigin | None
    replaced: list[str]
    used_names: dict[str, list[str]]
    settings: dict[str, Any] = field(default_factory=dict)
    train_transform_random: bool = False


def resolve_names(spec: Spec, registries: Registries) -> None:
    """Check every name and argument in the spec (no data or model is touched)."""
    t = spec.training
    for key, registry, name in (
        ("data.dataset", registries.datasets, spec.data.dataset),
        ("model.name", registries.models, spec.model.name),
        ("training.strategy.name", registries.strategies, t.strategy.name),
    ):
        try:
            registry.entry(name)
        except RunnerError as exc:
            raise SpecError(f"{key}: {exc}") from None
    if spec.model.name.startswith("hub:") and not spec.model.trust_repo:
        raise SpecError(
            f"model.name: {spec.model.name} would run code downloaded from GitHub; "
            "set model.trust_repo: true if you trust that repository"
        )
    check_arguments(_lookup(optimizers(), t.optimizer.name, "optimizer", "training.optimizer.name"), t.optimizer.options, "training.optimizer", skip=("params",))
    if t.scheduler is not None:
        check_arguments(_lookup(schedulers(), t.scheduler.name, "scheduler", "training.scheduler.name"), t.scheduler.options, "training.scheduler", skip=("optimizer",))
    check_arguments(_lookup(losses(), t.loss.name, "loss", "training.loss.name"), t.loss.options, "training.loss")
    check_arguments(registries.strategies.get(t.strategy.name), t.strategy.options, "training.strategy")
    for i, step in enumerate(spec.transforms.train):
        _transform_builder(registries, step, f"transforms.train[{i}]")
    for i, step in enumerate(spec.transforms.eval or []):
        _transform_builder(registries, step, f"transforms.eval[{i}]")
    if t.early_stopping is not None:
        metric = t.early_stopping.monitor
        if metric not in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            raise SpecError(f"training.early_stopping.monitor: unknown metric {metric!r} (val_loss, val_accuracy, train_loss, train_accuracy)")


def resolve_spec(spec: Spec, registries: Registries) -> Spec:
    """Fill what the spec left to defaults that need the registries (eval transforms)."""
    resolve_names(spec, registries)
    if spec.transforms.eval is None:
        spec.transforms.eval = [s for s in spec.transforms.train if not getattr(registries.transforms.get(s.name), "random", False)]
    return spec


def load_dataset(spec: Spec, registries: Registries, base_dir: str) -> tuple[Any, Any, dict[int, int], list[str]]:
    builder = registries.datasets.get(spec.data.dataset)
    dataset = builder(DatasetRequest(name=spec.data.dataset, options=dict(spec.data.options), base_dir=base_dir, on_corrupt=spec.data.on_corrupt))
    if len(dataset) == 0:
        raise SpecError(f"data.dataset: {spec.data.dataset} is empty")
    targets = data_mod.dataset_targets(dataset)
    names = data_mod.dataset_classes(dataset, targets)
    present = sorted(set(int(t) for t in targets))
    wanted = spec.data.classes if spec.data.classes is not None else present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise SpecError(f"data.classes: {missing} not in the dataset (labels present: {present})")
    label_map = {orig: new for new, orig in enumerate(wanted)}
    class_names = [names[c] if c < len(names) else str(c) for c in wanted]
    return dataset, targets, label_map, class_names


def set_num_classes(spec: Spec, num_classes: int) -> None:
    if spec.model.num_classes is not None and spec.model.num_classes != num_classes:
        raise SpecError(f"model.num_classes is {spec.model.num_classes} but the data has {num_classes} classes")
    spec.model.num_classes = num_classes


def resolved_spec_hash(spec: Spec, registries: Registries, base_dir: str) -> str:
    """The hash a run of this spec records, computed without building the model."""
    spec = resolve_spec(spec, registries)
    _, _, _, class_names = load_dataset(spec, registries, base_dir)
    set_num_classes(spec, len(class_names))
    return spec.spec_hash()


def prepare(spec: Spec, registries: Registries, base_dir: str = ".", load_weights: bool = True, store: Any = None) -> Prepared:
    """Build and check everything a run needs; raise :class:`RunnerError` on any problem."""
    spec = resolve_spec(spec, registries)
    device = resolve_device(spec.device)
    dataset, targets, label_map, class_names = load_dataset(spec, registries, base_dir)
    set_num_classes(spec, len(class_names))

    import numpy as np

    keep = np.isin(targets, list(label_map))
    split = _split_filtered(targets, keep, spec)

    train_steps, eval_steps = list(spec.transforms.train), list(spec.transforms.eval or [])
    raw_sample = dataset[int(split.train[0])][0]
    sample = _transformed_sample(registries, eval_steps, raw_sample)
    needs_rgb = sample is None  # e.g. a weights preset that normalises three channels, given grayscale
    if needs_rgb:
        sample = _transformed_sample(registries, with_rgb_expansion(eval_steps), raw_sample)
        if sample is None:
            _transformed_sample(registries, eval_steps, raw_sample, raise_errors=True)
    input_shape = tuple(int(s) for s in sample.shape)

    model, replaced, weights = build_model(spec, registries, input_shape, load_weights=load_weights, store=store, base_dir=base_dir)  # type: ignore[arg-type]

    wants = input_channels(model)
    expand = needs_rgb or spec.data.channels == 3 or (spec.data.channels == "auto" and input_shape[0] == 1 and wants == 3)
    if expand:
        train_steps, eval_steps = with_rgb_expansion(train_steps), with_rgb_expansion(eval_steps)
        input_shape = (3, *input_shape[1:])
    elif wants is not None and wants != input_shape[0]:
        raise SpecError(f"the model expects {wants}-channel images but the data has {input_shape[0]} channels")
    eval_transform = build_transform(registries, eval_steps, "transforms.eval")
    train_transform = build_transform(registries, train_steps, "transforms.train")

    strategy = build_strategy(spec, registries)
    select_trainable(model, strategy.stage(1).trainable)  # a bad pattern fails now, not at epoch 1

    from runner import performance

    speed = performance.resolve(spec, device, model)
    if speed.channels_last:  # here, so training, resume, eval and predict all see the same memory format
        model.to(memory_format=torch.channels_last)
    pin = speed.pin_memory
    seed = spec.seed
    eval_batch = spec.data.eval_batch_size or spec.data.batch_size
    train_random = is_random(registries, spec.transforms.train)

    def loader(indices: Any, transform: Any, deterministic: bool, batch: int, shuffle: bool, offset: int) -> Any:
        subset = data_mod.Relabelled(dataset, indices, label_map, None)
        return data_mod.make_loader(subset, transform, deterministic, batch, shuffle, seed + offset, spec.data.num_workers, pin, device)

    prepared = Prepared(
        spec=spec,
        device=device,
        model=model,
        class_names=class_names,
        input_shape=input_shape,  # type: ignore[arg-type]
        strategy=strategy,
        train_transform_random=train_random,
        train_loader=loader(split.train, train_transform, not train_random, spec.data.batch_size, True, 0),
        val_loader=loader(split.val, eval_transform, True, eval_batch, False, 1),
        test_loader=loader(split.test, eval_transform, True, eval_batch, False, 2),
        weights=weights,
        replaced=replaced,
        used_names={
            "model": [spec.model.name],
            "dataset": [spec.data.dataset],
            "strategy": [spec.training.strategy.name],
            "transform": sorted({s.name for s in train_steps + eval_steps}),
        },
        settings={"rgb_expanded": expand, "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                  "skipped_corrupt": list(getattr(dataset, "skipped_corrupt", [])),  # data.on_corrupt: skip
                  # what predict and export need to rebuild the model and read images as the data was read
                  "data_shape": list(sample.shape), "input_shape": list(input_shape),
                  "image_type": "tensor" if isinstance(raw_sample, torch.Tensor) else "PIL", "image_mode": image_mode(raw_sample)},
    )
    from runner import feature_cache

    reason = feature_cache.blocker(prepared)
    prepared.settings["feature_cache"] = "on" if reason is None else f"off: {reason}"
    prepared.settings["performance"] = {**speed.as_dict(), "batches": performance.describe_batches(prepared.train_loader)}
    return prepared


def _transformed_sample(registries: Registries, steps: list[TransformStep], image: Any, raise_errors: bool = False) -> Any:
    """One image after the eval transforms; None when they fail on it (unless ``raise_errors``)."""
    transform = build_transform(registries, steps, "transforms.eval")
    try:
        sample = transform(image)
    except Exception as exc:
        if raise_errors:
            raise SpecError(f"transforms.eval failed on a sample image: {str(exc).splitlines()[0]}") from None
        return None
    if not isinstance(sample, torch.Tensor) or sample.ndim != 3:
        raise SpecError("transforms.eval must turn an image into a (C, H, W) tensor (add ToImage and ToDtype)")
    return sample


def image_mode(image: Any) -> str | None:
    """The PIL mode a dataset's images have: a new image is converted to it before preprocessing."""
    if isinstance(image, torch.Tensor):
        return {1: "L", 3: "RGB", 4: "RGBA"}.get(int(image.shape[-3])) if image.ndim >= 3 else "L"
    return getattr(image, "mode", None)


def _split_filtered(targets: Any, keep: Any, spec: Spec) -> data_mod.SplitIndices:
    import numpy as np

    kept = np.flatnonzero(keep)
    split_seed = spec.seed if spec.data.split.seed is None else spec.data.split.seed
    inner = data_mod.stratified_split(
        targets[kept], (spec.data.split.train, spec.data.split.val, spec.data.split.test),
        seed=split_seed, train_per_class=spec.data.train_per_class,
    )
    return data_mod.SplitIndices(kept[inner.train], kept[inner.val], kept[inner.test])


def build_strategy(spec: Spec, registries: Registries) -> Strategy:
    builder = registries.strategies.get(spec.training.strategy.name)
    try:
        strategy = builder(**spec.training.strategy.options)
    except TypeError as exc:
        raise SpecError(f"training.strategy: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise SpecError(f"training.strategy: {spec.training.strategy.name} did not return a Strategy")
    return strategy


def build_model(
    spec: Spec,
    registries: Registries,
    input_shape: tuple[int, int, int],
    load_weights: bool = True,
    store: Any = None,
    base_dir: str = ".",
) -> tuple[nn.Module, list[str], WeightsOrigin | None]:
    """The model with head sized, surgery applied and weights loaded, and where the weights came from."""
    weights_spec = spec.model.weights
    named = weights_spec if isinstance(weights_spec, str) else None
    if named is not None and not spec.model.name.startswith("torchvision:"):
        raise SpecError(f"model.weights: named weights ({named!r}) exist only for torchvision models; use {{file: …}} or {{run: …}}")
    request = ModelRequest(
        name=spec.model.name, num_classes=int(spec.model.num_classes or 0), input_shape=input_shape,
        options=dict(spec.model.options), weights=named if load_weights else None, trust_repo=spec.model.trust_repo,
    )
    builder = registries.models.get(spec.model.name)
    try:
        model = builder(request)
    except RunnerError:
        raise
    except TypeError as exc:
        raise SpecError(f"model.options: {spec.model.name}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model.name: {spec.model.name} did not build a torch.nn.Module")
    heads = head_names(model)
    apply_surgery(model, spec.model.surgery, int(spec.model.num_classes or 0))
    replaced = sorted(set(heads) | set(spec.model.surgery))
    origin: WeightsOrigin | None = None
    if named is not None and load_weights:
        from runner.plugins.models import resolve_torchvision_weights, weights_cache_path

        member = resolve_torchvision_weights(spec.model.name.removeprefix("torchvision:"), named)
        path = weights_cache_path(member)
        origin = WeightsOrigin(source=f"torchvision:{member}", sha256=sha256_file(path), path=str(path))
    elif weights_spec is not None and load_weights:
        origin = load_external_weights(model, weights_spec, replaced, store, base_dir)
    return model, replaced, origin


def load_external_weights(model: nn.Module, weights_spec: Any, replaced: list[str], store: Any, base_dir: str) -> WeightsOrigin:
    from runner.models import load_state_dict_checked

    if hasattr(weights_spec, "file"):
        path = Path(weights_spec.file).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        source = f"file:{path}"
    else:
        if store is None:
            raise SpecError("weights from a run need a results store")
        from runner.upstream import checkpoint_of_upstream

        path, source = checkpoint_of_upstream(weights_spec, store, base_dir)
    state = load_state_dict_file(path, source)
    load_state_dict_checked(model, state, replaced, source)
    return WeightsOrigin(source=source, sha256=sha256_file(path), path=str(path))
