# -*- test-case-name: tests.test_plugins -*-
"""
Finding and building plugins.

Plugins are found with L{twisted.plugin.getPlugins} in the C{twisted.plugins}
package, built-in ones included (C{twisted/plugins/icpmesh_plugin.py}), and
chosen by their C{name}.
"""

from __future__ import annotations

from typing import Any, Iterable

import attr
from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass

from icpmesh.config import ConfigError, MeshConfig, PluginSection
from icpmesh.interfaces import (
    IAccessControlPlugin,
    IObjectStorePlugin,
    IPeerSelectorPlugin,
    UnknownPlugin,
)

#: Plugin kind (the config directive) -> (plugin interface, factory method).
KINDS: dict[str, tuple[InterfaceClass, str]] = {
    "store": (IObjectStorePlugin, "storeFromConfig"),
    "access": (IAccessControlPlugin, "accessControlFromConfig"),
    "selector": (IPeerSelectorPlugin, "selectorFromConfig"),
}


def installedPlugins(interface: InterfaceClass, package: Any = None) -> dict[str, Any]:
    """
    Every installed plugin providing C{interface}, by name.  When two
    distributions ship the same name, the first found wins.
    """
    found: dict[str, Any] = {}
    for plugin in getPlugins(interface, package):
        name = getattr(plugin, "name", None)
        if isinstance(name, str) and name not in found:
            found[name] = plugin
    return found


def findPlugin(kind: str, name: str, package: Any = None) -> Any:
    """
    The installed plugin of C{kind} (C{store}, C{access}, C{selector})
    called C{name}.

    @raise UnknownPlugin: listing the installed names.
    """
    interface, _ = KINDS[kind]
    plugins = installedPlugins(interface, package)
    try:
        return plugins[name]
    except KeyError:
        raise UnknownPlugin(kind, name, list(plugins)) from None


@attr.s(slots=True, auto_attribs=True)
class Components:
    """
    The runtime components a config chose.

    @ivar store: the L{IObjectStore} (or C{None} when not built).
    @ivar access: the L{IAccessControl}.
    @ivar selector: the L{IPeerSelector}.
    @ivar plugins: the plugin objects by kind.
    """

    store: Any = None
    access: Any = None
    selector: Any = None
    plugins: dict[str, Any] = attr.ib(factory=dict)


def resolvePlugins(
    config: MeshConfig, reactor: Any = None, build: bool = True, package: Any = None
) -> Components:
    """
    Find the plugin of each kind the config names, hand each the
    directives it claims, refuse directives nobody claims, and (with
    C{build}) build the components.

    @raise ConfigError: for an unknown plugin name (listing the installed
        ones), an unknown directive, or whatever a plugin's factory raises.
    """
    components = Components()
    claimedBy: dict[str, PluginSection] = {}
    for kind in KINDS:
        section = config.plugins[kind]
        try:
            plugin = findPlugin(kind, section.name, package)
        except UnknownPlugin as e:
            raise ConfigError(str(e), section.filename, section.lineno) from None
        components.plugins[kind] = plugin
        for directive in getattr(plugin, "directives", ()) or ():
            claimedBy.setdefault(directive, section)
        section.directives = []
    for d in config.extra:
        section = claimedBy.get(d.name)
        if section is None:
            raise d.error(f"unknown directive {d.name!r}")
        section.directives.append(d)
    if build:
        for kind, (_, factory) in KINDS.items():
            section = config.plugins[kind]
            plugin = components.plugins[kind]
            try:
                component = getattr(plugin, factory)(section, reactor)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(
                    f"{kind} plugin {section.name!r} failed to start: {e!r}",
                    section.filename,
                    section.lineno,
                ) from e
            setattr(components, kind, component)
    return components


def describePlugins(package: Any = None) -> Iterable[str]:
    """
    Lines listing every installed plugin by kind, name and description.
    """
    for kind, (interface, _) in KINDS.items():
        plugins = installedPlugins(interface, package)
        for name in sorted(plugins):
            description = getattr(plugins[name], "description", "")
            yield f"{kind:9} {name:22} {description}"

