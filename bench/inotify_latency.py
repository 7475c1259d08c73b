#!/usr/bin/env python3
"""How long after a host change inotify watchers hear of it (issue 11.1), and what the
host's own request costs meanwhile.

    .venv/bin/python bench/inotify_latency.py [--count 200]

Runs `kvpfs mount --simulate` in a temporary directory, watches `external/` with inotify
(ctypes, no tool), and for each of COUNT keys times: the host's SET of a new key until
IN_CREATE, a SET of a new value until IN_CLOSE_WRITE, and the DELETE until IN_DELETE (from
sending the request through the control socket). It also prints the host requests' own
round trips. Figures only, no targets: not part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import statistics
import struct
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import KvpfsProcess

IN_CREATE, IN_CLOSE_WRITE, IN_DELETE = 0x100, 0x8, 0x200
libc = ctypes.CDLL(None, use_errno=True)


class Watcher:
    """An inotify descriptor and the events read from it but not yet asked for.

    One read(2) returns every event queued: those not asked for yet stay here for
    the next `wait`, stamped with the time they were read.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.unread: deque[tuple[int, bytes, float]] = deque()  # (mask, name, read at)

    def wait(self, want: int, name: bytes, timeout: float = 10.0) -> float:
        """Wait for `want` on `name` (dropping the events before it); when it was read."""
        deadline = time.monotonic() + timeout
        while True:
            while self.unread:
                mask, got, read_at = self.unread.popleft()
                if mask & want and got == name:
                    return read_at
            ready, _, _ = select.select([self.fd], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                raise SystemExit(f"no event {want:#x} for {name!r} within {timeout} s")
            data, offset = os.read(self.fd, 65536), 0
            now = time.monotonic()
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                got = data[offset + 16: offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                self.unread.append((mask, got, now))


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (f"median {statistics.median(ms):7.2f} ms   p95 {ms[int(len(ms) * 0.95) - 1]:7.2f} ms"
            f"   max {ms[-1]:7.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        kvpfs = KvpfsProcess(Path(base)).start()
        try:
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if libc.inotify_add_watch(fd, bytes(kvpfs.path("external")),
                                      IN_CREATE | IN_CLOSE_WRITE | IN_DELETE) < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch")
            results: dict[str, list[float]] = {k: [] for k in (
                "new key -> IN_CREATE", "new value -> IN_CLOSE_WRITE", "delete -> IN_DELETE",
                "host SET round trip", "host DELETE round trip")}
            watcher = Watcher(fd)
            kvpfs.host("set", "external", "warm-up", "x")  # starts the echo helper
            watcher.wait(IN_CLOSE_WRITE, b"warm-up")
            for i in range(args.count):
                key = f"key{i}"
                for value, want, label in (("one", IN_CREATE, "new key -> IN_CREATE"),
                                           ("two", IN_CLOSE_WRITE,
                                            "new value -> IN_CLOSE_WRITE")):
                    started = time.monotonic()
                    kvpfs.host("set", "external", key, value)
                    results["host SET round trip"].append(time.monotonic() - started)
                    results[label].append(watcher.wait(want, key.encode()) - started)
                    if want == IN_CREATE:  # let its echo finish before the next change
                        watcher.wait(IN_CLOSE_WRITE, key.encode())
                started = time.monotonic()
                kvpfs.host("delete", "external", key)
                results["host DELETE round trip"].append(time.monotonic() - started)
                results["delete -> IN_DELETE"].append(
                    watcher.wait(IN_DELETE, key.encode()) - started)
            os.close(fd)
        finally:
            kvpfs.cleanup()
    print(f"kvpfs inotify echo latency, {args.count} keys, {os.cpu_count()} CPUs,"
          f" load {os.getloadavg()[0]:.2f}")
    for label, values in results.items():
        print(f"{label:30} {summary(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
