#!/usr/bin/env python3
"""Blocked readers of /.events: what they cost kvpfs, and how fast a killed one ends.

    .venv/bin/python bench/feedbench.py [--counts 0,32,300,1000] [--kills 10]

Runs as root. For each count of `cat MNT/.events` readers blocked at once (root's, so
that no per-user limit applies; the total limit is events.WAITING_MAX), it prints
kvpfs's resident memory, its CPU use while the readers wait (the interrupt watcher
looks at them), the time of a root `stat` on the mount, and how long a blocked
reader takes to end after SIGKILL and after SIGINT (median and worst of --kills).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, rss_bytes
from tests.conftest import KvpfsProcess


def in_feed_read(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() == "request_wait_answer"
    except OSError:
        return False


def wait_blocked(readers: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(in_feed_read(r.pid) for r in readers):
        if time.monotonic() > deadline:
            raise SystemExit("readers did not block in time")
        time.sleep(0.05)


def end_time(kvpfs: KvpfsProcess, sig: int) -> float:
    reader = subprocess.Popen(["cat", str(kvpfs.path(".events"))], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_blocked([reader])
    started = time.monotonic()
    reader.send_signal(sig)
    reader.wait(30)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,32,300,1000")
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    base = Path(tempfile.mkdtemp(prefix="kvpfs-feedbench-", dir="/tmp"))
    kvpfs = KvpfsProcess(base).start()
    pid = kvpfs.proc.pid
    readers: list[subprocess.Popen] = []
    print(f"{'readers':>8} {'RSS MB':>8} {'CPU %':>7} {'stat ms':>8} "
          f"{'KILL med/max ms':>16} {'INT med/max ms':>15}")
    try:
        for count in counts:
            while len(readers) < count:
                readers.append(subprocess.Popen(["cat", str(kvpfs.path(".events"))],
                                                stdout=subprocess.DEVNULL))
            wait_blocked(readers)
            time.sleep(1.0)  # let the watcher settle
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(5.0)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
            started = time.monotonic()
            os.stat(kvpfs.path("guest"))  # lookup + getattr through the kernel
            os.listdir(kvpfs.path("guest"))
            stat_ms = (time.monotonic() - started) * 1000
            kills = [end_time(kvpfs, signal.SIGKILL) * 1000 for _ in range(args.kills)]
            ints = [end_time(kvpfs, signal.SIGINT) * 1000 for _ in range(args.kills)]
            rss = rss_bytes(pid)[0] / 2**20
            print(f"{count:>8} {rss:>8.1f} {cpu:>7.1f} {stat_ms:>8.2f} "
                  f"{statistics.median(kills):>8.0f}/{max(kills):<7.0f} "
                  f"{statistics.median(ints):>7.0f}/{max(ints):<7.0f}", flush=True)
    finally:
        for reader in readers:
            reader.kill()
        for reader in readers:
            reader.wait(30)
        kvpfs.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
