# -*- test-case-name: tests.test_storage_memory -*-
"""
Object stores: where a node keeps the HTTP responses it caches.

Two built-in L{icpmesh.interfaces.IObjectStore} providers ship with icpmesh:

  - L{icpmesh.storage.memory.MemoryStore} (plugin C{memory}, the default):
    a byte budget in RAM with segmented-LRU eviction;
  - L{icpmesh.storage.disk.DiskStore} (plugin C{disk}): a directory with a
    byte budget whose objects survive restarts and C{kill -9}, and
    L{icpmesh.storage.disk.TieredStore} (plugin C{tiered}): a memory store
    in front of a disk store.

Store authors test their store with
L{icpmesh.testing.store.StoreConformanceMixin}.  See C{docs/storage.md}.

This module holds the small pieces both built-in stores share.  It imports
nothing heavy and never the reactor: the plugin drop-in imports the store
modules during every plugin scan.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Optional

from icpmesh.interfaces import StoredResponse

#: Bytes charged to every stored object on top of its key, body and headers:
#: a fair estimate of the per-object bookkeeping of the in-memory index (the
#: entry object, its slots in the index dicts, the metadata object and its
#: header tuples, the float of the freshness index).  Measured with
#: C{benchmarks/store_memory.py}; see C{docs/storage.md}.
ENTRY_OVERHEAD = 540

#: Bytes charged per response header on top of its name and value (the
#: tuple and the two C{bytes} objects).
HEADER_OVERHEAD = 150


def metaCost(meta: StoredResponse) -> int:
    """
    Estimate the memory the metadata of one object takes, headers included.

    @param meta: the stored metadata.
    @return: a byte count.
    """
    headers = meta.headers
    # The names' and values' lengths summed at C speed: the length of all
    # of them joined.
    return len(meta.reason) + HEADER_OVERHEAD * len(headers) + len(b"".join(chain.from_iterable(headers)))


def entryCost(key: str, meta: StoredResponse, bodySize: int) -> int:
    """
    Estimate what one object costs against a memory byte budget: its body,
    its key, its metadata and the fixed per-entry overhead.

    @param key: the object's key.
    @param meta: the object's metadata.
    @param bodySize: the body length in bytes.
    @return: a byte count.
    """
    return ENTRY_OVERHEAD + len(key) + metaCost(meta) + bodySize


def checkSizes(section: Any, defaultMax: int, defaultObject: int) -> tuple[int, int]:
    """
    Read and check the C{max-size} and C{max-object-size} options of a store
    plugin's config line.

    @param section: the L{icpmesh.config.PluginSection}.
    @param defaultMax: the default byte budget.
    @param defaultObject: the default maximum object size.
    @return: C{(maxSize, maxObjectSize)}.
    @raise icpmesh.config.ConfigError: for a zero or unparseable size, or an
        object size larger than the budget.
    """
    maxSize = section.getSize("max-size", defaultMax)
    maxObjectSize = section.getSize("max-object-size", min(defaultObject, maxSize))
    if maxSize <= 0:
        raise section.error("max-size must be more than 0")
    if maxObjectSize <= 0:
        raise section.error("max-object-size must be more than 0")
    if maxObjectSize > maxSize:
        raise section.error(
            f"max-object-size ({maxObjectSize} bytes) is larger than "
            f"max-size ({maxSize} bytes)"
        )
    return maxSize, maxObjectSize


def sizeMismatch(meta: StoredResponse, size: int) -> Optional[str]:
    """
    Check a finished body against the size its metadata announced.

    @return: C{None} when they agree (or no size was announced), else a
        reason to refuse the object: a body shorter than its
        C{Content-Length} is a truncated transfer and must not be cached.
    """
    if meta.size is not None and meta.size != size:
        return f"body is {size} bytes but its metadata says {meta.size}"
    return None


class IncompleteObject(Exception):
    """
    A writer was finished with a body whose length differs from the
    C{size} of its L{StoredResponse}; the object was not stored.
    """


__all__ = [
    "ENTRY_OVERHEAD",
    "HEADER_OVERHEAD",
    "IncompleteObject",
    "checkSizes",
    "entryCost",
    "metaCost",
    "sizeMismatch",
]
