"""
Tests for L{icpmesh.storage.disk}: the conformance suite for L{DiskStore}
and L{TieredStore} (persistence included), crash safety (leftover temp
files, damaged files, a writer process killed with C{SIGKILL}), the loading
state, and the C{disk} and C{tiered} plugins.

These run on the real reactor (the store works in threads) in temporary
directories.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Generator, Optional

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import icpmesh
from icpmesh import icp
from icpmesh.caching import cacheKey
from icpmesh.config import ConfigError, parseConfig
from icpmesh.interfaces import IObjectStorePlugin, StoredResponse
from icpmesh.plugins import findPlugin
from icpmesh.server import ICPResponder
from icpmesh.storage import IncompleteObject
from icpmesh.storage.disk import (
    MAGIC,
    PREFIX_SIZE,
    SMALL_OBJECT,
    CorruptObject,
    DirectoryInUse,
    DiskStore,
    TieredStore,
    diskStorePlugin,
    encodeMeta,
    encodeTrailer,
    keyName,
    tieredStorePlugin,
)
from icpmesh.storage.memory import MemoryStore
from icpmesh.testing.store import (
    FlowControlledConsumer,
    StoreConformanceMixin,
    makeBody,
    makeMeta,
)

KIB = 1024
MIB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(icpmesh.__file__)))


class DiskStoreConformanceTests(StoreConformanceMixin, TestCase):
    """
    L{DiskStore} passes the conformance suite, persistence tests included.
    """

    def makeStore(self) -> DiskStore:
        return DiskStore(
            self.mktemp(), maxSize=self.storeMaxSize,
            maxObjectSize=self.storeMaxObjectSize, fsync=False,
        )

    def reopenStore(self, store: DiskStore) -> DiskStore:
        return DiskStore(
            store.path, maxSize=self.storeMaxSize,
            maxObjectSize=self.storeMaxObjectSize, fsync=False,
        )


class SyncedDiskStoreConformanceTests(DiskStoreConformanceTests):
    """
    L{DiskStore} with C{fsync} on (the default) passes the suite too.
    """

    def makeStore(self) -> DiskStore:
        return DiskStore(
            self.mktemp(), maxSize=self.storeMaxSize,
            maxObjectSize=self.storeMaxObjectSize,
        )

    def reopenStore(self, store: DiskStore) -> DiskStore:
        return DiskStore(
            store.path, maxSize=self.storeMaxSize, maxObjectSize=self.storeMaxObjectSize
        )


class TieredStoreConformanceTests(StoreConformanceMixin, TestCase):
    """
    L{TieredStore} (memory in front of disk) passes the suite.
    """

    def tiered(self, path: str) -> TieredStore:
        memory = MemoryStore(Clock(), maxSize=2 * MIB, maxObjectSize=256 * KIB)
        disk = DiskStore(
            path, maxSize=self.storeMaxSize, maxObjectSize=self.storeMaxObjectSize,
            fsync=False,
        )
        return TieredStore(memory, disk)

    def makeStore(self) -> TieredStore:
        return self.tiered(self.mktemp())

    def reopenStore(self, store: TieredStore) -> TieredStore:
        return self.tiered(store.disk.path)


class DiskTestMixin:
    """
    Helpers for disk-store tests on the real reactor.
    """

    def newStore(self, path: Optional[str] = None, **kwargs: Any) -> DiskStore:
        kwargs.setdefault("fsync", False)
        store = DiskStore(path or self.mktemp(), **kwargs)  # type: ignore[attr-defined]
        return store

    @inlineCallbacks
    def started(self, store: DiskStore) -> Generator[Deferred[Any], Any, DiskStore]:
        store.startService()
        self.addCleanup(self.stopped, store)  # type: ignore[attr-defined]
        yield store.whenLoaded()
        return store

    def stopped(self, store: Any) -> Any:
        if store.running:
            return store.stopService()
        return None

    @inlineCallbacks
    def put(self, store: Any, key: str, body: bytes,
            meta: Optional[StoredResponse] = None) -> Generator[Deferred[Any], Any, None]:
        writer = store.begin(key, meta or makeMeta(size=len(body)))
        for i in range(0, len(body), 100 * KIB):
            writer.write(body[i : i + 100 * KIB])
        yield writer.finish()

    @inlineCallbacks
    def readAll(self, store: Any, key: str) -> Generator[Deferred[Any], Any, Optional[bytes]]:
        obj = yield store.get(key)
        if obj is None:
            return None
        consumer = FlowControlledConsumer(reactor)
        yield obj.writeTo(consumer)
        return consumer.value()

    def failureOf(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        A Deferred firing with the exception C{d} fails with (or with
        C{None} if C{d} succeeds).
        """
        return d.addCallbacks(lambda result: None, lambda failure: failure.value)

    def files(self, store: DiskStore, sub: str = "objects") -> list[str]:
        found = []
        for dirpath, _, names in os.walk(os.path.join(store.path, sub)):
            found.extend(os.path.join(dirpath, name) for name in names)
        return sorted(found)

    def objectPath(self, store: DiskStore, key: str) -> str:
        name = keyName(key)
        return os.path.join(store.path, "objects", name[:2], name)


class FileLayoutTests(DiskTestMixin, TestCase):
    """
    What a disk store leaves in its directory.
    """

    @inlineCallbacks
    def test_oneFilePerObjectNamedByHash(self) -> Generator[Deferred[Any], Any, None]:
        """
        A finished object is one file under C{objects/}, named by the
        SHA-256 of its key, that starts with the magic and the encoded
        metadata and ends with the trailer; no temp file is left behind.
        """
        store = yield self.started(self.newStore())
        meta = makeMeta(size=5)
        yield self.put(store, "http://example.com/f", b"hello", meta)
        path = self.objectPath(store, "http://example.com/f")
        self.assertEqual(self.files(store), [path])
        self.assertEqual(self.files(store, "tmp"), [])
        with open(path, "rb") as f:
            data = f.read()
        import zlib

        prefix = encodeMeta("http://example.com/f", meta)
        self.assertTrue(data.startswith(MAGIC))
        self.assertEqual(
            data, prefix + b"hello" + encodeTrailer(5, zlib.crc32(b"hello"))
        )
        self.assertEqual(store.stats()["bytes"], len(data))

    @inlineCallbacks
    def test_largeWriteUsesTempFile(self) -> Generator[Deferred[Any], Any, None]:
        """
        While a large object is being written its bytes are in a temp file
        under C{tmp/} and nothing is under C{objects/}; C{finish} moves it.
        """
        store = yield self.started(self.newStore())
        writer = store.begin("http://example.com/big", makeMeta())
        writer.write(b"x" * (600 * KIB))
        for _ in range(200):
            if self.files(store, "tmp"):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.files(store, "tmp")), 1)
        self.assertEqual(self.files(store), [])
        self.assertIsNone(store.freshUntil("http://example.com/big"))
        yield writer.finish()
        self.assertEqual(self.files(store, "tmp"), [])
        self.assertEqual(len(self.files(store)), 1)

    @inlineCallbacks
    def test_abortRemovesTempFile(self) -> Generator[Deferred[Any], Any, None]:
        """
        Aborting a large write removes its temp file.
        """
        store = yield self.started(self.newStore())
        writer = store.begin("http://example.com/big", makeMeta())
        writer.write(b"x" * (600 * KIB))
        yield deferLater(reactor, 0.05, lambda: None)
        writer.abort()
        for _ in range(200):
            if not self.files(store, "tmp"):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.files(store, "tmp"), [])
        self.assertEqual(store.stats()["writers"], 0)

    @inlineCallbacks
    def test_writeFailureLeavesStoreAsItWas(self) -> Generator[Deferred[Any], Any, None]:
        """
        When the temp file cannot be created, C{finish} fails with the
        C{OSError} and the older version stays readable.
        """
        store = yield self.started(self.newStore())
        yield self.put(store, "http://example.com/w", b"old")
        tmp = os.path.join(store.path, "tmp")
        os.rmdir(tmp)
        with open(tmp, "wb"):
            pass
        writer = store.begin("http://example.com/w", makeMeta())
        writer.write(b"new")
        failure = yield self.failureOf(writer.finish())
        self.assertIsInstance(failure, OSError)
        self.assertEqual((yield self.readAll(store, "http://example.com/w")), b"old")
        os.unlink(tmp)
        os.mkdir(tmp)

    @inlineCallbacks
    def test_sizeMismatchRefused(self) -> Generator[Deferred[Any], Any, None]:
        """
        A body shorter than the announced size is not stored.
        """
        store = yield self.started(self.newStore())
        writer = store.begin("http://example.com/short", makeMeta(size=10))
        writer.write(b"12345")
        failure = yield self.failureOf(writer.finish())
        self.assertIsInstance(failure, IncompleteObject)
        self.assertIsNone(store.freshUntil("http://example.com/short"))
        self.assertEqual(self.files(store), [])

    @inlineCallbacks
    def test_directoryLocked(self) -> Generator[Deferred[Any], Any, None]:
        """
        A second store cannot start on a directory another store is using.
        """
        first = yield self.started(self.newStore())
        second = self.newStore(first.path)
        self.assertRaises(DirectoryInUse, second.startService)
        self.assertFalse(second.running)

    @inlineCallbacks
    def test_stopWaitsForWrites(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{stopService} fires only after writes under way have finished, so
        a finished object is on disk when the node has stopped.
        """
        store = yield self.started(self.newStore())
        body = makeBody(2 * MIB, seed=9)
        writer = store.begin("http://example.com/late", makeMeta(size=len(body)))
        writer.write(body)
        finished = writer.finish()
        results: list[Any] = []
        finished.addBoth(results.append)
        yield store.stopService()
        self.assertEqual(results, [None])
        reopened = yield self.started(self.newStore(store.path))
        self.assertEqual((yield self.readAll(reopened, "http://example.com/late")), body)


class EvictionTests(DiskTestMixin, TestCase):
    """
    LRU eviction over the disk store's in-memory index.
    """

    @inlineCallbacks
    def test_lruOrderAndEviction(self) -> Generator[Deferred[Any], Any, None]:
        """
        A read moves an object to the recent end; when the budget is
        exceeded the least recently used object's file is removed;
        C{freshUntil} lookups do not count as use.
        """
        body = b"x" * (100 * KIB)
        store = yield self.started(self.newStore(maxSize=350 * KIB))
        for key in "abc":
            yield self.put(store, key, body)
        self.assertEqual(store.keys(), ["a", "b", "c"])
        yield store.get("a")
        self.assertEqual(store.keys(), ["b", "c", "a"])
        for _ in range(100):
            store.freshUntil("b")
        yield self.put(store, "d", body)
        self.assertEqual(store.keys(), ["c", "a", "d"])
        self.assertEqual(store.stats()["evictions"], 1)
        for _ in range(200):
            if not os.path.exists(self.objectPath(store, "b")):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(os.path.exists(self.objectPath(store, "b")))
        self.assertEqual(len(self.files(store)), 3)

    @inlineCallbacks
    def test_rebuildOrdersByAge(self) -> Generator[Deferred[Any], Any, None]:
        """
        After a restart the objects stored longest ago are evicted first
        (file modification times), whatever order the scan finds them in.
        """
        store = yield self.started(self.newStore())
        keys = [f"http://example.com/{i}" for i in range(30)]
        for key in keys:
            yield self.put(store, key, b"body")
        yield store.stopService()
        ages = list(range(30))
        random.Random(4).shuffle(ages)
        for key, age in zip(keys, ages):
            os.utime(self.objectPath(store, key), (1_000_000 + age, 1_000_000 + age))
        reopened = yield self.started(self.newStore(store.path))
        yield deferLater(reactor, 0.05, lambda: None)
        expected = [key for _, key in sorted(zip(ages, keys))]
        self.assertEqual(reopened.keys(), expected)

    @inlineCallbacks
    def test_smallerBudgetAfterRestart(self) -> Generator[Deferred[Any], Any, None]:
        """
        Reopened with a smaller budget, the store evicts down to it.
        """
        store = yield self.started(self.newStore())
        for i in range(10):
            yield self.put(store, f"k{i}", b"x" * (50 * KIB))
        yield store.stopService()
        reopened = yield self.started(self.newStore(store.path, maxSize=200 * KIB))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertLessEqual(reopened.stats()["bytes"], 200 * KIB)
        self.assertEqual(reopened.stats()["objects"], 3)


class CrashSafetyTests(DiskTestMixin, TestCase):
    """
    What a restart finds: leftovers of a crash, damaged files.
    """

    @inlineCallbacks
    def test_leftoverTempFilesRemoved(self) -> Generator[Deferred[Any], Any, None]:
        """
        Temp files left by a crash are deleted at start and never indexed,
        even when they hold a complete, valid object.
        """
        path = self.mktemp()
        os.makedirs(os.path.join(path, "tmp"))
        meta = makeMeta(size=4)
        import zlib

        with open(os.path.join(path, "tmp", "abc.tmp"), "wb") as f:
            f.write(encodeMeta("http://example.com/t", meta) + b"body"
                    + encodeTrailer(4, zlib.crc32(b"body")))
        with open(os.path.join(path, "tmp", "partial.tmp"), "wb") as f:
            f.write(MAGIC + b"\x00\x00")
        store = yield self.started(self.newStore(path))
        self.assertEqual(self.files(store, "tmp"), [])
        self.assertEqual(sorted(os.listdir(path)), ["lock", "objects", "tmp"])
        self.assertEqual(store.stats()["tempFilesRemoved"], 2)
        self.assertIsNone(store.freshUntil("http://example.com/t"))
        self.assertIsNone((yield store.get("http://example.com/t")))

    @inlineCallbacks
    def damaged(self, damage: Any, size: int = 1000) -> Generator[Deferred[Any], Any, Any]:
        """
        Store an object, stop, damage its file with C{damage(path)},
        reopen.

        @return: the reopened store.
        """
        store = yield self.started(self.newStore())
        key = "http://example.com/damaged"
        yield self.put(store, key, makeBody(size, seed=1))
        yield self.put(store, "http://example.com/fine", b"fine")
        yield store.stopService()
        damage(self.objectPath(store, key))
        reopened = yield self.started(self.newStore(store.path))
        return reopened

    @inlineCallbacks
    def assertNeverServed(self, store: DiskStore) -> Generator[Deferred[Any], Any, None]:
        key = "http://example.com/damaged"
        self.assertIsNone(store.freshUntil(key))
        self.assertIsNone((yield store.get(key)))
        self.assertFalse(os.path.exists(self.objectPath(store, key)))
        self.assertEqual(store.stats()["corrupt"], 1)
        self.assertEqual((yield self.readAll(store, "http://example.com/fine")), b"fine")
        self.assertEqual(store.stats()["objects"], 1)

    def test_truncated(self) -> Deferred[None]:
        """
        A file cut short anywhere (here, in its body) is removed at start:
        never served, never an ICP HIT.
        """
        def damage(path: str) -> None:
            os.truncate(path, os.path.getsize(path) - 30)

        return self.damaged(damage).addCallback(self.assertNeverServed)

    def test_truncatedToHeader(self) -> Deferred[None]:
        """
        A file holding only part of its header is removed at start.
        """
        return self.damaged(lambda path: os.truncate(path, PREFIX_SIZE + 3)).addCallback(
            self.assertNeverServed
        )

    def test_emptyFile(self) -> Deferred[None]:
        """
        An empty file (what a power cut can leave without fsync) is removed.
        """
        return self.damaged(lambda path: os.truncate(path, 0)).addCallback(
            self.assertNeverServed
        )

    def test_metadataBitFlip(self) -> Deferred[None]:
        """
        A flipped bit in the metadata fails its checksum: removed at start.
        """
        def damage(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(PREFIX_SIZE + 10)
                byte = f.read(1)
                f.seek(PREFIX_SIZE + 10)
                f.write(bytes([byte[0] ^ 0x04]))

        return self.damaged(damage).addCallback(self.assertNeverServed)

    def test_garbage(self) -> Deferred[None]:
        """
        A file of garbage under the object's name is removed at start.
        """
        def damage(path: str) -> None:
            with open(path, "wb") as f:
                f.write(os.urandom(5000))

        return self.damaged(damage).addCallback(self.assertNeverServed)

    def test_misplaced(self) -> Deferred[None]:
        """
        A valid object file under a name that is not the hash of its key is
        removed at start (so a key is never answered with another's body).
        """
        def damage(path: str) -> None:
            os.rename(path, path[:-1] + ("1" if path.endswith("0") else "0"))

        return self.damaged(damage).addCallback(self.checkMisplaced)

    def checkMisplaced(self, store: DiskStore) -> None:
        self.assertIsNone(store.freshUntil("http://example.com/damaged"))
        self.assertEqual(store.stats()["corrupt"], 1)
        self.assertEqual(store.stats()["objects"], 1)
        self.assertEqual(len(self.files(store)), 1)

    @inlineCallbacks
    def test_smallBodyBitFlip(self) -> Generator[Deferred[Any], Any, None]:
        """
        A flipped bit in a small body is found by C{get}, which checks the
        whole body before answering: C{get} fires with C{None} and the
        object is dropped.
        """
        def damage(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(-TRAILER - 10, os.SEEK_END)
                byte = f.read(1)
                f.seek(-TRAILER - 10, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0x01]))

        store = yield self.damaged(damage)
        key = "http://example.com/damaged"
        self.assertIsNotNone(store.freshUntil(key))  # the header is sound
        self.assertIsNone((yield store.get(key)))
        self.assertIsNone(store.freshUntil(key))
        self.assertFalse(os.path.exists(self.objectPath(store, key)))
        self.assertEqual(store.stats()["corrupt"], 1)

    @inlineCallbacks
    def test_largeBodyBitFlip(self) -> Generator[Deferred[Any], Any, None]:
        """
        A flipped bit in a large (streamed) body makes C{writeTo} fail with
        L{CorruptObject} before the last chunk is written, and the object
        is dropped, so the proxy never completes the response.
        """
        def damage(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(PREFIX_SIZE + 400 * KIB)
                byte = f.read(1)
                f.seek(PREFIX_SIZE + 400 * KIB)
                f.write(bytes([byte[0] ^ 0x80]))

        size = 1 * MIB
        self.assertTrue(size > SMALL_OBJECT)
        store = yield self.damaged(damage, size=size)
        key = "http://example.com/damaged"
        obj = yield store.get(key)
        consumer = FlowControlledConsumer(reactor)
        failure = yield self.failureOf(obj.writeTo(consumer))
        self.assertIsInstance(failure, CorruptObject)
        self.assertTrue(len(consumer.value()) < size)
        self.assertEqual(consumer.violations, [])
        self.assertIsNone(consumer.producer)
        self.assertIsNone(store.freshUntil(key))
        for _ in range(200):
            if not os.path.exists(self.objectPath(store, key)):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(os.path.exists(self.objectPath(store, key)))

    @inlineCallbacks
    def test_largeBodyRangeReadsOnlyRange(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{writeRangeTo} on a large (streamed) body reads only the bytes of
        the range from the file, and serves them even when a bit outside
        the range is flipped (a partial read cannot check the body's CRC).
        """
        def damage(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(PREFIX_SIZE + 100 * KIB)
                byte = f.read(1)
                f.seek(PREFIX_SIZE + 100 * KIB)
                f.write(bytes([byte[0] ^ 0x80]))

        size = 2 * MIB
        store = yield self.damaged(damage, size=size)
        body = makeBody(size, seed=1)
        reads: list[int] = []
        inThread = store._inThread

        def recording(f: Any, *args: Any) -> Any:
            if f.__name__ == "_readChunk":
                reads.append(args[1])
            return inThread(f, *args)

        store._inThread = recording  # type: ignore[method-assign]
        obj = yield store.get("http://example.com/damaged")
        consumer = FlowControlledConsumer(reactor)
        yield obj.writeRangeTo(consumer, MIB + 5, 300 * KIB)
        self.assertTrue(consumer.value() == body[MIB + 5 : MIB + 5 + 300 * KIB])
        self.assertEqual(reads, [256 * KIB, 44 * KIB])
        self.assertEqual(consumer.violations, [])
        self.assertIsNone(consumer.producer)

    @inlineCallbacks
    def test_largeBodyWholeRangeChecked(self) -> Generator[Deferred[Any], Any, None]:
        """
        A range that is the whole of a large body is checked like
        C{writeTo}: a flipped bit fails it with L{CorruptObject}.
        """
        def damage(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(PREFIX_SIZE + 400 * KIB)
                byte = f.read(1)
                f.seek(PREFIX_SIZE + 400 * KIB)
                f.write(bytes([byte[0] ^ 0x80]))

        size = 1 * MIB
        store = yield self.damaged(damage, size=size)
        obj = yield store.get("http://example.com/damaged")
        consumer = FlowControlledConsumer(reactor)
        failure = yield self.failureOf(obj.writeRangeTo(consumer, 0, size))
        self.assertIsInstance(failure, CorruptObject)
        self.assertTrue(len(consumer.value()) < size)


TRAILER = 20


class LoadingTests(DiskTestMixin, TestCase):
    """
    The index rebuild at start, on the real reactor.
    """

    @inlineCallbacks
    def populated(self, count: int = 300) -> Generator[Deferred[Any], Any, tuple[str, list[str]]]:
        store = yield self.started(self.newStore())
        keys = [f"http://example.com/obj/{i}" for i in range(count)]
        for i, key in enumerate(keys):
            yield self.put(store, key, b"body %d" % (i,), makeMeta(freshUntil=5000.0 + i))
        yield store.stopService()
        return store.path, keys

    @inlineCallbacks
    def test_loadingFlag(self) -> Generator[Deferred[Any], Any, None]:
        """
        Right after C{startService} the store is loading and knows nothing
        (C{freshUntil} is C{None}); once the rebuild is done C{loading} is
        C{False} and every object is indexed with its C{freshUntil}.
        """
        path, keys = yield self.populated()
        store = self.newStore(path)
        self.assertFalse(store.loading)
        store.startService()
        self.addCleanup(self.stopped, store)
        self.assertTrue(store.loading)
        self.assertEqual(store.stats()["loading"], 1)
        self.assertIsNone(store.freshUntil(keys[0]))
        yield store.whenLoaded()
        self.assertFalse(store.loading)
        self.assertEqual(store.stats()["objects"], len(keys))
        for i, key in enumerate(keys):
            self.assertEqual(store.freshUntil(key), 5000.0 + i)

    @inlineCallbacks
    def test_icpMissNoFetchWhileLoading(self) -> Generator[Deferred[Any], Any, None]:
        """
        The ICP responder answers MISS_NOFETCH for a stored object the
        rebuild has not indexed yet, MISS_NOFETCH for an unknown one, and
        HIT / MISS once the rebuild is done.
        """
        url = "http://example.com/icp"
        store = yield self.started(self.newStore())
        yield self.put(store, cacheKey(url), b"x", makeMeta(freshUntil=1e12))
        yield store.stopService()

        class Access:
            def allowICP(self, client: str, url: str) -> bool:
                return True

        store = self.newStore(store.path)
        responder = ICPResponder(store, Access(), reactor=Clock())

        def ask(u: str) -> icp.Opcode:
            reply = responder.answer(b"\x00\x00\x00\x07", u.encode(), "127.0.0.1")
            assert reply is not None
            return icp.decode(reply).opcode

        store.startService()
        self.addCleanup(self.stopped, store)
        self.assertEqual(ask(url), icp.Opcode.MISS_NOFETCH)
        self.assertEqual(ask("http://example.com/other"), icp.Opcode.MISS_NOFETCH)
        yield store.whenLoaded()
        self.assertEqual(ask(url), icp.Opcode.HIT)
        self.assertEqual(ask("http://example.com/other"), icp.Opcode.MISS)

    @inlineCallbacks
    def test_getWhileLoading(self) -> Generator[Deferred[Any], Any, None]:
        """
        While loading, C{get} of an object not indexed yet looks on disk,
        serves it and indexes it.
        """
        path, keys = yield self.populated(50)
        store = self.newStore(path)
        store.startService()
        self.addCleanup(self.stopped, store)
        self.assertIsNone(store.freshUntil(keys[7]))
        body = yield self.readAll(store, keys[7])
        self.assertEqual(body, b"body 7")
        self.assertEqual(store.freshUntil(keys[7]), 5007.0)
        yield store.whenLoaded()
        self.assertEqual(store.stats()["objects"], 50)

    @inlineCallbacks
    def test_changesWhileLoadingWin(self) -> Generator[Deferred[Any], Any, None]:
        """
        A delete, a replacement and a metadata update made while loading
        are not undone by the rebuild finding the older files.
        """
        path, keys = yield self.populated(50)
        store = self.newStore(path)
        store.startService()
        self.addCleanup(self.stopped, store)
        self.assertTrue(store.loading)
        deleted = yield store.delete(keys[1])
        self.assertTrue(deleted)
        yield self.put(store, keys[2], b"replaced", makeMeta(freshUntil=1.0))
        updated = yield store.updateMeta(keys[3], makeMeta(freshUntil=2.0))
        self.assertTrue(updated)
        yield store.whenLoaded()
        self.assertIsNone(store.freshUntil(keys[1]))
        self.assertIsNone((yield store.get(keys[1])))
        self.assertEqual(store.freshUntil(keys[2]), 1.0)
        self.assertEqual((yield self.readAll(store, keys[2])), b"replaced")
        self.assertEqual(store.freshUntil(keys[3]), 2.0)
        self.assertEqual((yield self.readAll(store, keys[3])), b"body 3")
        self.assertEqual(store.stats()["objects"], 49)


# A child process that writes, replaces, updates and deletes objects through
# a DiskStore as fast as it can, printing each operation once it completed.
CHILD = r"""
import random, sys
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from icpmesh.interfaces import StoredResponse
from icpmesh.storage.disk import DiskStore

path, seed = sys.argv[1], int(sys.argv[2])
store = DiskStore(path, maxSize=64 * 1024**2, maxObjectSize=8 * 1024**2,
                  fsync=sys.argv[3] == "on")
rng = random.Random(seed)

def body(key, version):
    r = random.Random(f"{key}:{version}")
    return r.randbytes(r.choice([0, 10, 3000, 70000, 300000, 900000]))

def say(*words):
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()

@inlineCallbacks
def worker(n):
    yield store.whenLoaded()
    while True:
        key = f"http://example.com/{rng.randrange(40)}"
        version = f"{seed}.{n}.{rng.randrange(10**9)}"
        action = rng.random()
        if action < 0.1:
            yield store.delete(key)
            say("deleted", key)
            continue
        if action < 0.2:
            meta = StoredResponse(200, b"OK", ((b"X-Version", b"updated"),), 1.0, 2.0, 3.0)
            ok = yield store.updateMeta(key, meta)
            continue
        data = body(key, version)
        meta = StoredResponse(200, b"OK", ((b"X-Version", version.encode()),),
                              1.0, 2.0, 3.0, len(data))
        writer = store.begin(key, meta)
        for i in range(0, len(data), 65536):
            writer.write(data[i:i + 65536])
        yield writer.finish()
        say("stored", key, version)

def start():
    store.startService()
    say("started")
    for n in range(4):
        worker(n).addErrback(lambda f: (say("error", f.getErrorMessage()), reactor.stop()))

reactor.callWhenRunning(start)
reactor.run()
"""


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, killAfter: int) -> None:
        self.killAfter = killAfter
        self.lines: list[str] = []
        self.buffer = b""
        self.ended: Deferred[None] = Deferred()
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lines.append(line.decode())
            stored = sum(1 for x in self.lines if x.startswith("stored"))
            if stored == self.killAfter and self.transport is not None:
                self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class KillTests(DiskTestMixin, TestCase):
    """
    A process writing through a L{DiskStore} is killed with C{SIGKILL}
    mid-stream; what a store reopened on its directory serves is exactly
    what was written, never a partial object.
    """

    timeout = 180

    def childBody(self, key: str, version: str) -> bytes:
        r = random.Random(f"{key}:{version}")
        return r.randbytes(r.choice([0, 10, 3000, 70000, 300000, 900000]))

    @inlineCallbacks
    def runChild(self, path: str, seed: int, killAfter: int,
                 fsync: str) -> Generator[Deferred[Any], Any, list[str]]:
        proto = _ChildProtocol(killAfter)
        env = dict(os.environ, PYTHONPATH=ROOT)
        reactor.spawnProcess(
            proto, sys.executable, [sys.executable, "-c", CHILD, path, str(seed), fsync],
            env=env, path=ROOT,
        )
        yield proto.ended
        self.assertNotIn("error", " ".join(proto.lines), proto.stderr)
        stored = [x for x in proto.lines if x.startswith("stored")]
        self.assertTrue(len(stored) >= killAfter, (proto.lines[-5:], proto.stderr))
        return proto.lines

    @inlineCallbacks
    def checkDirectory(
        self, path: str, lines: list[str]
    ) -> Generator[Deferred[Any], Any, tuple[int, int]]:
        """
        Reopen the directory and check that every object it serves is
        byte-identical to a version that was written for its key, and that
        no temp file is left.

        @return: the number of objects checked and of temp files the start
            removed (writes cut short by the kill).
        """
        store = yield self.started(self.newStore(path))
        self.assertEqual(self.files(store, "tmp"), [])
        checked = 0
        for key in list(store.keys()):
            obj = yield store.get(key)
            self.assertIsNotNone(obj, key)
            consumer = FlowControlledConsumer(reactor)
            yield obj.writeTo(consumer)
            version = obj.meta.header(b"X-Version").decode()
            if version == "updated":
                # Metadata replaced after the fact; the body is some version
                # written before, which the size and checksum vouched for.
                self.assertEqual(len(consumer.value()), obj.size)
            else:
                expected = self.childBody(key, version)
                self.assertTrue(consumer.value() == expected, (key, version))
                self.assertEqual(obj.meta.size, len(expected))
            checked += 1
        removed = store.stats()["tempFilesRemoved"]
        yield store.stopService()
        return checked, removed

    @inlineCallbacks
    def test_killDuringWrites(self) -> Generator[Deferred[Any], Any, None]:
        """
        Three rounds of: a child process writes objects (four writers at
        once, small and large, with replacements, updates and deletes) and
        is killed with C{SIGKILL} after a random number of completed
        writes; then the directory is reopened and checked.  Nothing
        partial is ever served, leftover temp files are gone, and objects
        keep being served across rounds.
        """
        path = os.path.abspath(self.mktemp())
        rng = random.Random(2024)
        total = cutShort = 0
        for round in range(3):
            lines = yield self.runChild(path, round, rng.randrange(15, 40),
                                        "on" if round % 2 else "off")
            checked, removed = yield self.checkDirectory(path, lines)
            total += checked
            cutShort += removed
        self.assertTrue(total > 0)
        # The kills did land in the middle of writes.
        self.assertTrue(cutShort > 0)

    @inlineCallbacks
    def test_killedFsyncedWritesSurvive(self) -> Generator[Deferred[Any], Any, None]:
        """
        With C{fsync} on, every object whose C{finish} fired in the killed
        process (and that was not replaced, updated or deleted afterwards)
        is served after the restart with that exact body.
        """
        path = os.path.abspath(self.mktemp())
        lines = yield self.runChild(path, 7, 25, "on")
        last: dict[str, Optional[str]] = {}
        for line in lines:
            words = line.split()
            if words[0] == "stored":
                last[words[1]] = words[2]
            elif words[0] == "deleted":
                last[words[1]] = None
        store = yield self.started(self.newStore(path))
        survived = 0
        for key, version in last.items():
            obj = yield store.get(key)
            if version is None or obj is None:
                # Deleted, or deleted/replaced by an operation in flight at
                # the kill: not a promise the store made.
                continue
            got = obj.meta.header(b"X-Version").decode()
            if got == version:
                consumer = FlowControlledConsumer(reactor)
                yield obj.writeTo(consumer)
                self.assertTrue(consumer.value() == self.childBody(key, version))
                survived += 1
        self.assertTrue(survived > 0, lines[-10:])


class ShutdownTests(SynchronousTestCase):
    """
    A process whose reactor stops without stopping the store still exits.
    """

    def test_reactorStopWithoutStopService(self) -> None:
        """
        The store's pool threads are stopped at reactor shutdown even when
        nobody called C{stopService}, so the process does not hang on them.
        """
        import subprocess

        code = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from icpmesh.storage.disk import DiskStore\n"
            "store = DiskStore(sys.argv[1])\n"
            "def go():\n"
            "    store.startService()\n"
            "    store.whenLoaded().addCallback(lambda _: store.get('x'))"
            ".addCallback(lambda _: reactor.stop())\n"
            "reactor.callWhenRunning(go)\n"
            "reactor.run()\n"
            "print('exited')\n"
        )
        path = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, cwd=ROOT, timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"exited\n"), result.stderr)


class PluginTests(SynchronousTestCase):
    """
    The C{disk} and C{tiered} store plugins.
    """

    def build(self, line: str, plugin: Any = diskStorePlugin) -> Any:
        self.configDir = getattr(self, "configDir", None) or os.path.abspath(self.mktemp())
        os.makedirs(self.configDir, exist_ok=True)
        config = parseConfig(
            f"http_port 3128\n{line}\n", os.path.join(self.configDir, "icpmesh.conf")
        )
        return plugin.storeFromConfig(config.plugins["store"], Clock())

    def test_verifyPlugins(self) -> None:
        """
        Both plugin objects provide L{IObjectStorePlugin}.
        """
        for name, plugin in (("disk", diskStorePlugin), ("tiered", tieredStorePlugin)):
            self.assertTrue(verifyObject(IObjectStorePlugin, plugin))
            self.assertEqual(plugin.name, name)

    def test_pluginsInstalled(self) -> None:
        """
        Both plugins are found by name among the installed plugins (the
        C{twisted/plugins} drop-in exports them).
        """
        for name, plugin in (("disk", diskStorePlugin), ("tiered", tieredStorePlugin)):
            self.assertIs(findPlugin("store", name), plugin)

    def test_options(self) -> None:
        """
        The options set the directory, budget, object limit, threads and
        fsync; the store is built but not started (nothing is created).
        """
        target = os.path.abspath(self.mktemp())
        store = self.build(
            f"store disk dir={target} max-size=2GB max-object-size=10MB threads=2 fsync=off"
        )
        self.assertIsInstance(store, DiskStore)
        self.assertEqual(
            (store.path, store.maxSize, store.maxObjectSize, store._threads, store.fsync),
            (target, 2 * 1024**3, 10 * MIB, 2, False),
        )
        self.assertFalse(os.path.exists(target))
        self.assertFalse(store.running)

    def test_relativeDirectory(self) -> None:
        """
        A relative C{dir} is taken from the config file's directory.
        """
        store = self.build("store disk dir=cache")
        self.assertEqual(store.path, os.path.join(self.configDir, "cache"))
        self.assertTrue(store.fsync)

    def test_dirRequired(self) -> None:
        """
        Without C{dir=} the config is refused, naming file and line.
        """
        e = self.assertRaises(ConfigError, self.build, "store disk max-size=1GB")
        self.assertEqual(e.lineno, 2)
        self.assertIn("dir=PATH is required", str(e))
        self.assertIn("icpmesh.conf:2: ", str(e))

    def test_badOptions(self) -> None:
        """
        An unknown option, a bad size, a file where the directory should be,
        a missing parent directory or bad threads are refused at the store
        line.
        """
        aFile = os.path.abspath(self.mktemp())
        with open(aFile, "w"):
            pass
        for line in (
            "store disk dir=/tmp/x max-sise=1GB",
            "store disk dir=/tmp/x max-size=huge",
            "store disk dir=/tmp/x max-size=1MB max-object-size=2MB",
            f"store disk dir={aFile}",
            "store disk dir=/nonexistent/parent/cache",
            "store disk dir=/tmp/x threads=0",
            "store disk dir=/tmp/x fsync=maybe",
        ):
            e = self.assertRaises(ConfigError, self.build, line)
            self.assertEqual(e.lineno, 2, line)

    def test_tiered(self) -> None:
        """
        The C{tiered} plugin builds a memory store in front of a disk store
        with the given sizes, and refuses inconsistent memory sizes.
        """
        target = os.path.abspath(self.mktemp())
        store = self.build(
            f"store tiered dir={target} max-size=1GB memory-size=32MB memory-object-size=2MB",
            tieredStorePlugin,
        )
        self.assertIsInstance(store, TieredStore)
        self.assertEqual(store.disk.path, target)
        self.assertEqual((store.memory.maxSize, store.memory.maxObjectSize), (32 * MIB, 2 * MIB))
        e = self.assertRaises(
            ConfigError, self.build,
            f"store tiered dir={target} memory-size=1MB memory-object-size=2MB",
            tieredStorePlugin,
        )
        self.assertEqual(e.lineno, 2)

    def test_noReactorImport(self) -> None:
        """
        Importing the module does not install the global reactor.
        """
        import subprocess

        code = ("import sys, icpmesh.storage.disk;"
                "sys.exit('twisted.internet.reactor' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT)
        self.assertEqual(result.returncode, 0, result.stderr)
