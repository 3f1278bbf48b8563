"""
Public test helpers for icpmesh and for authors of icpmesh plugins.

  - L{icpmesh.testing.udp}: L{FakeUDPReactor}, a C{MemoryReactorClock} with
    an in-memory UDP network (latency, silent hosts, multicast), and
    L{FakeICPNeighbour}, a scriptable ICP neighbour on it.
  - L{icpmesh.testing.store}: C{StoreConformanceMixin}, the test suite every
    object store plugin should pass.
  - L{icpmesh.testing.origin}: a fake origin server resource that counts the
    requests it gets.

Nothing here opens a real socket.
"""

from icpmesh.testing.udp import FakeICPNeighbour, FakeUDPPort, FakeUDPReactor

__all__ = ["FakeICPNeighbour", "FakeUDPPort", "FakeUDPReactor"]
