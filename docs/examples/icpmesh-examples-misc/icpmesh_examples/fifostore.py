# -*- test-case-name: test_examples -*-
"""
An example icpmesh store plugin: objects in a Python dict, the oldest stored
evicted first when the byte budget is used up.

Chosen in the node's config file with::

    store fifo [max-size=SIZE] [max-object-size=SIZE]

It keeps whole bodies in memory and does no I/O, so every method answers at
once.  It is here to show the shape of a store plugin; the built-in
C{memory} store (LRU) is the one to run.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from icpmesh.interfaces import (
    ICachedObject,
    IObjectStore,
    IObjectStorePlugin,
    IObjectWriter,
    ObjectTooLarge,
    StoredResponse,
)


@implementer(ICachedObject)
class FIFOObject:
    """
    One stored object: its metadata and its whole body.
    """

    def __init__(self, meta: StoredResponse, body: bytes) -> None:
        self.meta = meta
        self.body = body
        self.size = len(body)

    def writeTo(self, consumer: Any) -> Deferred[None]:
        """
        Write the body in one piece: it is already in memory, and the
        consumer's transport buffers it.
        """
        if self.body:
            consumer.write(self.body)
        return succeed(None)


@implementer(IObjectWriter)
class FIFOWriter:
    """
    Collects a body; stores it only when L{finish} is called.
    """

    def __init__(self, store: "FIFOStore", key: str, meta: StoredResponse) -> None:
        self._store = store
        self._key = key
        self._meta = meta
        self._chunks: list[bytes] = []
        self._size = 0
        self._state = "open"

    def write(self, data: bytes) -> None:
        if self._state != "open":
            return
        self._size += len(data)
        if self._size > self._store.maxObjectSize:
            self._state = "tooLarge"
            self._chunks = []
            raise ObjectTooLarge(self._key)
        self._chunks.append(data)

    def finish(self) -> Deferred[None]:
        if self._state != "open":
            return fail(ObjectTooLarge(self._key) if self._state == "tooLarge"
                        else RuntimeError(f"writer is {self._state}"))
        self._state = "finished"
        body = b"".join(self._chunks)
        self._chunks = []
        self._store._commit(self._key, FIFOObject(self._meta, body))
        return succeed(None)

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            self._chunks = []


@implementer(IObjectStore)
class FIFOStore:
    """
    A dict of objects in the order they were stored.

    @ivar maxSize: the byte budget for bodies.
    @ivar maxObjectSize: the largest body accepted.
    """

    loading = False

    def __init__(self, maxSize: int, maxObjectSize: int) -> None:
        self.maxSize = maxSize
        self.maxObjectSize = min(maxObjectSize, maxSize)
        self._objects: dict[str, FIFOObject] = {}
        self._bytes = 0

    def _commit(self, key: str, obj: FIFOObject) -> None:
        old = self._objects.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._objects[key] = obj
        self._bytes += obj.size
        # Dicts keep insertion order: the first key is the oldest.
        while self._bytes > self.maxSize:
            oldest = next(iter(self._objects))
            self._bytes -= self._objects.pop(oldest).size

    def freshUntil(self, key: str) -> Optional[float]:
        obj = self._objects.get(key)
        return None if obj is None else obj.meta.freshUntil

    def get(self, key: str) -> Deferred[Optional[FIFOObject]]:
        return succeed(self._objects.get(key))

    def begin(self, key: str, meta: StoredResponse) -> FIFOWriter:
        if meta.size is not None and meta.size > self.maxObjectSize:
            raise ObjectTooLarge(key)
        return FIFOWriter(self, key, meta)

    def updateMeta(self, key: str, meta: StoredResponse) -> Deferred[bool]:
        obj = self._objects.get(key)
        if obj is None:
            return succeed(False)
        # A new object in the same place: one already handed out by get()
        # keeps the metadata it was read with.
        self._objects[key] = FIFOObject(meta, obj.body)
        return succeed(True)

    def delete(self, key: str) -> Deferred[bool]:
        obj = self._objects.pop(key, None)
        if obj is None:
            return succeed(False)
        self._bytes -= obj.size
        return succeed(True)

    def stats(self) -> dict[str, Union[int, float]]:
        return {"objects": len(self._objects), "bytes": self._bytes}


@implementer(IObjectStorePlugin)
class FIFOStorePlugin:
    """
    The plugin object, chosen with C{store fifo}.
    """

    name = "fifo"
    description = "example: objects in memory, oldest stored evicted first"
    directives = ()

    def storeFromConfig(self, section: Any, reactor: Any) -> FIFOStore:
        section.checkOptions({"max-size", "max-object-size"})
        return FIFOStore(
            maxSize=section.getSize("max-size", 64 * 1024 * 1024),
            maxObjectSize=section.getSize("max-object-size", 4 * 1024 * 1024),
        )


fifoStore = FIFOStorePlugin()
