"""The run plan: everything about a run decided before any work, as one typed value.

:func:`plan` turns a validated spec into a :class:`RunPlan`: the resolved spec, the device, the
classes and split sizes, the shapes images have at each step, what the model looks like (built on
PyTorch's ``meta`` device: no memory, no weights, no random numbers), which parameters each stage
trains, the speed switches, whether the frozen-feature cache applies and why not, and where the
weights come from with their sha256. It is a pure function: it never trains, never writes, never
runs another experiment and leaves every random generator as it was. Everything that can be
checked before training is checked here, so a bad spec fails before any run exists.

Training (:mod:`runner.build`, :mod:`runner.training`), resume, eval, predict, export and reproduce
take a plan; :meth:`RunPlan.to_json` is the one place it becomes the run's stored settings, and
:meth:`RunPlan.from_json` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from runner import data as data_mod
from runner import distributed, feature_cache, performance, rng
from runner.errors import RunnerError, SpecError
from runner.files import sha256_file
from runner.interfaces import NamedWeights, Stage, Strategy
from runner.lifecycle import heartbeat_interval
from runner.models import build_model, count_parameters, freeze, head_names, input_channels, select_trainable
from runner.optim import check_arguments, check_training_names
from runner.performance import Performance
from runner.preflight import check_forward, check_loss, check_train_transforms, check_whole_split_transforms, training_image
from runner.registry import blamed
from runner.spec import Spec, load_spec
from runner.transforms import build_transform, is_random, transform_builder, transform_sample, without_random

if TYPE_CHECKING:
    from runner.registries import Registries

PLAN_VERSION = 1
MONITORABLE = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")


# ------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class DataPlan:
    """What the data is and how images reach the model."""

    dataset: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    skipped_corrupt: tuple[str, ...]  # unreadable images left out (data.on_corrupt: skip)
    data_shape: tuple[int, ...]  # one image after the evaluation transforms
    input_shape: tuple[int, ...]  # what the model takes (three channels where grey images were expanded)
    rgb_expanded: bool  # GrayscaleToRgb inserted after the step that makes a tensor
    image_type: str  # what the dataset gives the transforms: "PIL" or "tensor"
    image_mode: str | None  # PIL mode new images are converted to before preprocessing (predict)
    train_transform_random: bool
    batches: str  # how training batches are made, e.g. "in-memory tensors, on cpu"
    batches_on_device: bool  # pre-transformed splits are moved to the (CUDA) device once


@dataclass(frozen=True)
class StagePlan:
    """A span of epochs with one set of trainable parameters."""

    first_epoch: int
    last_epoch: int
    trainable: Any  # as the strategy gives it: "all", "head", patterns or {"last": N}
    backbone_lr_mult: float
    params_trainable: int


@dataclass(frozen=True)
class ModelPlan:
    params_total: int
    params_trainable: int  # in the first stage
    heads: tuple[str, ...]
    replaced: tuple[str, ...]  # layers not loaded from pretrained weights (the head, surgery)
    stages: tuple[StagePlan, ...]


@dataclass(frozen=True)
class WeightsPlan:
    """Where the initial weights come from; ``sha256`` is None only when they were not read (validate)."""

    kind: str  # "named", "file" or "run"
    source: str
    sha256: str | None
    path: str | None
    name: str | None = None  # named weights: the name passed to the builder


@dataclass(frozen=True)
class FeatureCachePlan:
    enabled: bool
    reason: str | None  # why it is off

    def describe(self) -> str:
        return "on" if self.enabled else f"off: {self.reason}"


@dataclass(frozen=True)
class DistributedPlan:
    """How many processes train the run (``torchrun``, ``--nproc``) and what follows from it.

    ``data.batch_size`` is each process's batch; the optimizer steps on the global batch.
    """

    world_size: int  # 1 also for one process without torch.distributed (backend None)
    backend: str | None  # "nccl" on CUDA, "gloo" otherwise; None: one process, no process group
    batch_size_per_process: int
    global_batch_size: int
    sync_batchnorm: bool
    sync_batchnorm_reason: str | None  # why it is off

    @classmethod
    def one_process(cls, batch_size: int) -> DistributedPlan:
        return cls(1, None, batch_size, batch_size, False, "one process")


@dataclass(frozen=True)
class UpstreamWeights:
    """A completed run whose best checkpoint gives the weights (``{run: …}`` or ``{experiment: …}``)."""

    run_id: str
    path: str
    source: str  # what the run records, e.g. "run:ab12 (experiment vgg_pretrain.yaml)"


@dataclass(frozen=True)
class RunPlan:
    """Everything decided about one run before it starts. Read it; never change it (or its ``spec``)."""

    spec: Spec  # resolved: defaults applied, eval transforms and class count filled in
    spec_dir: str  # where relative paths in the spec point
    device: str
    data: DataPlan
    model: ModelPlan
    weights: WeightsPlan | None
    strategy: dict[str, Any]  # the strategy's own description
    performance: Performance
    feature_cache: FeatureCachePlan
    plugins: tuple[dict[str, Any], ...]  # distribution and version of every plugin whose names the run uses
    heartbeat_s: float
    distributed: DistributedPlan
    used_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        return self.spec.spec_hash()

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)

    def to_json(self) -> dict[str, Any]:
        """The run's stored settings (``runner show``'s ``settings``): every key of earlier versions, and more."""
        return {
            "plan_version": PLAN_VERSION,
            "spec_dir": self.spec_dir,
            "device": self.device,
            "heartbeat_s": self.heartbeat_s,
            "class_names": list(self.data.class_names),
            "split_sizes": dict(self.data.split_sizes),
            "skipped_corrupt": list(self.data.skipped_corrupt),
            "data_shape": list(self.data.data_shape),
            "input_shape": list(self.data.input_shape),
            "rgb_expanded": self.data.rgb_expanded,
            "image_type": self.data.image_type,
            "image_mode": self.data.image_mode,
            "train_transform_random": self.data.train_transform_random,
            "batches_on_device": self.data.batches_on_device,
            "model": {
                "params_total": self.model.params_total, "params_trainable": self.model.params_trainable,
                "heads": list(self.model.heads), "replaced": list(self.model.replaced),
                "stages": [asdict(s) for s in self.model.stages],
            },
            "weights": asdict(self.weights) if self.weights else None,
            "strategy": self.strategy,
            "performance": {**self.performance.as_dict(), "batches": self.data.batches},
            "feature_cache": self.feature_cache.describe(),
            "feature_cache_reason": self.feature_cache.reason,
            "plugins": list(self.plugins),
            "used_names": self.used_names,
            "distributed": asdict(self.distributed),
        }

    @classmethod
    def from_json(cls, spec: Spec, settings: dict[str, Any]) -> RunPlan:
        """A plan stored by :meth:`to_json` (``settings['plan_version']`` present)."""
        model = settings["model"]
        cache = settings["feature_cache"]
        weights = settings.get("weights")
        return cls(
            spec=spec,
            spec_dir=settings["spec_dir"],
            device=settings["device"],
            data=DataPlan(
                dataset=spec.data.dataset, class_names=tuple(settings["class_names"]), split_sizes=dict(settings["split_sizes"]),
                skipped_corrupt=tuple(settings["skipped_corrupt"]), data_shape=tuple(settings["data_shape"]),
                input_shape=tuple(settings["input_shape"]), rgb_expanded=bool(settings["rgb_expanded"]),
                image_type=settings["image_type"], image_mode=settings["image_mode"],
                train_transform_random=bool(settings["train_transform_random"]),
                batches=settings["performance"].get("batches", ""), batches_on_device=bool(settings.get("batches_on_device")),
            ),
            model=ModelPlan(
                params_total=model["params_total"], params_trainable=model["params_trainable"], heads=tuple(model["heads"]),
                replaced=tuple(model["replaced"]), stages=tuple(StagePlan(**s) for s in model["stages"]),
            ),
            weights=WeightsPlan(**weights) if weights else None,
            strategy=settings["strategy"],
            performance=Performance.from_dict(settings["performance"]),
            feature_cache=FeatureCachePlan(cache == "on", settings.get("feature_cache_reason")),
            plugins=tuple(settings.get("plugins", [])),
            heartbeat_s=float(settings["heartbeat_s"]),
            distributed=(DistributedPlan(**settings["distributed"]) if settings.get("distributed")
                         else DistributedPlan.one_process(spec.data.batch_size)),
            used_names=dict(settings.get("used_names", {})),
        )


# ------------------------------------------------------------------------------------------
# Planning


def plan(
    spec: Spec,
    registries: Registries,
    *,
    base_dir: str = ".",
    upstream: UpstreamWeights | None = None,
    data: data_mod.LoadedData | None = None,
    read_weights: bool = True,
    world_size: int | None = None,
) -> RunPlan:
    """Check the whole spec and decide everything about its run; raise :class:`RunnerError` on any problem.

    :param base_dir: where relative paths in the spec point (the spec file's directory).
    :param upstream: the completed run whose checkpoint ``model.weights: {run|experiment: …}`` names;
        without it such a spec is refused (the caller resolves, or runs, upstream experiments first).
    :param data: the spec's dataset when the caller already loaded it (it is then not loaded again).
    :param read_weights: hash the weights file (False: describe the weights without opening any file).
    :param world_size: the number of processes of a distributed run (None: one process, no process group).
    """
    with rng.preserved():
        return _plan(spec, registries, base_dir, upstream, data, read_weights, world_size)


def _plan(spec: Spec, registries: Registries, base_dir: str, upstream: UpstreamWeights | None,
          data: data_mod.LoadedData | None, read_weights: bool, world_size: int | None) -> RunPlan:
    spec = resolve_spec(spec, registries)
    device = resolve_device(spec.device)
    if world_size is not None:
        distributed.check_device(spec.device, device)
    data = data if data is not None else data_mod.load_data(spec, registries, base_dir)
    set_num_classes(spec, len(data.class_names))
    split = data_mod.split_indices(data, spec)
    raw_image = training_image(spec, registries, data, split)

    eval_steps = list(spec.transforms.eval or [])
    sample = transform_sample(build_transform(registries, eval_steps, "transforms.eval"), raw_image, "transforms.eval")
    needs_rgb = sample is None  # e.g. a weights preset that normalises three channels, given grayscale
    if needs_rgb:
        sample = transform_sample(build_transform(registries, eval_steps, "transforms.eval", expand_rgb=True), raw_image, "transforms.eval")
        if sample is None:  # not a channel problem after all: say what fails
            transform_sample(build_transform(registries, eval_steps, "transforms.eval"), raw_image, "transforms.eval", raise_errors=True)
    data_shape = tuple(int(s) for s in sample.shape)

    weights_name = spec.model.weights if isinstance(spec.model.weights, str) else None
    named = named_weights(spec, registries, weights_name) if weights_name else None
    model, replaced = build_model(spec, registries, data_shape, on_meta=True)  # type: ignore[arg-type]
    wants = input_channels(model)
    expand = needs_rgb or spec.data.channels == 3 or (spec.data.channels == "auto" and data_shape[0] == 1 and wants == 3)
    input_shape = (3, *data_shape[1:]) if expand else data_shape
    if not expand and wants is not None and wants != data_shape[0]:
        raise SpecError(f"the model expects {wants}-channel images but the data has {data_shape[0]} channels")
    train_shape = check_train_transforms(spec, registries, raw_image, expand, input_shape)
    check_whole_split_transforms(spec, registries, data, split, expand)
    check_forward(model, spec, registries, [input_shape, train_shape])
    check_loss(spec, len(data.class_names))

    strategy = build_strategy(spec, registries)
    stages = plan_stages(model, strategy, spec.training.epochs)
    first_stage = strategy.stage(1)
    freeze(model, select_trainable(model, first_stage.trainable))
    total, trainable = count_parameters(model)
    train_random = is_random(registries, spec.transforms.train)
    speed = performance.resolve(spec, device, model)
    cache = feature_cache_decision(spec, registries, model, strategy, train_random, input_shape)  # type: ignore[arg-type]
    in_memory = data_mod.batches_in_memory(data, not train_random)
    on_device = in_memory and data_mod.fits_on_device(len(split.train) * sample.numel() * sample.element_size(), device)
    used_names = {
        "model": [spec.model.name], "dataset": [spec.data.dataset], "strategy": [spec.training.strategy.name],
        "transform": sorted({s.name for s in [*spec.transforms.train, *eval_steps]}),
    }
    return RunPlan(
        spec=spec,
        spec_dir=str(Path(base_dir).resolve()),
        device=str(device),
        data=DataPlan(
            dataset=spec.data.dataset, class_names=tuple(data.class_names),
            split_sizes={"train": len(split.train), "val": len(split.val), "test": len(split.test)},
            skipped_corrupt=tuple(getattr(data.dataset, "skipped_corrupt", [])),
            data_shape=data_shape, input_shape=tuple(input_shape), rgb_expanded=expand,
            image_type="tensor" if isinstance(raw_image, torch.Tensor) else "PIL", image_mode=data_mod.image_mode(raw_image),
            train_transform_random=train_random,
            batches=describe_batches(in_memory, on_device, speed.pin_memory, spec.data.num_workers, device),
            batches_on_device=on_device,
        ),
        model=ModelPlan(params_total=total, params_trainable=trainable, heads=tuple(head_names(model)), replaced=tuple(replaced),
                        stages=stages),
        weights=weights_plan(spec, base_dir, named, upstream, read_weights),
        strategy=strategy.describe(),
        performance=speed,
        feature_cache=cache,
        plugins=tuple(registries.used_plugins(used_names)),
        heartbeat_s=heartbeat_interval(),
        distributed=distributed_plan(spec, device, model, world_size),
        used_names=used_names,
    )


def resolved_spec_hash(spec: Spec, registries: Registries, base_dir: str) -> str:
    """The hash a run of ``spec`` records, found without building a model or reading weights."""
    spec = resolve_spec(spec, registries)
    set_num_classes(spec, len(data_mod.load_data(spec, registries, base_dir).class_names))
    return spec.spec_hash()


def resolve_spec(spec: Spec, registries: Registries) -> Spec:
    """A copy of ``spec`` with every name and argument checked and the evaluation transforms filled in."""
    spec = spec.model_copy(deep=True)
    check_names(spec, registries)
    if spec.transforms.eval is None:
        spec.transforms.eval = without_random(registries, spec.transforms.train)
    return spec


def check_names(spec: Spec, registries: Registries) -> None:
    """Every registered name and every argument of the spec exists (no data or model is touched)."""
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
    check_training_names(spec)
    check_arguments(registries.strategies.get(t.strategy.name), t.strategy.options, "training.strategy")
    for i, step in enumerate(spec.transforms.train):
        transform_builder(registries, step, f"transforms.train[{i}]")
    for i, step in enumerate(spec.transforms.eval or []):
        transform_builder(registries, step, f"transforms.eval[{i}]")
    if t.early_stopping is not None and t.early_stopping.monitor not in MONITORABLE:
        raise SpecError(f"training.early_stopping.monitor: unknown metric {t.early_stopping.monitor!r} ({', '.join(MONITORABLE)})")


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


def set_num_classes(spec: Spec, num_classes: int) -> None:
    if spec.model.num_classes is not None and spec.model.num_classes != num_classes:
        raise SpecError(f"model.num_classes is {spec.model.num_classes} but the data has {num_classes} classes")
    spec.model.num_classes = num_classes


def build_strategy(spec: Spec, registries: Registries) -> Strategy:
    entry = registries.strategies.entry(spec.training.strategy.name)
    with entry.blamed("training.strategy", spec.training.strategy.name):
        try:
            strategy = entry.obj(**spec.training.strategy.options)
        except TypeError as exc:
            raise SpecError(f"training.strategy: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise SpecError(f"training.strategy: {entry.label(spec.training.strategy.name)} did not return a Strategy")
    return strategy


def plan_stages(model: nn.Module, strategy: Strategy, epochs: int) -> tuple[StagePlan, ...]:
    """The strategy's stages over the run's epochs, each checked against the model's parameter names."""
    stages: list[StagePlan] = []
    stage = _checked_stage(strategy)
    first, current = 1, stage(1)
    for epoch in range(2, epochs + 2):
        following = stage(epoch) if epoch <= epochs else None
        if following != current:
            try:
                selected = select_trainable(model, current.trainable)
            except SpecError as exc:
                raise SpecError(f"training.strategy (epochs {first}-{epoch - 1}): {exc}") from None
            count = sum(p.numel() for name, p in model.named_parameters() if name in selected)
            stages.append(StagePlan(first, epoch - 1, current.trainable, float(current.backbone_lr_mult), count))
            first, current = epoch, following  # type: ignore[assignment]
    return tuple(stages)


def _checked_stage(strategy: Strategy) -> Any:
    """``strategy.stage``, its failures and wrong answers named by epoch."""
    def stage(epoch: int) -> Stage:
        with blamed(f"training.strategy ({strategy.name}, epoch {epoch})"):
            answer = strategy.stage(epoch)
        if not isinstance(answer, Stage):
            raise SpecError(f"training.strategy ({strategy.name}): stage({epoch}) returned {type(answer).__name__}, not a Stage")
        return answer

    return stage


def feature_cache_decision(spec: Spec, registries: Registries, model: nn.Module, strategy: Strategy, train_random: bool,
                           input_shape: tuple[int, int, int]) -> FeatureCachePlan:
    try:
        reason = feature_cache.blocker(spec, model, strategy, train_random, input_shape)
    except NotImplementedError:  # an operation the meta device lacks: look again at a CPU-built model
        cpu_model, _ = build_model(spec, registries, input_shape, on_meta=False)
        freeze(cpu_model, select_trainable(cpu_model, strategy.stage(1).trainable))
        reason = feature_cache.blocker(spec, cpu_model, strategy, train_random, input_shape)
    return FeatureCachePlan(reason is None, reason)


def distributed_plan(spec: Spec, device: torch.device, model: nn.Module, world_size: int | None) -> DistributedPlan:
    batch = spec.data.batch_size
    if world_size is None:
        return DistributedPlan.one_process(batch)
    sync, reason = distributed.sync_batchnorm_decision(spec.performance.sync_batchnorm, device, model, world_size)
    return DistributedPlan(world_size, distributed.backend_for(device), batch, batch * world_size, sync, reason)


def describe_batches(in_memory: bool, on_device: bool, pinned: bool, workers: int, device: torch.device) -> str:
    """How training batches are made, as the run records it."""
    if in_memory:
        return f"in-memory tensors, {'on ' + device.type if on_device or device.type == 'cpu' else 'pinned' if pinned else 'on cpu'}"
    return f"DataLoader, {workers} workers" + (", persistent" if workers else "")


# ------------------------------------------------------------------------------------------
# Weights


def named_weights(spec: Spec, registries: Registries, name: str) -> NamedWeights:
    """What the model's builder offers under ``name`` (``IMAGENET1K_V1``, ``DEFAULT``)."""
    try:
        entry = registries.models.entry(spec.model.name)
    except RunnerError as exc:
        raise SpecError(f"model.name: {exc}") from None
    resolve = getattr(entry.obj, "named_weights", None)
    if resolve is None:
        raise SpecError(f"model.weights: {spec.model.name} offers no named weights ({name!r}); use {{file: …}} or {{run: …}}")
    with entry.blamed("model.weights", spec.model.name):
        weights = resolve(name)
    if not isinstance(weights, NamedWeights):
        raise SpecError(f"model.weights: {entry.label(spec.model.name)} resolved {name!r} to a {type(weights).__name__}, not NamedWeights")
    return weights


def weights_plan(spec: Spec, base_dir: str, named: NamedWeights | None, upstream: UpstreamWeights | None,
                 read_weights: bool) -> WeightsPlan | None:
    source = spec.model.weights
    if source is None:
        return None
    if named is not None:
        if named.path is not None and read_weights and not Path(named.path).is_file():
            raise SpecError(f"model.weights: {named.source} are not downloaded: put {Path(named.path).name} in {Path(named.path).parent}")
        digest = sha256_file(named.path) if named.path is not None and read_weights else None
        return WeightsPlan("named", named.source, digest, named.path, name=named.name)
    if hasattr(source, "file"):
        path = Path(source.file).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        if read_weights and not path.is_file():
            raise SpecError(f"weights file not found: {path}")
        return WeightsPlan("file", f"file:{path}", sha256_file(path) if read_weights else None, str(path))
    if not read_weights:
        return WeightsPlan("run", f"run:{source.run}" if hasattr(source, "run") else f"experiment {source.experiment}", None, None)
    if upstream is None:
        what = f"run {source.run}" if hasattr(source, "run") else f"experiment {source.experiment}"
        raise SpecError(f"model.weights: {what} has no completed run with a best checkpoint in the store")
    return WeightsPlan("run", upstream.source, sha256_file(upstream.path), upstream.path)


# ------------------------------------------------------------------------------------------
# Plans stored with runs


def stored_plan(row: dict[str, Any], registries: Registries) -> RunPlan:
    """The plan a run was trained with; runs stored before plans existed are planned again from their spec."""
    spec = load_spec(json.loads(row["spec_json"]))
    settings = json.loads(row["settings_json"] or "{}")
    if settings.get("plan_version"):
        return RunPlan.from_json(spec, settings)
    replanned = plan(spec, registries, base_dir=settings.get("spec_dir", "."), read_weights=False)
    recorded = settings.get("performance")
    return replanned if not recorded else replace(replanned, performance=Performance.from_dict(recorded))


__all__ = [
    "RunPlan", "DataPlan", "ModelPlan", "StagePlan", "WeightsPlan", "FeatureCachePlan", "UpstreamWeights", "DistributedPlan",
    "plan", "resolve_spec", "check_names", "resolve_device", "build_strategy", "stored_plan", "named_weights",
]
