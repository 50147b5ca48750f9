"""Model assembly: build from the registry, size the head, apply surgery, load weights.

What "the head" is follows one rule for every family: the final classification layer is the last
``Linear`` in module order (the last ``Conv2d`` for models without one, e.g. SqueezeNet), and the
head is the top-level child holding it (VGG ``classifier``, ResNet ``fc``, ViT ``heads``).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from runner import rng
from runner.errors import PluginError, SpecError
from runner.interfaces import ModelRequest
from runner.layers import build_layer
from runner.spec import Spec

if TYPE_CHECKING:
    from runner.registries import Registries


# ------------------------------------------------------------------------------------------
# Building


def build_model(
    spec: Spec, registries: Registries, input_shape: tuple[int, int, int], *, weights_name: str | None = None,
    on_meta: bool = False,
) -> tuple[nn.Module, list[str]]:
    """The spec's model with its head sized and surgery applied, and the names of the layers replaced.

    ``on_meta`` builds it on PyTorch's ``meta`` device: every module and shape, no memory and no
    random numbers, which is all planning needs (a builder that cannot build on ``meta`` is built on
    the CPU with the random generators left as they were). ``weights_name`` is passed to the builder
    (named pretrained weights); weights from files or runs are loaded later by the caller.
    """
    request = ModelRequest(
        name=spec.model.name, num_classes=int(spec.model.num_classes or 0), input_shape=input_shape,
        options=dict(spec.model.options), weights=weights_name, trust_repo=spec.model.trust_repo,
    )
    entry = registries.models.entry(spec.model.name)
    if not on_meta:
        return _assemble(entry, request, spec)
    try:
        with torch.device("meta"):
            return _assemble(entry, request, spec)
    except (NotImplementedError, RuntimeError, PluginError) as exc:
        if not _meta_unsupported(exc):
            raise
    with rng.preserved():
        return _assemble(entry, request, spec)


def _meta_unsupported(exc: BaseException) -> bool:
    """Whether building failed only because the builder needs real tensors (the meta device has no data)."""
    cause = exc.__cause__ if isinstance(exc, PluginError) else exc
    return isinstance(cause, (NotImplementedError, RuntimeError)) and "meta" in str(cause).lower()


def _assemble(entry: Any, request: ModelRequest, spec: Spec) -> tuple[nn.Module, list[str]]:
    with entry.blamed("model", spec.model.name):
        try:
            model = entry.obj(request)
        except TypeError as exc:
            raise SpecError(f"model.options: {spec.model.name}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model.name: {entry.label(spec.model.name)} did not build a torch.nn.Module")
    heads = head_names(model)
    apply_surgery(model, spec.model.surgery, int(spec.model.num_classes or 0))
    return model, sorted(set(heads) | set(spec.model.surgery))


# ------------------------------------------------------------------------------------------
# The head


def final_layer_name(model: nn.Module) -> str:
    """Dotted name of the final classification layer."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise SpecError("the model has no Linear or Conv2d layer to use as its classification head")


def head_names(model: nn.Module) -> list[str]:
    """Top-level children that make up the classification head (``["classifier"]`` for VGG, ``["fc"]`` for ResNet).

    The rule: the final classification layer is the last ``Linear`` in module order (the last
    ``Conv2d`` without one) and the head is the top-level child holding it. What ``Stage(trainable="head")``
    trains and what a ``{last: N}`` stage adds blocks to.
    """
    return [final_layer_name(model).split(".")[0]]


def _out_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return None


def _resized(module: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, num_classes, bias=module.bias is not None)
    assert isinstance(module, nn.Conv2d)
    return nn.Conv2d(
        module.in_channels, num_classes, kernel_size=module.kernel_size, stride=module.stride,
        padding=module.padding, bias=module.bias is not None,
    )


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Resize every classification output of ``model`` (auxiliary heads too) to ``num_classes``.

    The original class count is read off the final layer; every Linear (or, without Linears, every
    Conv2d) producing that many outputs is a classification output and is replaced by a freshly
    initialised layer of the same input size. Returns the replaced names; nothing else is touched.
    """
    final_name = final_layer_name(model)
    original = _out_size(model.get_submodule(final_name))
    if original == num_classes:
        return []
    layer_type = type(model.get_submodule(final_name))
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is layer_type and _out_size(module) == original:
            set_submodule(model, name, _resized(module, num_classes))
            replaced.append(name)
    return replaced


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def apply_surgery(model: nn.Module, surgery: dict[str, Any], num_classes: int) -> None:
    """Replace submodules by dotted path, as in ``model.classifier[6] = nn.Linear(4096, 2)``."""
    for path, decl in surgery.items():
        try:
            old = model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            matches = difflib.get_close_matches(path, names, n=1)
            hint = f"; did you mean {matches[0]!r}?" if matches else ""
            raise SpecError(f"model.surgery: the model has no submodule {path!r}{hint}") from None
        decl = _fill_sizes_from(old, decl)
        set_submodule(model, path, build_layer(decl, _input_shape_of(old), num_classes, where=f"model.surgery.{path}"))


def _fill_sizes_from(old: nn.Module, decl: Any) -> Any:
    """A replacement Linear/Conv2d takes its input size from the layer it replaces unless given."""
    if not isinstance(decl, dict):
        return decl
    decl = dict(decl)
    if decl.get("type") == "Linear" and isinstance(old, nn.Linear):
        decl.setdefault("in_features", old.in_features)
    if decl.get("type") == "Conv2d" and isinstance(old, nn.Conv2d):
        decl.setdefault("in_channels", old.in_channels)
    if decl.get("type") == "Linear":
        decl.setdefault("out_features", "num_classes")
    return decl


def _input_shape_of(old: nn.Module) -> tuple[int, ...]:
    if isinstance(old, nn.Linear):
        return (old.in_features,)
    if isinstance(old, nn.Conv2d):
        return (old.in_channels, 8, 8)
    return (1,)


def input_channels(model: nn.Module) -> int | None:
    """Channels the first convolution expects (None when the model has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


# ------------------------------------------------------------------------------------------
# Which parameters train


def select_trainable(model: nn.Module, trainable: Any) -> set[str]:
    """Parameter names a stage trains: "all", "head", name patterns, or {"last": N} blocks + head."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return set(names)
    heads = head_names(model)
    if trainable == "head":
        patterns: list[str] = heads
    elif isinstance(trainable, dict) and set(trainable) == {"last"}:
        blocks = [n for n, m in model.named_children() if n not in heads and any(True for _ in m.parameters())]
        patterns = heads + blocks[len(blocks) - int(trainable["last"]):] if int(trainable["last"]) > 0 else heads
    elif isinstance(trainable, (list, tuple)):
        # "head" in a list stands for the model's head, beside name patterns: ["head", "layer4.*"]
        patterns = [q for p in trainable for q in (heads if p == "head" else [str(p)])]
    else:
        raise SpecError(f"trainable must be 'all', 'head', a list of name patterns or {{last: N}}, got {trainable!r}")
    selected = {n for n in names if any(_matches(n, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if unmatched:
        raise SpecError(f"trainable pattern {unmatched[0]!r} matches no parameter of the model")
    return selected


def _matches(param_name: str, pattern: str) -> bool:
    return param_name == pattern or param_name.startswith(pattern + ".") or fnmatch.fnmatchcase(param_name, pattern)


def freeze(model: nn.Module, trainable: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers with no trainable parameter stay in eval mode.

    A frozen backbone must stay frozen: in train mode BatchNorm would still update its running
    statistics, changing the backbone's buffers (and outputs) although no weight trains.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], replaced: Iterable[str], source: str) -> list[str]:
    """Load ``state`` into ``model``; only layers the spec replaced may be left out or differ in shape.

    Returns the names that were not loaded (freshly initialised head or surgery layers). Anything
    else missing or mismatched is an error: weights never fall back to random silently.
    """
    replaced_prefixes = tuple(f"{r}." for r in replaced)
    own = model.state_dict()
    usable, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            usable[key] = value
        elif key.startswith(replaced_prefixes):
            skipped.append(key)
        elif key in own:
            raise SpecError(f"weights from {source}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}")
        else:
            raise SpecError(f"weights from {source}: unexpected tensor {key!r}; is it for another architecture?")
    missing = [k for k in own if k not in usable and not k.startswith(replaced_prefixes)]
    if missing:
        raise SpecError(f"weights from {source} lack {len(missing)} tensors the model needs, e.g. {missing[0]!r}")
    model.load_state_dict(usable, strict=False)
    return skipped + [k for k in own if k not in usable and k not in skipped]
