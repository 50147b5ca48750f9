"""Plugin loading: a plugin-manager factory and the registries it fills, loaded once per command.

Built-in plugins are the modules of :mod:`runner.plugins`, registered through the same path as
third-party entry points (group ``runner``), so ``runner plugins`` shows them and a user can block
any of them. Every entry point of the runner (run, resume, eval, predict, export, summary, validate,
reproduce, the Python API) takes one :class:`Registries` and reaches plugin names only through it.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from runner import hookspecs
from runner.version import __version__
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
    stage: str  # "import", "register" (pluggy refused its hooks) or the hook name
    error: str

    def __str__(self) -> str:
        where = {"import": "importing", "register": "registering its hooks"}.get(self.stage, f"running {self.stage}")
        return f"plugin {self.plugin!r} failed while {where}: {self.error}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (pluggy's validation errors span several), at most ``limit`` chars."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Registries:
    """Every name the loaded plugins registered, by kind."""

    models: Registry[Any] = field(default_factory=lambda: Registry("model"))
    datasets: Registry[Any] = field(default_factory=lambda: Registry("dataset"))
    transforms: Registry[Any] = field(default_factory=lambda: Registry("transform"))
    strategies: Registry[Any] = field(default_factory=lambda: Registry("strategy"))
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Plugins not loaded on purpose, with the reason (RUNNER_BLOCK_PLUGINS, RUNNER_DISABLE_PLUGINS)."""

    def by_kind(self) -> dict[str, Registry[Any]]:
        """The four registries by the kind of name they hold (``model``, ``dataset``, ``transform``, ``strategy``)."""
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


def name_rows(registries: Registries) -> list[dict[str, Any]]:
    """One row per registered name (what ``runner plugins`` prints); both sides of a collision, flagged."""
    rows = []
    for kind, registry in registries.by_kind().items():
        for entry in registry.entries():
            rows.append(_name_row(kind, entry.name, entry, ""))
        for name, entries in registry.collisions().items():
            rows.extend(_name_row(kind, name, entry, "COLLISION") for entry in entries)
    return rows


def _name_row(kind: str, name: str, entry: Any, collision: str) -> dict[str, Any]:
    return {"kind": kind, "name": name, "plugin": entry.plugin, "distribution": entry.distribution,
            "version": entry.version, "collision": collision}


def plugin_rows(registries: Registries) -> list[dict[str, Any]]:
    """Every loaded plugin with its distribution and version, built-ins first."""
    infos = sorted(registries.plugins.values(), key=lambda i: (not i.builtin, i.name))
    return [{"plugin": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin} for i in infos]


def _blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _is_blocked(ep: metadata.EntryPoint, blocked: set[str]) -> bool:
    """Blocked by entry-point name (``extras``) or by distribution name (``runner-extras``)."""
    dist = getattr(ep, "dist", None)
    return ep.name in blocked or (dist is not None and _normalized(dist.name) in {_normalized(b) for b in blocked})




class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering the distribution and version each entry point came from."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.distributions: dict[str, tuple[str | None, str | None]] = {}
        self.skipped: dict[str, str] = {}


def get_plugin_manager(problems: list[PluginProblem] | None = None) -> PluginManager:
    """A fresh plugin manager with the hookspecs added, built-ins and entry points registered.

    Plugins that fail to import, or whose hooks pluggy refuses, are skipped and recorded in
    ``problems``; blocked and disabled ones are recorded in ``pm.skipped``.
    """
    problems = problems if problems is not None else []
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    blocked = _blocked_names()
    for module_name in BUILTIN_PLUGINS:
        if module_name in blocked:
            pm.skipped[module_name] = f"blocked by {BLOCK_ENV}"
        else:
            pm.register(importlib.import_module(module_name), name=module_name)
    disabled = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name):
            continue
        if disabled or _is_blocked(ep, blocked):
            pm.skipped[ep.name] = f"{DISABLE_ENV}=1" if disabled else f"blocked by {BLOCK_ENV}"
            continue
        _register_entry_point(pm, ep, problems)
    return pm


def _register_entry_point(pm: PluginManager, ep: metadata.EntryPoint, problems: list[PluginProblem]) -> None:
    try:
        plugin = ep.load()
    except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down (nor exit)
        problems.append(PluginProblem(ep.name, "import", one_line(exc)))
        return
    try:
        pm.register(plugin, name=ep.name)
    except Exception as exc:  # e.g. a hookimpl asking for an argument this runner's hook lacks
        problems.append(PluginProblem(ep.name, "register", one_line(exc)))
        return
    dist = getattr(ep, "dist", None)
    pm.distributions[ep.name] = (dist.name if dist else None, dist.version if dist else None)


def _plugin_info(pm: PluginManager, plugin: object) -> PluginInfo:
    name = pm.get_name(plugin) or repr(plugin)
    if name in BUILTIN_PLUGINS:
        return PluginInfo(name, DISTRIBUTION, __version__, builtin=True)
    dist, version = getattr(pm, "distributions", {}).get(name, (None, None))
    return PluginInfo(name, dist, version, builtin=False)


def load_registries(pm: pluggy.PluginManager | None = None) -> Registries:
    """Call every registration hook, one plugin at a time, and collect the names into registries.

    Calling implementations one by one (rather than through ``pm.hook``) is what lets the runner
    attribute every name to its plugin and keep loading when one plugin raises. Names of plugins
    that are not loaded stay known as unavailable, so a spec using one is told why.
    """
    registries = Registries()
    if pm is None:
        pm = get_plugin_manager(registries.problems)
    registries.skipped.update(getattr(pm, "skipped", {}))
    for plugin in pm.get_plugins():
        info = _plugin_info(pm, plugin)
        registries.plugins[info.name] = info
    kinds = registries.by_kind()
    for hook_name, kind in hookspecs.HOOK_KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = registries.plugins[impl.plugin_name]
            pending = _call_registration_hook(impl, hook_name, info, registries.problems)
            for name, obj in pending:
                _register(kinds[kind], name, obj, info, hook_name, registries.problems)
    _mark_unavailable(registries)
    return registries


def _mark_unavailable(registries: Registries) -> None:
    """Names of skipped or broken plugins: a built-in's exact names, a third-party plugin's ``name:`` prefix."""
    kinds = registries.by_kind()
    for plugin, reason in registries.skipped.items():
        why = f"comes from plugin {plugin!r}, which is {reason if reason.startswith('blocked') else f'not loaded ({reason})'}"
        if plugin in BUILTIN_PLUGINS:
            for kind, name in builtin_names(plugin):
                kinds[kind].mark_unavailable(name, why)
        else:
            for registry in kinds.values():
                registry.mark_unavailable_prefix(f"{plugin}:", why)
    for problem in registries.problems:
        if problem.stage in ("import", "register"):
            for registry in kinds.values():
                registry.mark_unavailable_prefix(f"{problem.plugin}:", f"comes from plugin {problem.plugin!r}, which failed to load")


def builtin_names(module_name: str) -> list[tuple[str, str]]:
    """(kind, name) of everything a built-in plugin module registers, without registering it.

    Only for the runner's own modules: a blocked third-party plugin is never imported.
    """
    module = importlib.import_module(module_name)
    names: list[tuple[str, str]] = []
    for hook_name, kind in hookspecs.HOOK_KINDS.items():
        hook = getattr(module, hook_name, None)
        if hook is not None:
            hook(lambda name, _builder, kind=kind: names.append((kind, name)))
    return names


def _call_registration_hook(impl: Any, hook_name: str, info: PluginInfo, problems: list[PluginProblem]) -> list[tuple[str, Any]]:
    """Run one plugin's hook and return what it registered: nothing at all if the hook raised.

    Only the arguments the implementation names are passed (pluggy's rule), so an implementation
    written before a hook gained an argument keeps working.
    """
    pending: list[tuple[str, Any]] = []

    def register(name: str, builder: Any) -> None:
        # checked at the call, so the hook fails at the mistake and none of its names count
        if not isinstance(name, str) or not name:
            raise ValueError(f"register() needs a non-empty string name, got {name!r}")
        if not callable(builder):
            raise TypeError(f"register({name!r}, …) needs a callable builder, got {type(builder).__name__}")
        pending.append((name, builder))

    offered: dict[str, Any] = {"register": register}
    unknown = [arg for arg in impl.argnames if arg not in offered]
    if unknown:
        problems.append(PluginProblem(info.name, hook_name, f"asks for {', '.join(unknown)}, which this runner version does not provide"))
        return []
    try:
        impl.function(**{arg: offered[arg] for arg in impl.argnames})
    except (Exception, SystemExit) as exc:
        problems.append(PluginProblem(info.name, hook_name, one_line(exc)))
        return []
    return pending


def _register(registry: Registry[Any], name: str, obj: Any, info: PluginInfo, hook_name: str, problems: list[PluginProblem]) -> None:
    try:
        registry.register(name, obj, plugin=info.name, distribution=info.distribution, version=info.version)
    except DuplicateNameError as exc:
        problems.append(PluginProblem(info.name, hook_name, str(exc)))
