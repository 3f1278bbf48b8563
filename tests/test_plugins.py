"""
Tests for L{icpmesh.plugins}: discovery by name through twisted.plugin,
directive claiming, and errors that list what is installed.
"""

from __future__ import annotations

import os

import twisted.plugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import (
    IAccessControl,
    IAccessControlPlugin,
    IObjectStore,
    IObjectStorePlugin,
    IPeerSelector,
    IPeerSelectorPlugin,
    UnknownPlugin,
)
from icpmesh.plugins import describePlugins, findPlugin, installedPlugins, resolvePlugins

TEST_PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")


class UseTestPlugins:
    """
    Put tests/plugins on twisted.plugins.__path__ for one test.
    """

    def useTestPlugins(self) -> None:
        twisted.plugins.__path__.append(TEST_PLUGINS)
        self.addCleanup(twisted.plugins.__path__.remove, TEST_PLUGINS)  # type: ignore[attr-defined]


class BuiltinTests(SynchronousTestCase):
    """
    The built-in plugins are found like any other.
    """

    def test_builtinsFound(self) -> None:
        """
        memory, acl and icp are installed plugins providing their
        interfaces.
        """
        store = findPlugin("store", "memory")
        access = findPlugin("access", "acl")
        selector = findPlugin("selector", "icp")
        verifyObject(IObjectStorePlugin, store)
        verifyObject(IAccessControlPlugin, access)
        verifyObject(IPeerSelectorPlugin, selector)

    def test_defaultsBuild(self) -> None:
        """
        The default config builds a store, an access control and a
        selector providing the runtime interfaces.
        """
        from twisted.internet.task import Clock
        components = resolvePlugins(parseConfig("", "t"), reactor=Clock())
        verifyObject(IObjectStore, components.store)
        verifyObject(IAccessControl, components.access)
        verifyObject(IPeerSelector, components.selector)

    def test_unknownListsInstalled(self) -> None:
        """
        An unknown name lists the installed names of that kind.
        """
        e = self.assertRaises(UnknownPlugin, findPlugin, "store", "nosuch")
        self.assertIn("memory", e.installed)
        self.assertIn("unknown store plugin 'nosuch'; installed: ", str(e))

    def test_unknownInConfigNamesLine(self) -> None:
        """
        In a config, an unknown plugin is a ConfigError at its line.
        """
        config = parseConfig("\nselector nosuch\n", "mesh.conf")
        e = self.assertRaises(ConfigError, resolvePlugins, config, None, False)
        self.assertTrue(str(e).startswith("mesh.conf:2: unknown selector plugin 'nosuch'; installed: "))
        self.assertIn("icp", str(e))

    def test_unknownDirective(self) -> None:
        """
        A directive nobody claims is refused at its line.
        """
        config = parseConfig("http_port 3128\n\nhtp_access allow all\n", "mesh.conf")
        e = self.assertRaises(ConfigError, resolvePlugins, config, None, False)
        self.assertEqual(str(e), "mesh.conf:3: unknown directive 'htp_access'")

    def test_describe(self) -> None:
        """
        describePlugins lists every kind.
        """
        lines = list(describePlugins())
        self.assertTrue(any(line.startswith("store") and " memory " in line for line in lines))
        self.assertTrue(any(line.startswith("selector") and " icp " in line for line in lines))


class ThirdPartyTests(UseTestPlugins, SynchronousTestCase):
    """
    A plugin from another directory on twisted.plugins' path.
    """

    def test_foundAndBuilt(self) -> None:
        """
        The test selector is found by name, gets the directives it claims,
        and is built.
        """
        self.useTestPlugins()
        self.assertIn("test-always-direct", installedPlugins(IPeerSelectorPlugin))
        config = parseConfig("selector test-always-direct\ntest_direct_note hello world\n", "t")
        components = resolvePlugins(config)
        self.assertEqual(components.selector.notes, [("hello", "world")])

    def test_notChosenDirectiveRefused(self) -> None:
        """
        A directive claimed only by a plugin that is not chosen is unknown.
        """
        self.useTestPlugins()
        config = parseConfig("test_direct_note hello\n", "t")
        self.assertRaises(ConfigError, resolvePlugins, config, None, False)
