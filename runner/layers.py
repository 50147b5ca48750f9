"""Layers declared in YAML (``{type: Conv2d, out_channels: 32, kernel_size: 3}``) turned into modules.

Input sizes (``in_channels``, ``in_features``, ``num_features``) are inferred by passing a dummy
tensor through the layers built so far, so specs only state what a person would choose.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import torch
from torch import nn

from runner.errors import SpecError


class Residual(nn.Module):
    """``x + body(x)``, with a 1x1 convolution projecting ``x`` when the shapes differ (ResNet's skip)."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _conv(shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return nn.Conv2d(kw.pop("in_channels", shape[0]), **kw)


def _linear(shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return nn.Linear(kw.pop("in_features", shape[-1]), **kw)


def _batchnorm(shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return nn.BatchNorm2d(kw.pop("num_features", shape[0]), **kw)


def _batchnorm1d(shape: tuple[int, ...], **kw: Any) -> nn.Module:
    return nn.BatchNorm1d(kw.pop("num_features", shape[0]), **kw)


def _plain(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(shape: tuple[int, ...], **kw: Any) -> nn.Module:
        return cls(**kw)

    build.__doc__ = cls.__doc__
    build.target = cls  # type: ignore[attr-defined]
    return build


LAYERS: dict[str, Callable[..., nn.Module]] = {
    "Conv2d": _conv,
    "ConvTranspose2d": lambda shape, **kw: nn.ConvTranspose2d(kw.pop("in_channels", shape[0]), **kw),
    "Linear": _linear,
    "BatchNorm2d": _batchnorm,
    "BatchNorm1d": _batchnorm1d,
    "ReLU": _plain(nn.ReLU),
    "LeakyReLU": _plain(nn.LeakyReLU),
    "GELU": _plain(nn.GELU),
    "SiLU": _plain(nn.SiLU),
    "Sigmoid": _plain(nn.Sigmoid),
    "Tanh": _plain(nn.Tanh),
    "Softmax": _plain(nn.Softmax),
    "MaxPool2d": _plain(nn.MaxPool2d),
    "AvgPool2d": _plain(nn.AvgPool2d),
    "AdaptiveAvgPool2d": _plain(nn.AdaptiveAvgPool2d),
    "AdaptiveMaxPool2d": _plain(nn.AdaptiveMaxPool2d),
    "Dropout": _plain(nn.Dropout),
    "Dropout2d": _plain(nn.Dropout2d),
    "Flatten": _plain(nn.Flatten),
    "Identity": lambda shape, **kw: nn.Identity(),
}
"""Layer types a spec may declare (plus ``Residual`` and ``Sequential``, which nest layers)."""

_TARGETS = {
    "Conv2d": nn.Conv2d, "ConvTranspose2d": nn.ConvTranspose2d, "Linear": nn.Linear,
    "BatchNorm2d": nn.BatchNorm2d, "BatchNorm1d": nn.BatchNorm1d,
}


def _normalise(decl: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(decl, str):
        return decl, {}
    if not isinstance(decl, dict) or "type" not in decl:
        raise SpecError(f"{where}: a layer is a type name or a mapping with a 'type' key, got {decl!r}")
    options = dict(decl)
    return str(options.pop("type")), options


def build_layer(decl: Any, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    """One declared layer, sized for ``input_shape`` (one sample, no batch dimension)."""
    kind, options = _normalise(decl, where)
    options = {k: (num_classes if v == "num_classes" else v) for k, v in options.items()}
    if kind in ("Sequential", "Residual"):
        body = build_layers(options.pop("layers", []), input_shape, num_classes, where=f"{where}.layers")
        if options:
            raise SpecError(f"{where}: {kind} takes only 'layers', got {sorted(options)}")
        if kind == "Sequential":
            return body
        out_shape = _output_shape(body, input_shape)
        shortcut = None
        if out_shape != tuple(input_shape):
            if len(out_shape) != 3:
                raise SpecError(f"{where}: a Residual block must keep the image layout, got output {out_shape}")
            stride = max(1, input_shape[1] // out_shape[1])
            shortcut = nn.Conv2d(input_shape[0], out_shape[0], kernel_size=1, stride=stride, bias=False)
        return Residual(body, shortcut)
    factory = LAYERS.get(kind)
    if factory is None:
        matches = difflib.get_close_matches(kind, [*LAYERS, "Residual", "Sequential"], n=1)
        hint = f"; did you mean {matches[0]!r}?" if matches else ""
        raise SpecError(f"{where}: unknown layer type {kind!r}{hint}")
    try:
        return factory(tuple(input_shape), **options)
    except TypeError as exc:
        target = _TARGETS.get(kind) or getattr(factory, "target", None)
        raise SpecError(f"{where}: bad arguments for {kind}: {_explain_type_error(exc, target)}") from None


def _explain_type_error(exc: TypeError, target: Any) -> str:
    message = str(exc)
    if target is not None and "unexpected keyword argument" in message:
        bad = message.split("'")[-2] if "'" in message else ""
        names = list(inspect.signature(target).parameters)
        matches = difflib.get_close_matches(bad, names, n=1)
        if matches:
            return f"unknown argument {bad!r}; did you mean {matches[0]!r}?"
    return message


def build_layers(decls: list[Any], input_shape: tuple[int, ...], num_classes: int, where: str = "layers") -> nn.Sequential:
    """A Sequential of declared layers; each is sized by the output of the ones before it."""
    if not isinstance(decls, list):
        raise SpecError(f"{where}: expected a list of layers")
    modules: list[nn.Module] = []
    shape = tuple(input_shape)
    for i, decl in enumerate(decls):
        module = build_layer(decl, shape, num_classes, where=f"{where}[{i}]")
        modules.append(module)
        shape = _output_shape(module, shape)
    return nn.Sequential(*modules)


@torch.no_grad()
def _output_shape(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    was_training = module.training
    module.eval()  # BatchNorm must not update running stats on the dummy input
    try:
        out = module(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        raise SpecError(f"layers do not fit input of shape {tuple(input_shape)}: {str(exc).splitlines()[0]}") from None
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])
