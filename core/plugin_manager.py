"""The plugin manager: loads the `fastgen` entry points and keeps what they register, by name.

Built-in plugins come through the same entry-point group as third-party ones, so every run
exercises the path a plugin author relies on. Users isolate a broken plugin with
FASTGEN_LOAD_PLUGINS (a comma-separated allow-list; empty loads none) or
FASTGEN_BLOCK_PLUGINS (a comma-separated block list).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fastgen"
KINDS = ("models", "kernels", "schedulers", "transports")


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    plugin: str      # the pluggy plugin (module) that registered it
    package: str     # the distribution it comes from

    @property
    def full_name(self) -> str:
        return f"{self.kind}.{self.name}"


@dataclass
class Registry:
    items: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    import_errors: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, cls: Any, plugin: str, package: str) -> None:
        if not isinstance(cls, type):
            raise PluginError(f"Plugin {plugin!r} ({package}) registered {cls!r} as a {kind[:-1]}; "
                              f"register the class itself.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"Plugin {plugin!r} ({package}) registered {cls.__qualname__} "
                              f"without a `name` class attribute.")
        if kind == "models" and not getattr(cls, "architectures", None):
            raise PluginError(f"Plugin {plugin!r} ({package}) registered model {name!r} "
                              f"without `architectures`.")
        existing = self.items[kind].get(name)
        if existing is not None:
            raise PluginError(f"{kind}.{name} is registered twice: by {existing.plugin!r} "
                              f"({existing.package}) and by {plugin!r} ({package}); "
                              f"uninstall or block one of them.")
        self.items[kind][name] = PluginInfo(kind, name, cls, plugin, package)

    def get(self, kind: str, name: str) -> PluginInfo:
        if kind not in self.items:
            raise PluginError(f"Unknown plugin kind {kind!r}; the kinds are {', '.join(KINDS)}.")
        if name.startswith(kind + "."):
            name = name[len(kind) + 1:]
        try:
            return self.items[kind][name]
        except KeyError:
            installed = ", ".join(f"{kind}.{n}" for n in sorted(self.items[kind])) or "none"
            raise PluginError(f"No plugin named {kind}.{name}; installed {kind}: {installed}.") from None

    def model_for_architecture(self, architecture: str) -> PluginInfo:
        for info in self.items["models"].values():
            if architecture in info.cls.architectures:
                return info
        served = sorted(a for i in self.items["models"].values() for a in i.cls.architectures)
        raise PluginError(f"No model plugin serves architecture {architecture!r}; "
                          f"installed plugins serve: {', '.join(served) or 'none'}.")

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for info in self.items[kind].values()]


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


class PluginManager:
    """A pluggy manager with the fastgen hookspecs, plus the registry filled by the register hooks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("fastgen")
        self.pm.add_hookspecs(hookspecs)
        self.packages: dict[str, str] = {}
        self.registry = Registry()

    @property
    def hook(self):
        return self.pm.hook

    def register(self, plugin: Any, name: str, package: str = "(in-process)") -> None:
        """Register a plugin object (usually a module) and collect what its hooks register.

        All or nothing: a plugin whose registrations are refused leaves no trace behind.
        """
        try:
            self.pm.register(plugin, name=name)
        except ValueError as e:
            raise PluginError(f"Plugin {name!r} ({package}) cannot be registered: {e}.") from None
        try:
            self.pm.check_pending()
            staged = Registry()
            for kind in KINDS:
                hook = getattr(self.pm.hook, f"register_{kind}")
                for impl in (i for i in hook.get_hookimpls() if i.plugin_name == name):
                    # Called per plugin (not through pm.hook) so each registration is attributed to it.
                    register_fn = lambda cls, _k=kind: staged.add(_k, cls, name, package)
                    impl.function(**({"register": register_fn} if "register" in impl.argnames else {}))
            for info in staged.all():
                existing = self.registry.items[info.kind].get(info.name)
                if existing is not None:
                    raise PluginError(f"{info.full_name} is registered twice: by {existing.plugin!r} "
                                      f"({existing.package}) and by {name!r} ({package}); "
                                      f"uninstall or block one of them.")
        except Exception:
            self.pm.unregister(name=name)
            raise
        for info in staged.all():
            self.registry.items[info.kind][info.name] = info
        self.packages[name] = package

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered (observers leave when their server stops)."""
        self.pm.unregister(name=name)
        self.packages.pop(name, None)
        for kind in KINDS:
            items = self.registry.items[kind]
            for item_name in [n for n, info in items.items() if info.plugin == name]:
                del items[item_name]

    def load_entry_points(self) -> None:
        allow = _env_list("FASTGEN_LOAD_PLUGINS")
        block = _env_list("FASTGEN_BLOCK_PLUGINS") or set()
        for ep in _entry_points():
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            package = ep.dist.name if ep.dist is not None else "unknown package"
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                message = f'Error importing plugin "{ep.name}" ({package}): {type(e).__name__}: {e}'
                self.registry.import_errors[ep.name] = message
                print(message, file=sys.stderr)
                continue
            if self.pm.is_registered(module):
                continue
            self.register(module, name=ep.name, package=package)


_manager: PluginManager | None = None


def load_plugins() -> PluginManager:
    """The process-wide plugin manager, loading the installed plugins on first use."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_entry_points()
        _manager = manager
    return _manager


def reset_plugins() -> None:
    """Forget loaded plugins (tests use this after changing the environment)."""
    global _manager
    _manager = None
