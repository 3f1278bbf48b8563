"""
Disk-store figures: hit throughput and start-up (index rebuild) time.

  1. B{Start-up}: fills a directory with N object files (written directly
     in the store's file format, to save time), then times
     C{startService()} until the rebuild is done (C{whenLoaded}), and how
     long the reactor was blocked at most meanwhile (the rebuild runs in a
     thread; this shows it does not stall the reactor).
  2. B{Hits}: C{get} + C{writeTo} of stored objects through a consumer that
     discards the bytes, with C concurrent readers, for small (8 KiB, read
     whole by C{get}) and large (1 MiB, streamed in chunks) objects, and
     for small objects through the C{tiered} store (memory in front).
  3. B{Writes}: objects stored per second, with and without C{fsync}.

Usage::

    python benchmarks/store_disk.py [--objects 100000] [--dir /var/tmp/x]
                                    [--seconds 5] [--concurrency 16]

The page cache is warm (the files were just written), as it is for the hot
set of a running cache; a cold start on a spinning disk is slower.  A
script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import zlib
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from icpmesh.interfaces import StoredResponse  # noqa: E402
from icpmesh.storage.disk import (  # noqa: E402
    DiskStore,
    TieredStore,
    encodeMeta,
    encodeTrailer,
    keyName,
)
from icpmesh.storage.memory import MemoryStore  # noqa: E402


def rss() -> int:
    """
    Resident set size of this process in bytes (Linux).
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def meta(size: int, i: int) -> StoredResponse:
    return StoredResponse(
        status=200,
        reason=b"OK",
        headers=(
            (b"Content-Type", b"image/png"),
            (b"Content-Length", str(size).encode()),
            (b"ETag", f'"{i:x}"'.encode()),
            (b"Cache-Control", b"max-age=3600"),
        ),
        requestTime=1000.0,
        responseTime=1000.1,
        freshUntil=4600.0,
        size=size,
    )


def keyFor(i: int) -> str:
    return f"http://www{i % 97}.example.com/static/img/{i:08d}.png"


def populate(path: str, count: int, size: int) -> None:
    """
    Write C{count} object files straight into C{path} in the store's
    format.
    """
    body = os.urandom(size)
    crc = zlib.crc32(body)
    objects = os.path.join(path, "objects")
    for i in range(count):
        key = keyFor(i)
        name = keyName(key)
        sub = os.path.join(objects, name[:2])
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, name), "wb") as f:
            f.write(encodeMeta(key, meta(size, i)) + body + encodeTrailer(size, crc))


class NullConsumer:
    """
    Discards what it gets; accepts a push producer and never pauses it.
    """

    def __init__(self) -> None:
        self.bytes = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.bytes += len(data)


class Stall:
    """
    Measures the longest gap between reactor turns (a 1 ms looping call).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.last = time.perf_counter()
        self.worst = 0.0
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = reactor

    def tick(self) -> None:
        now = time.perf_counter()
        self.worst = max(self.worst, now - self.last)
        self.last = now

    def start(self) -> None:
        self.last = time.perf_counter()
        self.loop.start(0.001)

    def stop(self) -> None:
        self.loop.stop()


@defer.inlineCallbacks
def startup(reactor: Any, base: str, count: int) -> Any:
    path = os.path.join(base, "startup")
    started = time.perf_counter()
    populate(path, count, 2048)
    print(f"wrote {count:,} object files of 2 KiB in {time.perf_counter() - started:.1f} s")
    store = DiskStore(path, reactor=reactor, maxSize=100 * 1024**3, fsync=False)
    stall = Stall(reactor)
    stall.start()
    gc.collect()
    before = rss()
    started = time.perf_counter()
    store.startService()
    yield store.whenLoaded()
    elapsed = time.perf_counter() - started
    stall.stop()
    gc.collect()
    grown = rss() - before
    print(f"start-up: {count:,} objects indexed in {elapsed:.2f} s "
          f"({count / elapsed:,.0f} objects/s); longest reactor stall "
          f"{stall.worst * 1000:.1f} ms")
    print(f"index memory: {grown / count:,.0f} bytes per object (RSS delta, "
          f"keys of ~45 characters included)")
    yield store.stopService()
    shutil.rmtree(path)


@defer.inlineCallbacks
def hits(reactor: Any, base: str, count: int, size: int, seconds: float,
         concurrency: int, tiered: bool = False) -> Any:
    path = os.path.join(base, f"hits-{size}-{tiered}")
    populate(path, count, size)
    store: Any = DiskStore(path, reactor=reactor, maxSize=100 * 1024**3, fsync=False)
    if tiered:
        memory = MemoryStore(reactor, maxSize=1024**3, maxObjectSize=1024**2)
        store = TieredStore(memory, store)
    store.startService()
    yield store.whenLoaded()
    keys = [keyFor(i) for i in range(count)]
    done = [0, 0]
    deadline = time.perf_counter() + seconds

    @defer.inlineCallbacks
    def reader(n: int) -> Any:
        i = n
        while time.perf_counter() < deadline:
            obj = yield store.get(keys[i % count])
            consumer = NullConsumer()
            yield obj.writeTo(consumer)
            done[0] += 1
            done[1] += consumer.bytes
            i += concurrency

    started = time.perf_counter()
    yield defer.DeferredList([reader(n) for n in range(concurrency)])
    elapsed = time.perf_counter() - started
    print(f"{'tiered' if tiered else 'disk'} hits, {size // 1024:,} KiB objects, "
          f"{concurrency} concurrent: "
          f"{done[0] / elapsed:,.0f} hits/s, {done[1] / elapsed / 1024**2:,.0f} MiB/s")
    yield store.stopService()
    shutil.rmtree(path)


@defer.inlineCallbacks
def writes(reactor: Any, base: str, count: int, size: int, fsync: bool) -> Any:
    path = os.path.join(base, f"writes-{fsync}")
    store = DiskStore(path, reactor=reactor, maxSize=100 * 1024**3, fsync=fsync)
    store.startService()
    yield store.whenLoaded()
    body = os.urandom(size)
    started = time.perf_counter()
    pending = []
    for i in range(count):
        writer = store.begin(keyFor(i), meta(size, i))
        writer.write(body)
        pending.append(writer.finish())
        if len(pending) >= 16:
            yield defer.DeferredList(pending)
            pending = []
    yield defer.DeferredList(pending)
    elapsed = time.perf_counter() - started
    print(f"writes, {size // 1024:,} KiB objects, fsync={'on' if fsync else 'off'}: "
          f"{count / elapsed:,.0f} objects/s")
    yield store.stopService()
    shutil.rmtree(path)


@defer.inlineCallbacks
def main(reactor: Any) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000,
                        help="objects for the start-up figure")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="icpmesh-bench-", dir=args.dir)
    try:
        yield startup(reactor, base, args.objects)
        yield hits(reactor, base, 5000, 8 * 1024, args.seconds, args.concurrency)
        yield hits(reactor, base, 200, 1024 * 1024, args.seconds, args.concurrency)
        yield hits(reactor, base, 5000, 8 * 1024, args.seconds, args.concurrency, True)
        yield writes(reactor, base, 2000, 8 * 1024, False)
        yield writes(reactor, base, 500, 8 * 1024, True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    task.react(main)
