"""Plugin loading: a plugin-manager factory and the registries it fills, loaded once per command.

Built-in plugins are the modules of :mod:`runner.plugins`, registered through the same path as
third-party entry points (group ``runner``), so ``runner plugins`` shows them and a user can block
any of them. Every entry point of the runner (run, resume, eval, predict, export, summary, validate,
reproduce, the Python API) takes one :class:`Registries` and reaches plugin names only through it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from runner import hookspecs, import_gc
from runner.errors import DuplicateNameError, one_line
from runner.registry import Registry
from runner.version import __version__

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
LOAD_ENV = "RUNNER_LOAD_PLUGINS"
"""Comma-separated third-party plugin names: only these load, as if no other were installed (empty: none)."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


@dataclass(frozen=True)
class PluginProblem:
    """Something wrong with one plugin, reported as a warning; the other plugins (and its good names) still load.

    ``stage`` says what: ``import``, ``register`` (pluggy refused its hooks) or a hook's name (the hook
    raised: none of its names count) are failures; ``refused`` (a name it may not have), ``hooks`` (a
    function runner never calls), ``empty`` (it registered nothing) and ``duplicate`` (another
    distribution has its name) are notices about a plugin that otherwise loaded.
    """

    plugin: str
    stage: str
    error: str

    @property
    def failed(self) -> bool:
        return self.stage in ("import", "register") or self.stage in hookspecs.HOOK_KINDS

    def __str__(self) -> str:
        if not self.failed:
            return f"plugin {self.plugin!r} {self.error}"
        where = {"import": "importing", "register": "registering its hooks"}.get(self.stage, f"running {self.stage}")
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


def _env_names(variable: str) -> set[str]:
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _named(ep: metadata.EntryPoint, names: set[str]) -> bool:
    """Named by entry-point name (``extras``) or by distribution name (``runner-extras``)."""
    dist = getattr(ep, "dist", None)
    return ep.name in names or (dist is not None and _normalized(dist.name) in {_normalized(b) for b in names})


def selected_plugins(only: Iterable[str] | None = None) -> set[str] | None:
    """The third-party plugins to look at: ``only`` if given, else ``RUNNER_LOAD_PLUGINS`` if set, else None (all)."""
    if only is not None:
        return set(only)
    return _env_names(LOAD_ENV) if LOAD_ENV in os.environ else None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering the distribution and version each entry point came from."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.distributions: dict[str, tuple[str | None, str | None]] = {}
        self.skipped: dict[str, str] = {}


def get_plugin_manager(problems: list[PluginProblem] | None = None, *, only: Iterable[str] | None = None) -> PluginManager:
    """A fresh plugin manager with the hookspecs added, built-ins and entry points registered.

    ``only`` names the third-party plugins to load (entry-point or distribution names), as if no
    other were installed; without it ``RUNNER_LOAD_PLUGINS`` may say, else every installed one loads.
    Plugins that fail to import, or whose hooks pluggy refuses, are skipped and recorded in
    ``problems``; blocked and disabled ones are recorded in ``pm.skipped``.
    """
    problems = problems if problems is not None else []
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    blocked = _env_names(BLOCK_ENV)
    for module_name in BUILTIN_PLUGINS:
        if module_name in blocked:
            pm.skipped[module_name] = f"blocked by {BLOCK_ENV}"
        else:
            pm.register(importlib.import_module(module_name), name=module_name)
    disabled = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
    selected = selected_plugins(only)
    first_seen: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if selected is not None and not _named(ep, selected):
            continue
        if ep.name in first_seen:  # two distributions chose the same plugin name: the first one wins
            problems.append(PluginProblem(ep.name, "duplicate", f"of {_distribution(ep)} is not loaded: {first_seen[ep.name]} "
                                                                f"already provides a plugin of that name"))
            continue
        first_seen[ep.name] = _distribution(ep)
        if disabled or _named(ep, blocked):
            pm.skipped[ep.name] = f"{DISABLE_ENV}=1" if disabled else f"blocked by {BLOCK_ENV}"
            continue
        _register_entry_point(pm, ep, problems)
    return pm


def _distribution(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"distribution {dist.name!r} {dist.version}" if dist is not None else "an unknown distribution"


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


def load_registries(pm: pluggy.PluginManager | None = None, *, plugins: Iterable[str] | None = None) -> Registries:
    """Call every registration hook, one plugin at a time, and collect the names into registries.

    Calling implementations one by one (rather than through ``pm.hook``) is what lets the runner
    attribute every name to its plugin and keep loading when one plugin raises. Built-ins register
    first and keep their names: a third-party plugin registering one is refused that name. Names of
    plugins that are not loaded stay known as unavailable, so a spec using one is told why.

    :param plugins: the third-party plugins to load (see :func:`get_plugin_manager`'s ``only``).
    """
    with import_gc.paused():  # loading the built-in plugins imports torch and torchvision
        return _load(pm, plugins)


def _load(pm: pluggy.PluginManager | None, plugins: Iterable[str] | None) -> Registries:
    registries = Registries()
    if pm is None:
        pm = get_plugin_manager(registries.problems, only=plugins)
    registries.skipped.update(getattr(pm, "skipped", {}))
    for plugin in pm.get_plugins():
        info = _plugin_info(pm, plugin)
        registries.plugins[info.name] = info
    kinds = registries.by_kind()
    for hook_name, kind in hookspecs.HOOK_KINDS.items():
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        for impl in sorted(impls, key=lambda impl: not registries.plugins[impl.plugin_name].builtin):
            info = registries.plugins[impl.plugin_name]
            for name, obj in _call_registration_hook(impl, hook_name, kind, info, registries.problems):
                _register(kinds[kind], name, obj, info, registries.problems)
    registries.problems.extend(unused_code(pm))
    registries.problems.extend(empty_plugins(registries))
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
        elif problem.stage in hookspecs.HOOK_KINDS:
            kinds[hookspecs.HOOK_KINDS[problem.stage]].mark_unavailable_prefix(
                f"{problem.plugin}:", f"comes from plugin {problem.plugin!r}, whose {problem.stage} failed")


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


def _call_registration_hook(impl: Any, hook_name: str, kind: str, info: PluginInfo,
                            problems: list[PluginProblem]) -> list[tuple[str, Any]]:
    """Run one plugin's hook and return what it registered: nothing at all if the hook raised.

    Only the arguments the implementation names are passed (pluggy's rule), so an implementation
    written before a hook gained an argument keeps working.
    """
    pending: dict[str, Any] = {}

    def register(name: str, builder: Any) -> None:
        # checked at the call, so the hook fails at the mistake and none of its names count
        check_registration(info, kind, name, builder, pending)
        pending[name] = builder

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
    return list(pending.items())


def check_registration(info: PluginInfo, kind: str, name: Any, builder: Any, already: Iterable[str]) -> None:
    """What ``register(name, builder)`` refuses at the call, naming the plugin and the name.

    A third-party plugin's names start with its own name and a colon (``acme:lenet5`` for plugin
    ``acme``), so two plugins never claim one name and blocking a plugin says which names went with it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register() needs a non-empty string name, got {name!r}")
    if not callable(builder):
        raise TypeError(f"register({name!r}, …) needs a callable builder, got {type(builder).__name__}")
    prefix = f"{info.name}:"
    if not info.builtin and not name.startswith(prefix):
        raise ValueError(f"register({name!r}, …): plugin {info.name!r} may only register names that start with {prefix!r} "
                         f"(e.g. {prefix + name.rsplit(':', 1)[-1]!r})")
    if name in already:
        raise ValueError(f"register({name!r}, …): plugin {info.name!r} registered {kind} {name!r} twice")


def _register(registry: Registry[Any], name: str, obj: Any, info: PluginInfo, problems: list[PluginProblem]) -> None:
    provider = registry.find(name)
    if provider is not None and provider.builtin and not info.builtin:
        # built-ins win: an installed package can never take a built-in name away (hub:*, torchvision:*)
        problems.append(PluginProblem(info.name, "refused", f"registered {registry.kind} {name!r}, which the built-in plugin "
                                                            f"{provider.plugin!r} provides: refused, the built-in is used"))
        return
    try:
        registry.register(name, obj, plugin=info.name, distribution=info.distribution, version=info.version, builtin=info.builtin)
    except DuplicateNameError as exc:
        problems.append(PluginProblem(info.name, "collision", str(exc)))


def unused_code(pm: pluggy.PluginManager) -> list[PluginProblem]:
    """Hook implementations runner never calls: a name that is no hook of this runner, or a hook without ``@hookimpl``.

    An implementation of a newer runner's hook is not reported when marked ``@hookimpl(optionalhook=True)``.
    """
    problems = []
    hook_names = list(hookspecs.HOOK_KINDS)
    for name, caller in sorted(vars(pm.hook).items()):
        if name.startswith("_") or caller.has_spec():
            continue
        close = difflib.get_close_matches(name, hook_names, n=1, cutoff=0.9)
        hint = f"; did you mean {close[0]}?" if close else " (mark a newer runner's hook @hookimpl(optionalhook=True))"
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                problems.append(PluginProblem(impl.plugin_name, "hooks", f"implements {name}, which is not a hook of this runner{hint}"))
    for plugin in pm.get_plugins():
        for attr in sorted(_unmarked_hooks(plugin)):
            problems.append(PluginProblem(pm.get_name(plugin) or repr(plugin), "hooks",
                                          f"defines {attr} without @hookimpl, so runner never calls it"))
    return problems


def _unmarked_hooks(plugin: object) -> list[str]:
    found = []
    for attr in dir(plugin):
        if not attr.startswith("runner_register"):
            continue
        value = getattr(plugin, attr, None)
        marked = hasattr(value, f"{ENTRY_POINT_GROUP}_impl") or hasattr(value, f"{ENTRY_POINT_GROUP}_spec")
        if callable(value) and not marked:
            found.append(attr)
    return found


def empty_plugins(registries: Registries) -> list[PluginProblem]:
    """Third-party plugins that loaded and registered no name, with nothing else reported about them."""
    providers = {e.plugin for registry in registries.by_kind().values() for e in registry.entries()}
    providers |= {e.plugin for registry in registries.by_kind().values() for es in registry.collisions().values() for e in es}
    reported = {p.plugin for p in registries.problems}
    return [PluginProblem(info.name, "empty", "loaded but registered no names (`runner plugins` lists what plugins register)")
            for info in registries.plugins.values() if not info.builtin and info.name not in providers | reported]
