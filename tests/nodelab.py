"""
Real processes on loopback for end-to-end tests: an icpmesh node started with
twistd as a user would start it, and a counting origin server.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def freePort(kind: int = socket.SOCK_STREAM, address: str = "127.0.0.1") -> int:
    """
    A port number free on C{address} for C{kind} right now.
    """
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def twistdCommand() -> list[str]:
    """
    The installed C{twistd} script under tox (C{ICPMESH_INSTALLED}), so the
    drop-in is found as users find it; else twistd run from the checkout.
    """
    if os.environ.get("ICPMESH_INSTALLED"):
        return [os.path.join(os.path.dirname(sys.executable), "twistd")]
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def checkoutEnv() -> dict[str, str]:
    env = dict(os.environ)
    if not os.environ.get("ICPMESH_INSTALLED"):
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Origin:
    """
    A threaded HTTP origin on loopback.  C{routes} maps a path to
    C{(status, headers, body)}; unknown paths get 200 with max-age=3600.

    @ivar counts: requests per path.
    @ivar requests: C{(method, path, headers)} in arrival order.
    @ivar uploads: C{(method, path, size, sha256 hex digest)} of each request
        body (Content-Length or chunked), in arrival order.
    @ivar received: request body bytes read so far, counted as they arrive.
    """

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.counts: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.uploads: list[tuple[str, str, int, str]] = []
        self.received = 0
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                origin.counts[self.path] = origin.counts.get(self.path, 0) + 1
                origin.requests.append((self.command, self.path, dict(self.headers)))
                origin.readBody(self)
                status, headers, body = origin.routes.get(
                    self.path,
                    (200, {"Cache-Control": "max-age=3600", "Content-Type": "text/plain"},
                     b"body of " + self.path.encode()),
                )
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = handle_one

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.address = address
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def readBody(self, handler: Any) -> None:
        """
        Read a request's body in pieces (chunked or by Content-Length),
        counting the bytes as they arrive, and record its size and digest.
        """
        digest = hashlib.sha256()
        size = 0

        def take(n: int) -> None:
            nonlocal size
            while n:
                data = handler.rfile.read(min(n, 65536))
                if not data:
                    raise ConnectionError("request body cut short")
                digest.update(data)
                size += len(data)
                self.received += len(data)
                n -= len(data)

        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(n)
                handler.rfile.readline()
        else:
            take(int(handler.headers.get("Content-Length") or 0))
        if size or handler.command in ("POST", "PUT"):
            self.uploads.append((handler.command, handler.path, size, digest.hexdigest()))

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Node:
    """
    C{twistd -n icpmesh ...} in a subprocess, on loopback.
    """

    def __init__(self, workdir: str, address: str = "127.0.0.1", config: Optional[str] = None,
                 extraArgs: tuple[str, ...] = ()) -> None:
        workdir = os.path.abspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.address = address
        self.httpPort = freePort(socket.SOCK_STREAM, address)
        self.icpPort = freePort(socket.SOCK_DGRAM, address)
        args = twistdCommand() + ["-n", "--pidfile=", "--logfile", os.path.join(workdir, "twistd.log"),
                                  "icpmesh", "--bind", address,
                                  "--http-port", str(self.httpPort), "--icp-port", str(self.icpPort)]
        if config is not None:
            path = os.path.join(workdir, "icpmesh.conf")
            with open(path, "w") as f:
                f.write(config)
            args += ["--config", path]
        args += list(extraArgs)
        self.process = subprocess.Popen(args, cwd=workdir, env=checkoutEnv(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.waitForHTTP()

    def waitForHTTP(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("node exited: " + self.log())
            try:
                socket.create_connection((self.address, self.httpPort), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("node did not start: " + self.log())

    def log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "twistd.log")) as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def icpExchange(data: bytes, to: tuple[str, int], source: str = "127.0.0.1",
                timeout: float = 2.0) -> Optional[bytes]:
    """
    Send one datagram from C{source} and return the first reply (or None).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(data, to)
        try:
            return s.recvfrom(65536)[0]
        except socket.timeout:
            return None


def curl(*args: str, proxy: Optional[str] = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    command = ["curl", "-sS", "--max-time", "20", "-D", "-"]
    if proxy:
        command += ["--proxy", proxy]
    return subprocess.run(command + list(args), capture_output=True, timeout=timeout)


def waitFor(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
