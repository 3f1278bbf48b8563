"""
Tests for the example store and access-control plugins.  Run them against
the installed distribution: C{pip install .[test]}, then C{pytest} here.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import (
    AccessRequest,
    IAccessControl,
    IAccessControlPlugin,
    IObjectStorePlugin,
)
from icpmesh.plugins import resolvePlugins
from icpmesh.testing.store import StoreConformanceMixin
from icpmesh_examples.fifostore import FIFOStore, fifoStore
from icpmesh_examples.subnets import subnetAccess


class FIFOStoreConformanceTests(StoreConformanceMixin, TestCase):
    """
    The example store passes icpmesh's store conformance suite.
    """

    def makeStore(self) -> FIFOStore:
        return FIFOStore(maxSize=self.storeMaxSize, maxObjectSize=self.storeMaxObjectSize)


class FIFOStorePluginTests(SynchronousTestCase):
    """
    The C{fifo} plugin object and its options.
    """

    def test_plugin(self) -> None:
        """
        The plugin provides L{IObjectStorePlugin}, is found by
        C{twisted.plugin} once installed, and reads its size options.
        """
        self.assertTrue(verifyObject(IObjectStorePlugin, fifoStore))
        self.assertIn("fifo", [p.name for p in getPlugins(IObjectStorePlugin)])
        config = parseConfig("store fifo max-size=1MB max-object-size=64KB\n", "t.conf")
        store = fifoStore.storeFromConfig(config.plugins["store"], None)
        self.assertEqual((store.maxSize, store.maxObjectSize), (1024 * 1024, 64 * 1024))

    def test_oldestEvictedFirst(self) -> None:
        """
        When the budget is used up, the object stored first goes first.
        """
        store = FIFOStore(maxSize=10, maxObjectSize=10)
        for key in ("a", "b", "c"):
            writer = store.begin(key, _meta())
            writer.write(b"1234")
            self.successResultOf(writer.finish())
        self.assertIsNone(store.freshUntil("a"))
        self.assertEqual((store.freshUntil("b"), store.freshUntil("c")), (100.0, 100.0))
        self.assertEqual(store.stats(), {"objects": 2, "bytes": 8})


class SubnetAccessTests(SynchronousTestCase):
    """
    The C{subnets} access-control plugin.
    """

    def build(self, text: str) -> Any:
        config = parseConfig("access subnets\n" + text, "t.conf")
        return resolvePlugins(config, reactor=None).access

    def test_plugin(self) -> None:
        """
        The plugin provides L{IAccessControlPlugin}, claims C{allow_subnet},
        is found by C{twisted.plugin} once installed, and builds an
        L{IAccessControl}.
        """
        self.assertTrue(verifyObject(IAccessControlPlugin, subnetAccess))
        self.assertEqual(subnetAccess.directives, ("allow_subnet",))
        self.assertIn("subnets", [p.name for p in getPlugins(IAccessControlPlugin)])
        self.assertTrue(verifyObject(IAccessControl, self.build("")))

    def test_allowSubnet(self) -> None:
        """
        Clients in an C{allow_subnet} network (IPv4-mapped IPv6 included)
        may use HTTP and ICP; others may not.
        """
        access = self.build("allow_subnet 10.0.0.0/8\nallow_subnet 2001:db8::/32\n")
        for client, allowed in (("10.1.2.3", True), ("::ffff:10.1.2.3", True),
                                ("2001:db8::7", True), ("192.168.1.1", False),
                                ("127.0.0.1", False), ("not an address", False)):
            request = AccessRequest.fromURL(client, "GET", "http://example.com/")
            self.assertEqual(access.allowHTTP(request), allowed, client)
            self.assertEqual(access.allowMiss(request), allowed, client)
            self.assertEqual(access.allowICP(client, "http://example.com/"), allowed, client)

    def test_loopbackByDefault(self) -> None:
        """
        Without C{allow_subnet}, only loopback clients are allowed.
        """
        access = self.build("")
        self.assertTrue(access.allowICP("127.0.0.5", "http://x/"))
        self.assertTrue(access.allowICP("::1", "http://x/"))
        self.assertFalse(access.allowICP("10.0.0.1", "http://x/"))

    def test_badNetwork(self) -> None:
        """
        A bad network is refused with the file and line of its
        C{allow_subnet}.
        """
        with self.assertRaises(ConfigError) as caught:
            self.build("allow_subnet 10.0.0.0/8\nallow_subnet 10.0.0.300/8\n")
        self.assertEqual(str(caught.exception), "t.conf:3: not a network: '10.0.0.300/8'")


def _meta() -> Any:
    from icpmesh.interfaces import StoredResponse

    return StoredResponse(200, b"OK", (), 0.0, 0.0, 100.0)
