"""
Tests for L{icpmesh.storage.memory}: the conformance suite for
L{MemoryStore}, its segmented-LRU eviction and budget accounting, and the
C{memory} store plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import icpmesh
from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import IObjectStorePlugin, ObjectTooLarge, StoredResponse
from icpmesh.plugins import findPlugin
from icpmesh.storage import ENTRY_OVERHEAD, IncompleteObject, entryCost
from icpmesh.storage.memory import (
    DEFAULT_MAX_OBJECT_SIZE,
    DEFAULT_MAX_SIZE,
    MemoryStore,
    memoryStorePlugin,
)
from icpmesh.testing.store import (
    FlowControlledConsumer,
    StoreConformanceMixin,
    makeMeta,
)

KIB = 1024


class MemoryStoreConformanceTests(StoreConformanceMixin, TestCase):
    """
    L{MemoryStore} passes the store conformance suite.
    """

    def makeStore(self) -> MemoryStore:
        return MemoryStore(
            Clock(), maxSize=self.storeMaxSize, maxObjectSize=self.storeMaxObjectSize
        )


def store(maxSize: int = 100 * KIB, maxObjectSize: int = 100 * KIB) -> MemoryStore:
    return MemoryStore(Clock(), maxSize=maxSize, maxObjectSize=maxObjectSize)


def put(s: MemoryStore, key: str, body: bytes, meta: StoredResponse | None = None) -> None:
    """
    Store an object and check its finish fired.
    """
    writer = s.begin(key, meta if meta is not None else makeMeta())
    writer.write(body)
    d = writer.finish()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert not failures, failures


def get(testCase: SynchronousTestCase, s: MemoryStore, key: str) -> Any:
    return testCase.successResultOf(s.get(key))


def cost(key: str, size: int) -> int:
    return entryCost(key, makeMeta(), size)


class EvictionTests(SynchronousTestCase):
    """
    Segmented LRU: probation for new objects, protection for objects read
    again, eviction from probation first.
    """

    def test_newObjectsOnProbationInOrder(self) -> None:
        """
        New objects join the probation segment at its recent end, so the
        oldest unread object is the next victim.
        """
        s = store()
        for key in "abc":
            put(s, key, b"x")
        self.assertEqual(s.keys(), ["a", "b", "c"])
        self.assertEqual(s.stats()["protectedObjects"], 0)

    def test_readPromotes(self) -> None:
        """
        A C{get} hit moves an object to the recent end of the protected
        segment, behind every probation object in eviction order.
        """
        s = store()
        for key in "abc":
            put(s, key, b"x")
        get(self, s, "a")
        self.assertEqual(s.keys(), ["b", "c", "a"])
        get(self, s, "b")
        self.assertEqual(s.keys(), ["c", "a", "b"])
        get(self, s, "a")
        self.assertEqual(s.keys(), ["c", "b", "a"])
        self.assertEqual(s.stats()["protectedObjects"], 2)

    def test_evictsLeastRecentlyUsedProbationFirst(self) -> None:
        """
        When the budget is exceeded the oldest probation object goes first,
        even when protected objects are older.
        """
        body = b"x" * (20 * KIB)
        s = store(maxSize=4 * cost("k0", len(body)) + 10)
        put(s, "k0", body)
        get(self, s, "k0")  # protected, and the oldest object
        for i in range(1, 4):
            put(s, f"k{i}", body)
        put(s, "k4", body)
        self.assertEqual(s.keys(), ["k2", "k3", "k4", "k0"])
        self.assertEqual(s.stats()["evictions"], 1)
        self.assertIsNone(s.freshUntil("k1"))

    def test_scanResistance(self) -> None:
        """
        A burst of one-off objects many times the budget does not evict
        objects that were read again: the scan only recycles probation.
        """
        body = b"x" * KIB
        unit = cost("hot-0", len(body))
        s = store(maxSize=20 * unit)
        hot = [f"hot-{i}" for i in range(8)]
        for key in hot:
            put(s, key, body)
            get(self, s, key)
        for i in range(500):
            put(s, f"scan-{i:03}", body)
        for key in hot:
            self.assertIsNotNone(s.freshUntil(key), key)
        self.assertIsNotNone(s.freshUntil("scan-499"))
        self.assertIsNone(s.freshUntil("scan-000"))
        self.assertLessEqual(s.stats()["bytes"], s.maxSize)

    def test_protectedOverflowDemotes(self) -> None:
        """
        When promoted objects fill more than the protected share of the
        budget, the least recently used protected objects drop back to the
        recent end of probation.
        """
        body = b"x" * (10 * KIB)
        unit = cost("p0", len(body))
        s = store(maxSize=10 * unit)  # protected share: 8 units
        keys = [f"p{i}" for i in range(9)]
        for key in keys:
            put(s, key, body)
        for key in keys:
            get(self, s, key)
        stats = s.stats()
        self.assertEqual(stats["protectedObjects"], 8)
        self.assertLessEqual(stats["protectedBytes"], int(s.maxSize * 0.8))
        self.assertEqual(s.keys(), keys)  # p0 demoted: next victim
        put(s, "n1", body)
        put(s, "n2", body)
        self.assertIsNone(s.freshUntil("p0"))
        self.assertEqual(s.keys(), ["n1", "n2"] + keys[1:])

    def test_freshUntilIsNotAUse(self) -> None:
        """
        C{freshUntil} lookups (ICP queries) do not change the eviction
        order: an object asked about a thousand times but never read is
        still the first evicted.
        """
        body = b"x" * (20 * KIB)
        s = store(maxSize=3 * cost("a", len(body)) + 10)
        put(s, "a", body, makeMeta(freshUntil=55.0))
        put(s, "b", body)
        put(s, "c", body)
        for _ in range(1000):
            self.assertEqual(s.freshUntil("a"), 55.0)
        self.assertEqual(s.keys(), ["a", "b", "c"])
        put(s, "d", body)
        self.assertIsNone(s.freshUntil("a"))
        self.assertEqual(s.keys(), ["b", "c", "d"])
        self.assertEqual(s.stats()["hits"], 0)

    def test_replaceKeepsProtection(self) -> None:
        """
        A new version of a protected object stays protected; a new version
        of an object on probation stays on probation, at its recent end.
        """
        s = store()
        put(s, "a", b"1")
        put(s, "b", b"1")
        put(s, "c", b"1")
        get(self, s, "a")
        put(s, "a", b"2")
        put(s, "b", b"2")
        self.assertEqual(s.keys(), ["c", "b", "a"])
        self.assertEqual(s.stats()["protectedObjects"], 1)

    def test_updateMetaKeepsOrder(self) -> None:
        """
        C{updateMeta} does not move an object in the eviction order.
        """
        s = store()
        for key in "abc":
            put(s, key, b"x")
        self.successResultOf(s.updateMeta("a", makeMeta(freshUntil=1.0)))
        self.assertEqual(s.keys(), ["a", "b", "c"])


class BudgetTests(SynchronousTestCase):
    """
    What objects cost against the budget, and the limits.
    """

    def test_accounting(self) -> None:
        """
        C{bytes} is the sum of L{entryCost} of what is stored (body, key,
        headers and fixed overhead), and goes back to 0 when all is deleted.
        """
        s = store()
        put(s, "http://a/", b"x" * 1000)
        put(s, "http://bb/", b"y" * 3000)
        expected = cost("http://a/", 1000) + cost("http://bb/", 3000)
        self.assertEqual(s.stats()["bytes"], expected)
        self.assertEqual(s.stats()["bodyBytes"], 4000)
        self.assertTrue(cost("http://a/", 1000) >= 1000 + ENTRY_OVERHEAD)
        self.successResultOf(s.delete("http://a/"))
        self.successResultOf(s.delete("http://bb/"))
        self.assertEqual(s.stats()["bytes"], 0)

    def test_headersCount(self) -> None:
        """
        Bigger headers cost more; C{updateMeta} re-charges the object.
        """
        s = store()
        put(s, "k", b"body", makeMeta(headers=[]))
        small = s.stats()["bytes"]
        bigMeta = makeMeta(headers=[(b"X-Big", b"v" * 5000)])
        self.successResultOf(s.updateMeta("k", bigMeta))
        self.assertEqual(s.stats()["bytes"], entryCost("k", bigMeta, 4))
        self.assertTrue(s.stats()["bytes"] > small + 5000)

    def test_replaceRecharges(self) -> None:
        """
        Replacing an object charges the new version only.
        """
        s = store()
        put(s, "k", b"x" * 5000)
        put(s, "k", b"x" * 100)
        self.assertEqual(s.stats()["bytes"], cost("k", 100))
        self.assertEqual(s.stats()["objects"], 1)

    def test_entryLargerThanBudgetRefused(self) -> None:
        """
        A body within C{maxObjectSize} whose whole entry (with overhead)
        would not fit the budget is refused at C{finish} with
        L{ObjectTooLarge}, and nothing is evicted for it.
        """
        s = store(maxSize=10 * KIB, maxObjectSize=10 * KIB)
        put(s, "small", b"x")
        writer = s.begin("big", makeMeta())
        writer.write(b"x" * (10 * KIB))
        self.failureResultOf(writer.finish(), ObjectTooLarge)
        self.assertIsNone(s.freshUntil("big"))
        self.assertIsNotNone(s.freshUntil("small"))
        self.assertEqual(s.stats()["tooLarge"], 1)

    def test_maxObjectSizeClamped(self) -> None:
        """
        C{maxObjectSize} is never more than C{maxSize}.
        """
        self.assertEqual(store(maxSize=1000, maxObjectSize=5000).maxObjectSize, 1000)

    def test_badSizes(self) -> None:
        """
        A zero budget or object size is refused.
        """
        self.assertRaises(ValueError, store, 0, 10)
        self.assertRaises(ValueError, store, 10, 0)

    def test_justStoredNeverEvicted(self) -> None:
        """
        An object that needs nearly the whole budget evicts everything else
        but is itself kept.
        """
        s = store(maxSize=50 * KIB, maxObjectSize=50 * KIB)
        for i in range(10):
            put(s, f"k{i}", b"x" * KIB)
            get(self, s, f"k{i}")
        put(s, "big", b"y" * (48 * KIB))
        self.assertEqual(s.keys(), ["big"])
        self.assertEqual(s.stats()["evictions"], 10)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "get", "delete", "update", "fresh"]),
                st.integers(0, 12),
                st.integers(0, 30 * KIB),
            ),
            max_size=80,
        )
    )
    def test_modelInvariants(self, ops: list[tuple[str, int, int]]) -> None:
        """
        Under any sequence of operations the store stays within its budget,
        its freshness index matches exactly what it holds, C{bytes} is the
        sum of entry costs, and every object still held is the last version
        stored under its key.
        """
        s = store(maxSize=64 * KIB, maxObjectSize=32 * KIB)
        model: dict[str, tuple[bytes, float]] = {}
        for op, n, size in ops:
            key = f"http://example.com/{n}"
            if op == "put":
                body = bytes([n]) * size
                put(s, key, body, makeMeta(freshUntil=float(size)))
                model[key] = (body, float(size))
            elif op == "get":
                obj = get(self, s, key)
                if obj is not None:
                    self.assertEqual(obj.body, model[key][0])
            elif op == "delete":
                present = s.freshUntil(key) is not None
                removed = self.successResultOf(s.delete(key))
                self.assertEqual(removed, present)
                self.assertIsNone(s.freshUntil(key))
                model.pop(key, None)
            elif op == "update":
                updated = self.successResultOf(s.updateMeta(key, makeMeta(freshUntil=-1.0)))
                if updated:
                    model[key] = (model[key][0], -1.0)
            else:
                fresh = s.freshUntil(key)
                if fresh is not None:
                    self.assertEqual(fresh, model[key][1])
            stats = s.stats()
            self.assertLessEqual(stats["bytes"], s.maxSize)
            keys = s.keys()
            self.assertEqual(len(keys), len(set(keys)))
            self.assertEqual(sorted(keys), sorted(s._fresh))
            total = 0
            for k in keys:
                obj = s._probation.get(k) or s._protected[k]
                self.assertEqual(obj.body, model[k][0])
                self.assertEqual(s.freshUntil(k), model[k][1])
                total += obj.cost
            self.assertEqual(stats["bytes"], total)
            self.assertLessEqual(stats["protectedBytes"], max(
                int(s.maxSize * 0.8),
                max([s._protected[k].cost for k in s._protected] or [0]),
            ))


class WriterTests(SynchronousTestCase):
    """
    Memory-specific writer behaviour.
    """

    def test_sizeMismatchRefused(self) -> None:
        """
        A body shorter than the C{size} its metadata announced (a truncated
        transfer) is not stored: C{finish} fails with L{IncompleteObject}
        and an older version stays.
        """
        s = store()
        put(s, "k", b"old")
        writer = s.begin("k", makeMeta(size=100))
        writer.write(b"x" * 60)
        self.failureResultOf(writer.finish(), IncompleteObject)
        self.assertEqual(get(self, s, "k").body, b"old")

    def test_writeAfterFinish(self) -> None:
        """
        Writing to a finished writer is a programming error.
        """
        s = store()
        writer = s.begin("k", makeMeta())
        writer.write(b"a")
        self.successResultOf(writer.finish())
        self.assertRaises(RuntimeError, writer.write, b"b")
        self.failureResultOf(writer.finish(), RuntimeError)
        self.assertEqual(get(self, s, "k").body, b"a")

    def test_writeAfterAbortIgnored(self) -> None:
        """
        Writes after C{abort} are dropped silently and C{finish} fails.
        """
        s = store()
        writer = s.begin("k", makeMeta())
        writer.abort()
        writer.write(b"late")
        self.failureResultOf(writer.finish(), RuntimeError)
        self.assertIsNone(s.freshUntil("k"))

    def test_tooLargeKeepsRaising(self) -> None:
        """
        After L{ObjectTooLarge}, later writes raise it again, and the
        C{tooLarge} counter counts the object once.
        """
        s = store(maxSize=100 * KIB, maxObjectSize=10)
        writer = s.begin("k", makeMeta())
        self.assertRaises(ObjectTooLarge, writer.write, b"x" * 11)
        self.assertRaises(ObjectTooLarge, writer.write, b"x")
        self.failureResultOf(writer.finish(), ObjectTooLarge)
        self.assertEqual(s.stats()["tooLarge"], 1)

    def test_writeToIsOneWrite(self) -> None:
        """
        A cached object writes its body to the consumer in one C{write} and
        the returned Deferred has already fired.
        """
        s = store()
        put(s, "k", b"abc" * 1000)
        obj = get(self, s, "k")
        writes: list[bytes] = []

        class Consumer:
            write = writes.append

        self.successResultOf(obj.writeTo(Consumer()))
        self.assertEqual(writes, [b"abc" * 1000])
        self.assertEqual(obj.size, 3000)

    def test_hitAndMissCounters(self) -> None:
        """
        C{stats} counts hits, misses and stores.
        """
        s = store()
        put(s, "k", b"x")
        get(self, s, "k")
        get(self, s, "k")
        get(self, s, "other")
        stats = s.stats()
        self.assertEqual((stats["hits"], stats["misses"], stats["stores"]), (2, 1, 1))


class PluginTests(SynchronousTestCase):
    """
    The C{memory} store plugin.
    """

    def build(self, line: str) -> MemoryStore:
        config = parseConfig(f"http_port 3128\n{line}\n", "/etc/icpmesh.conf")
        return memoryStorePlugin.storeFromConfig(config.plugins["store"], Clock())

    def test_verifyPlugin(self) -> None:
        """
        The plugin object provides L{IObjectStorePlugin} and is found by
        name among the installed plugins.
        """
        self.assertTrue(verifyObject(IObjectStorePlugin, memoryStorePlugin))
        self.assertEqual(memoryStorePlugin.name, "memory")
        self.assertEqual(memoryStorePlugin.directives, ())
        self.assertIs(findPlugin("store", "memory"), memoryStorePlugin)

    def test_options(self) -> None:
        """
        C{max-size} and C{max-object-size} set the budget and object limit.
        """
        s = self.build("store memory max-size=2MB max-object-size=64KB")
        self.assertEqual((s.maxSize, s.maxObjectSize), (2 * 1024**2, 64 * KIB))

    def test_defaults(self) -> None:
        """
        Without options the store has a 256 MB budget and 8 MB objects; with
        only a smaller budget the object limit shrinks to it.
        """
        s = self.build("store memory")
        self.assertEqual((s.maxSize, s.maxObjectSize), (DEFAULT_MAX_SIZE, DEFAULT_MAX_OBJECT_SIZE))
        self.assertEqual(DEFAULT_MAX_SIZE, 256 * 1024**2)
        s = self.build("store memory max-size=1MB")
        self.assertEqual(s.maxObjectSize, 1024**2)

    def test_unknownOption(self) -> None:
        """
        An unknown option is a L{ConfigError} naming file, line and the
        known options.
        """
        e = self.assertRaises(ConfigError, self.build, "store memory max-sise=1MB")
        self.assertEqual(e.lineno, 2)
        self.assertTrue(str(e).startswith("/etc/icpmesh.conf:2: "), str(e))
        self.assertIn("max-sise", str(e))
        self.assertIn("max-object-size, max-size", str(e))

    def test_badSize(self) -> None:
        """
        An unparseable, zero or inconsistent size is a L{ConfigError} at the
        store line.
        """
        for line in (
            "store memory max-size=lots",
            "store memory max-size=0",
            "store memory max-object-size=0",
            "store memory max-size=1MB max-object-size=2MB",
        ):
            e = self.assertRaises(ConfigError, self.build, line)
            self.assertTrue(str(e).startswith("/etc/icpmesh.conf:2: "), (line, str(e)))

    def test_noReactorImport(self) -> None:
        """
        Importing the module (as every plugin scan does) does not install
        the global reactor.
        """
        code = (
            "import sys, icpmesh.storage.memory, icpmesh.storage;"
            "sys.exit('twisted.internet.reactor' in sys.modules)"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(icpmesh.__file__)))
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, cwd=root
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class FlowControlledConsumerTests(SynchronousTestCase):
    """
    The conformance suite's consumer double notices flow-control mistakes,
    so the suite's large-body test can fail.
    """

    def test_pushProducerPausedAndResumed(self) -> None:
        """
        A registered push producer is paused at once and after every write,
        and resumed on a later reactor turn.
        """
        clock = Clock()
        consumer = FlowControlledConsumer(clock)
        calls: list[str] = []

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")
                if calls.count("resume") == 1:
                    consumer.write(b"data")

            def stopProducing(self) -> None:
                pass

        consumer.registerProducer(Producer(), True)
        self.assertEqual(calls, ["pause"])
        clock.advance(0)
        self.assertEqual(calls, ["pause", "resume", "pause", "resume"])
        consumer.unregisterProducer()
        self.assertEqual((consumer.value(), consumer.violations), (b"data", []))

    def test_writeWhilePaused(self) -> None:
        """
        A write while the push producer is paused is a violation.
        """
        consumer = FlowControlledConsumer(Clock())

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        consumer.registerProducer(Producer(), True)
        consumer.write(b"too soon")
        self.assertEqual(consumer.violations, ["write while paused"])

    def test_pullProducerUnaskedWrite(self) -> None:
        """
        A pull producer writing before C{resumeProducing} asked for data is
        a violation; one write per request is not.
        """
        clock = Clock()
        consumer = FlowControlledConsumer(clock)

        @implementer(IPullProducer)
        class Producer:
            def __init__(self) -> None:
                self.asked = 0

            def resumeProducing(self) -> None:
                self.asked += 1
                if self.asked == 1:
                    consumer.write(b"asked")

            def stopProducing(self) -> None:
                pass

        producer = Producer()
        consumer.registerProducer(producer, False)
        clock.advance(0)
        self.assertEqual(producer.asked, 2)
        self.assertEqual(consumer.violations, [])
        consumer.write(b"unasked")
        self.assertEqual(consumer.violations, [])  # the second request is open
        consumer.write(b"unasked")
        self.assertEqual(consumer.violations, ["pull producer wrote unasked"])
