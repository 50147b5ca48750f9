"""Plugin loading: a plugin-manager factory and the registries it fills.

Built-in plugins are modules of this package registered through the same path as third-party
entry points (group ``runner``), so ``runner plugins`` shows them and a user can block any of them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from runner import hookspecs
from runner.errors import DuplicateNameError
from runner.registry import Registry

ENTRY_POINT_GROUP = "runner"
DISTRIBUTION = "runner-dl"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "runner.plugins.models",
    "runner.plugins.datasets",
    "runner.plugins.transforms",
    "runner.plugins.strategies",
)

DISABLE_ENV = "RUNNER_DISABLE_PLUGINS"
"""Set to 1 to load no third-party plugins (built-ins still load)."""
BLOCK_ENV = "RUNNER_BLOCK_PLUGINS"
"""Comma-separated plugin names (entry-point or built-in module names) not to load."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to import or to register; the others still load."""

    plugin: str
    stage: str  # "import" or the hook name
    error: str

    def __str__(self) -> str:
        where = "importing" if self.stage == "import" else f"running {self.stage}"
        return f"plugin {self.plugin!r} failed while {where}: {self.error}"


@dataclass
class Registries:
    """Every name the loaded plugins registered, by kind."""

    models: Registry[Any] = field(default_factory=lambda: Registry("model"))
    datasets: Registry[Any] = field(default_factory=lambda: Registry("dataset"))
    transforms: Registry[Any] = field(default_factory=lambda: Registry("transform"))
    strategies: Registry[Any] = field(default_factory=lambda: Registry("strategy"))
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)

    def by_kind(self) -> dict[str, Registry[Any]]:
        return {"model": self.models, "dataset": self.datasets, "transform": self.transforms, "strategy": self.strategies}

    def used_plugins(self, names_by_kind: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Distribution and version of each plugin that provided one of the given names."""
        registries = self.by_kind()
        seen: dict[str, dict[str, Any]] = {}
        for kind, names in names_by_kind.items():
            for name in names:
                entry = registries[kind].entry(name)
                seen[entry.plugin] = {"plugin": entry.plugin, "distribution": entry.distribution, "version": entry.version}
        return sorted(seen.values(), key=lambda d: d["plugin"])


def _blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _runner_version() -> str | None:
    from runner import __version__

    return __version__


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering the distribution and version each entry point came from."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.distributions: dict[str, tuple[str | None, str | None]] = {}


def get_plugin_manager(problems: list[PluginProblem] | None = None) -> PluginManager:
    """A fresh plugin manager with the hookspecs added, built-ins and entry points registered.

    Plugins that fail to import are skipped and recorded in ``problems``.
    """
    problems = problems if problems is not None else []
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    blocked = _blocked_names()
    for module_name in BUILTIN_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return pm
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            problems.append(PluginProblem(ep.name, "import", f"{type(exc).__name__}: {exc}"))
            continue
        dist = getattr(ep, "dist", None)
        pm.distributions[ep.name] = (dist.name if dist else None, dist.version if dist else None)
    return pm


def _plugin_info(pm: PluginManager, plugin: object) -> PluginInfo:
    name = pm.get_name(plugin) or repr(plugin)
    if name in BUILTIN_PLUGINS:
        return PluginInfo(name, DISTRIBUTION, _runner_version(), builtin=True)
    dist, version = getattr(pm, "distributions", {}).get(name, (None, None))
    return PluginInfo(name, dist, version, builtin=False)


def load_registries(pm: pluggy.PluginManager | None = None) -> Registries:
    """Call every registration hook, one plugin at a time, and collect the names into registries.

    Calling implementations one by one (rather than through ``pm.hook``) is what lets the runner
    attribute every name to its plugin and keep loading when one plugin raises.
    """
    registries = Registries()
    if pm is None:
        pm = get_plugin_manager(registries.problems)
    for plugin in pm.get_plugins():
        info = _plugin_info(pm, plugin)
        registries.plugins[info.name] = info
    kinds = registries.by_kind()
    for hook_name, kind in hookspecs.HOOK_KINDS.items():
        registry = kinds[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = registries.plugins[impl.plugin_name]
            register = _register_callback(registry, info, registries.problems, hook_name)
            arguments = {"register": register}
            try:
                impl.function(**{arg: arguments[arg] for arg in impl.argnames})
            except Exception as exc:
                registries.problems.append(PluginProblem(info.name, hook_name, f"{type(exc).__name__}: {exc}"))
    return registries


def _register_callback(
    registry: Registry[Any], info: PluginInfo, problems: list[PluginProblem], hook_name: str
) -> Callable[[str, Any], None]:
    def register(name: str, obj: Any) -> None:
        try:
            registry.register(name, obj, plugin=info.name, distribution=info.distribution, version=info.version)
        except DuplicateNameError as exc:
            problems.append(PluginProblem(info.name, hook_name, str(exc)))

    return register
