# -*- test-case-name: test_examples -*-
"""
An example icpmesh access-control plugin: clients in the listed networks may
use the proxy and send ICP queries; nobody else may.

Chosen in the node's config file with::

    access subnets
    allow_subnet 127.0.0.0/8 ::1
    allow_subnet 10.0.0.0/8

C{allow_subnet} is a directive of its own that this plugin claims (its
C{directives} attribute); it may be repeated.  Without it, only loopback
clients are allowed.  Every neighbour may be used for every request, and
every response may be stored: for anything finer, use the built-in C{acl}
plugin.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional, Union

from zope.interface import implementer

from icpmesh.interfaces import AccessRequest, IAccessControl, IAccessControlPlugin

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Allowed when the config has no C{allow_subnet} line.
LOOPBACK = ("127.0.0.0/8", "::1/128")

#: Decisions remembered per client address, so that an ICP query (which
#: asks L{SubnetAccess.allowICP} every time) costs one dict lookup.
CACHE_LIMIT = 4096


@implementer(IAccessControl)
class SubnetAccess:
    """
    Allow clients by network.

    @ivar networks: the allowed networks.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._decisions: dict[str, bool] = {}

    def allowed(self, client: str) -> bool:
        """
        Whether C{client} (an address as text) is in an allowed network.
        IPv4 addresses mapped into IPv6 (C{::ffff:10.1.2.3}) count as IPv4.
        """
        decision = self._decisions.get(client)
        if decision is None:
            decision = self._decide(client)
            if len(self._decisions) >= CACHE_LIMIT:
                self._decisions.clear()
            self._decisions[client] = decision
        return decision

    def _decide(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def allowHTTP(self, request: AccessRequest) -> bool:
        return self.allowed(request.client)

    def allowMiss(self, request: AccessRequest) -> bool:
        return self.allowed(request.client)

    def allowICP(self, client: str, url: str) -> bool:
        return self.allowed(client)

    def allowNeighbour(self, neighbour: str, request: AccessRequest) -> bool:
        return True

    def directPolicy(self, request: AccessRequest) -> Optional[str]:
        return None

    def allowStore(self, request: AccessRequest) -> bool:
        return True


@implementer(IAccessControlPlugin)
class SubnetAccessPlugin:
    """
    The plugin object, chosen with C{access subnets}.
    """

    name = "subnets"
    description = "example: clients in the allow_subnet networks may use the node"
    directives = ("allow_subnet",)

    def accessControlFromConfig(self, section: Any, reactor: Any) -> SubnetAccess:
        """
        Read the C{allow_subnet} lines.

        @raise icpmesh.config.ConfigError: for an option on the C{access}
            line, an empty C{allow_subnet} or a bad network, naming its line.
        """
        section.checkOptions(())
        networks: list[Network] = []
        for directive in section.directives:
            if not directive.args:
                raise section.error("usage: allow_subnet NETWORK ...", directive)
            for word in directive.args:
                try:
                    networks.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    raise section.error(f"not a network: {word!r}", directive) from None
        if not section.directives:
            networks = [ipaddress.ip_network(n) for n in LOOPBACK]
        return SubnetAccess(networks)


subnetAccess = SubnetAccessPlugin()
