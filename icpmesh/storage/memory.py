# -*- test-case-name: tests.test_storage_memory -*-
"""
The C{memory} store: complete objects in RAM under a byte budget.

Config line::

    store memory max-size=256MB max-object-size=8MB

Eviction is a I{segmented LRU} (SLRU): a new object enters a I{probation}
segment; a read of an object on probation promotes it to a I{protected}
segment that may hold up to L{PROTECTED_FRACTION} of the budget; when the
protected segment overflows, its least recently used objects drop back to
the most recently used end of probation.  Eviction takes the least recently
used object on probation first, and only takes from the protected segment
when probation is empty.  Every operation is O(1).

Why not plain LRU: a forward proxy sees bursts of one-off fetches (a crawler,
a software update, a user paging through a photo gallery).  Under plain LRU
each such burst flushes the whole cache, including the objects that every
client and every neighbour keeps asking for.  Under SLRU a one-off object
never leaves probation, so a burst only recycles probation and the objects
that were read at least twice survive it.  GDSF or LFU-DA (Squid's heap
policies) do slightly better on byte hit ratio but need a heap update on
every hit; the hit path here stays two dict operations.

An ICP query is not a use of an object: L{MemoryStore.freshUntil} is the
C{get} method of a plain C{key -> freshUntil} dict that the LRU order never
sees, so neighbours' queries cannot keep alive objects nobody fetches.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from icpmesh.interfaces import (
    ICachedObject,
    IObjectStore,
    IObjectStorePlugin,
    IObjectWriter,
    IRangedCachedObject,
    ObjectTooLarge,
    StoredResponse,
)
from icpmesh.storage import IncompleteObject, checkSizes, entryCost, sizeMismatch

DEFAULT_MAX_SIZE = 256 * 1024**2
DEFAULT_MAX_OBJECT_SIZE = 8 * 1024**2

#: Share of the byte budget the protected segment (objects read at least
#: once since they were stored) may hold.
PROTECTED_FRACTION = 0.8


@implementer(IRangedCachedObject)
class MemoryObject:
    """
    One complete object as the memory store holds it.  Immutable once
    built: a reader that got it keeps its bytes even if the object is
    replaced, updated or evicted meanwhile.

    @ivar meta: its L{StoredResponse}.
    @ivar body: its body.
    @ivar cost: what it is charged against the budget (L{entryCost}).
    @ivar protected: C{True} while it is in the protected segment.
    """

    __slots__ = ("meta", "body", "cost", "protected")

    def __init__(self, meta: StoredResponse, body: bytes, cost: int) -> None:
        self.meta = meta
        self.body = body
        self.cost = cost
        self.protected = False

    @property
    def size(self) -> int:
        """
        The body length in bytes.
        """
        return len(self.body)

    def writeTo(self, consumer: Any) -> Deferred[None]:
        """
        Write the body to C{consumer} in one C{write}: the bytes are already
        in memory, so the consumer's transport buffers them and its own
        flow control applies from there.

        @return: a Deferred that has already fired.
        """
        if self.body:
            consumer.write(self.body)
        return succeed(None)

    def writeRangeTo(self, consumer: Any, offset: int, length: int) -> Deferred[None]:
        """
        Write bytes C{[offset, offset + length)} of the body to C{consumer}
        in one C{write}.

        @return: a Deferred that has already fired.
        """
        if length > 0:
            consumer.write(self.body[offset : offset + length])
        return succeed(None)


@implementer(IObjectWriter)
class MemoryWriter:
    """
    Collects one object's body.  Nothing is visible before L{finish}.
    """

    __slots__ = ("_store", "_key", "_meta", "_chunks", "_size", "_state")

    def __init__(self, store: MemoryStore, key: str, meta: StoredResponse) -> None:
        self._store = store
        self._key = key
        self._meta = meta
        self._chunks: list[bytes] = []
        self._size = 0
        # "open", "finished", "aborted" or "tooLarge"
        self._state = "open"

    def write(self, data: bytes) -> None:
        """
        Append body bytes.  Writes after L{abort} are ignored.

        @raise ObjectTooLarge: the body grew past the store's maximum object
            size (then, and on any later write); what was written is dropped.
        @raise RuntimeError: after L{finish}.
        """
        state = self._state
        if state != "open":
            if state == "tooLarge":
                raise ObjectTooLarge(self._key)
            if state == "finished":
                raise RuntimeError("write() after finish()")
            return
        self._size += len(data)
        if self._size > self._store.maxObjectSize:
            self._state = "tooLarge"
            self._chunks = []
            self._store._tooLarge += 1
            raise ObjectTooLarge(
                f"{self._key}: more than {self._store.maxObjectSize} bytes"
            )
        self._chunks.append(data)

    def finish(self) -> Deferred[None]:
        """
        Commit the object; it replaces any older one under its key.

        @return: a Deferred that has already fired, or failed with
            L{ObjectTooLarge} (body or whole entry too large),
            L{IncompleteObject} (body length differs from C{meta.size}) or
            C{RuntimeError} (writer aborted or finished before).
        """
        state = self._state
        if state != "open":
            if state == "tooLarge":
                return fail(ObjectTooLarge(self._key))
            return fail(RuntimeError(f"finish() on a writer that is {state}"))
        self._state = "finished"
        chunks, self._chunks = self._chunks, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        problem = sizeMismatch(self._meta, len(body))
        if problem is not None:
            return fail(IncompleteObject(f"{self._key}: {problem}"))
        try:
            self._store._commit(self._key, self._meta, body)
        except ObjectTooLarge as e:
            return fail(e)
        return succeed(None)

    def abort(self) -> None:
        """
        Drop what was written.  Harmless more than once, after a failure, or
        after L{finish} (the committed object stays).
        """
        if self._state == "open":
            self._state = "aborted"
        self._chunks = []


@implementer(IObjectStore)
class MemoryStore:
    """
    Objects in memory within a byte budget, evicted by segmented LRU.

    @ivar maxSize: the byte budget: bodies plus a fair estimate of key,
        header and index overhead per object (L{icpmesh.storage.entryCost}).
    @ivar maxObjectSize: the largest body accepted (never more than
        C{maxSize}).
    @ivar loading: always C{False}: there is nothing to load.
    @ivar size: bytes charged against the budget now.
    """

    loading = False

    def __init__(
        self,
        reactor: Any = None,
        maxSize: int = DEFAULT_MAX_SIZE,
        maxObjectSize: int = DEFAULT_MAX_OBJECT_SIZE,
    ) -> None:
        """
        @param reactor: unused today (the store does no I/O and reads no
            time); accepted so every store is built the same way.
        @param maxSize: the byte budget.
        @param maxObjectSize: the largest body accepted.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        if maxSize <= 0 or maxObjectSize <= 0:
            raise ValueError("maxSize and maxObjectSize must be positive")
        self.maxSize = maxSize
        self.maxObjectSize = min(maxObjectSize, maxSize)
        self._protectedMax = int(maxSize * PROTECTED_FRACTION)
        self.size = 0
        self._protectedSize = 0
        # Least recently used first.
        self._probation: OrderedDict[str, MemoryObject] = OrderedDict()
        self._protected: OrderedDict[str, MemoryObject] = OrderedDict()
        self._fresh: dict[str, float] = {}
        # The ICP hot path: a bound dict method, no Python frame at all.
        self.freshUntil = self._fresh.get  # type: ignore[method-assign]
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._stores = 0
        self._tooLarge = 0

    def freshUntil(self, key: str) -> Optional[float]:
        """
        The C{freshUntil} of the complete object under C{key}, or C{None}.

        Replaced in every instance by the C{get} of the freshness dict, so a
        lookup is one C dict access; it never changes the eviction order.
        """
        return self._fresh.get(key)  # pragma: no cover

    def get(self, key: str) -> Deferred[Optional[ICachedObject]]:
        """
        Look up a complete object; a hit is a use of it (it is promoted to,
        or moved to the recent end of, the protected segment).

        @return: a Deferred that has already fired with a L{MemoryObject} or
            C{None}.
        """
        entry = self._protected.get(key)
        if entry is not None:
            self._protected.move_to_end(key)
        else:
            entry = self._probation.pop(key, None)
            if entry is None:
                self._misses += 1
                return succeed(None)
            self._protect(key, entry)
        self._hits += 1
        return succeed(entry)

    def _protect(self, key: str, entry: MemoryObject) -> None:
        """
        Move an entry just taken off probation into the protected segment,
        demoting the protected segment's oldest entries if it overflows.
        """
        entry.protected = True
        self._protected[key] = entry
        self._protectedSize += entry.cost
        protected = self._protected
        while self._protectedSize > self._protectedMax and len(protected) > 1:
            oldKey, old = protected.popitem(last=False)
            old.protected = False
            self._protectedSize -= old.cost
            self._probation[oldKey] = old

    def begin(self, key: str, meta: StoredResponse) -> IObjectWriter:
        """
        Start writing an object.

        @raise ObjectTooLarge: C{meta.size} is known and larger than
            L{maxObjectSize}.
        """
        if meta.size is not None and meta.size > self.maxObjectSize:
            self._tooLarge += 1
            raise ObjectTooLarge(f"{key}: {meta.size} bytes")
        return MemoryWriter(self, key, meta)

    def _commit(self, key: str, meta: StoredResponse, body: bytes) -> None:
        """
        Make a finished object visible, replacing any older one, and evict
        until the budget holds.

        @raise ObjectTooLarge: the entry alone costs more than the budget.
        """
        cost = entryCost(key, meta, len(body))
        if cost > self.maxSize:
            self._tooLarge += 1
            raise ObjectTooLarge(f"{key}: {cost} bytes with its metadata")
        entry = MemoryObject(meta, body, cost)
        old = self._remove(key)
        self._stores += 1
        if old is not None and old.protected:
            # A new version of a popular object stays popular.
            entry.protected = True
            self._protected[key] = entry
            self._protectedSize += cost
        else:
            self._probation[key] = entry
        self._fresh[key] = meta.freshUntil
        self.size += cost
        self._evict(key)

    def _remove(self, key: str) -> Optional[MemoryObject]:
        """
        Take an entry out of the index and the budget.
        """
        entry = self._probation.pop(key, None)
        if entry is None:
            entry = self._protected.pop(key, None)
            if entry is None:
                return None
            self._protectedSize -= entry.cost
        del self._fresh[key]
        self.size -= entry.cost
        return entry

    def _evict(self, keep: str) -> None:
        """
        Evict least recently used entries, probation first, until the budget
        holds; never the entry under C{keep} (just stored or updated).
        """
        probation = self._probation
        protected = self._protected
        fresh = self._fresh
        while self.size > self.maxSize:
            if probation and (len(probation) > 1 or keep not in probation):
                key, entry = probation.popitem(last=False)
                if key == keep:
                    probation[key] = entry
                    continue
            elif protected and (len(protected) > 1 or keep not in protected):
                key, entry = protected.popitem(last=False)
                if key == keep:
                    protected[key] = entry
                    continue
                self._protectedSize -= entry.cost
            else:  # pragma: no cover - only C{keep} is left and it fits
                break
            del fresh[key]
            self.size -= entry.cost
            self._evictions += 1

    def updateMeta(self, key: str, meta: StoredResponse) -> Deferred[bool]:
        """
        Replace the metadata of a stored object, keeping its body and its
        place in the eviction order (a revalidation follows a C{get}, which
        already counted as the use).

        @return: a fired Deferred: C{False} when nothing is stored under
            C{key}.
        """
        segment = self._protected
        old = segment.get(key)
        if old is None:
            segment = self._probation
            old = segment.get(key)
            if old is None:
                return succeed(False)
        cost = entryCost(key, meta, len(old.body))
        entry = MemoryObject(meta, old.body, cost)
        entry.protected = old.protected
        segment[key] = entry  # same position: assignment keeps the order
        if entry.protected:
            self._protectedSize += cost - old.cost
        self.size += cost - old.cost
        self._fresh[key] = meta.freshUntil
        if cost > self.maxSize:
            self._remove(key)
        else:
            self._evict(key)
        return succeed(True)

    def delete(self, key: str) -> Deferred[bool]:
        """
        Remove an object.

        @return: a fired Deferred: C{True} when something was removed.
        """
        return succeed(self._remove(key) is not None)

    def stats(self) -> dict[str, Union[int, float]]:
        """
        Counters: C{objects}, C{bytes} (charged against the budget),
        C{bodyBytes}, C{maxSize}, C{maxObjectSize}, C{protectedObjects},
        C{protectedBytes}, C{hits}, C{misses}, C{stores}, C{evictions},
        C{tooLarge}.
        """
        bodyBytes = 0
        for segment in (self._probation, self._protected):
            for entry in segment.values():
                bodyBytes += len(entry.body)
        return {
            "objects": len(self._fresh),
            "bytes": self.size,
            "bodyBytes": bodyBytes,
            "maxSize": self.maxSize,
            "maxObjectSize": self.maxObjectSize,
            "protectedObjects": len(self._protected),
            "protectedBytes": self._protectedSize,
            "hits": self._hits,
            "misses": self._misses,
            "stores": self._stores,
            "evictions": self._evictions,
            "tooLarge": self._tooLarge,
        }

    def keys(self) -> list[str]:
        """
        The stored keys in eviction order, next victim first (probation
        oldest to newest, then protected oldest to newest).  For tests and
        diagnostics.
        """
        return list(self._probation) + list(self._protected)


@implementer(IObjectStorePlugin)
class MemoryStorePlugin:
    """
    Builds a L{MemoryStore} from C{store memory [max-size=256MB]
    [max-object-size=8MB]}.
    """

    name = "memory"
    description = "objects in RAM, segmented-LRU eviction (the default)"
    directives = ()

    def storeFromConfig(self, section: Any, reactor: Any) -> MemoryStore:
        """
        Build the store.

        @raise icpmesh.config.ConfigError: for an unknown option or a bad
            size, naming file and line.
        """
        section.checkOptions({"max-size", "max-object-size"})
        maxSize, maxObjectSize = checkSizes(
            section, DEFAULT_MAX_SIZE, DEFAULT_MAX_OBJECT_SIZE
        )
        return MemoryStore(reactor, maxSize=maxSize, maxObjectSize=maxObjectSize)


#: The plugin object the drop-in exports.
memoryStorePlugin = MemoryStorePlugin()

__all__ = [
    "DEFAULT_MAX_OBJECT_SIZE",
    "DEFAULT_MAX_SIZE",
    "MemoryObject",
    "MemoryStore",
    "MemoryStorePlugin",
    "MemoryWriter",
    "memoryStorePlugin",
]
