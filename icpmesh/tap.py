# -*- test-case-name: tests.test_tap -*-
"""
C{twistd icpmesh}: command-line options and the service maker.

With no options at all, a node starts on the embedded defaults
(L{icpmesh.config.DEFAULT_CONFIG}).  Options override the config file.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.python import usage

from icpmesh.config import (
    PLUGIN_KINDS,
    ConfigError,
    MeshConfig,
    PluginSection,
    loadConfig,
    parsePortInt,
)


class Options(usage.Options):
    """
    Options for C{twistd icpmesh}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run an icpmesh node: a caching HTTP forward proxy that asks its "
        "neighbour caches over ICPv2 (RFC 2186/2187) before going to the "
        "origin.  With no options it listens for HTTP on port 3128 and ICP on "
        "UDP port 3130, keeps objects in memory, and serves only loopback and "
        "private (RFC 1918, ULA) addresses.  Check a config file without "
        "starting with: icpmesh-check FILE."
    )
    optParameters = [
        ["config", "c", None, "Config file (default: the embedded defaults)."],
        ["http-port", None, None, "HTTP proxy port (overrides http_port; 0 picks a free port)."],
        ["icp-port", None, None, "ICP UDP port (overrides icp_port; 0 picks a free port)."],
        ["http-address", None, None, "Address the HTTP proxy binds to (default: all)."],
        ["icp-address", None, None, "Address the ICP socket binds to (default: all)."],
        ["bind", "b", None, "Address both the HTTP proxy and ICP bind to."],
        ["name", None, None, "Visible hostname (Via, X-Cache, logs)."],
        ["store", None, None, "Object store plugin (overrides 'store'; default memory)."],
        ["access", None, None, "Access control plugin (overrides 'access'; default acl)."],
        ["selector", None, None, "Peer selection plugin (overrides 'selector'; default icp)."],
        ["access-log", None, None, "Squid-format access log file ('none' to disable)."],
    ]
    optFlags = [
        ["no-icp", None, "Do not open the ICP port."],
    ]

    meshConfig: Optional[MeshConfig] = None

    def opt_help_plugins(self) -> None:
        """
        List the installed store, access and selector plugins, then exit.
        """
        from icpmesh.plugins import describePlugins

        for line in describePlugins():
            print(line)
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            config = loadConfig(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        self.meshConfig = config
        try:
            if self["bind"] is not None:
                config.httpAddress = config.icpAddress = self["bind"]
            if self["http-address"] is not None:
                config.httpAddress = self["http-address"]
            if self["icp-address"] is not None:
                config.icpAddress = self["icp-address"]
            if self["http-port"] is not None:
                config.httpPort = parsePortInt(self["http-port"])
            if self["icp-port"] is not None:
                config.icpPort = parsePortInt(self["icp-port"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["no-icp"]:
            config.icpPort = None
        if self["name"] is not None:
            config.visibleHostname = self["name"]
        if self["access-log"] is not None:
            config.settings["access_log"] = self["access-log"]
        for kind in PLUGIN_KINDS:
            name = self[kind]
            if name is not None:
                old = config.plugins[kind]
                config.plugins[kind] = PluginSection(
                    kind=kind,
                    name=name,
                    options=old.options if old.name == name else {},
                    filename="<command line>",
                    lineno=None,
                    config=config,
                )
        from twisted.internet.task import Clock

        from icpmesh.plugins import resolvePlugins

        # Build every plugin once against a fake clock, so that any mistake
        # in the file stops start-up here with its file and line.
        try:
            resolvePlugins(config, reactor=Clock(), build=True)
        except ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> Any:
    """
    Build the node's service; called by twistd.
    """
    from twisted.internet import reactor

    from icpmesh.service import makeMeshService, tuneGarbageCollector

    try:
        mesh = makeMeshService(options.meshConfig)
    except ConfigError as e:
        raise SystemExit(f"icpmesh: {e}")
    reactor.callWhenRunning(tuneGarbageCollector)
    return mesh
