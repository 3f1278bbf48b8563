"""
A small Ethernet segment of network namespaces for tests that need real
multicast: loopback does not carry it between sockets of different
processes the way a LAN does, and a test must not touch the host's own
interfaces.

L{Segment} creates a hub namespace holding a Linux bridge, and one namespace
per member, each with a veth interface C{eth0} plugged into the bridge,
an address in C{10.99.N.0/24} and a route for C{224.0.0.0/4}.  Everything
it creates is removed by L{Segment.destroy}, processes included.  Needs
root and iproute2; without them the tests are skipped, except under C{CI},
where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import unittest
from typing import Optional


def requireNetns() -> str:
    """
    Check that network namespaces can be made here.

    @return: the path of C{ip}.
    @raise unittest.SkipTest: when they cannot (not root, no iproute2),
        unless C{CI} is set, where this is a failure.
    """
    ip = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
    problem = None
    if ip is None:
        problem = "iproute2's ip command is not installed"
    elif os.geteuid() != 0:
        problem = "network namespace tests need root"
    if problem is not None:
        if os.environ.get("CI"):
            raise AssertionError(problem + "; CI runs as root with iproute2")
        raise unittest.SkipTest(problem)
    assert ip is not None
    return ip


class Segment:
    """
    One bridged Ethernet segment of namespaces.

    @ivar prefix: unique prefix of every namespace and interface name.
    @ivar members: namespace name by member name.
    @ivar addresses: IPv4 address by member name.
    """

    def __init__(self, subnet: int = 99) -> None:
        self.ip = requireNetns()
        self.prefix = f"icpm{os.getpid() % 100000}"
        self.subnet = subnet
        self.hub = self.prefix + "hub"
        self.members: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []
        self._run("netns", "add", self.hub)
        self._made.append(self.hub)
        self._run("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        self._run("-n", self.hub, "link", "set", "br0", "up")

    def _run(self, *args: str) -> str:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def add(self, name: str, host: int) -> str:
        """
        Add a member namespace with address C{10.99.0.HOST}.

        @return: the address.
        """
        ns = f"{self.prefix}{name}"
        address = f"10.{self.subnet}.0.{host}"
        self._run("netns", "add", ns)
        self._made.append(ns)
        port = f"{self.prefix[-6:]}p{host}"
        self._run("link", "add", port, "netns", self.hub, "type", "veth",
                  "peer", "name", "eth0", "netns", ns)
        self._run("-n", self.hub, "link", "set", port, "master", "br0", "up")
        self._run("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._run("-n", ns, "link", "set", "eth0", "up")
        self._run("-n", ns, "link", "set", "lo", "up")
        self._run("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        self.members[name] = ns
        self.addresses[name] = address
        return address

    def command(self, name: str, argv: list[str]) -> list[str]:
        """
        C{argv} run inside member C{name}'s namespace.
        """
        return [self.ip, "netns", "exec", self.members[name], *argv]

    def spawn(self, name: str, argv: list[str], **kwargs: object) -> "subprocess.Popen[bytes]":
        """
        Start a process in member C{name}; L{destroy} stops it.
        """
        process = subprocess.Popen(self.command(name, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def run(self, name: str, argv: list[str], timeout: float = 30) -> "subprocess.CompletedProcess[bytes]":
        """
        Run C{argv} to completion in member C{name}.
        """
        return subprocess.run(self.command(name, argv), capture_output=True, timeout=timeout)

    def waitForTCP(self, name: str, address: str, port: int, timeout: float = 30.0,
                   alive: Optional["subprocess.Popen[bytes]"] = None) -> None:
        """
        Wait until C{address:port} accepts TCP connections as seen from
        member C{name}.
        """
        probe = ("import socket,sys\n"
                 "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.5).close()\n"
                 "except OSError:\n sys.exit(1)\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if alive is not None and alive.poll() is not None:
                raise RuntimeError(f"process for {address}:{port} exited with {alive.returncode}")
            if self.run(name, ["python3", "-c", probe, address, str(port)]).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{address}:{port} did not start listening")

    def destroy(self) -> None:
        """
        Stop every process and delete every namespace (and so every veth
        and the bridge).
        """
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()
        for ns in reversed(self._made):
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True)
        self._made.clear()
