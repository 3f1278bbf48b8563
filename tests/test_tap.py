"""
Tests for L{icpmesh.tap} and the twistd drop-in.
"""

from __future__ import annotations

import os
import subprocess

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from icpmesh.tap import Options
from tests.nodelab import checkoutEnv, twistdCommand

class OptionsTests(SynchronousTestCase):
    """
    Command-line options override the config.
    """

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self) -> None:
        """
        No arguments: HTTP 3128, ICP 3130 on all addresses, default plugins.
        """
        config = self.parse().meshConfig
        assert config is not None
        self.assertEqual((config.httpAddress, config.httpPort, config.icpAddress, config.icpPort),
                         ("", 3128, "", 3130))
        self.assertEqual(config.plugins["store"].name, "memory")

    def test_overrides(self) -> None:
        """
        Ports, bind addresses, name and plugin names override.
        """
        config = self.parse("--http-port", "8080", "--icp-port", "0", "--bind", "127.0.0.1",
                            "--icp-address", "127.0.0.2", "--name", "node1",
                            "--store", "memory").meshConfig
        assert config is not None
        self.assertEqual((config.httpAddress, config.httpPort, config.icpAddress, config.icpPort,
                          config.visibleHostname), ("127.0.0.1", 8080, "127.0.0.2", 0, "node1"))

    def test_configFile(self) -> None:
        """
        --config reads the file; options still override it.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("http_port 127.0.0.1:4000\nicp_port 4001\nvisible_hostname n\n")
        config = self.parse("--config", path, "--icp-port", "5001").meshConfig
        assert config is not None
        self.assertEqual((config.httpPort, config.icpPort, config.visibleHostname), (4000, 5001, "n"))

    def test_errors(self) -> None:
        """
        Bad ports, unknown plugins and bad config files are usage errors
        naming the problem (and the file and line).
        """
        e = self.assertRaises(UsageError, self.parse, "--http-port", "http")
        self.assertIn("not a port number", str(e))
        e = self.assertRaises(UsageError, self.parse, "--store", "nosuch")
        self.assertIn("unknown store plugin 'nosuch'; installed: ", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("http_port 3128\nacl lan src 10.0.0.0/33\n")
        e = self.assertRaises(UsageError, self.parse, "--config", path)
        self.assertIn(f"{path}:2:", str(e))

    def test_noIcp(self) -> None:
        """
        --no-icp turns ICP off.
        """
        config = self.parse("--no-icp").meshConfig
        assert config is not None
        self.assertIsNone(config.icpPort)


class TwistdTests(SynchronousTestCase):
    """
    The drop-in as twistd sees it (a subprocess, like a user).
    """

    def run_(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(twistdCommand() + list(args), capture_output=True, text=True,
                              env=checkoutEnv(), timeout=120)

    def test_listedWithCleanStderr(self) -> None:
        """
        twistd --help lists icpmesh and prints nothing on stderr (a broken
        drop-in only shows there).
        """
        result = self.run_("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("icpmesh", result.stdout)
        self.assertEqual(result.stderr, "")

    def test_subcommandHelp(self) -> None:
        """
        twistd icpmesh --help documents every option.
        """
        result = self.run_("icpmesh", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--config", "--http-port", "--icp-port", "--http-address", "--icp-address",
                       "--bind", "--name", "--store", "--access", "--selector", "--help-plugins"):
            self.assertIn(option, result.stdout)

    def test_badConfigStopsStartup(self) -> None:
        """
        A bad config file stops twistd before it starts, with file, line
        and reason.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("http_port 3128\nicp_port banana\n")
        result = self.run_("-n", "--pidfile=", "icpmesh", "--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{path}:2: icp_port: not a port number: 'banana'", result.stdout + result.stderr)


class MakeServiceTests(SynchronousTestCase):
    """
    L{icpmesh.tap.makeService}, as twistd calls it.
    """

    def test_garbageCollectorTunedWhenRunning(self) -> None:
        """
        The node's service is built, and L{tuneGarbageCollector} is
        scheduled for when the reactor runs (not called at once: twistd has
        not started anything yet).
        """
        from twisted.internet import reactor

        from icpmesh import tap
        from icpmesh.service import MeshService, tuneGarbageCollector

        scheduled = []
        self.patch(reactor, "callWhenRunning", lambda f, *a, **k: scheduled.append(f))
        options = Options()
        options.parseOptions(["--http-port", "0", "--icp-port", "0", "--bind", "127.0.0.1"])
        self.assertIsInstance(tap.makeService(options), MeshService)
        self.assertEqual(scheduled, [tuneGarbageCollector])
