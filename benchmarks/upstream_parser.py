#!/usr/bin/env python3
"""
What the upstream client hook (L{icpmesh.upstreamclient}) costs per
response: Twisted's own C{HTTP11ClientProtocol} against
L{icpmesh.upstreamclient.UpstreamClientProtocol}, parsing the same
keep-alive responses (1 KiB bodies, typical origin headers) on one
in-memory connection.  No sockets, no reactor: only the client's request
writing and response parsing.

This is a script that prints figures, not a test.  The two protocols take
turns round after round; the minimum and the median microseconds per
response of each are printed.

Usage::

    python benchmarks/upstream_parser.py [--responses 20000] [--rounds 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web._newclient import HTTP11ClientProtocol, Request  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from icpmesh.upstreamclient import InterimHeaders, UpstreamClientProtocol  # noqa: E402

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nDate: Tue, 24 Nov 2026 04:00:00 GMT\r\nServer: nginx\r\n"
    b"Content-Type: text/plain\r\nCache-Control: max-age=3600\r\n"
    b"Last-Modified: Tue, 24 Nov 2026 03:00:00 GMT\r\nETag: \"abc\"\r\n"
    b"Connection: keep-alive\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
)


def perResponse(protocolClass: Any, headersClass: Any, count: int) -> float:
    """
    Microseconds per request and response over one connection.
    """
    protocol = protocolClass(lambda p: None)
    protocol.makeConnection(StringTransport())
    started = time.perf_counter()
    for _ in range(count):
        headers = headersClass()
        headers.addRawHeader(b"host", b"origin.test")
        responses: list[Any] = []
        protocol.request(Request(b"GET", b"/x", headers, None, persistent=True)).addCallback(
            responses.append
        )
        protocol.dataReceived(RESPONSE)
        responses[0].deliverBody(Protocol())
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=16)
    options = parser.parse_args()
    contenders = {
        "twisted": (HTTP11ClientProtocol, Headers),
        "icpmesh": (UpstreamClientProtocol, InterimHeaders),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(options.rounds):
        for name, (protocolClass, headersClass) in contenders.items():
            results[name].append(perResponse(protocolClass, headersClass, options.responses))
    for name, values in results.items():
        values.sort()
        print(f"{name:8} min {values[0]:6.1f} us  median {values[len(values) // 2]:6.1f} us per response")


if __name__ == "__main__":
    main()
