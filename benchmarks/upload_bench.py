#!/usr/bin/env python3
"""
Upload benchmark: a large PUT through an icpmesh node, on loopback.

This is a script that prints figures, not a test.  It uploads C{--size}
MiB with C{curl -T FILE} (Content-Length, and curl's C{Expect:
100-continue}) to a threaded origin that reads the body in pieces and
hashes it, straight and through nodes started with twistd from one or more
checkouts (C{--checkout}, default: this one), taking turns round after
round.  Per run it prints:

 - C{s}: wall time of the upload (until curl has the response);
 - C{MiB/s}: size over that time;
 - C{first}: seconds from the start until the origin had its first body
   byte (a node that buffers the whole body first shows about the whole
   upload time here);
 - C{rss+}: growth of the node's peak resident set size (VmHWM) during
   the run, in MiB;
 - C{ok}: the origin's SHA-256 of the body matched.

Example::

    python benchmarks/upload_bench.py --size 200 --rounds 3 --checkout . --checkout /work/main
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.nodelab import Origin, freePort  # noqa: E402


def startNode(checkout: str, workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    port = freePort()
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    command = [sys.executable, "-c",
               "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "--logfile", os.path.join(workdir, "twistd.log"),
               "icpmesh", "--bind", "127.0.0.1", "--http-port", str(port), "--no-icp"]
    process = subprocess.Popen(command, cwd=workdir, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"node from {checkout} did not start")


def peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def upload(origin: Origin, path: str, url: str, proxy: str | None) -> tuple[float, float]:
    """
    One upload; returns (seconds, seconds until the origin's first byte).
    """
    start = origin.received
    first: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if origin.received > start:
                first.append(time.monotonic())
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    command = ["curl", "-sS", "-o", "/dev/null", "--max-time", "600", "-T", path, url]
    if proxy:
        command += ["-x", proxy]
    began = time.monotonic()
    watcher.start()
    subprocess.run(command, check=True)
    ended = time.monotonic()
    done.set()
    watcher.join()
    return ended - began, (first[0] - began) if first else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100, help="MiB to upload (default 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkout", action="append", help="checkout to run a node from (repeatable)")
    args = parser.parse_args()
    checkouts = args.checkout or [ROOT]
    size = args.size * 1024 * 1024
    work = tempfile.mkdtemp(prefix="upload-bench-")
    path = os.path.join(work, "body")
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        block = os.urandom(1024 * 1024)
        for i in range(args.size):
            piece = hashlib.sha256(i.to_bytes(4, "big")).digest() + block[32:]
            f.write(piece)
            digest.update(piece)
    origin = Origin()
    nodes = {}
    for n, checkout in enumerate(checkouts):
        workdir = os.path.join(work, f"node{n}")
        os.makedirs(workdir)
        nodes[checkout] = startNode(checkout, workdir)
    setups: list[tuple[str, str | None, int | None]] = [("direct", None, None)]
    for checkout, (process, port) in nodes.items():
        setups.append((checkout, f"http://127.0.0.1:{port}", process.pid))
    results: dict[str, list[tuple[float, float, float, bool]]] = {name: [] for name, _, _ in setups}
    try:
        for r in range(args.rounds):
            order = setups[r % len(setups):] + setups[:r % len(setups)]
            for name, proxy, pid in order:
                url = origin.url(f"/upload-{r}")
                before = peak(pid) if pid else 0
                seconds, first = upload(origin, path, url, proxy)
                growth = (peak(pid) - before) / 1048576 if pid else 0.0
                ok = origin.uploads[-1][2:] == (size, digest.hexdigest())
                results[name].append((seconds, first, growth, ok))
                print(f"round {r + 1} {name:>30}: {seconds:6.2f} s {args.size / seconds:7.1f} MiB/s "
                      f"first {first:6.3f} s rss+ {growth:6.1f} MiB ok={ok}", flush=True)
    finally:
        for process, _ in nodes.values():
            process.terminate()
            process.wait()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians over {args.rounds} rounds, {args.size} MiB PUT:")
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        first = statistics.median(r[1] for r in runs)
        growth = max(r[2] for r in runs)
        print(f"{name:>30}: {seconds:6.2f} s {args.size / seconds:7.1f} MiB/s first {first:6.3f} s "
              f"max rss+ {growth:6.1f} MiB all ok={all(r[3] for r in runs)}")


if __name__ == "__main__":
    main()
