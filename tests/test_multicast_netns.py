"""
Multicast ICP for real: icpmesh nodes in network namespaces on one bridged
segment, each started with twistd as an operator would start it.

The segment (L{tests.netnslab.Segment}) has an origin, a querying node
C{q} configured with a multicast group and two of its members as
C{multicast-responder} neighbours, the two members C{r1} and C{r2}, and a
third node C{r3} that joins the same group but is not configured on C{q}.
So the tests see the real socket path: C{listenMulticast}, joining the
group, the TTL on the wire, unicast replies to a multicast query, and the
rule that only configured members' replies count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import unittest

import pytest

from icpmesh import icp

from .netnslab import Segment
from .nodelab import checkoutEnv, twistdCommand, waitFor
from .squidlab import requireSquid

pytestmark = pytest.mark.netns

GROUP = "239.255.77.1"
TTL = 3
HTTP_PORT = 3128
ICP_PORT = 3130
ORIGIN_PORT = 8080

ORIGIN_SCRIPT = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = open(sys.argv[2], "a", buffering=1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        log.write(self.path + "\n")
        body = b"object " + self.path.encode() + b"\n" + b"x" * 2000
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=3600")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer((sys.argv[1], int(sys.argv[3])), Handler).serve_forever()
'''

# Listens on the group in a member's namespace and prints, for the first
# datagram, the TTL it arrived with and its bytes in hex.
SNIFFER_SCRIPT = r'''
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton(sys.argv[1]), socket.inet_aton("0.0.0.0")))
s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVTTL", 12), 1)  # Linux value
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
while True:
    data, ancillary, flags, source = s.recvmsg(65536, 64)
    ttl = [struct.unpack("i", d[:4])[0] for level, kind, d in ancillary
           if level == socket.IPPROTO_IP and kind == socket.IP_TTL]
    if data[:1] == bytes([1]):
        print(ttl[0] if ttl else -1, source[0], data.hex(), flush=True)
        break
'''


SQUID_CONFIG = """\
http_port {address}:%d
icp_port %d
mcast_groups %s
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log squid
cache_store_log none
coredump_dir {dir}
netdb_filename stdio:{dir}/netdb.state
logfile_rotate 0
cache_mem 16 MB
pinger_enable off
shutdown_lifetime 0 seconds
visible_hostname squid-member
cache_effective_user proxy
acl segment src 10.99.0.0/24
http_access allow segment
icp_access allow segment
http_access deny all
icp_access deny all
""" % (HTTP_PORT, ICP_PORT, GROUP)


def accessLog(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f]
    except OSError:
        return []


class MulticastMeshTests(unittest.TestCase):
    """
    One segment, built once for the class: building it and starting four
    twistd nodes takes a few seconds.
    """

    segment: Segment
    workdir: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.segment = segment = Segment()
        cls.workdir = tempfile.mkdtemp(prefix="icpmesh-mcast-")
        try:
            cls._build()
        except BaseException:
            segment.destroy()
            raise

    @classmethod
    def _build(cls) -> None:
        segment = cls.segment
        cls.origin = segment.add("o", 100)
        cls.q = segment.add("q", 10)
        cls.r1 = segment.add("r1", 11)
        cls.r2 = segment.add("r2", 12)
        cls.r3 = segment.add("r3", 13)
        cls.squidMember = segment.add("squid", 14)
        cls.sniffer = segment.add("s", 20)

        script = os.path.join(cls.workdir, "origin.py")
        with open(script, "w") as f:
            f.write(ORIGIN_SCRIPT)
        cls.originLog = os.path.join(cls.workdir, "origin.log")
        proc = segment.spawn("o", [sys.executable, script, cls.origin, cls.originLog, str(ORIGIN_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        segment.waitForTCP("o", cls.origin, ORIGIN_PORT, alive=proc)

        member = (
            "http_port {address}:%d\n"
            # A socket bound to a unicast address never sees datagrams sent
            # to a group: members bind ICP to the wildcard address.
            "icp_port %d\n"
            "mcast_groups %s\n"
            "log_icp_queries on\n"
            "access_log {log}\n"
        ) % (HTTP_PORT, ICP_PORT, GROUP)
        querier = (
            "http_port {address}:%d\n"
            "icp_port {address}:%d\n"
            "access_log {log}\n"
            "cache_peer %s multicast %d %d ttl=%d\n"
            "cache_peer %s sibling %d %d multicast-responder name=r1\n"
            "cache_peer %s sibling %d %d multicast-responder name=r2\n"
            "cache_peer %s sibling %d %d multicast-responder name=squid\n"
            "mcast_icp_query_timeout 1 second\n"
            "icp_query_timeout 1 second\n"
        ) % (HTTP_PORT, ICP_PORT, GROUP, HTTP_PORT, ICP_PORT, TTL,
             cls.r1, HTTP_PORT, ICP_PORT, cls.r2, HTTP_PORT, ICP_PORT,
             cls.squidMember, HTTP_PORT, ICP_PORT)
        cls.nodes = {}
        for name, template in (("r1", member), ("r2", member), ("r3", member), ("q", querier)):
            directory = os.path.join(cls.workdir, name)
            os.makedirs(directory)
            address = segment.addresses[name]
            log = os.path.join(directory, "access.log")
            config = os.path.join(directory, "icpmesh.conf")
            with open(config, "w") as f:
                f.write(template.format(address=address, log=log))
            argv = twistdCommand() + ["-n", "--pidfile=", "--logfile", os.path.join(directory, "twistd.log"),
                                      "icpmesh", "--config", config, "--name", name]
            proc = segment.spawn(name, argv, cwd=directory, env=checkoutEnv(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cls.nodes[name] = (proc, directory)
        cls._startSquid()
        for name, (proc, directory) in cls.nodes.items():
            try:
                segment.waitForTCP(name, segment.addresses[name], HTTP_PORT, alive=proc)
            except RuntimeError as e:
                raise RuntimeError(f"{name}: {e}\n{cls.twistdLog(name)}") from None
        # Squid says when it has joined the group and opened its ICP port.
        if not waitFor(lambda: "Accepting ICP messages" in cls.twistdLog("squid"), 30):
            raise RuntimeError("Squid did not start:\n" + cls.twistdLog("squid"))

    @classmethod
    def _startSquid(cls) -> None:
        """
        A real Squid 5.7 as one more member of the group, as a
        C{multicast-responder} of C{q}.
        """
        import pwd

        squid = requireSquid()
        directory = os.path.join(cls.workdir, "squid")
        os.makedirs(directory)
        proxy = pwd.getpwnam("proxy")
        os.chmod(cls.workdir, 0o755)
        os.chown(directory, proxy.pw_uid, proxy.pw_gid)
        config = os.path.join(directory, "squid.conf")
        with open(config, "w") as f:
            f.write(SQUID_CONFIG.format(address=cls.squidMember, dir=directory))
        name = f"mcast{os.getpid()}"
        check = subprocess.run([squid, "-k", "parse", "-f", config, "-n", name], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError("squid.conf does not parse: " + check.stderr.decode("latin-1"))
        proc = cls.segment.spawn("squid", [squid, "-N", "-f", config, "-n", name], cwd=directory,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        cls.nodes["squid"] = (proc, directory)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.segment.destroy()

    @classmethod
    def twistdLog(cls, name: str) -> str:
        """
        The node's twistd.log (Squid's cache.log for C{squid}).
        """
        logName = "cache.log" if name == "squid" else "twistd.log"
        try:
            with open(os.path.join(cls.nodes[name][1], logName)) as f:
                return f.read()
        except OSError:
            return ""

    def accessLog(self, name: str) -> list[list[str]]:
        return accessLog(os.path.join(self.nodes[name][1], "access.log"))

    def originCount(self, path: str) -> int:
        try:
            with open(self.originLog) as f:
                return sum(1 for line in f if line.strip() == path)
        except OSError:
            return 0

    def get(self, via: str, path: str) -> tuple[int, bytes, str]:
        """
        GET the origin's C{path} through node C{via}, with curl run in the
        node's own namespace.  Returns status, body and headers.
        """
        url = f"http://{self.origin}:{ORIGIN_PORT}{path}"
        proxy = f"http://{self.segment.addresses[via]}:{HTTP_PORT}"
        result = self.segment.run(via, ["curl", "-sS", "--max-time", "20", "-x", proxy,
                                        "-D", "/dev/stderr", url])
        self.assertEqual(result.returncode, 0, result.stderr.decode("latin-1"))
        headers = result.stderr.decode("latin-1")
        status = int(headers.split()[1])
        return status, result.stdout, headers

    def warm(self, name: str, path: str) -> None:
        """
        Make node C{name} hold C{path} by fetching it through that node.
        """
        status, body, _ = self.get(name, path)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"object " + path.encode()))

    def entry(self, name: str, path: str, method: str = "GET") -> list[str]:
        url = f"http://{self.origin}:{ORIGIN_PORT}{path}"
        found: list[list[str]] = []

        def logged() -> bool:
            found[:] = [e for e in self.accessLog(name) if len(e) > 8 and e[6] == url and e[5] == method]
            return bool(found)

        self.assertTrue(waitFor(logged, 10), f"no {method} {url} in {name}'s access.log")
        return found[-1]

    def assertHitFrom(self, member: str, path: str) -> None:
        """
        C{path}, held only by C{member}: C{q} gets it from C{member}
        (SIBLING_HIT) after C{member} answered its multicast query HIT,
        and the origin is not asked again.
        """
        self.warm(member, path)
        self.assertEqual(self.originCount(path), 1)
        status, body, _ = self.get("q", path)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"object " + path.encode() + b"\n"))
        self.assertEqual(self.originCount(path), 1)
        self.assertEqual(self.entry("q", path)[8], f"SIBLING_HIT/{self.segment.addresses[member]}")
        icpEntry = self.entry(member, path, "ICP_QUERY")
        self.assertEqual((icpEntry[2], icpEntry[3].split("/")[0]), (self.q, "UDP_HIT"))

    def test_hitFromMember(self) -> None:
        """
        A URL only member C{r2} holds: C{q} sends one query to the group,
        C{r2} answers HIT by unicast, and C{q} fetches the object from
        C{r2} (SIBLING_HIT) without reaching the origin again.  C{r1}
        answered the same multicast query with a MISS, which shows the
        query reached the group and not just C{r2}.
        """
        path = "/member-hit"
        self.assertHitFrom("r2", path)
        icpR1 = self.entry("r1", path, "ICP_QUERY")
        self.assertEqual((icpR1[2], icpR1[3].split("/")[0]), (self.q, "UDP_MISS"))

    def test_missGoesDirect(self) -> None:
        """
        A URL no member holds: every member answers MISS to the multicast
        query and C{q} fetches from the origin (HIER_DIRECT).
        """
        path = "/nobody-has-it"
        status, body, _ = self.get("q", path)
        self.assertEqual(status, 200)
        self.assertEqual(self.originCount(path), 1)
        self.assertEqual(self.entry("q", path)[8], f"HIER_DIRECT/{self.origin}")
        for name in ("r1", "r2", "squid"):
            icpEntry = self.entry(name, path, "ICP_QUERY")
            self.assertEqual(icpEntry[3].split("/")[0], "UDP_MISS")

    def test_nonMemberHitIgnored(self) -> None:
        """
        A HIT from C{r3}, which joined the group but is not one of C{q}'s
        configured C{multicast-responder} neighbours, is not accepted: C{q}
        goes to the origin.  C{r3}'s own log shows that it did receive the
        query and answered HIT, so the reply was refused by C{q}'s policy.
        """
        path = "/stranger-hit"
        self.warm("r3", path)
        self.assertEqual(self.originCount(path), 1)
        status, _, _ = self.get("q", path)
        self.assertEqual(status, 200)
        self.assertEqual(self.originCount(path), 2)
        self.assertEqual(self.entry("q", path)[8], f"HIER_DIRECT/{self.origin}")
        icpR3 = self.entry("r3", path, "ICP_QUERY")
        self.assertEqual((icpR3[2], icpR3[3].split("/")[0]), (self.q, "UDP_HIT"))

    def test_queryOnTheWire(self) -> None:
        """
        The datagram C{q} sends to the group is an ICPv2 QUERY for the URL,
        and it carries the configured TTL, as a plain socket that joined
        the group in another namespace sees it.
        """
        sniffer = self.segment.spawn(
            "s", [sys.executable, "-c", SNIFFER_SCRIPT, GROUP, str(ICP_PORT), "15"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert sniffer.stdout is not None
        self.assertEqual(sniffer.stdout.readline().strip(), b"ready")
        path = "/on-the-wire"
        self.get("q", path)
        line = sniffer.stdout.readline().decode().split()
        self.assertEqual(len(line), 3, "the sniffer saw no ICP datagram")
        ttl, source, data = int(line[0]), line[1], bytes.fromhex(line[2])
        self.assertEqual(ttl, TTL)
        self.assertEqual(source, self.q)
        message = icp.decode(data)
        self.assertEqual(message.opcode, icp.Opcode.QUERY)
        self.assertEqual(message.version, 2)
        self.assertNotEqual(message.reqnum, 0)
        self.assertEqual(message.url, f"http://{self.origin}:{ORIGIN_PORT}{path}")

    def test_hitFromSquidMember(self) -> None:
        """
        Squid 5.7 joined the group with C{mcast_groups}: it answers C{q}'s
        multicast query by unicast with a HIT for what it holds, and C{q}
        fetches the object from Squid (SIBLING_HIT), which serves it from
        its cache (TCP_HIT, or TCP_MEM_HIT).
        """
        path = "/squid-hit"
        self.assertHitFrom("squid", path)
        served = [e for e in self.accessLog("squid") if e[5] == "GET" and e[2] == self.q and e[6].endswith(path)]
        self.assertEqual(len(served), 1)
        self.assertIn("HIT", served[0][3])

    def test_memberCount(self) -> None:
        """
        Ten seconds after start, C{q} counts the group's members with a
        probe query.  Four caches answer it (two icpmesh members, Squid,
        and C{r3}), but only the three configured responders count.
        """
        pattern = "Multicast group"
        self.assertTrue(waitFor(lambda: pattern in self.twistdLog("q"), 30),
                        "q never counted its multicast group:\n" + self.twistdLog("q"))
        line = next(line for line in self.twistdLog("q").splitlines() if pattern in line)
        self.assertTrue(line.endswith(": 3 replies"), line)
