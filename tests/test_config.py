"""
Tests for L{icpmesh.config}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from icpmesh.config import (
    DEFAULT_CONFIG,
    ConfigError,
    loadConfig,
    main,
    parseConfig,
    parseDuration,
    parseListen,
    parseSize,
    readDirectives,
)


class ValueParserTests(SynchronousTestCase):
    """
    Sizes, durations and listen addresses.
    """

    def test_sizes(self) -> None:
        """
        Sizes take binary units with or without a space.
        """
        self.assertEqual(parseSize("256MB"), 256 * 1024**2)
        self.assertEqual(parseSize("8 KB"), 8192)
        self.assertEqual(parseSize("100"), 100)
        self.assertEqual(parseSize("1.5 GB"), int(1.5 * 1024**3))
        for bad in ("", "MB", "12 parsecs", "-1"):
            self.assertRaises(ValueError, parseSize, bad)

    def test_durations(self) -> None:
        """
        Durations default to seconds and know ms, minutes and hours.
        """
        self.assertEqual(parseDuration("2"), 2.0)
        self.assertEqual(parseDuration("500 ms"), 0.5)
        self.assertEqual(parseDuration("10 minutes"), 600.0)
        self.assertEqual(parseDuration("1h"), 3600.0)
        self.assertRaises(ValueError, parseDuration, "soon")

    def test_listen(self) -> None:
        """
        Ports, address:port and [v6]:port.
        """
        self.assertEqual(parseListen("3128"), ("", 3128))
        self.assertEqual(parseListen("127.0.0.1:3128"), ("127.0.0.1", 3128))
        self.assertEqual(parseListen("[::1]:3130"), ("::1", 3130))
        for bad in ("x", "70000", "::1:3130", "[::1]3130", "host:"):
            self.assertRaises(ValueError, parseListen, bad)


class ParseTests(SynchronousTestCase):
    """
    Parsing whole files.
    """

    def test_defaults(self) -> None:
        """
        The embedded defaults: HTTP 3128 and ICP 3130 on all addresses,
        memory store, acl access control, icp selector.
        """
        config = parseConfig(DEFAULT_CONFIG, "<defaults>")
        self.assertEqual((config.httpAddress, config.httpPort), ("", 3128))
        self.assertEqual((config.icpAddress, config.icpPort), ("", 3130))
        self.assertEqual(
            {k: s.name for k, s in config.plugins.items()},
            {"store": "memory", "access": "acl", "selector": "icp"},
        )
        self.assertEqual(loadConfig(None).httpPort, 3128)

    def test_continuationAndComments(self) -> None:
        """
        Comments and blank lines are skipped; a trailing backslash joins
        lines and the directive keeps the line it started on.
        """
        ds = readDirectives("# c\n\nacl a src \\\n  10.0.0.0/8\nicp_port 1\n", "f")
        self.assertEqual([(d.name, d.args, d.lineno) for d in ds],
                         [("acl", ("a", "src", "10.0.0.0/8"), 3), ("icp_port", ("1",), 5)])

    def test_pluginLines(self) -> None:
        """
        C{store NAME key=value flag} gives the plugin its options and line.
        """
        config = parseConfig("\nstore disk dir=/tmp/x max-size=1GB fast\n", "f.conf")
        section = config.plugins["store"]
        self.assertEqual(section.name, "disk")
        self.assertEqual(section.options, {"dir": "/tmp/x", "max-size": "1GB", "fast": ""})
        self.assertEqual((section.filename, section.lineno), ("f.conf", 2))
        self.assertEqual(section.getSize("max-size", 0), 1024**3)
        self.assertTrue(section.getBool("fast", False))
        e = self.assertRaises(ConfigError, section.checkOptions, {"dir", "max-size"})
        self.assertEqual(str(e), "f.conf:2: store disk: unknown option 'fast'; known options: dir, max-size")

    def test_neighbours(self) -> None:
        """
        C{cache_peer} lines become neighbours with flags and values, and
        domain rules attach to them by name.
        """
        config = parseConfig(
            "cache_peer 127.0.0.2 parent 3128 3130 weight=2 no-query name=p1\n"
            "cache_peer 127.0.0.3 neighbor 3128 3130 proxy-only\n"
            "neighbour_domain p1 .example.com !private.example.com\n"
            "neighbour_type_domain 127.0.0.3 parent .edu\n",
            "f",
        )
        p1, s1 = config.neighbours
        self.assertEqual((p1.name, p1.type, p1.weight, p1.flags), ("p1", "parent", 2, frozenset({"no-query"})))
        self.assertEqual(p1.domains, ((".example.com", True), ("private.example.com", False)))
        self.assertEqual((s1.name, s1.type), ("127.0.0.3", "sibling"))
        self.assertEqual(s1.typeDomains, (("parent", (".edu",)),))

    def test_errorsNameFileAndLine(self) -> None:
        """
        Every mistake names the file and the line.
        """
        cases = [
            ("http_port abc\n", "f:1: http_port: not a port number: 'abc'"),
            ("\n\nicp_port 1 2\n", "f:3: icp_port takes exactly one value"),
            ("cache_peer a parent 1\n", "f:1: usage: cache_peer HOST TYPE HTTP-PORT ICP-PORT [OPTIONS]"),
            ("cache_peer a uncle 1 2\n", "f:1: unknown neighbour type 'uncle'; use parent, sibling or multicast"),
            ("cache_peer a parent 1 2 wieght=3\n", "f:1: unknown cache_peer option 'wieght=3'"),
            ("cache_peer a parent 1 2 weight=x\n", "f:1: cache_peer option weight: invalid literal for int() with base 10: 'x'"),
            ("cache_peer a parent 1 2\ncache_peer b parent 1 2 name=A\n",
             "f:2: duplicate neighbour name 'A' (first defined at line 1); use name=..."),
            ("icp_query_timeout 2 fortnights\n", "f:1: icp_query_timeout: not a duration: '2 fortnights' (use e.g. 2s, 500ms, 10 minutes)"),
            ("log_icp_queries maybe\n", "f:1: log_icp_queries: not on/off: 'maybe'"),
            ("\ncdn_cache_control sometimes\n",
             "f:2: cdn_cache_control: expected one of ignore, restrictive, on, not 'sometimes'"),
            ("dead_peer_timeout 1\ndead_peer_timeout 2\n", "f:2: dead_peer_timeout given twice (first at line 1)"),
            ("store\n", "f:1: usage: store NAME [key=value ...]"),
            ("store Bad_Name\n", "f:1: bad plugin name 'Bad_Name'"),
            ("neighbour_domain nobody .com\n", "f:1: neighbour_domain: no cache_peer named 'nobody'"),
        ]
        for text, message in cases:
            e = self.assertRaises(ConfigError, parseConfig, text, "f")
            self.assertEqual(str(e), message)

    def test_unreadableFile(self) -> None:
        """
        A missing file is a ConfigError naming it.
        """
        e = self.assertRaises(ConfigError, loadConfig, "/nonexistent/icpmesh.conf")
        self.assertIn("/nonexistent/icpmesh.conf: cannot read config file", str(e))


class CheckCommandTests(SynchronousTestCase):
    """
    C{icpmesh-check FILE}.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_(self, *args: str) -> tuple[int, str, str]:
        import io
        import sys

        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(list(args))
        return code, out.getvalue(), err.getvalue()

    def test_ok(self) -> None:
        """
        A good file prints OK and exits 0.
        """
        path = self.write("http_port 127.0.0.1:3128\nacl lan src 10.0.0.0/8\nhttp_access allow lan\n")
        self.assertEqual(self.run_(path), (0, f"{path}: OK\n", ""))

    def test_unknownDirective(self) -> None:
        """
        A directive no core part and no chosen plugin claims is an error at
        its line.
        """
        path = self.write("http_port 3128\nhtp_access allow all\n")
        self.assertEqual(self.run_(path),
                         (1, "", f"icpmesh-check: {path}:2: unknown directive 'htp_access'\n"))

    def test_unknownPlugin(self) -> None:
        """
        An unknown plugin name fails the check.
        """
        path = self.write("store nosuchstore\n")
        code, _, err = self.run_(path)
        self.assertEqual(code, 1)
        self.assertIn(f"{path}:1: unknown store plugin 'nosuchstore'; installed: ", err)
        self.assertIn("memory", err)

    def test_badACL(self) -> None:
        """
        Mistakes inside a plugin's directives are reported at their line.
        """
        path = self.write("http_port 3128\n\nacl lan src 10.0.0.0/33\n")
        code, _, err = self.run_(path)
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"icpmesh-check: {path}:3: "), err)

    def test_usage(self) -> None:
        """
        Wrong arguments exit 2.
        """
        self.assertEqual(self.run_()[0], 2)
        self.assertEqual(self.run_("a", "b")[0], 2)
