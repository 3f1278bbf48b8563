"""
Memory-store figures: memory per cached object and freshUntil lookups/s.

Fills a L{icpmesh.storage.memory.MemoryStore} with N small objects (each
with its own key, metadata and a few headers, as the proxy stores them) and
prints:

  - the memory the process grew by, per object (RSS delta, or tracemalloc
    with C{--tracemalloc}), split into the bytes the object itself brings
    (key text, body, header names and values) and the rest: the I{index
    overhead} (entry object, dict slots, metadata object, header tuples,
    the freshness float);
  - what the store charges per object against its budget
    (L{icpmesh.storage.entryCost}), to check that estimate is fair;
  - C{freshUntil} lookups per second (hits and misses), the ICP hot path;
  - C{get} hits per second.

Usage::

    python benchmarks/store_memory.py [--objects 1000000] [--body 100]
                                      [--tracemalloc]

A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from icpmesh.interfaces import StoredResponse  # noqa: E402
from icpmesh.storage import entryCost  # noqa: E402
from icpmesh.storage.memory import MemoryStore  # noqa: E402


def rss() -> int:
    """
    Resident set size of this process in bytes (Linux).
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(
    store: MemoryStore, count: int, bodySize: int, headerCount: int = 4
) -> tuple[int, int]:
    """
    Store C{count} objects.

    @return: C{(own, charged)}: bytes the objects bring themselves (key,
        body, reason, header names and values) and bytes the store charged.
    """
    own = 0
    charged = 0
    for i in range(count):
        key = f"http://www{i % 97}.example.com/static/img/{i:08d}.png"
        body = i.to_bytes(8, "big") * (bodySize // 8)
        # Fresh bytes objects per header, as an HTTP parser makes them.
        headers = tuple(
            (bytes(bytearray(name)), bytes(bytearray(value)))
            for name, value in (
                (b"Content-Type", b"image/png"),
                (b"Content-Length", str(len(body)).encode()),
                (b"ETag", f'"{i:x}"'.encode()),
                (b"Cache-Control", b"max-age=3600"),
            )[:headerCount]
        )
        meta = StoredResponse(
            status=200,
            reason=b"OK",
            headers=headers,
            requestTime=1000.0 + i,
            responseTime=1000.1 + i,
            freshUntil=4600.0 + i,
            size=len(body),
        )
        writer = store.begin(key, meta)
        writer.write(body)
        writer.finish()
        own += len(key) + len(body) + 2 + sum(len(n) + len(v) for n, v in headers)
        charged += entryCost(key, meta, len(body))
    return own, charged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--body", type=int, default=100, help="body bytes per object")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="measure with tracemalloc (slow) instead of RSS")
    parser.add_argument("--headers", type=int, default=4, choices=range(5),
                        help="response headers per object (0-4)")
    parser.add_argument("--lookups", type=int, default=2_000_000)
    args = parser.parse_args()

    store = MemoryStore(Clock(), maxSize=64 * 1024**3, maxObjectSize=1024**2)
    gc.collect()
    if args.tracemalloc:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = rss()
    start = time.perf_counter()
    own, charged = fill(store, args.objects, args.body, args.headers)
    elapsed = time.perf_counter() - start
    gc.collect()
    if args.tracemalloc:
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        how = "tracemalloc"
    else:
        after = rss()
        how = "RSS delta"
    n = args.objects
    grown = after - before
    print(f"objects stored:               {n:,} ({args.body}-byte bodies, "
          f"{args.headers} headers) "
          f"in {elapsed:.1f} s ({n / elapsed:,.0f}/s)")
    print(f"memory per object ({how}):  {grown / n:,.0f} bytes")
    print(f"  brought by the object:      {own / n:,.0f} bytes (key, body, headers)")
    print(f"  index overhead:             {(grown - own) / n:,.0f} bytes")
    print(f"charged per object (budget):  {charged / n:,.0f} bytes "
          f"(store says {store.stats()['bytes'] / n:,.0f})")

    keys = [f"http://www{i % 97}.example.com/static/img/{i:08d}.png"
            for i in range(0, n, max(1, n // 10_000))]
    missing = [k + "?miss" for k in keys]
    lookup = store.freshUntil
    rounds = max(1, args.lookups // len(keys))
    for label, sample in (("hits", keys), ("misses", missing)):
        start = time.perf_counter()
        for _ in range(rounds):
            for key in sample:
                lookup(key)
        elapsed = time.perf_counter() - start
        total = rounds * len(sample)
        print(f"freshUntil {label:6}:            {total / elapsed:,.0f} lookups/s "
              f"({elapsed / total * 1e9:.0f} ns each)")

    get = store.get
    start = time.perf_counter()
    for _ in range(max(1, rounds // 4)):
        for key in keys:
            get(key)
    elapsed = time.perf_counter() - start
    total = max(1, rounds // 4) * len(keys)
    print(f"get hits:                     {total / elapsed:,.0f}/s "
          f"({elapsed / total * 1e9:.0f} ns each)")


if __name__ == "__main__":
    main()
