"""Built-in models: the custom CNN, every torchvision classification model, torch.hub models."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from runner.errors import RunnerError, SpecError
from runner.hookspecs import hookimpl
from runner.interfaces import ModelRequest, NamedWeights

DEFAULT_CNN_LAYERS: list[Any] = [
    {"type": "Conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
    {"type": "BatchNorm2d"},
    "ReLU",
    {"type": "MaxPool2d", "kernel_size": 2},
    {"type": "Conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
    {"type": "BatchNorm2d"},
    "ReLU",
    {"type": "AdaptiveAvgPool2d", "output_size": 1},
    "Flatten",
    {"type": "Linear", "out_features": "num_classes"},
]


def build_cnn(request: ModelRequest) -> Any:
    """A CNN declared layer by layer in ``options.layers`` (a two-block CNN by default)."""
    from runner.layers import build_layers

    options = dict(request.options)
    layers = options.pop("layers", DEFAULT_CNN_LAYERS)
    if options:
        raise SpecError(f"model.options: the cnn model takes only 'layers', got {sorted(options)}")
    if request.weights is not None:
        raise SpecError(f"model.weights: the cnn has no named weights ({request.weights!r}); use {{file: …}} or {{run: …}}")
    return build_layers(layers, request.input_shape, request.num_classes, where="model.options.layers")


def _torchvision_builder(model_name: str) -> Callable[[ModelRequest], Any]:
    def build(request: ModelRequest) -> Any:
        import torchvision

        from runner.models import replace_head

        weights = resolve_torchvision_weights(model_name, request.weights)
        if weights is not None:
            ensure_weights_file(weights)
        options = dict(request.options)
        if model_name in ("inception_v3", "googlenet") and weights is None:
            options.setdefault("init_weights", True)  # silences torchvision's FutureWarning
        model = torchvision.models.get_model(model_name, weights=weights, **options)
        replace_head(model, request.num_classes)
        return model

    def named_weights(name: str) -> NamedWeights:
        weights = resolve_torchvision_weights(model_name, name)
        path = weights_cache_path(weights)

        def fetch() -> None:
            ensure_weights_file(weights)  # offline: one line naming the file and where to put it
            weights.get_state_dict(progress=True)  # downloads into $TORCH_HOME/hub/checkpoints

        return NamedWeights(name=weights.name, source=f"torchvision:{weights}", path=str(path), fetch=fetch)

    def weights_names() -> list[str]:
        import torchvision

        return [w.name for w in torchvision.models.get_model_weights(model_name)]

    build.__doc__ = f"torchvision.models.{model_name} with its head sized for num_classes"
    build.named_weights = named_weights  # type: ignore[attr-defined]
    build.weights_names = weights_names  # type: ignore[attr-defined]
    return build


def resolve_torchvision_weights(model_name: str, weights_name: str | None) -> Any:
    """The torchvision weights enum member for a name such as ``IMAGENET1K_V1`` or ``DEFAULT``."""
    if weights_name is None:
        return None
    import torchvision

    enum = torchvision.models.get_model_weights(model_name)
    try:
        return enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise SpecError(f"model.weights: {weights_name!r} is not a weights name for {model_name} (valid: {valid})") from None


def weights_cache_path(weights: Any) -> Path:
    """Where torchvision's weights API looks for this file: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def ensure_weights_file(weights: Any) -> None:
    """Fail fast with the file name and place when the weights are not cached and cannot be fetched."""
    path = weights_cache_path(weights)
    if path.exists():
        return
    host = urlparse(weights.url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise RunnerError(
            f"weights {weights} are not cached and there is no network: put {path.name} "
            f"(from {weights.url}) in {path.parent}"
        ) from None


def _parse_hub_name(name: str, prefix: str) -> tuple[str, str]:
    rest = name[len(prefix):]
    repo, sep, entry = rest.rpartition("/")
    if not sep or not repo or not entry:
        raise SpecError(f"model.name: expected {prefix}<repo>/<entry>, got {name!r}")
    return repo, entry


def require_trust(request: ModelRequest, code: str) -> None:
    """torch.hub runs the repository's ``hubconf.py``: only with the spec's explicit trust."""
    if not request.trust_repo:
        raise SpecError(f"model.name: {request.name} would run {code}; set model.trust_repo: true if you trust that repository")


def build_hub(request: ModelRequest) -> Any:
    """``hub:<owner>/<repo>[:<ref>]/<entry>``: a torch.hub model from GitHub, only with ``trust_repo``."""
    import torch

    from runner.models import replace_head

    repo, entry = _parse_hub_name(request.name, "hub:")
    require_trust(request, "code downloaded from GitHub")
    model = torch.hub.load(repo, entry, source="github", trust_repo=True, **request.options)
    replace_head(model, request.num_classes)
    return model


def build_hub_local(request: ModelRequest) -> Any:
    """``hub-local:<dir>/<entry>``: an entry point of a local ``hubconf.py``, only with ``trust_repo`` (it runs that file)."""
    import torch

    from runner.models import replace_head

    directory, entry = _parse_hub_name(request.name, "hub-local:")
    if not (Path(directory) / "hubconf.py").is_file():
        raise SpecError(f"model.name: no hubconf.py in {directory}")
    require_trust(request, f"the code in {Path(directory) / 'hubconf.py'}")
    model = torch.hub.load(directory, entry, source="local", **request.options)
    replace_head(model, request.num_classes)
    return model


def torchvision_classification_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@hookimpl
def runner_register_models(register: Callable[[str, Any], None]) -> None:
    register("cnn", build_cnn)
    for model_name in torchvision_classification_models():
        register(f"torchvision:{model_name}", _torchvision_builder(model_name))
    register("hub:*", build_hub)
    register("hub-local:*", build_hub_local)
