"""
twistd and plugin drop-in for icpmesh.

Kept tiny: it is imported on every plugin scan.  The service maker names its
module by dotted name (imported only when C{twistd icpmesh} runs), and the
built-in store, access-control and selector plugins are imported from
modules that never import the reactor.
"""

from twisted.application.service import ServiceMaker

from icpmesh.acl import aclPlugin
from icpmesh.selection import icpSelectorPlugin
from icpmesh.selectors import (
    carpSelectorPlugin,
    firstUpSelectorPlugin,
    roundsSelectorPlugin,
    rrSelectorPlugin,
    sourcehashSelectorPlugin,
    wrrSelectorPlugin,
)
from icpmesh.storage.disk import diskStorePlugin, tieredStorePlugin
from icpmesh.storage.memory import memoryStorePlugin

icpmesh = ServiceMaker(
    "icpmesh",
    "icpmesh.tap",
    "ICPv2 web cache mesh: a caching HTTP proxy that asks its neighbour caches (RFC 2186/2187)",
    "icpmesh",
)

__all__ = [
    "icpmesh",
    "aclPlugin",
    "icpSelectorPlugin",
    "carpSelectorPlugin",
    "firstUpSelectorPlugin",
    "roundsSelectorPlugin",
    "rrSelectorPlugin",
    "sourcehashSelectorPlugin",
    "wrrSelectorPlugin",
    "diskStorePlugin",
    "tieredStorePlugin",
    "memoryStorePlugin",
]
