# -*- test-case-name: tests.test_storage_disk -*-
"""
The C{disk} store: objects in a directory, under a byte budget, that
survive restarts and C{kill -9}; and the C{tiered} store, a memory store in
front of a disk store.

Config lines::

    store disk dir=/var/cache/icpmesh max-size=10GB max-object-size=64MB
    store tiered dir=/var/cache/icpmesh max-size=10GB memory-size=256MB

Layout of the directory::

    DIR/lock                 flock()ed while a store uses the directory
    DIR/tmp/                 objects being written; emptied at every start
    DIR/objects/ab/ab12...   one file per object, named by SHA-256 of its key

Crash safety.  An object is written to a new file in C{tmp/}, C{fsync}ed
(unless C{fsync=off}), then renamed into C{objects/}.  The rename is atomic,
so a file under C{objects/} is always complete: a process killed at any
moment leaves either the old object, or the new one, plus perhaps a temp
file that the next start deletes.  Each file carries its own checks:

    "ICPMESH1" | meta length (4) | CRC-32 of meta (4) | meta (JSON) |
    body | body length (8) | CRC-32 of body (4) | "ICPMEND1"

At start the index is rebuilt by scanning C{objects/} in a thread; a file
whose header checksum, key, name or length does not match is deleted and
never indexed, so never answered as an ICP HIT.  The body checksum is
checked as the body is read: a body damaged on disk makes
L{ICachedObject.writeTo} fail (and the object is dropped), so the proxy
never finishes such a response as if it were complete.

No blocking file I/O happens on the reactor thread: every read, write,
rename, unlink and the scan run in the store's own thread pool, started and
stopped with the store (it provides C{IService}).  The only synchronous
file operations are the C{mkdir} and C{flock} done once in
L{DiskStore.startService}, before the node serves anything.  While the scan
runs, L{DiskStore.loading} is C{True} and L{DiskStore.freshUntil} answers
C{None} for what is not indexed yet, so the ICP responder answers
MISS_NOFETCH for it (RFC 2187 section 5.2.4), as Squid does while it
rebuilds.

The in-memory index holds, per object, its file size and inode (one int)
in an LRU-ordered dict, and its C{freshUntil} in a plain dict read by the
ICP responder.  After a restart, recency is approximated by the files'
modification times (the time each object was stored).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import os
import struct
import uuid
import zlib
from collections import OrderedDict
from typing import Any, Callable, Generator, Iterator, Optional, TypeVar, Union

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from icpmesh.interfaces import (
    ICachedObject,
    IRangedCachedObject,
    IObjectStore,
    IObjectStorePlugin,
    IObjectWriter,
    ObjectTooLarge,
    StoredResponse,
)
from icpmesh.storage import IncompleteObject, checkSizes, sizeMismatch

_T = TypeVar("_T")

log = Logger()

DEFAULT_MAX_SIZE = 1024**3
DEFAULT_MAX_OBJECT_SIZE = 64 * 1024**2
DEFAULT_THREADS = 4

MAGIC = b"ICPMESH1"
END_MAGIC = b"ICPMEND1"
_PREFIX = struct.Struct(">8sII")  # magic, meta length, meta CRC-32
_TRAILER = struct.Struct(">QI8s")  # body length, body CRC-32, end magic
_FIXED = struct.Struct(">dI")  # freshUntil, key length
PREFIX_SIZE = _PREFIX.size
TRAILER_SIZE = _TRAILER.size
#: Metadata larger than this is taken for corruption.
MAX_META_SIZE = 1024**2

#: Bodies up to this size are read whole (and checked) by C{get}, in the
#: same thread job that opens the file: one thread hop per small hit.
SMALL_OBJECT = 64 * 1024
#: Bytes a writer buffers before handing them to a thread.
WRITE_CHUNK = 256 * 1024
#: Bytes a reader reads per thread job.
READ_CHUNK = 256 * 1024
#: Most threads that scan the directory at start (they overlap disk
#: latency; parsing is bound by the GIL).
SCAN_THREADS = 4
#: Index entries applied per reactor turn when ordering the rebuilt index.
ORDER_BATCH = 20_000

_SIZE_BITS = 42  # an index value is inode << 42 | file size (< 4 TiB)
_SIZE_MASK = (1 << _SIZE_BITS) - 1


class CorruptObject(Exception):
    """
    A stored object failed its checks (checksum, length or key); it is
    never served and is removed from the store.
    """


class ReadStopped(Exception):
    """
    The consumer stopped the producer before the whole body was written.
    """


class StoreNotRunning(Exception):
    """
    The disk store was asked to do file I/O while it is not running.
    """


class DirectoryInUse(Exception):
    """
    Another store (in this or another process) is using the directory.
    """


# ---------------------------------------------------------------------------
# The file format (pure functions, run in threads)


def keyName(key: str) -> str:
    """
    The file name of the object stored under C{key}: the hex SHA-256 of its
    UTF-8 encoding.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def encodeMeta(key: str, meta: StoredResponse) -> bytes:
    """
    The file prefix and metadata block for an object.

    The block starts with what the index rebuild needs, in fixed binary
    form (C{freshUntil} as a double, the key's length and UTF-8 bytes), so a
    scan parses no JSON; the rest of the L{StoredResponse} follows as JSON
    (bytes as Latin-1 text).  The prefix holds the block's length and
    CRC-32.
    """
    keyBytes = key.encode("utf-8", "surrogatepass")
    rest = json.dumps(
        {
            "s": meta.status,
            "r": meta.reason.decode("latin-1"),
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in meta.headers],
            "q": meta.requestTime,
            "p": meta.responseTime,
            "z": meta.size,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    blob = _FIXED.pack(meta.freshUntil, len(keyBytes)) + keyBytes + rest
    return _PREFIX.pack(MAGIC, len(blob), zlib.crc32(blob)) + blob


def decodeMeta(
    blob: bytes, full: bool = True
) -> tuple[str, float, Optional[StoredResponse]]:
    """
    Parse a metadata block (whose checksum was already checked).

    @param full: also decode the whole L{StoredResponse}; without it only
        the key and C{freshUntil} are read (what the index needs).
    @return: C{(key, freshUntil, meta)}; C{meta} is C{None} unless C{full}.
    @raise CorruptObject: it is not what L{encodeMeta} writes.
    """
    try:
        freshUntil, keyLength = _FIXED.unpack_from(blob, 0)
        keyEnd = _FIXED.size + keyLength
        if keyEnd > len(blob):
            raise ValueError("key runs past the metadata")
        key = blob[_FIXED.size : keyEnd].decode("utf-8", "surrogatepass")
        if not full:
            return key, freshUntil, None
        d = json.loads(blob[keyEnd:].decode("utf-8"))
        meta = StoredResponse(
            status=int(d["s"]),
            reason=d["r"].encode("latin-1"),
            headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in d["h"]),
            requestTime=float(d["q"]),
            responseTime=float(d["p"]),
            freshUntil=freshUntil,
            size=None if d["z"] is None else int(d["z"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError,
            struct.error) as e:
        raise CorruptObject(f"bad metadata: {e}") from None
    return key, freshUntil, meta


def encodeTrailer(bodyLength: int, bodyCRC: int) -> bytes:
    """
    The trailer that ends every object file.
    """
    return _TRAILER.pack(bodyLength, bodyCRC, END_MAGIC)


class ObjectFile:
    """
    What the checks of an object file found.  Built in a thread by
    L{readObjectFile}.

    @ivar key: the key stored in the file.
    @ivar freshUntil: its C{freshUntil}.
    @ivar meta: the metadata (C{None} when only the index fields were read).
    @ivar bodyOffset: where the body starts.
    @ivar bodyLength: the body length.
    @ivar bodyCRC: the CRC-32 the body must have.
    @ivar fileSize: the file's length.
    @ivar inode: the file's inode number.
    @ivar mtime: its modification time.
    @ivar body: the whole body, already checked, when it was read.
    """

    __slots__ = ("key", "freshUntil", "meta", "bodyOffset", "bodyLength", "bodyCRC",
                 "fileSize", "inode", "mtime", "body")

    def __init__(self, key: str, freshUntil: float, meta: Any, bodyOffset: int,
                 bodyLength: int, bodyCRC: int, fileSize: int, inode: int,
                 mtime: float, body: Optional[bytes]) -> None:
        self.key = key
        self.freshUntil = freshUntil
        self.meta = meta
        self.bodyOffset = bodyOffset
        self.bodyLength = bodyLength
        self.bodyCRC = bodyCRC
        self.fileSize = fileSize
        self.inode = inode
        self.mtime = mtime
        self.body = body


def readObjectFile(fd: int, readBodyUpTo: int = 0, full: bool = True) -> ObjectFile:
    """
    Check an open object file's header, metadata and trailer (and, when
    the body is at most C{readBodyUpTo} bytes, read and check the body too).
    With C{full} false only the fields the index needs are decoded.

    @raise CorruptObject: the file is not a complete object.
    @raise OSError: it could not be read.
    """
    st = os.fstat(fd)
    fileSize = st.st_size
    if fileSize < PREFIX_SIZE + TRAILER_SIZE:
        raise CorruptObject(f"file too short ({fileSize} bytes)")
    wanted = PREFIX_SIZE + 4096
    if fileSize <= PREFIX_SIZE + readBodyUpTo + 4096 + TRAILER_SIZE:
        wanted = fileSize
    head = os.pread(fd, wanted, 0)
    if len(head) < PREFIX_SIZE:
        raise CorruptObject("file shrank while reading")
    magic, metaLength, metaCRC = _PREFIX.unpack_from(head, 0)
    if magic != MAGIC:
        raise CorruptObject("bad magic")
    if metaLength > MAX_META_SIZE:
        raise CorruptObject("metadata length out of range")
    bodyOffset = PREFIX_SIZE + metaLength
    if bodyOffset + TRAILER_SIZE > fileSize:
        raise CorruptObject("file shorter than its metadata")
    if len(head) < bodyOffset:
        head = os.pread(fd, bodyOffset, 0)
    blob = head[PREFIX_SIZE:bodyOffset]
    if len(blob) != metaLength or zlib.crc32(blob) != metaCRC:
        raise CorruptObject("metadata checksum mismatch")
    key, freshUntil, meta = decodeMeta(blob, full)
    if len(head) == fileSize:
        trailer = head[fileSize - TRAILER_SIZE :]
    else:
        trailer = os.pread(fd, TRAILER_SIZE, fileSize - TRAILER_SIZE)
    if len(trailer) != TRAILER_SIZE:
        raise CorruptObject("short trailer")
    bodyLength, bodyCRC, endMagic = _TRAILER.unpack(trailer)
    if endMagic != END_MAGIC:
        raise CorruptObject("bad trailer")
    if bodyOffset + bodyLength + TRAILER_SIZE != fileSize:
        raise CorruptObject("file length does not match its trailer")
    body = None
    if bodyLength <= readBodyUpTo:
        if len(head) == fileSize:
            body = head[bodyOffset : bodyOffset + bodyLength]
        else:
            body = os.pread(fd, bodyLength, bodyOffset)
        if len(body) != bodyLength or zlib.crc32(body) != bodyCRC:
            raise CorruptObject("body checksum mismatch")
    return ObjectFile(key, freshUntil, meta, bodyOffset, bodyLength, bodyCRC, fileSize,
                      st.st_ino, st.st_mtime, body)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Reading


@implementer(IRangedCachedObject)
class DiskObject:
    """
    A complete object read from a L{DiskStore}.  Holds its file open, so it
    reads back whole even if the object is replaced, deleted or evicted
    meanwhile.  The file is closed when the object is garbage-collected or
    L{close}d.

    @ivar meta: the L{StoredResponse}.
    @ivar size: the body length.
    """

    def __init__(self, store: DiskStore, key: str, info: ObjectFile,
                 fd: Optional[int]) -> None:
        self._store = store
        self._key = key
        self._info = info
        self._fd = fd
        self.meta = info.meta
        self.size = info.bodyLength

    def writeTo(self, consumer: Any) -> Deferred[None]:
        """
        Write the body to C{consumer}: small bodies (already read and
        checked) in one C{write}, larger ones streamed from the file in
        chunks by a push producer that honours C{pauseProducing}.  The
        Deferred fails with L{CorruptObject} if the body on disk does not
        match its checksum (the object is then removed), or with
        L{ReadStopped} if the consumer stopped the producer.
        """
        body = self._info.body
        if body is not None:
            if body:
                consumer.write(body)
            return succeed(None)
        if self._fd is None:
            return fail(ValueError("object closed"))
        return _BodyProducer(self._store, self, consumer).start()

    def writeRangeTo(self, consumer: Any, offset: int, length: int) -> Deferred[None]:
        """
        Write bytes C{[offset, offset + length)} of the body to C{consumer}:
        from memory for small bodies (already read and checked), else
        streamed from the file like L{writeTo}, reading only those bytes.

        A range of a large body that is not the whole body is not checked
        against the body's CRC-32: that would mean reading all of it.  The
        file's framing (magic, metadata checksum, trailer, length) was
        checked when it was opened, and a file that turns out shorter
        still fails the read with L{CorruptObject}.
        """
        body = self._info.body
        if body is not None:
            if length > 0:
                consumer.write(body[offset : offset + length])
            return succeed(None)
        if length <= 0:
            return succeed(None)
        if self._fd is None:
            return fail(ValueError("object closed"))
        return _BodyProducer(self._store, self, consumer, offset, length).start()

    def close(self) -> None:
        """
        Close the file now.  Later L{writeTo} calls fail for large bodies.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        fd = self._fd
        if fd is not None:
            self._fd = None
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass


def _readChunk(fd: int, length: int, offset: int, crc: int) -> tuple[bytes, int]:
    data = os.pread(fd, length, offset)
    return data, zlib.crc32(data, crc)


@implementer(IPushProducer)
class _BodyProducer:
    """
    Streams one object's body from disk to a consumer: an
    C{IPushProducer}, one read in a thread at a time, no read while
    paused.
    """

    def __init__(self, store: DiskStore, obj: DiskObject, consumer: Any,
                 offset: int = 0, length: Optional[int] = None) -> None:
        self._store = store
        self._obj = obj
        self._consumer = consumer
        info = obj._info
        if length is None:
            length = info.bodyLength - offset
        self._offset = info.bodyOffset + offset
        self._end = self._offset + length
        # The CRC can be checked only when the whole body is read.
        self._checked = offset == 0 and length == info.bodyLength
        self._crc = 0
        self._paused = False
        self._reading = False
        self._done = False
        self._deferred: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._consumer.registerProducer(self, True)
        self._readNext()
        return self._deferred

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._readNext()

    def stopProducing(self) -> None:
        self._finish(ReadStopped("consumer stopped reading"))

    def _readNext(self) -> None:
        if self._paused or self._reading or self._done:
            return
        fd = self._obj._fd
        if fd is None:
            self._finish(ValueError("object closed"))
            return
        self._reading = True
        length = min(READ_CHUNK, self._end - self._offset)
        d = self._store._inThread(_readChunk, fd, length, self._offset, self._crc)
        d.addCallbacks(self._gotChunk, self._failed)

    def _gotChunk(self, result: tuple[bytes, int]) -> None:
        self._reading = False
        if self._done:
            return
        data, crc = result
        if not data:
            self._corrupt("file truncated while reading")
            return
        self._offset += len(data)
        self._crc = crc
        if self._offset >= self._end:
            if self._checked and crc != self._obj._info.bodyCRC:
                self._corrupt("body checksum mismatch")
                return
            self._consumer.write(data)
            self._finish(None)
            return
        self._consumer.write(data)
        self._readNext()

    def _failed(self, failure: Any) -> None:
        self._reading = False
        self._finish(failure.value)

    def _corrupt(self, reason: str) -> None:
        self._store._dropCorrupt(self._obj._key, self._obj._info.inode, reason)
        self._finish(CorruptObject(f"{self._obj._key}: {reason}"))

    def _finish(self, error: Optional[BaseException]) -> None:
        if self._done:
            return
        self._done = True
        self._consumer.unregisterProducer()
        if error is None:
            self._deferred.callback(None)
        else:
            self._deferred.errback(error)


# ---------------------------------------------------------------------------
# Writing


def _openTemp(tmpDir: str, prefix: bytes) -> tuple[int, str]:
    path = os.path.join(tmpDir, uuid.uuid4().hex + ".tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _writeAll(fd, prefix)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def _appendChunk(fd: int, data: bytes, crc: int) -> int:
    _writeAll(fd, data)
    return zlib.crc32(data, crc)


def _commitFile(fd: int, tmpPath: str, data: bytes, crc: int, length: int,
                finalPath: str, fsync: bool) -> tuple[int, int]:
    """
    Write the last bytes and the trailer, sync, close and rename into
    place.  Returns C{(fileSize, inode)}.
    """
    try:
        crc = zlib.crc32(data, crc)
        _writeAll(fd, data + encodeTrailer(length, crc))
        if fsync:
            os.fsync(fd)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmpPath, finalPath)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(finalPath), exist_ok=True)
        os.rename(tmpPath, finalPath)
    return st.st_size, st.st_ino


def _discardTemp(fd: Optional[int], path: Optional[str]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _createFile(tmpDir: str, prefix: bytes, data: bytes, finalPath: str,
                fsync: bool) -> tuple[int, int]:
    """
    Write a whole small object to a temp file, sync it and rename it into
    place, in one thread job.  Returns C{(fileSize, inode)}.
    """
    fd, path = _openTemp(tmpDir, prefix)
    try:
        return _commitFile(fd, path, data, 0, len(data), finalPath, fsync)
    except BaseException:
        _discardTemp(None, path)
        raise


@implementer(IObjectWriter)
class DiskWriter:
    """
    Writes one object: the body is buffered and handed to a thread in
    L{WRITE_CHUNK} pieces that are appended, in order, to a temp file; at
    L{finish} the file gets its trailer, is synced and renamed into place.
    Nothing is visible before then.  A body smaller than L{WRITE_CHUNK} is
    written by a single thread job at L{finish}.
    """

    def __init__(self, store: DiskStore, key: str, meta: StoredResponse) -> None:
        self._store = store
        self._key = key
        self._meta = meta
        self._prefix = encodeMeta(key, meta)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._size = 0
        # "open", "finishing", "finished", "aborted" or "tooLarge"
        self._state = "open"
        # The temp file, once a thread has opened it.  Only the thread job
        # chain below uses it; whoever closes the fd clears it first.
        self._fd: Optional[int] = None
        self._path: Optional[str] = None
        self._opening = False
        # Thread jobs of this writer run one after the other; the chain's
        # result is the CRC-32 of what was written so far.
        self._chain: Deferred[int] = succeed(0)
        store._writers += 1

    def _closed(self, state: str) -> None:
        """
        Leave the C{open} state.
        """
        if self._state == "open":
            self._store._writers -= 1
        self._state = state

    def write(self, data: bytes) -> None:
        """
        Append body bytes; they reach the disk in a thread, in order.
        Writes after L{abort} are ignored.

        @raise ObjectTooLarge: the body grew past the store's maximum object
            size (then and on later writes); the temp file is removed.
        @raise RuntimeError: after L{finish}.
        """
        state = self._state
        if state != "open":
            if state == "tooLarge":
                raise ObjectTooLarge(self._key)
            if state in ("finishing", "finished"):
                raise RuntimeError("write() after finish()")
            return
        self._size += len(data)
        if self._size > self._store.maxObjectSize:
            self._closed("tooLarge")
            self._store._tooLarge += 1
            self._discard()
            raise ObjectTooLarge(f"{self._key}: more than {self._store.maxObjectSize} bytes")
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered >= WRITE_CHUNK:
                self._flush()

    def _takeBuffer(self) -> bytes:
        data = b"".join(self._buffer)
        self._buffer = []
        self._buffered = 0
        return data

    def _flush(self) -> None:
        data = self._takeBuffer()
        store = self._store
        if not self._opening:
            self._opening = True
            self._chain.addCallback(
                lambda crc: store._inThread(_openTemp, store._tmpDir, self._prefix)
            ).addCallback(self._opened)
        self._chain.addCallback(
            lambda crc: store._inThread(_appendChunk, self._fd, data, crc)
        )

    def _opened(self, result: tuple[int, str]) -> int:
        self._fd, self._path = result
        if self._state in ("aborted", "tooLarge"):
            # Stop the chain here; the cleanup queued by _discard runs next.
            raise ObjectTooLarge(self._key)
        return 0

    def finish(self) -> Deferred[None]:
        """
        Write what is left, sync, and rename into place.

        @return: a Deferred that fires once the object is visible, or fails
            with L{ObjectTooLarge} (too large, also with its file header),
            L{IncompleteObject} (body length differs from C{meta.size}),
            C{RuntimeError} (aborted or finished before) or the C{OSError}
            that stopped the write; the store is then as it was.
        """
        state = self._state
        if state != "open":
            if state == "tooLarge":
                return fail(ObjectTooLarge(self._key))
            return fail(RuntimeError(f"finish() on a writer that is {state}"))
        store = self._store
        key = self._key
        problem = sizeMismatch(self._meta, self._size)
        if problem is not None:
            self._closed("aborted")
            self._discard()
            return fail(IncompleteObject(f"{key}: {problem}"))
        if len(self._prefix) + self._size + TRAILER_SIZE > store.maxSize:
            self._closed("tooLarge")
            store._tooLarge += 1
            self._discard()
            return fail(ObjectTooLarge(f"{key}: larger than the whole store"))
        self._closed("finishing")
        data = self._takeBuffer()
        finalPath = store._pathFor(key)
        freshUntil = self._meta.freshUntil

        def writeLast(crc: int) -> Deferred[tuple[int, int]]:
            if not self._opening:
                return store._inThread(
                    _createFile, store._tmpDir, self._prefix, data, finalPath, store.fsync
                )
            fd, self._fd = self._fd, None  # _commitFile always closes it
            return store._inThread(
                _commitFile, fd, self._path, data, crc, self._size, finalPath, store.fsync
            )

        def committed(result: tuple[int, int]) -> None:
            self._path = None
            fileSize, inode = result
            store._stores += 1
            store._indexSet(key, fileSize, inode, freshUntil)

        def commit(crc: int) -> Deferred[None]:
            return store._keyLocked(key, lambda: writeLast(crc).addCallback(committed))

        def failed(failure: Any) -> Any:
            self._cleanup()
            return failure

        def done(result: Any) -> Any:
            self._state = "finished"
            return result

        d = self._chain.addCallback(commit)
        d.addErrback(failed)
        d.addBoth(done)
        return d

    def abort(self) -> None:
        """
        Throw away what was written (the temp file is removed in a thread).
        Harmless more than once, after a failure, or after L{finish}.
        """
        if self._state == "open":
            self._closed("aborted")
            self._discard()

    def _discard(self) -> None:
        self._buffer = []
        self._buffered = 0
        self._chain.addErrback(lambda failure: None)
        self._chain.addCallback(lambda ignored: self._cleanup())

    def _cleanup(self) -> Optional[Deferred[None]]:
        fd, path = self._fd, self._path
        self._fd = self._path = None
        if fd is None and path is None:
            return None
        if not self._store._running:
            # Stopped: close now; the next start deletes the temp file.
            _discardTemp(fd, None)
            return None
        d = self._store._inThread(_discardTemp, fd, path)
        d.addErrback(lambda failure: log.failure("Removing a temp file", failure))
        return d


# ---------------------------------------------------------------------------
# The store


def _rewriteMeta(path: str, tmpDir: str, key: str, meta: StoredResponse,
                 fsync: bool) -> Optional[tuple[int, int]]:
    """
    Write the object at C{path} again with new metadata, keeping its body
    and trailer, and rename it into place.  Returns C{(fileSize, inode)},
    or C{None} when there is no valid object for C{key}.
    """
    try:
        src = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    tmpFd = None
    tmpPath = None
    try:
        try:
            info = readObjectFile(src)
        except CorruptObject:
            return None
        if info.key != key:
            return None
        tmpFd, tmpPath = _openTemp(tmpDir, encodeMeta(key, meta))
        offset = info.bodyOffset
        remaining = info.fileSize - offset
        while remaining:
            try:
                copied = os.copy_file_range(src, tmpFd, remaining, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                   errno.EOPNOTSUPP):
                    raise
                chunk = os.pread(src, min(remaining, READ_CHUNK), offset)
                _writeAll(tmpFd, chunk)
                copied = len(chunk)
            if copied == 0:
                raise CorruptObject("file shrank while copying")
            offset += copied
            remaining -= copied
        if fsync:
            os.fsync(tmpFd)
        st = os.fstat(tmpFd)
        os.close(tmpFd)
        tmpFd = None
        os.rename(tmpPath, path)
        tmpPath = None
        return st.st_size, st.st_ino
    finally:
        os.close(src)
        _discardTemp(tmpFd, tmpPath)


def _openObject(path: str, key: str) -> tuple[Optional[int], Optional[ObjectFile], str]:
    """
    Open and check the object file for C{key}.  Returns C{(fd, info, "")}
    (C{fd} already closed and C{None} when the whole body was read), or
    C{(None, None, reason)} when there is no usable object (a corrupt file
    is deleted, the reason says why).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None, "missing"
    try:
        info = readObjectFile(fd, SMALL_OBJECT)
        if info.key != key:
            raise CorruptObject("key does not match")
    except CorruptObject as e:
        inode = os.fstat(fd).st_ino
        os.close(fd)
        _unlinkIfInode(path, inode)
        return None, None, f"corrupt: {e}"
    except BaseException:
        os.close(fd)
        raise
    if info.body is not None:
        os.close(fd)
        return None, info, ""
    return fd, info, ""


def _unlinkIfInode(path: str, inode: Optional[int]) -> bool:
    """
    Remove C{path} if it exists and (when C{inode} is given) is still that
    inode.  Returns whether a file was removed.
    """
    try:
        if inode is not None and os.stat(path).st_ino != inode:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class _ScanResult:
    """
    What one part of a directory scan found, besides the entries it
    delivered.

    @ivar ages: per subdirectory, C{(mtime, key)} pairs sorted by age.
    @ivar problems: messages to log (bounded).
    @ivar corrupt: damaged files removed.
    @ivar tempRemoved: leftover temp files removed.
    """

    def __init__(self) -> None:
        self.ages: list[list[tuple[float, str]]] = []
        self.problems: list[str] = []
        self.corrupt = 0
        self.tempRemoved = 0


def _removeOldTemp(root: str) -> int:
    """
    Delete the temp directories that earlier runs left (renamed aside by
    L{DiskStore.startService}); returns how many files they held.
    """
    removed = 0
    for name in os.listdir(root):
        if not name.startswith("tmp.old-"):
            continue
        old = os.path.join(root, name)
        for leftover in os.listdir(old):
            try:
                os.unlink(os.path.join(old, leftover))
                removed += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
        try:
            os.rmdir(old)
        except OSError as e:
            log.warn("Cannot remove {old}: {error}", old=old, error=str(e))
    return removed


def _scanDirectory(objectsDir: str, part: int, parts: int,
                   deliver: Callable[[list[Any]], None],
                   cancelled: Callable[[], bool]) -> _ScanResult:
    """
    Rebuild part of the index (runs in a thread): check every object file
    in subdirectories C{part}, C{part + parts}, ... of C{objectsDir},
    delete damaged ones, and hand batches of C{(key, fileSize, inode,
    freshUntil)} to C{deliver} (which must pass them to the reactor
    thread).
    """
    result = _ScanResult()
    try:
        subdirs = sorted(os.listdir(objectsDir))[part::parts]
    except FileNotFoundError:
        subdirs = []
    for sub in subdirs:
        if cancelled():
            break
        subPath = os.path.join(objectsDir, sub)
        try:
            names = os.listdir(subPath)
        except NotADirectoryError:
            _unlinkIfInode(subPath, None)
            result.corrupt += 1
            continue
        batch = []
        ages = []
        for name in names:
            path = os.path.join(subPath, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, IsADirectoryError):
                continue
            try:
                info = readObjectFile(fd, 0, False)
                if name != keyName(info.key) or sub != name[:2]:
                    raise CorruptObject("file name does not match its key")
            except CorruptObject as e:
                _unlinkIfInode(path, os.fstat(fd).st_ino)
                result.corrupt += 1
                if len(result.problems) < 100:
                    result.problems.append(f"{path}: {e} (removed)")
                continue
            except OSError as e:
                if len(result.problems) < 100:
                    result.problems.append(f"{path}: {e} (skipped)")
                continue
            finally:
                os.close(fd)
            batch.append((info.key, info.fileSize, info.inode, info.freshUntil))
            ages.append((info.mtime, info.key))
        if batch:
            deliver(batch)
            ages.sort()
            result.ages.append(ages)
    return result


def _mergeAges(results: list[_ScanResult]) -> list[str]:
    """
    All keys the scan found, oldest file first.  A generator merge of the
    small sorted lists rather than one big sort: a single C{list.sort}
    holds the GIL (so stalls the reactor thread) for as long as it takes.
    """
    lists = [ages for result in results for ages in result.ages]
    return [key for _, key in heapq.merge(*lists)]


@implementer(IObjectStore)
class DiskStore(Service):
    """
    Objects in files under a directory, within a byte budget (LRU), crash
    safe.  A service: L{startService} locks the directory and starts the
    index rebuild; L{stopService} waits for file operations under way and
    stops the thread pool.

    @ivar path: the directory.
    @ivar maxSize: the byte budget (file sizes: body plus header and
        trailer).
    @ivar maxObjectSize: the largest body accepted.
    @ivar fsync: whether files are synced before they are renamed into
        place.
    @ivar loading: C{True} from L{startService} until the index is rebuilt.
    @ivar size: bytes of the indexed files.
    """

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        maxSize: int = DEFAULT_MAX_SIZE,
        maxObjectSize: int = DEFAULT_MAX_OBJECT_SIZE,
        threads: int = DEFAULT_THREADS,
        fsync: bool = True,
    ) -> None:
        """
        @param path: the directory (created at start if missing).
        @param reactor: provides C{IReactorFromThreads} and C{IReactorTime};
            the global reactor by default.
        @param maxSize: the byte budget.
        @param maxObjectSize: the largest body accepted.
        @param threads: the most file operations run at once.
        @param fsync: sync every object file before renaming it into place
            (durability across power loss; a process crash is safe either
            way).
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if maxSize <= 0 or maxObjectSize <= 0 or threads <= 0:
            raise ValueError("maxSize, maxObjectSize and threads must be positive")
        self._reactor = reactor
        self.path = os.path.abspath(path)
        self._objectsDir = os.path.join(self.path, "objects")
        self._tmpDir = os.path.join(self.path, "tmp")
        self.maxSize = maxSize
        self.maxObjectSize = min(maxObjectSize, maxSize)
        self.fsync = fsync
        self._threads = threads
        self._pool: Any = None
        self._shutdownTrigger: Any = None
        self._lockFd: Optional[int] = None
        self._running = False
        self.loading = False
        self._cancelScan = False
        self.size = 0
        # key -> inode << 42 | file size, least recently used first.
        self._index: OrderedDict[str, int] = OrderedDict()
        self._fresh: dict[str, float] = {}
        # The ICP hot path: a bound dict method, no Python frame at all.
        self.freshUntil = self._fresh.get  # type: ignore[method-assign]
        # Keys changed by live operations while loading; the scan must not
        # overwrite what they did.
        self._touched: set[str] = set()
        # Keys indexed by the scan and not used since, for the final order.
        self._cold: set[str] = set()
        self._locks: dict[str, tuple[DeferredLock, list[int]]] = {}
        self._pending: set[Deferred[Any]] = set()
        self._loaded: Optional[Deferred[None]] = None
        self._evictionListeners: list[Callable[[str], None]] = []
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._evictions = 0
        self._tooLarge = 0
        self._corrupt = 0
        self._tempRemoved = 0
        self._writers = 0
        self.loadSeconds = 0.0

    def freshUntil(self, key: str) -> Optional[float]:
        """
        The C{freshUntil} of the complete object indexed under C{key}, or
        C{None} (also for objects not indexed yet while loading).

        Replaced in every instance by the C{get} of the freshness dict: a
        single C dict lookup that never changes the eviction order.
        """
        return self._fresh.get(key)  # pragma: no cover

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        """
        Create and lock the directory, start the thread pool and the index
        rebuild; L{loading} is C{True} until the rebuild is done.

        @raise DirectoryInUse: another store holds the directory's lock.
        @raise OSError: the directory cannot be created or locked.
        """
        import fcntl

        from twisted.python.threadpool import ThreadPool

        os.makedirs(self._objectsDir, exist_ok=True)
        lockFd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lockFd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lockFd)
            raise DirectoryInUse(f"{self.path} is in use by another store") from None
        self._lockFd = lockFd
        # Temp files of an earlier run are moved aside in one rename (the
        # rebuild deletes them) so new writes start in an empty tmp/.
        if os.path.isdir(self._tmpDir):
            os.rename(self._tmpDir, f"{self._tmpDir}.old-{uuid.uuid4().hex}")
        os.mkdir(self._tmpDir)
        Service.startService(self)
        self._pool = ThreadPool(minthreads=0, maxthreads=self._threads,
                                name=f"icpmesh-disk-{self.path}")
        self._pool.start()
        # Pool threads are not daemons: if the reactor stops without the
        # store being stopped, stop the pool anyway so the process can exit.
        addTrigger = getattr(self._reactor, "addSystemEventTrigger", None)
        if addTrigger is not None:
            self._shutdownTrigger = addTrigger("during", "shutdown", self._stopPool)
        self._running = True
        self.loading = True
        self._cancelScan = False
        self._loaded = self._rebuild()

    def stopService(self) -> Deferred[None]:
        """
        Stop: cancel a rebuild under way, wait for the file operations
        under way, stop the thread pool and unlock the directory.
        """
        Service.stopService(self)
        self._cancelScan = True
        return self._stop()

    @inlineCallbacks
    def _stop(self) -> Generator[Deferred[Any], Any, None]:
        while self._pending:
            yield DeferredList(list(self._pending), consumeErrors=True)
        self._stopPool()
        trigger, self._shutdownTrigger = self._shutdownTrigger, None
        if trigger is not None:
            self._reactor.removeSystemEventTrigger(trigger)
        lockFd, self._lockFd = self._lockFd, None
        if lockFd is not None:
            os.close(lockFd)
        self.loading = False

    def _stopPool(self) -> None:
        self._running = False
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def whenLoaded(self) -> Deferred[None]:
        """
        A Deferred that fires when the index rebuild started by
        L{startService} is done (at once if it is).
        """
        d: Deferred[None] = Deferred()
        if self._loaded is None or not self.loading:
            d.callback(None)
        else:

            def loaded(result: object) -> object:
                d.callback(None)
                return result

            self._loaded.addBoth(loaded)
        return d

    @inlineCallbacks
    def _rebuild(self) -> Generator[Deferred[Any], Any, None]:
        from twisted.internet.task import cooperate

        reactor = self._reactor
        started = reactor.seconds()
        parts = min(self._threads, SCAN_THREADS)

        def deliver(batch: list[Any]) -> None:
            reactor.callFromThread(self._indexScanned, batch)

        try:
            scans = [
                self._inThread(_scanDirectory, self._objectsDir, part, parts, deliver,
                               lambda: self._cancelScan)
                for part in range(parts)
            ]
            tempRemoved = yield self._inThread(_removeOldTemp, self.path)
            results = yield defer.gatherResults(scans, consumeErrors=True)
            order = yield self._inThread(_mergeAges, results)
        except Exception:
            log.failure("Rebuilding the disk store index of {path} failed", path=self.path)
            self.loading = False
            return
        corrupt = sum(result.corrupt for result in results)
        self._corrupt += corrupt
        self._tempRemoved += tempRemoved
        for result in results:
            for problem in result.problems:
                log.warn("Disk store rebuild: {problem}", problem=problem)
        self.loading = False
        self._touched = set()
        self.loadSeconds = reactor.seconds() - started
        log.info(
            "Disk store {path}: {objects} objects, {bytes} bytes indexed in "
            "{seconds:.2f}s ({corrupt} corrupt files and {temp} temp files removed)",
            path=self.path, objects=len(self._index), bytes=self.size,
            seconds=self.loadSeconds, corrupt=corrupt, temp=tempRemoved,
        )
        # Order what the scan found by age, oldest next to be evicted, a
        # batch per reactor turn; objects used since start stay newest.
        yield cooperate(self._orderScanned(order)).whenDone()
        self._cold = set()
        self._evict(None)

    def _orderScanned(self, order: list[str]) -> Iterator[None]:
        index = self._index
        cold = self._cold
        for i, key in enumerate(reversed(order)):
            if key in cold:
                index.move_to_end(key, last=False)
            if i % ORDER_BATCH == ORDER_BATCH - 1:
                yield None

    def _indexScanned(self, batch: list[tuple[str, int, int, float]]) -> None:
        index = self._index
        fresh = self._fresh
        touched = self._touched
        cold = self._cold
        if not self.loading:
            return
        for key, fileSize, inode, freshUntil in batch:
            if key in touched or key in index:
                continue
            index[key] = (inode << _SIZE_BITS) | fileSize
            index.move_to_end(key, last=False)
            fresh[key] = freshUntil
            cold.add(key)
            self.size += fileSize
        self._evict(None)

    # -- helpers ----------------------------------------------------------

    def _inThread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{f(*args)} in the store's thread pool.
        """
        from twisted.internet.threads import deferToThreadPool

        if not self._running or self._pool is None:
            return fail(StoreNotRunning(f"disk store {self.path} is not running"))
        d = deferToThreadPool(self._reactor, self._pool, f, *args)
        pending = self._pending
        pending.add(d)

        def done(result: Any) -> Any:
            pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def _keyLocked(self, key: str, f: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """
        Run C{f} once no other file operation on C{key} is under way, so
        operations on one key reach the disk and the index in one order.
        """
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (DeferredLock(), [0])
        lock, users = entry
        users[0] += 1

        def release(result: Any) -> Any:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]
            return result

        return lock.run(f).addBoth(release)

    def _pathFor(self, key: str) -> str:
        name = keyName(key)
        return os.path.join(self._objectsDir, name[:2], name)

    def _touch(self, key: str) -> None:
        if self.loading:
            self._touched.add(key)
        self._cold.discard(key)

    def _indexSet(self, key: str, fileSize: int, inode: int, freshUntil: float) -> None:
        """
        Index an object just written (most recently used) and evict until
        the budget holds.
        """
        old = self._index.pop(key, None)
        if old is not None:
            self.size -= old & _SIZE_MASK
        self._index[key] = (inode << _SIZE_BITS) | fileSize
        self._fresh[key] = freshUntil
        self.size += fileSize
        self._touch(key)
        self._evict(key)

    def _indexRemove(self, key: str) -> Optional[int]:
        value = self._index.pop(key, None)
        if value is None:
            return None
        del self._fresh[key]
        self.size -= value & _SIZE_MASK
        self._cold.discard(key)
        return value

    def _evict(self, keep: Optional[str]) -> None:
        """
        Evict least recently used objects until the budget holds, never
        C{keep}; their files are removed in a thread (unless a newer version
        has replaced them by then).
        """
        index = self._index
        while self.size > self.maxSize and index:
            key, value = index.popitem(last=False)
            if key == keep:
                index[key] = value
                if len(index) == 1:
                    break
                continue
            del self._fresh[key]
            self.size -= value & _SIZE_MASK
            self._evictions += 1
            self._cold.discard(key)
            self._touch(key)
            self._removeFile(key, value >> _SIZE_BITS)
            for listener in self._evictionListeners:
                listener(key)

    def _removeFile(self, key: str, inode: Optional[int]) -> Deferred[bool]:
        path = self._pathFor(key)
        d = self._keyLocked(key, lambda: self._inThread(_unlinkIfInode, path, inode))
        d.addErrback(self._logRemoveFailure, key)
        return d

    def _logRemoveFailure(self, failure: Any, key: str) -> bool:
        if not failure.check(StoreNotRunning):
            log.failure("Removing the cache file of {key}", failure, key=key)
        return False

    def _dropCorrupt(self, key: str, inode: int, reason: str) -> None:
        """
        A read found the object's file damaged: unindex it (if the index
        still names that file) and remove the file.
        """
        log.warn("Dropping corrupt cached object {key}: {reason}", key=key, reason=reason)
        self._corrupt += 1
        value = self._index.get(key)
        if value is not None and value >> _SIZE_BITS == inode:
            self._indexRemove(key)
        self._removeFile(key, inode)

    def addEvictionListener(self, listener: Callable[[str], None]) -> None:
        """
        Call C{listener(key)} whenever an object is evicted or dropped from
        the index for lack of room (used by L{TieredStore}).
        """
        self._evictionListeners.append(listener)

    # -- IObjectStore ------------------------------------------------------

    def get(self, key: str) -> Deferred[Optional[ICachedObject]]:
        """
        Open and check the object's file in a thread.  A hit is a use of
        the object (LRU).  While loading, a key not indexed yet is looked
        for on disk too.

        @return: a Deferred firing with a L{DiskObject} or C{None}.
        """
        value = self._index.get(key)
        if value is None and not (self.loading and self._running):
            self._misses += 1
            return succeed(None)
        if value is not None:
            self._index.move_to_end(key)
            self._cold.discard(key)
        path = self._pathFor(key)

        def opened(result: tuple[Optional[int], Optional[ObjectFile], str]) -> Any:
            fd, info, reason = result
            if info is None:
                self._misses += 1
                current = self._index.get(key)
                if current is not None and (value is None or current == value):
                    if reason.startswith("corrupt"):
                        self._corrupt += 1
                        log.warn("Dropping corrupt cached object {key}: {reason}",
                                 key=key, reason=reason)
                    self._indexRemove(key)
                return None
            if value is None and key not in self._index:
                if key in self._touched:
                    # Deleted or evicted while we looked.
                    if fd is not None:
                        os.close(fd)
                    self._misses += 1
                    return None
                self._indexSet(key, info.fileSize, info.inode, info.freshUntil)
            self._hits += 1
            return DiskObject(self, key, info, fd)

        if value is None:
            return self._keyLocked(key, lambda: self._inThread(_openObject, path, key)
                                   .addCallback(opened))
        return self._inThread(_openObject, path, key).addCallback(opened)

    def begin(self, key: str, meta: StoredResponse) -> IObjectWriter:
        """
        Start writing an object.

        @raise ObjectTooLarge: C{meta.size} is larger than L{maxObjectSize}.
        """
        if meta.size is not None and meta.size > self.maxObjectSize:
            self._tooLarge += 1
            raise ObjectTooLarge(f"{key}: {meta.size} bytes")
        return DiskWriter(self, key, meta)

    def updateMeta(self, key: str, meta: StoredResponse) -> Deferred[bool]:
        """
        Rewrite the object's file with new metadata (the body is copied in
        the kernel with C{copy_file_range}) and rename it into place.

        @return: a Deferred firing with C{False} when nothing is stored.
        """
        if key not in self._index and not (self.loading and self._running):
            return succeed(False)
        path = self._pathFor(key)

        def done(result: Optional[tuple[int, int]]) -> bool:
            if result is None:
                self._indexRemove(key)
                self._touch(key)
                return False
            fileSize, inode = result
            self._indexSet(key, fileSize, inode, meta.freshUntil)
            return True

        return self._keyLocked(
            key,
            lambda: self._inThread(_rewriteMeta, path, self._tmpDir, key, meta, self.fsync)
            .addCallback(done),
        )

    def delete(self, key: str) -> Deferred[bool]:
        """
        Unindex the object at once (no more ICP HITs for it) and remove its
        file in a thread.

        @return: a Deferred firing with C{True} when an object was removed.
        """
        indexed = self._indexRemove(key) is not None
        self._touch(key)
        if not indexed and not (self.loading and self._running):
            return succeed(False)
        path = self._pathFor(key)

        def removed(unlinked: bool) -> bool:
            self._indexRemove(key)
            self._touch(key)
            return unlinked or indexed

        return self._keyLocked(
            key, lambda: self._inThread(_unlinkIfInode, path, None).addCallback(removed)
        )

    def stats(self) -> dict[str, Union[int, float]]:
        """
        Counters: C{objects}, C{bytes} (file sizes), C{maxSize},
        C{maxObjectSize}, C{loading} (0 or 1), C{loadSeconds}, C{hits},
        C{misses}, C{stores}, C{evictions}, C{tooLarge}, C{corrupt} (files
        found damaged and removed), C{tempFilesRemoved}, C{writers} (under
        way).
        """
        return {
            "objects": len(self._index),
            "bytes": self.size,
            "maxSize": self.maxSize,
            "maxObjectSize": self.maxObjectSize,
            "loading": int(self.loading),
            "loadSeconds": self.loadSeconds,
            "hits": self._hits,
            "misses": self._misses,
            "stores": self._stores,
            "evictions": self._evictions,
            "tooLarge": self._tooLarge,
            "corrupt": self._corrupt,
            "tempFilesRemoved": self._tempRemoved,
            "writers": self._writers,
        }

    def keys(self) -> list[str]:
        """
        The indexed keys, next to be evicted first.  For tests and
        diagnostics.
        """
        return list(self._index)


# ---------------------------------------------------------------------------
# Memory in front of disk


@implementer(IObjectWriter)
class _TieredWriter:
    """
    Writes through to the disk tier, and to the memory tier when the object
    fits it.
    """

    def __init__(self, store: TieredStore, key: str, meta: StoredResponse) -> None:
        self._store = store
        self._key = key
        self._disk = store.disk.begin(key, meta)
        self._memory: Any = None
        if meta.size is None or meta.size <= store.memory.maxObjectSize:
            self._memory = store.memory.begin(key, meta)

    def write(self, data: bytes) -> None:
        self._disk.write(data)
        if self._memory is not None:
            try:
                self._memory.write(data)
            except ObjectTooLarge:
                self._memory = None

    def finish(self) -> Deferred[None]:
        memory = self._memory
        self._memory = None

        def stored(result: None) -> Any:
            if memory is None:
                self._store.memory.delete(self._key)
                return None
            return memory.finish().addErrback(lambda failure: None)

        def failed(failure: Any) -> Any:
            if memory is not None:
                memory.abort()
            return failure

        return self._disk.finish().addCallbacks(stored, failed)

    def abort(self) -> None:
        self._disk.abort()
        if self._memory is not None:
            self._memory.abort()
            self._memory = None


@implementer(IObjectStore)
class TieredStore(Service):
    """
    A L{icpmesh.storage.memory.MemoryStore} in front of a L{DiskStore}.

    Every object is written through to disk (so it survives restarts); the
    ones small enough for the memory tier are kept there too.  Reads are
    served from memory when they can, else from disk, and small objects
    read from disk are copied into memory.  The disk tier's index is the
    truth: C{freshUntil}, C{loading}, the budget that matters for
    persistence.  Objects the disk tier evicts leave the memory tier too.

    @ivar memory: the memory tier.
    @ivar disk: the disk tier.
    """

    def __init__(self, memory: Any, disk: DiskStore) -> None:
        self.memory = memory
        self.disk = disk
        self.maxObjectSize = disk.maxObjectSize
        self.freshUntil = disk.freshUntil  # type: ignore[method-assign]
        disk.addEvictionListener(self._evicted)

    def freshUntil(self, key: str) -> Optional[float]:
        """
        The disk tier's freshness index (replaced per instance by it).
        """
        return self.disk.freshUntil(key)  # pragma: no cover

    @property
    def loading(self) -> bool:
        """
        Whether the disk tier is still rebuilding its index.
        """
        return bool(self.disk.loading)

    def whenLoaded(self) -> Deferred[None]:
        """
        A Deferred that fires when the disk tier's index is rebuilt.
        """
        return self.disk.whenLoaded()

    def startService(self) -> None:
        """
        Start the disk tier.
        """
        Service.startService(self)
        self.disk.startService()

    def stopService(self) -> Deferred[None]:
        """
        Stop the disk tier.
        """
        Service.stopService(self)
        return self.disk.stopService()

    def _evicted(self, key: str) -> None:
        self.memory.delete(key)

    def get(self, key: str) -> Deferred[Optional[ICachedObject]]:
        """
        From memory if there, else from disk (copying small objects into
        memory).
        """
        if self.disk.freshUntil(key) is None and not self.disk.loading:
            self.memory.delete(key)
            return self.disk.get(key)

        def fromMemory(obj: Any) -> Any:
            if obj is not None:
                return obj
            return self.disk.get(key).addCallback(fromDisk)

        def fromDisk(obj: Any) -> Any:
            if obj is not None:
                body = obj._info.body
                if body is not None and len(body) <= self.memory.maxObjectSize:
                    writer = self.memory.begin(key, obj.meta)
                    writer.write(body)
                    writer.finish().addErrback(lambda failure: None)
            return obj

        return self.memory.get(key).addCallback(fromMemory)

    def begin(self, key: str, meta: StoredResponse) -> IObjectWriter:
        """
        Start writing an object to both tiers.

        @raise ObjectTooLarge: C{meta.size} is larger than L{maxObjectSize}.
        """
        return _TieredWriter(self, key, meta)

    def updateMeta(self, key: str, meta: StoredResponse) -> Deferred[bool]:
        """
        Update both tiers; the disk tier's answer counts.
        """
        def updated(result: bool) -> bool:
            if result:
                self.memory.updateMeta(key, meta)
            else:
                self.memory.delete(key)
            return result

        return self.disk.updateMeta(key, meta).addCallback(updated)

    def delete(self, key: str) -> Deferred[bool]:
        """
        Delete from both tiers.
        """
        self.memory.delete(key)
        return self.disk.delete(key)

    def stats(self) -> dict[str, Union[int, float]]:
        """
        The disk tier's counters, plus the memory tier's prefixed with
        C{memory.}.
        """
        stats = dict(self.disk.stats())
        for name, value in self.memory.stats().items():
            stats["memory." + name] = value
        return stats


# ---------------------------------------------------------------------------
# Plugins


def _directory(section: Any) -> str:
    """
    The C{dir=} option: required; relative paths are taken from the config
    file's directory.  Checked without creating anything.
    """
    path = section.getString("dir")
    if not path:
        raise section.error("option dir=PATH is required")
    if not os.path.isabs(path) and section.filename and not section.filename.startswith("<"):
        path = os.path.join(os.path.dirname(os.path.abspath(section.filename)), path)
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise section.error(f"dir {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise section.error(f"dir {path} is not writable")
    else:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise section.error(f"dir {path} does not exist, nor does its parent")
    return path


def _diskOptions(section: Any) -> dict[str, Any]:
    maxSize, maxObjectSize = checkSizes(section, DEFAULT_MAX_SIZE, DEFAULT_MAX_OBJECT_SIZE)
    threads = section.getInt("threads", DEFAULT_THREADS)
    if not 1 <= threads <= 64:
        raise section.error("threads must be between 1 and 64")
    return {
        "path": _directory(section),
        "maxSize": maxSize,
        "maxObjectSize": maxObjectSize,
        "threads": threads,
        "fsync": section.getBool("fsync", True),
    }


@implementer(IObjectStorePlugin)
class DiskStorePlugin:
    """
    Builds a L{DiskStore} from C{store disk dir=PATH [max-size=1GB]
    [max-object-size=64MB] [threads=4] [fsync=on]}.
    """

    name = "disk"
    description = "objects in a directory; survives restarts and crashes"
    directives = ()

    def storeFromConfig(self, section: Any, reactor: Any) -> DiskStore:
        """
        Build the store (not started: it is a service of the node).

        @raise icpmesh.config.ConfigError: for a missing or unusable C{dir},
            an unknown option or a bad value, naming file and line.
        """
        section.checkOptions({"dir", "max-size", "max-object-size", "threads", "fsync"})
        return DiskStore(reactor=reactor, **_diskOptions(section))


@implementer(IObjectStorePlugin)
class TieredStorePlugin:
    """
    Builds a L{TieredStore} from C{store tiered dir=PATH [max-size=1GB]
    [max-object-size=64MB] [memory-size=64MB] [memory-object-size=1MB]
    [threads=4] [fsync=on]}.
    """

    name = "tiered"
    description = "memory in front of a crash-safe disk store"
    directives = ()

    def storeFromConfig(self, section: Any, reactor: Any) -> TieredStore:
        """
        Build the store (not started: it is a service of the node).

        @raise icpmesh.config.ConfigError: as for the C{disk} store, and for
            bad memory-tier sizes.
        """
        from icpmesh.storage.memory import MemoryStore

        section.checkOptions({"dir", "max-size", "max-object-size", "threads", "fsync",
                              "memory-size", "memory-object-size"})
        options = _diskOptions(section)
        memorySize = section.getSize("memory-size", 64 * 1024**2)
        memoryObject = section.getSize("memory-object-size", min(1024**2, memorySize))
        if memorySize <= 0 or memoryObject <= 0:
            raise section.error("memory-size and memory-object-size must be more than 0")
        if memoryObject > memorySize:
            raise section.error("memory-object-size is larger than memory-size")
        disk = DiskStore(reactor=reactor, **options)
        memory = MemoryStore(reactor, maxSize=memorySize, maxObjectSize=memoryObject)
        return TieredStore(memory, disk)


#: The plugin objects the drop-in exports.
diskStorePlugin = DiskStorePlugin()
tieredStorePlugin = TieredStorePlugin()

__all__ = [
    "CorruptObject",
    "DiskObject",
    "DiskStore",
    "DiskStorePlugin",
    "DiskWriter",
    "DirectoryInUse",
    "ReadStopped",
    "StoreNotRunning",
    "TieredStore",
    "TieredStorePlugin",
    "diskStorePlugin",
    "keyName",
    "readObjectFile",
    "tieredStorePlugin",
]
