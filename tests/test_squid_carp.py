"""
CARP interop with a real Squid 5.7 (issue 5 point 5): Squid with three
icpmesh nodes as CARP parents, and an icpmesh node with the same three as
CARP parents, send every URL to the same member - the member that
L{icpmesh.carp} predicts.
"""

from __future__ import annotations

import http.client
import os

import pytest
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.carp import ArrayMember, CARPArray
from tests.nodelab import Node, Origin, waitFor
from tests.squidlab import startSquid

pytestmark = pytest.mark.squid

MEMBERS = [("p1", "127.0.0.11", 1), ("p2", "127.0.0.12", 2), ("p3", "127.0.0.13", 1)]
URLS = 150


def proxyGet(host: str, port: int, url: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def meshLog(node: Node) -> list[list[str]]:
    try:
        with open(os.path.join(node.workdir, "access.log")) as f:
            return [line.split() for line in f if line.strip()]
    except OSError:
        return []


class CARPInteropTests(SynchronousTestCase):
    """
    One array, two kinds of client, the same routing.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.parents = {}
        for name, address, _ in MEMBERS:
            node = Node(self.mktemp(), address=address, config="access_log access.log\n")
            self.addCleanup(node.stop)
            self.parents[name] = node
        self.byAddress = {node.address: name for name, node in self.parents.items()}
        self.model = CARPArray([ArrayMember(name, weight) for name, _, weight in MEMBERS])
        self.urls = [self.origin.url(f"/carp/{i}/object-{i * 7919 % 1000}") for i in range(URLS)]

    def peerLines(self) -> str:
        return "".join(
            f"cache_peer {address} parent {self.parents[name].httpPort} 0 carp no-query "
            f"name={name} weight={weight}\n"
            for name, address, weight in MEMBERS
        )

    def test_squidAndMeshAgree(self) -> None:
        """
        Every URL goes to the model's member through Squid and through an
        icpmesh node.
        """
        squid = startSquid(self, address="127.0.0.4",
                           extraConfig=self.peerLines() + "never_direct allow all\n")
        assert waitFor(lambda: squid.mgr("server_list").count("Up") >= 3, 20), squid.mgr("server_list")
        expected = {url: self.model.select(url).name for url in self.urls}
        self.assertEqual(len(set(expected.values())), 3)

        for url in self.urls:
            status, _, _ = squid.fetch(url)
            self.assertEqual(status, 200)
        waitFor(lambda: len([e for e in squid.accessLogEntries() if e["url"] in expected]) >= URLS, 10)
        viaSquid = {}
        for entry in squid.accessLogEntries():
            if entry["url"] in expected:
                self.assertEqual(entry["hierarchy"], "CARP")
                viaSquid[entry["url"]] = self.byAddress[entry["peer"].split(":")[0]]
        self.assertEqual(viaSquid, expected)

        mesh = Node(self.mktemp(), address="127.0.0.3", config=(
            "selector carp\n" + self.peerLines() + "never_direct allow all\naccess_log access.log\n"))
        self.addCleanup(mesh.stop)
        for url in self.urls:
            self.assertEqual(proxyGet(mesh.address, mesh.httpPort, url), 200)
        waitFor(lambda: len(meshLog(mesh)) >= URLS, 10)
        viaMesh = {}
        for fields in meshLog(mesh):
            hierarchy, _, peer = fields[8].partition("/")
            self.assertEqual(hierarchy, "CARP", fields)
            viaMesh[fields[6]] = self.byAddress[peer]
        self.assertEqual(viaMesh, expected)
