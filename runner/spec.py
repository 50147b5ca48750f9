"""The experiment spec: YAML in, a validated, typed, resolved spec out.

Loading never imports torch: ``runner validate`` checks names against the plugin registries
separately (see :func:`runner.build.check_spec`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.errors import SpecError

# --------------------------------------------------------------------------------------------
# YAML: safe_load semantics, but a key given twice is an error instead of silently keeping the last


class _StrictSafeLoader(yaml.SafeLoader):
    pass


def _construct_mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise SpecError(f"duplicate key {key!r} at line {line} (the YAML would be ambiguous)")
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)
# YAML 1.2 booleans: only true/false. YAML 1.1 would turn `feature_cache: off` or `amp: on` into booleans.
_StrictSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.1 reads "1e-3" as a string (it wants "1.0e-3"); learning rates are written the short way
_StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML: a bigger file is a mistake, and parsing it would take minutes
MAX_NESTING = 32  # levels of mappings and lists; real specs use fewer than ten


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` nests mappings and lists more than ``limit`` levels deep.

    Iterative, so a deep value cannot exhaust the stack; a container shared through YAML aliases is
    looked at once per depth (a "billion laughs" stays cheap), and a recursive one is too deep.
    """
    deepest_seen: dict[int, int] = {}
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or deepest_seen.get(id(node), 0) >= depth:
            continue
        if depth > limit:
            return True
        deepest_seen[id(node)] = depth
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_yaml(text: str, source: str = "<spec>") -> Any:
    """``yaml.safe_load`` with duplicate keys refused and nesting limited; errors become one-line :class:`SpecError`."""
    nested = f"{source}: the YAML is nested more than {MAX_NESTING} levels deep"
    try:
        value = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # the parser itself recurses once per level
        raise SpecError(nested) from None
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except yaml.constructor.ConstructorError as exc:
        raise SpecError(f"{source}: YAML tag not allowed ({exc.problem}); only plain YAML is accepted") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None
    if too_deep(value):
        raise SpecError(nested)
    return value


def read_spec_text(path: Path) -> str:
    """A spec file's text: at most :data:`MAX_SPEC_BYTES` of UTF-8, read without loading more than that."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise SpecError(f"cannot read spec {path}: {exc.__class__.__name__}") from None
    if len(data) > MAX_SPEC_BYTES:
        size = path.stat().st_size if path.is_file() else len(data)
        raise SpecError(f"spec {path} is {size / 2**20:.1f} MiB; a spec may be at most {MAX_SPEC_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"cannot read spec {path}: UnicodeDecodeError") from None


# --------------------------------------------------------------------------------------------
# The typed spec


MAX_SEED = 2**63 - 1  # what torch.manual_seed and the loaders' generators take


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _NamedWithOptions(BaseModel):
    """``{name: X, any: kwargs}``: the kwargs are checked against X's signature when names are resolved."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TransformStep(_NamedWithOptions):
    pass


class OptimizerSpec(_NamedWithOptions):
    name: str = "Adam"


class SchedulerSpec(_NamedWithOptions):
    pass


class LossSpec(_NamedWithOptions):
    name: str = "CrossEntropyLoss"


class StrategySpec(_NamedWithOptions):
    name: str = "full_finetune"


class SplitSpec(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="seed of the split; the run's seed when null")

    @model_validator(mode="after")
    def _fractions_add_up(self) -> "SplitSpec":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {total:g}")
        return self


class DataSpec(_Strict):
    dataset: str = "mnist_bundled"
    options: dict[str, Any] = Field(default_factory=dict)
    classes: Optional[list[int]] = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    train_per_class: Optional[int] = Field(None, gt=0, description="keep only this many training samples per class")
    batch_size: int = Field(64, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)
    channels: Literal["auto", 1, 3] = "auto"
    on_corrupt: Literal["error", "skip"] = "error"

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        repeated = sorted({c for c in value if value.count(c) > 1}) if value else []
        if repeated:
            raise ValueError(f"class {repeated[0]} is listed more than once (each label may be kept once)")
        return value


class WeightsFromFile(_Strict):
    file: str


class WeightsFromRun(_Strict):
    run: str

    @field_validator("run", mode="before")
    @classmethod
    def _id_read_as_a_number(cls, value: Any) -> Any:
        # Ids made before new ones started with a letter can read as YAML numbers. Twelve decimal digits
        # (``{run: 257400778786}``) come back as an int that still spells the id; any other number
        # (``5351e9053013`` is a float, ``012345670123`` octal) has lost it, so the user must quote it.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if isinstance(value, int) and len(str(value)) == 12:
            return str(value)
        raise ValueError(f"YAML read this run id as a number ({value}); put the id in quotes, as in {{run: '5351e9053013'}}")


class WeightsFromExperiment(_Strict):
    experiment: str


WeightsSpec = Union[None, str, WeightsFromFile, WeightsFromRun, WeightsFromExperiment]


class ModelSpec(_Strict):
    name: str
    num_classes: Optional[int] = Field(None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsSpec = None
    surgery: dict[str, Any] = Field(default_factory=dict)
    trust_repo: bool = False

    @field_validator("weights", mode="before")
    @classmethod
    def _one_weights_source(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "random", ""):
            return None
        if isinstance(value, dict):
            forms = {"file": WeightsFromFile, "run": WeightsFromRun, "experiment": WeightsFromExperiment}
            keys = [k for k in value if k in forms]
            if len(keys) != 1 or len(value) != 1:
                raise ValueError("weights must be none, a weights name such as IMAGENET1K_V1, "
                                 "or one of {file: PATH}, {run: RUN_ID}, {experiment: SPEC_PATH}")
            return forms[keys[0]](**value)
        if value is not None and not isinstance(value, str):
            raise ValueError("weights must be none, a weights name, {file: …}, {run: …} or {experiment: …}")
        return value


class EarlyStoppingSpec(_Strict):
    monitor: str = "val_loss"
    mode: Optional[Literal["min", "max"]] = None
    patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if "loss" in self.monitor else "max")


class TrainingSpec(_Strict):
    epochs: int = Field(10, gt=0)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="Adam", lr=1e-3))
    scheduler: Optional[SchedulerSpec] = None
    loss: LossSpec = Field(default_factory=LossSpec)
    grad_clip: Optional[float] = Field(None, gt=0)
    early_stopping: Optional[EarlyStoppingSpec] = None
    feature_cache: Literal["auto", "off"] = Field(
        "auto", description="train a frozen backbone's head on features computed once, where that is exact"
    )
    nonfinite_validation: Literal["fail", "continue"] = Field(
        "fail", description="a NaN or infinite validation loss fails the run, or is stored as null and training goes on"
    )


DEFAULT_TRANSFORMS: list[dict[str, Any]] = [{"name": "ToImage"}, {"name": "ToDtype", "dtype": "float32", "scale": True}]


class TransformsSpec(_Strict):
    train: list[TransformStep] = Field(default_factory=lambda: [TransformStep(**t) for t in DEFAULT_TRANSFORMS])
    eval: Optional[list[TransformStep]] = Field(
        None, description="defaults to the training transforms with the random ones left out"
    )


class CheckpointsSpec(_Strict):
    keep: Literal["best", "last", "both", "all"] = Field(
        "both", description="checkpoints kept once the run completes; all adds one per epoch"
    )


class PerformanceSpec(_Strict):
    """How fast, not what: speed switches resolved per device (``auto``) and recorded in the run.

    See :mod:`runner.performance` for what ``auto`` chooses and why.
    """

    threads: Optional[int] = Field(None, gt=0, description="torch.set_num_threads; null: torch's default")
    channels_last: Literal["auto", "on", "off"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="mixed precision; auto: bf16 or fp16 on CUDA, off elsewhere")
    cudnn_benchmark: Literal["auto", "on", "off"] = Field("auto", description="auto: on for CUDA unless deterministic")
    pin_memory: Literal["auto", "on", "off"] = Field("auto", description="page-locked batches; auto: on for CUDA")
    compile: bool = Field(False, description="torch.compile the trained module")
    sync_batchnorm: Literal["auto", "on", "off"] = Field(
        "auto", description="several processes: BatchNorm statistics over the global batch; auto: on CUDA only"
    )

    @field_validator("channels_last", "amp", "cudnn_benchmark", "pin_memory", "sync_batchnorm", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # true/false mean on/off (and a YAML 1.1 reader would have turned on/off into booleans)
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Keys that decide what is kept on disk, how fast it runs or when a diverged run gives up, not what
# is trained: left out of the spec hash, so equal experiments still share a hash (and
# `{experiment: …}` weights still find their run, and runs stored before a key existed still resume).
_NOT_HASHED = ("checkpoints", "performance", "training.nonfinite_validation")


class Spec(_Strict):
    name: str = "experiment"
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    deterministic: bool = False
    device: str = "auto"
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec
    transforms: TransformsSpec = Field(default_factory=TransformsSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoints: CheckpointsSpec = Field(default_factory=CheckpointsSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    # ---- what gets stored -------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The spec with defaults applied, as plain JSON-compatible data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        # libyaml's emitter where PyYAML has it: the same text, several times faster (a sweep stores hundreds)
        return yaml.dump(self.resolved(), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved spec: equal specs, equal hash."""
        hashed = self.resolved()
        for dotted in _NOT_HASHED:
            *parents, key = dotted.split(".")
            node = hashed
            for parent in parents:
                node = node[parent]
            node.pop(key)
        canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.epochs=3"`` → (["training", "epochs"], 3); the value is parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects KEY=VALUE, got {text!r}")
    value = parse_yaml(raw, source=f"--set {key}") if raw.strip() else None
    return key.strip().split("."), value


def set_key(raw: dict[str, Any], path: list[str], value: Any, what: str = "--set") -> None:
    """Set the dotted key ``path`` of a spec mapping to ``value``, making mappings on the way."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{what} {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a spec mapping. Unknown keys are caught by validation, not here."""
    for text in overrides:
        path, value = parse_override(text)
        set_key(raw, path, value)
    return raw


# Top-level sections of a sweep (runner.sweeps): a spec holding them stands for many runs, not one.
SWEEP_SECTIONS = ("sweep", "seeds")


def read_mapping(source: str | Path | dict[str, Any] | Spec) -> tuple[dict[str, Any], str]:
    """A spec as a plain mapping (a deep copy) and the label its errors carry; a file's name defaults to its stem."""
    if isinstance(source, Spec):
        return source.resolved(), "<spec>"
    if isinstance(source, dict):
        return json.loads(json.dumps(source)), "<spec>"  # a deep copy; overrides must not touch the caller's mapping
    path = Path(source)
    label = str(path)
    raw = parse_yaml(read_spec_text(path), source=label)
    if raw is None:
        raise SpecError(f"{label}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{label}: a spec must be a mapping of keys to values, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    return raw, label


def load_spec(source: str | Path | dict[str, Any] | Spec, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, override and validate a spec from a YAML path, a mapping or a typed :class:`Spec`."""
    raw, label = read_mapping(source)
    swept = [key for key in SWEEP_SECTIONS if key in raw]
    if swept:
        raise SpecError(f"{label}: {swept[0]}: this spec is a sweep of many runs; run it with 'runner run' or "
                        f"'runner sweep run', list its runs with 'runner sweep plan'")
    return validate_mapping(apply_overrides(raw, list(overrides)), label)


def validate_mapping(raw: dict[str, Any], label: str = "<spec>") -> Spec:
    """A spec mapping as a typed :class:`Spec`; every problem in one :class:`SpecError` line headed by ``label``."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{label}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line: each problem as ``key.path: message`` with a "did you mean" for unknown keys."""
    problems = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "tagged-union"))]
        loc = _drop_union_branch_names(loc)
        key = ".".join(loc) or "<spec>"
        if error["type"] == "extra_forbidden":
            suggestion = _did_you_mean(loc)
            problems.append(f"unknown key {key!r}{suggestion}")
        elif error["type"] == "missing":
            problems.append(f"missing required key {key!r}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message} (got {error.get('input')!r})")
    unique = list(dict.fromkeys(problems))
    return "; ".join(unique[:3]) + (f"; and {len(unique) - 3} more" if len(unique) > 3 else "")


_BRANCH_NAMES = {"str", "WeightsFromFile", "WeightsFromRun", "WeightsFromExperiment", "int", "float"}


def _drop_union_branch_names(loc: list[str]) -> list[str]:
    return [p for p in loc if p not in _BRANCH_NAMES]


def _did_you_mean(loc: list[str]) -> str:
    fields = _field_names_at(Spec, loc[:-1])
    matches = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*loc[:-1], matches[0]])!r}?" if matches else ""


def _field_names_at(model: type[BaseModel], path: list[str]) -> list[str]:
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
