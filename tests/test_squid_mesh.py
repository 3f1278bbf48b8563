"""
Interop with a real Squid 5.7 on loopback, in both directions: icpmesh
asking Squid as sibling and as parent, and Squid asking icpmesh as sibling
and as parent.  We read Squid's access log, icpmesh's access log and the
origin's request counts.

Addresses: the origin on 127.0.0.1, icpmesh on 127.0.0.3, Squid on
127.0.0.4 (each ICP agent on its own IP: Squid ignores datagrams from its
own address).
"""

from __future__ import annotations

import os

import pytest
from twisted.trial.unittest import SynchronousTestCase

from icpmesh import icp
from tests.nodelab import Node, Origin, curl, icpExchange, waitFor
from tests.squidlab import startSquid

pytestmark = pytest.mark.squid

MESH = "127.0.0.3"
SQUID = "127.0.0.4"


def meshLog(node: Node) -> list[list[str]]:
    path = os.path.join(node.workdir, "access.log")
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except OSError:
        return []


def meshEntry(node: Node, url: str) -> list[str]:
    """
    The icpmesh access-log line for an HTTP request to C{url}.
    """
    found: list[list[str]] = []

    def look() -> bool:
        found[:] = [e for e in meshLog(node) if len(e) > 6 and e[6] == url and e[5] != "ICP_QUERY"]
        return bool(found)

    waitFor(look, 10)
    assert found, f"no access.log line for {url}: {meshLog(node)}"
    return found[-1]


def squidEntry(squid, url: str) -> dict[str, str]:
    found: list[dict[str, str]] = []

    def look() -> bool:
        found[:] = [e for e in squid.accessLogEntries() if e.get("url") == url and e.get("method") != "ICP_QUERY"]
        return bool(found)

    waitFor(look, 10)
    assert found, f"no Squid access.log line for {url}: {squid.accessLogLines()}"
    return found[-1]


def waitPeerUp(squid) -> None:
    """
    Squid starts every cache_peer DEAD until a TCP probe succeeds.
    """
    assert waitFor(lambda: "Status     : Up" in squid.mgr("server_list")
                   or "Status : Up" in squid.mgr("server_list"), 15), squid.mgr("server_list")


class MeshAsksSquidTests(SynchronousTestCase):
    """
    icpmesh with a Squid neighbour.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.squid = startSquid(self, address=SQUID)

    def node(self, kind: str) -> Node:
        config = (f"cache_peer {SQUID} {kind} {self.squid.httpPort} {self.squid.icpPort} name=squid\n"
                  "icp_query_timeout 2 seconds\n"
                  "access_log access.log\n")
        node = Node(self.mktemp(), address=MESH, config=config)
        self.addCleanup(node.stop)
        return node

    def test_siblingHit(self) -> None:
        """
        A URL Squid holds is a SIBLING_HIT: fetched from Squid with
        only-if-cached, the origin not asked again.
        """
        url = self.origin.url("/sibling-hit")
        status, _, _ = self.squid.fetch(url)
        self.assertEqual((status, self.origin.counts["/sibling-hit"]), (200, 1))
        node = self.node("sibling")
        result = curl(url, proxy=f"http://{MESH}:{node.httpPort}")
        self.assertTrue(result.stdout.endswith(b"body of /sibling-hit"), result)
        self.assertEqual(self.origin.counts["/sibling-hit"], 1)
        entry = meshEntry(node, url)
        self.assertEqual(entry[8], f"SIBLING_HIT/{SQUID}")
        squidSide = squidEntry(self.squid, url)
        self.assertIn("HIT", squidSide["code"])

    def test_siblingMissGoesDirect(self) -> None:
        """
        A sibling MISS is ignored: the node fetches from the origin itself
        and Squid is asked only over ICP.
        """
        node = self.node("sibling")
        url = self.origin.url("/sibling-miss")
        result = curl(url, proxy=f"http://{MESH}:{node.httpPort}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.origin.counts["/sibling-miss"], 1)
        self.assertEqual(meshEntry(node, url)[8].split("/")[0], "HIER_DIRECT")
        http = [e for e in self.squid.accessLogEntries() if e.get("url") == url and e.get("method") != "ICP_QUERY"]
        self.assertEqual(http, [])
        icpLines = [e for e in self.squid.accessLogEntries() if e.get("url") == url and e.get("method") == "ICP_QUERY"]
        self.assertEqual([e["code"] for e in icpLines], ["UDP_MISS"])

    def test_parentMiss(self) -> None:
        """
        A parent MISS makes Squid the FIRST_PARENT_MISS: the object comes
        through Squid, and the origin is asked exactly once.
        """
        node = self.node("parent")
        url = self.origin.url("/parent-miss")
        result = curl(url, proxy=f"http://{MESH}:{node.httpPort}")
        self.assertTrue(result.stdout.endswith(b"body of /parent-miss"), result)
        self.assertEqual(self.origin.counts["/parent-miss"], 1)
        self.assertEqual(meshEntry(node, url)[8], f"FIRST_PARENT_MISS/{SQUID}")
        self.assertIn("MISS", squidEntry(self.squid, url)["code"])


class SquidAsksMeshTests(SynchronousTestCase):
    """
    Squid with an icpmesh neighbour.
    """

    def setUp(self) -> None:
        self.origin = Origin()
        self.addCleanup(self.origin.stop)
        self.node = Node(self.mktemp(), address=MESH, config="access_log access.log\n")
        self.addCleanup(self.node.stop)

    def squid(self, kind: str):
        squid = startSquid(self, address=SQUID, extraConfig=(
            f"cache_peer {MESH} {kind} {self.node.httpPort} {self.node.icpPort} name=mesh\n"
            "icp_query_timeout 2000\n"))
        waitPeerUp(squid)
        return squid

    def test_meshAsSiblingHit(self) -> None:
        """
        Squid finds a URL icpmesh holds by ICP and fetches it from icpmesh
        (SIBLING_HIT), without reaching the origin.
        """
        url = self.origin.url("/mesh-sibling")
        curl(url, proxy=f"http://{MESH}:{self.node.httpPort}")
        self.assertEqual(self.origin.counts["/mesh-sibling"], 1)
        squid = self.squid("sibling")
        status, _, body = squid.fetch(url)
        self.assertEqual((status, body), (200, b"body of /mesh-sibling"))
        self.assertEqual(self.origin.counts["/mesh-sibling"], 1)
        entry = squidEntry(squid, url)
        self.assertEqual((entry["hierarchy"], entry["peer"]), ("SIBLING_HIT", f"{MESH}:{self.node.httpPort}"))
        served = meshEntry(self.node, url)
        self.assertTrue(served[3].startswith("TCP_") and "HIT" in served[3], served)

    def test_meshAsSiblingMiss(self) -> None:
        """
        For a URL icpmesh lacks, Squid gets MISS over ICP and goes direct;
        icpmesh logs the ICP query and never fetches.
        """
        squid = self.squid("sibling")
        url = self.origin.url("/mesh-miss")
        status, _, _ = squid.fetch(url)
        self.assertEqual(status, 200)
        self.assertEqual(self.origin.counts["/mesh-miss"], 1)
        self.assertEqual(squidEntry(squid, url)["hierarchy"], "HIER_DIRECT")
        waitFor(lambda: any(e[5] == "ICP_QUERY" and e[6] == url for e in meshLog(self.node) if len(e) > 6))
        queries = [e for e in meshLog(self.node) if len(e) > 6 and e[6] == url]
        self.assertEqual([e[3].split("/")[0] for e in queries], ["UDP_MISS"])

    def test_meshAsParent(self) -> None:
        """
        With icpmesh as parent, Squid's miss goes through icpmesh
        (FIRST_PARENT_MISS), which fetches from the origin once and then
        answers ICP HIT for it.
        """
        squid = self.squid("parent")
        url = self.origin.url("/mesh-parent")
        status, _, body = squid.fetch(url)
        self.assertEqual((status, body), (200, b"body of /mesh-parent"))
        self.assertEqual(self.origin.counts["/mesh-parent"], 1)
        entry = squidEntry(squid, url)
        self.assertEqual((entry["hierarchy"], entry["peer"]), ("FIRST_PARENT_MISS", f"{MESH}:{self.node.httpPort}"))
        data = icp.encode(icp.query(5, url))
        answer = icp.decode(icpExchange(data, (MESH, self.node.icpPort), source="127.0.0.5"))
        self.assertEqual(answer.opcode, icp.Opcode.HIT)
