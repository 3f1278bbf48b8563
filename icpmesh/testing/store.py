# -*- test-case-name: tests.test_storage_memory -*-
"""
The conformance suite every L{icpmesh.interfaces.IObjectStore} should pass.

Store authors (of built-in or third-party store plugins) use it like this::

    from twisted.trial.unittest import TestCase
    from icpmesh.testing.store import StoreConformanceMixin

    class MyStoreConformanceTests(StoreConformanceMixin, TestCase):
        def makeStore(self):
            return MyStore(maxSize=self.storeMaxSize,
                           maxObjectSize=self.storeMaxObjectSize)

        # Only for stores that persist their objects:
        def reopenStore(self, store):
            return MyStore(path=store.path, maxSize=self.storeMaxSize,
                           maxObjectSize=self.storeMaxObjectSize)

and run it with C{python -m pytest} or C{python -m twisted.trial}.

The rules a store must follow:

  - C{makeStore()} returns a new, empty store whose byte budget is
    L{StoreConformanceMixin.storeMaxSize} and whose maximum object size is
    L{StoreConformanceMixin.storeMaxObjectSize}.  It may return a Deferred.
  - A store that provides C{IService} is returned I{not} started; the suite
    starts it, waits until its C{loading} attribute is C{False}, and stops it
    at the end of the test.
  - The optional C{reopenStore(store)} is given a store the suite has
    already stopped and returns (or fires with) a new store over the same
    persistent data.  The persistence tests run only when it is defined.

Every test returns a Deferred and runs on the real reactor, so stores that
work in threads or over the network are tested as they run in a node; use a
C{twisted.trial.unittest.TestCase} (not C{SynchronousTestCase}).
"""

from __future__ import annotations

import random
from typing import Any, Generator, Optional

from twisted.application.service import IService
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IConsumer, IPullProducer, IPushProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from icpmesh.interfaces import (
    ICachedObject,
    IObjectStore,
    IObjectWriter,
    IRangedCachedObject,
    ObjectTooLarge,
    StoredResponse,
)
from icpmesh.ranges import writeRange

KIB = 1024
MIB = 1024 * 1024


def makeMeta(
    freshUntil: float = 10_000.0,
    size: Optional[int] = None,
    status: int = 200,
    headers: Any = ((b"Content-Type", b"text/plain"), (b"X-Test", b"1")),
) -> StoredResponse:
    """
    A L{StoredResponse} for tests.
    """
    return StoredResponse(
        status=status,
        reason=b"OK" if status == 200 else b"Other",
        headers=tuple(headers),
        requestTime=1000.0,
        responseTime=1000.5,
        freshUntil=freshUntil,
        size=size,
    )


def makeBody(size: int, seed: int = 0) -> bytes:
    """
    C{size} reproducible pseudo-random bytes (so a byte slipped, repeated
    or dropped anywhere shows).
    """
    return random.Random(seed).randbytes(size)


@implementer(IConsumer)
class FlowControlledConsumer:
    """
    An L{IConsumer} test double that exercises flow control the way a slow
    client connection does.

    With a push producer it pauses the producer after every write and
    resumes it on a later reactor turn; with a pull producer it asks for
    data one C{resumeProducing} at a time, on later reactor turns.  It
    records every protocol violation in L{violations}: a write while
    paused, a pull producer writing when nothing was asked for, a second
    producer registered.  Without a producer, writes are simply collected.

    @ivar chunks: the data received, in order.
    @ivar violations: descriptions of flow-control violations seen.
    @ivar pauses: how many times a push producer was paused.
    @ivar registered: how many times a producer was registered.
    @ivar unregistered: how many times one was unregistered.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.chunks: list[bytes] = []
        self.violations: list[str] = []
        self.producer: Any = None
        self.streaming = False
        self.paused = False
        self.demanded = False
        self.pauses = 0
        self.registered = 0
        self.unregistered = 0

    def value(self) -> bytes:
        """
        Everything written so far.
        """
        return b"".join(self.chunks)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            self.violations.append("registerProducer while one is registered")
        self.registered += 1
        self.producer = producer
        self.streaming = bool(streaming)
        if streaming:
            if not IPushProducer.providedBy(producer):
                self.violations.append("streaming producer is not an IPushProducer")
            # A slow client: stop at once, go on a bit later.
            self.paused = True
            self.pauses += 1
            producer.pauseProducing()
            self._reactor.callLater(0, self._resume, producer)
        else:
            if not IPullProducer.providedBy(producer):
                self.violations.append("pull producer is not an IPullProducer")
            self._reactor.callLater(0, self._pull, producer)

    def unregisterProducer(self) -> None:
        if self.producer is None:
            self.violations.append("unregisterProducer without a producer")
        self.unregistered += 1
        self.producer = None
        self.paused = False
        self.demanded = False

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            self.violations.append(f"write of {type(data).__name__}, not bytes")
        if self.producer is not None:
            if self.streaming:
                if self.paused:
                    self.violations.append("write while paused")
                else:
                    self.paused = True
                    self.pauses += 1
                    self.producer.pauseProducing()
                    self._reactor.callLater(0, self._resume, self.producer)
            else:
                if not self.demanded:
                    self.violations.append("pull producer wrote unasked")
                self.demanded = False
                self._reactor.callLater(0, self._pull, self.producer)
        self.chunks.append(data)

    def _resume(self, producer: Any) -> None:
        if self.producer is producer and self.paused:
            self.paused = False
            producer.resumeProducing()

    def _pull(self, producer: Any) -> None:
        if self.producer is producer and not self.demanded:
            self.demanded = True
            producer.resumeProducing()


class StoreConformanceMixin:
    """
    Tests every L{IObjectStore} must pass.  Mix into a
    C{twisted.trial.unittest.TestCase} and define L{makeStore} (and, for a
    persistent store, L{reopenStore}).

    @cvar storeMaxSize: the byte budget C{makeStore} must give the store.
    @cvar storeMaxObjectSize: the maximum object size it must give it.
    @cvar loadTimeout: seconds to wait for C{loading} to become C{False}.
    """

    storeMaxSize = 8 * MIB
    storeMaxObjectSize = 4 * MIB
    loadTimeout = 30.0

    # Filled in by trial's TestCase.
    addCleanup: Any
    assertEqual: Any
    assertIs: Any
    assertIsNone: Any
    assertIsNotNone: Any
    assertTrue: Any
    assertFalse: Any
    assertRaises: Any
    assertLessEqual: Any
    assertIn: Any
    fail: Any

    def makeStore(self) -> Any:
        """
        Return (or fire with) a new, empty, unstarted store with a budget
        of L{storeMaxSize} and a maximum object size of
        L{storeMaxObjectSize}.  Subclasses must override this.
        """
        raise NotImplementedError(f"{type(self).__name__} must define makeStore()")

    # reopenStore(self, store) -> store | Deferred[store] is optional; see
    # the module docstring.

    # -- helpers --------------------------------------------------------

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    @inlineCallbacks
    def startedStore(self, store: Any = None) -> Generator[Deferred[Any], Any, Any]:
        """
        Make a store with L{makeStore} (or take C{store}), start it if it is
        a service, wait until it has loaded, and arrange for it to be
        stopped after the test.

        @return: a Deferred firing with the store.
        """
        if store is None:
            store = yield maybeDeferred(self.makeStore)
        if IService.providedBy(store) and not store.running:
            yield maybeDeferred(store.startService)
            self.addCleanup(self._stopStore, store)
        yield self.waitLoaded(store)
        return store

    def _stopStore(self, store: Any) -> Any:
        if store.running:
            return maybeDeferred(store.stopService)
        return None

    @inlineCallbacks
    def waitLoaded(self, store: Any) -> Generator[Deferred[Any], Any, None]:
        """
        Wait (on the real reactor) until C{store.loading} is C{False}.
        """
        from twisted.internet.task import deferLater

        reactor = self._reactor()
        deadline = reactor.seconds() + self.loadTimeout
        while store.loading:
            if reactor.seconds() > deadline:
                self.fail(f"store still loading after {self.loadTimeout} seconds")
            yield deferLater(reactor, 0.005, lambda: None)

    @inlineCallbacks
    def reopened(self, store: Any) -> Generator[Deferred[Any], Any, Any]:
        """
        Stop C{store}, reopen it with C{reopenStore}, start the new one and
        wait until it has loaded.
        """
        reopen = getattr(self, "reopenStore", None)
        if reopen is None:
            self.fail("not a persistent store: define reopenStore()")
        if IService.providedBy(store) and store.running:
            yield maybeDeferred(store.stopService)
        newStore = yield maybeDeferred(reopen, store)
        started = yield self.startedStore(newStore)
        return started

    @inlineCallbacks
    def put(
        self, store: Any, key: str, body: bytes, meta: Optional[StoredResponse] = None,
        chunk: int = 64 * KIB,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Store C{body} under C{key} in chunks and wait for L{finish}.
        """
        writer = store.begin(key, meta if meta is not None else makeMeta())
        for i in range(0, len(body), chunk):
            writer.write(body[i : i + chunk])
        yield writer.finish()

    @inlineCallbacks
    def read(self, store: Any, key: str) -> Generator[Deferred[Any], Any, Any]:
        """
        C{get} an object and read its body through a
        L{FlowControlledConsumer}.

        @return: a Deferred firing with C{(object, body)}, or C{None} when
            nothing is stored.
        """
        obj = yield store.get(key)
        if obj is None:
            return None
        body = yield self.readBody(obj)
        return obj, body

    @inlineCallbacks
    def readBody(self, obj: Any) -> Generator[Deferred[Any], Any, bytes]:
        """
        Read an object's body through a L{FlowControlledConsumer} and check
        that flow control was honoured.
        """
        consumer = FlowControlledConsumer(self._reactor())
        yield obj.writeTo(consumer)
        self.assertEqual(consumer.violations, [])
        self.assertIsNone(consumer.producer, "producer left registered")
        return consumer.value()

    # -- the interface ---------------------------------------------------

    @inlineCallbacks
    def test_verifyObject(self) -> Generator[Deferred[Any], Any, None]:
        """
        The store, its writers and its cached objects provide their
        interfaces, and the store has the limits C{makeStore} was asked for.
        """
        store = yield self.startedStore()
        self.assertTrue(verifyObject(IObjectStore, store))
        self.assertEqual(store.maxObjectSize, self.storeMaxObjectSize)
        self.assertFalse(store.loading)
        writer = store.begin("http://example.com/v", makeMeta())
        self.assertTrue(verifyObject(IObjectWriter, writer))
        writer.write(b"body")
        yield writer.finish()
        obj = yield store.get("http://example.com/v")
        self.assertTrue(verifyObject(ICachedObject, obj))

    @inlineCallbacks
    def test_getMissing(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{get} of a key never stored fires with C{None}, and C{freshUntil}
        returns C{None} for it.
        """
        store = yield self.startedStore()
        obj = yield store.get("http://example.com/missing")
        self.assertIsNone(obj)
        self.assertIsNone(store.freshUntil("http://example.com/missing"))

    @inlineCallbacks
    def test_roundTrip(self) -> Generator[Deferred[Any], Any, None]:
        """
        A finished object comes back with the same metadata (status,
        reason, headers in order, times, size) and a byte-identical body.
        """
        store = yield self.startedStore()
        body = makeBody(100_000, seed=1)
        meta = makeMeta(
            freshUntil=5000.25,
            size=len(body),
            headers=[(b"Content-Type", b"image/png"), (b"ETag", b'"x"'),
                     (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        )
        yield self.put(store, "http://example.com/a", body, meta)
        result = yield self.read(store, "http://example.com/a")
        self.assertIsNotNone(result)
        obj, got = result
        self.assertEqual(got, body)
        self.assertEqual(obj.size, len(body))
        self.assertEqual(obj.meta.status, 200)
        self.assertEqual(obj.meta.reason, b"OK")
        self.assertEqual(list(obj.meta.headers), list(meta.headers))
        self.assertEqual(obj.meta.requestTime, meta.requestTime)
        self.assertEqual(obj.meta.responseTime, meta.responseTime)
        self.assertEqual(obj.meta.freshUntil, 5000.25)
        self.assertEqual(obj.meta.size, len(body))

    @inlineCallbacks
    def test_emptyBody(self) -> Generator[Deferred[Any], Any, None]:
        """
        An object with an empty body (a redirect, say) is stored and read
        back with size 0.
        """
        store = yield self.startedStore()
        meta = makeMeta(status=301, size=0, headers=[(b"Location", b"http://x/")])
        yield self.put(store, "http://example.com/moved", b"", meta)
        result = yield self.read(store, "http://example.com/moved")
        self.assertIsNotNone(result)
        obj, got = result
        self.assertEqual((obj.size, got, obj.meta.status), (0, b"", 301))

    @inlineCallbacks
    def test_keysAreOpaque(self) -> Generator[Deferred[Any], Any, None]:
        """
        Keys are opaque text: long ones, non-ASCII ones, ones with slashes,
        dots, NULs and spaces are all kept apart and read back.
        """
        store = yield self.startedStore()
        keys = [
            "http://example.com/" + "x" * 5000,
            "http://example.com/caf\u00e9?q=\u2603",
            "../../etc/passwd",
            "http://example.com/a b\x00c",
            "vary:http://example.com/a\naccept-encoding=gzip",
            ".",
            "",
        ]
        for i, key in enumerate(keys):
            yield self.put(store, key, b"body %d" % (i,))
        for i, key in enumerate(keys):
            result = yield self.read(store, key)
            self.assertIsNotNone(result, key)
            self.assertEqual(result[1], b"body %d" % (i,))
            self.assertEqual(store.freshUntil(key), 10_000.0)

    @inlineCallbacks
    def test_invisibleBeforeFinish(self) -> Generator[Deferred[Any], Any, None]:
        """
        Bytes written are invisible to C{get} and C{freshUntil} until
        C{finish} fires, even when an older version is replaced.
        """
        store = yield self.startedStore()
        key = "http://example.com/pending"
        writer = store.begin(key, makeMeta(freshUntil=2000.0))
        writer.write(b"new body")
        self.assertIsNone(store.freshUntil(key))
        self.assertIsNone((yield store.get(key)))
        yield self.put(store, key + "2", b"old", makeMeta(freshUntil=1000.0))
        writer2 = store.begin(key + "2", makeMeta(freshUntil=3000.0))
        writer2.write(b"replacement")
        self.assertEqual(store.freshUntil(key + "2"), 1000.0)
        result = yield self.read(store, key + "2")
        self.assertEqual(result[1], b"old")
        yield writer.finish()
        self.assertEqual(store.freshUntil(key), 2000.0)
        result = yield self.read(store, key)
        self.assertEqual(result[1], b"new body")
        writer2.abort()

    @inlineCallbacks
    def test_abort(self) -> Generator[Deferred[Any], Any, None]:
        """
        An aborted writer leaves nothing behind, leaves an older version in
        place, and may be aborted again; aborting after C{finish} keeps the
        committed object.
        """
        store = yield self.startedStore()
        key = "http://example.com/aborted"
        writer = store.begin(key, makeMeta())
        writer.write(b"partial")
        writer.abort()
        writer.abort()
        self.assertIsNone((yield store.get(key)))
        self.assertIsNone(store.freshUntil(key))

        yield self.put(store, key, b"old", makeMeta(freshUntil=1500.0))
        writer = store.begin(key, makeMeta(freshUntil=2500.0))
        writer.write(b"new")
        writer.abort()
        result = yield self.read(store, key)
        self.assertEqual(result[1], b"old")
        self.assertEqual(store.freshUntil(key), 1500.0)

        writer = store.begin(key, makeMeta(freshUntil=3500.0))
        writer.write(b"newest")
        yield writer.finish()
        writer.abort()
        result = yield self.read(store, key)
        self.assertEqual(result[1], b"newest")
        self.assertEqual(store.freshUntil(key), 3500.0)

    @inlineCallbacks
    def test_replace(self) -> Generator[Deferred[Any], Any, None]:
        """
        A second object under a key replaces the first, metadata included,
        and counts once in C{stats}.
        """
        store = yield self.startedStore()
        key = "http://example.com/r"
        yield self.put(store, key, b"first", makeMeta(freshUntil=1000.0))
        yield self.put(store, key, b"second version", makeMeta(freshUntil=2000.0, status=203))
        result = yield self.read(store, key)
        obj, body = result
        self.assertEqual(body, b"second version")
        self.assertEqual(obj.meta.status, 203)
        self.assertEqual(store.freshUntil(key), 2000.0)
        self.assertEqual(store.stats()["objects"], 1)

    @inlineCallbacks
    def test_lastFinishWins(self) -> Generator[Deferred[Any], Any, None]:
        """
        Of two writers for one key, the one that finishes last wins,
        whichever began first.
        """
        store = yield self.startedStore()
        key = "http://example.com/race"
        first = store.begin(key, makeMeta(freshUntil=1000.0))
        second = store.begin(key, makeMeta(freshUntil=2000.0))
        first.write(b"from the first writer")
        second.write(b"from the second writer")
        yield second.finish()
        yield first.finish()
        result = yield self.read(store, key)
        self.assertEqual(result[1], b"from the first writer")
        self.assertEqual(store.freshUntil(key), 1000.0)
        self.assertEqual(store.stats()["objects"], 1)

    @inlineCallbacks
    def test_readSurvivesReplaceAndDelete(self) -> Generator[Deferred[Any], Any, None]:
        """
        An object already returned by C{get} still reads back whole with its
        old bytes after it is replaced and then deleted.
        """
        store = yield self.startedStore()
        key = "http://example.com/busy"
        old = makeBody(300_000, seed=2)
        yield self.put(store, key, old)
        obj = yield store.get(key)
        yield self.put(store, key, b"replacement")
        yield store.delete(key)
        got = yield self.readBody(obj)
        self.assertEqual(got, old)

    @inlineCallbacks
    def test_delete(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{delete} removes the object (fires C{True}); deleting again, or
        deleting a key never stored, fires C{False}.
        """
        store = yield self.startedStore()
        key = "http://example.com/d"
        yield self.put(store, key, b"doomed")
        self.assertIs((yield store.delete(key)), True)
        self.assertIsNone((yield store.get(key)))
        self.assertIsNone(store.freshUntil(key))
        self.assertIs((yield store.delete(key)), False)
        self.assertIs((yield store.delete("http://example.com/never")), False)
        self.assertEqual(store.stats()["objects"], 0)

    @inlineCallbacks
    def test_updateMeta(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{updateMeta} replaces the metadata and freshness of a stored object
        and keeps its body; for a missing key it fires C{False}.
        """
        store = yield self.startedStore()
        key = "http://example.com/u"
        body = makeBody(50_000, seed=3)
        yield self.put(store, key, body, makeMeta(freshUntil=1000.0))
        newMeta = makeMeta(
            freshUntil=9000.0, size=len(body),
            headers=[(b"Content-Type", b"text/plain"), (b"Date", b"later")],
        )
        self.assertIs((yield store.updateMeta(key, newMeta)), True)
        self.assertEqual(store.freshUntil(key), 9000.0)
        obj, got = yield self.read(store, key)
        self.assertEqual(got, body)
        self.assertEqual(list(obj.meta.headers), list(newMeta.headers))
        self.assertEqual(obj.meta.freshUntil, 9000.0)
        self.assertIs(
            (yield store.updateMeta("http://example.com/none", newMeta)), False
        )
        self.assertIsNone(store.freshUntil("http://example.com/none"))

    # -- limits ------------------------------------------------------------

    @inlineCallbacks
    def test_tooLargeOnBegin(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{begin} refuses at once an object whose announced size is larger
        than C{maxObjectSize}, and accepts one of exactly that size.
        """
        store = yield self.startedStore()
        limit = store.maxObjectSize
        self.assertRaises(
            ObjectTooLarge, store.begin, "http://example.com/big",
            makeMeta(size=limit + 1),
        )
        writer = store.begin("http://example.com/big", makeMeta(size=limit))
        writer.abort()
        self.assertIsNone((yield store.get("http://example.com/big")))

    @inlineCallbacks
    def test_tooLargeOnWrite(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{write} raises L{ObjectTooLarge} once an object of unannounced
        size grows past C{maxObjectSize}; nothing is stored, an older
        version stays, and C{finish} then fails.
        """
        store = yield self.startedStore()
        limit = store.maxObjectSize
        key = "http://example.com/growing"
        yield self.put(store, key, b"old", makeMeta(freshUntil=1234.0))
        writer = store.begin(key, makeMeta(freshUntil=4321.0))
        chunk = b"x" * (256 * KIB)
        written = 0
        with self.assertRaises(ObjectTooLarge):
            while written <= limit:
                writer.write(chunk)
                written += len(chunk)
        self.assertLessEqual(written, limit)
        finished = writer.finish()
        failed = []
        finished.addErrback(failed.append)
        yield finished
        self.assertEqual(len(failed), 1)
        writer.abort()
        result = yield self.read(store, key)
        self.assertEqual(result[1], b"old")
        self.assertEqual(store.freshUntil(key), 1234.0)

    @inlineCallbacks
    def test_exactlyMaxObjectSize(self) -> Generator[Deferred[Any], Any, None]:
        """
        A body of exactly C{maxObjectSize} bytes is accepted and read back.
        """
        store = yield self.startedStore()
        body = makeBody(store.maxObjectSize, seed=4)
        yield self.put(store, "http://example.com/limit", body, chunk=1 * MIB)
        obj, got = yield self.read(store, "http://example.com/limit")
        self.assertEqual(obj.size, len(body))
        self.assertTrue(got == body, "body differs")

    @inlineCallbacks
    def test_largeBodyFlowControl(self) -> Generator[Deferred[Any], Any, None]:
        """
        A 3 MiB body comes back byte-identical through a consumer that
        pauses its producer after every write (a slow client), with no write
        while paused.
        """
        store = yield self.startedStore()
        body = makeBody(3 * MIB, seed=5)
        yield self.put(store, "http://example.com/large", body, makeMeta(size=len(body)))
        obj = yield store.get("http://example.com/large")
        consumer = FlowControlledConsumer(self._reactor())
        yield obj.writeTo(consumer)
        self.assertEqual(consumer.violations, [])
        self.assertIsNone(consumer.producer)
        got = consumer.value()
        self.assertEqual(len(got), len(body))
        self.assertTrue(got == body, "body differs")

    @inlineCallbacks
    def test_byteRanges(self) -> Generator[Deferred[Any], Any, None]:
        """
        Byte ranges of a small and of a 3 MiB body, read as the proxy reads
        them for C{Range} requests (with C{writeRangeTo} when the object
        provides L{IRangedCachedObject}, else by slicing C{writeTo}), are
        exactly those bytes, with flow control honoured.  Ranges start and
        end on both sides of 64 KiB and 256 KiB boundaries.
        """
        store = yield self.startedStore()
        for size, seed in ((1000, 6), (3 * MIB, 7)):
            key = f"http://example.com/ranges/{size}"
            body = makeBody(size, seed=seed)
            yield self.put(store, key, body, makeMeta(size=size))
            obj = yield store.get(key)
            if IRangedCachedObject.providedBy(obj):
                self.assertTrue(verifyObject(IRangedCachedObject, obj))
            spans = [(0, 1), (size - 1, 1), (0, size), (1, size - 1), (size // 3, size // 3)]
            if size > MIB:
                spans += [
                    (64 * KIB - 1, 2), (256 * KIB - 1, 256 * KIB + 2),
                    (256 * KIB, 256 * KIB), (size - 256 * KIB - 1, 256 * KIB + 1),
                ]
            for offset, length in spans:
                consumer = FlowControlledConsumer(self._reactor())
                yield writeRange(obj, consumer, offset, length)
                self.assertEqual(consumer.violations, [])
                self.assertIsNone(consumer.producer, "producer left registered")
                got = consumer.value()
                self.assertEqual(len(got), length, (size, offset, length))
                self.assertTrue(got == body[offset : offset + length], (size, offset, length))

    @inlineCallbacks
    def test_budget(self) -> Generator[Deferred[Any], Any, None]:
        """
        Writing far more than the budget keeps the store within it: the
        C{bytes} counter and the bodies that can still be read both stay
        under C{storeMaxSize}, the object just written is always readable,
        and C{objects} counts what can be read.
        """
        store = yield self.startedStore()
        size = 300 * KIB
        count = (3 * self.storeMaxSize) // size
        keys = [f"http://example.com/budget/{i}" for i in range(count)]
        for i, key in enumerate(keys):
            yield self.put(store, key, makeBody(size, seed=i))
            self.assertLessEqual(store.stats()["bytes"], self.storeMaxSize)
            self.assertIsNotNone(store.freshUntil(key))
        present = []
        for i, key in enumerate(keys):
            result = yield self.read(store, key)
            if result is not None:
                self.assertTrue(result[1] == makeBody(size, seed=i), key)
                present.append(key)
            else:
                self.assertIsNone(store.freshUntil(key))
        self.assertIn(keys[-1], present)
        self.assertLessEqual(len(present) * size, self.storeMaxSize)
        self.assertTrue(len(present) < count)
        self.assertEqual(store.stats()["objects"], len(present))

    @inlineCallbacks
    def test_stats(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{stats} returns numbers, at least C{objects} and C{bytes}, which
        follow stores and deletes.
        """
        store = yield self.startedStore()
        before = store.stats()
        self.assertEqual(before["objects"], 0)
        self.assertEqual(before["bytes"], 0)
        yield self.put(store, "http://example.com/s1", b"a" * 1000)
        yield self.put(store, "http://example.com/s2", b"b" * 2000)
        after = store.stats()
        self.assertEqual(after["objects"], 2)
        self.assertTrue(after["bytes"] >= 3000, after)
        for name, value in after.items():
            self.assertTrue(isinstance(name, str))
            self.assertTrue(isinstance(value, (int, float)), (name, value))
        yield store.delete("http://example.com/s1")
        self.assertEqual(store.stats()["objects"], 1)
        self.assertTrue(store.stats()["bytes"] < after["bytes"])

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """
        Give a subclass that defines C{reopenStore} the persistence tests
        of L{PersistenceTests} too.
        """
        super().__init_subclass__(**kwargs)
        if getattr(cls, "reopenStore", None) is not None:
            for name, value in vars(PersistenceTests).items():
                if name.startswith("test_") and not hasattr(cls, name):
                    setattr(cls, name, value)


class PersistenceTests:
    """
    The tests L{StoreConformanceMixin} adds to a subclass that defines
    C{reopenStore}: what a persistent store must keep across a restart.
    Not meant to be used on its own.
    """

    @inlineCallbacks
    def test_persistRoundTrip(self) -> Generator[Deferred[Any], Any, None]:
        """
        Objects, their metadata and freshness survive closing and reopening
        the store; deleted, aborted and unfinished objects stay gone.
        """
        store = yield self.startedStore()
        body = makeBody(700_000, seed=6)
        meta = makeMeta(freshUntil=7777.5, size=len(body),
                        headers=[(b"Content-Type", b"a/b"), (b"Vary", b"Accept")])
        yield self.put(store, "http://example.com/p", body, meta)
        yield self.put(store, "http://example.com/gone", b"x")
        yield store.delete("http://example.com/gone")
        aborted = store.begin("http://example.com/aborted", makeMeta())
        aborted.write(b"half")
        aborted.abort()
        unfinished = store.begin("http://example.com/unfinished", makeMeta())
        unfinished.write(b"never finished")

        store = yield self.reopened(store)
        unfinished.abort()
        self.assertEqual(store.freshUntil("http://example.com/p"), 7777.5)
        obj, got = yield self.read(store, "http://example.com/p")
        self.assertTrue(got == body, "body differs")
        self.assertEqual(obj.meta, meta)
        for key in ("gone", "aborted", "unfinished"):
            self.assertIsNone((yield store.get("http://example.com/" + key)), key)
            self.assertIsNone(store.freshUntil("http://example.com/" + key), key)
        self.assertEqual(store.stats()["objects"], 1)

    @inlineCallbacks
    def test_persistReplaceAndUpdate(self) -> Generator[Deferred[Any], Any, None]:
        """
        After a reopen, a replaced object reads back as its last version and
        an updated one with its new metadata.
        """
        store = yield self.startedStore()
        yield self.put(store, "http://example.com/r", b"v1", makeMeta(freshUntil=1.0))
        yield self.put(store, "http://example.com/r", b"v2", makeMeta(freshUntil=2.0))
        yield self.put(store, "http://example.com/u", b"body", makeMeta(freshUntil=3.0))
        yield store.updateMeta("http://example.com/u", makeMeta(freshUntil=4.0, status=206))

        store = yield self.reopened(store)
        obj, got = yield self.read(store, "http://example.com/r")
        self.assertEqual((got, obj.meta.freshUntil), (b"v2", 2.0))
        obj, got = yield self.read(store, "http://example.com/u")
        self.assertEqual((got, obj.meta.freshUntil, obj.meta.status), (b"body", 4.0, 206))
        self.assertEqual(store.freshUntil("http://example.com/u"), 4.0)
        self.assertEqual(store.stats()["objects"], 2)

    @inlineCallbacks
    def test_persistBudget(self) -> Generator[Deferred[Any], Any, None]:
        """
        A reopened store still counts what it holds against its budget: it
        reports the same objects and bytes, and writing more keeps it under
        the budget.
        """
        store = yield self.startedStore()
        for i in range(10):
            yield self.put(store, f"http://example.com/pb/{i}", makeBody(100 * KIB, seed=i))
        stats = store.stats()
        store = yield self.reopened(store)
        self.assertEqual(store.stats()["objects"], stats["objects"])
        self.assertEqual(store.stats()["bytes"], stats["bytes"])
        for i in range(40):
            yield self.put(store, f"http://example.com/pb2/{i}", makeBody(300 * KIB, seed=i))
            self.assertLessEqual(store.stats()["bytes"], self.storeMaxSize)


__all__ = [
    "FlowControlledConsumer",
    "PersistenceTests",
    "StoreConformanceMixin",
    "makeBody",
    "makeMeta",
]
