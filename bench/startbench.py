"""Start-up time to a ready mount and resident memory of the kvpfs process.

Each repeat starts a fresh `kvpfs mount` on the emulated device with N records
in each of pools 0, 1 and 3. Start-up is the time from spawning the process
(interpreter start and imports included) to systemd's READY=1, which kvpfs
sends once the pools are loaded, the device registered and the filesystem
mounted. Memory is VmRSS at that moment, and again after every file of the
three filled pools has been listed and stat'ed through the mount (kvpfs then
holds a node per file); VmHWM is the peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.common import Stat, rss_bytes, run_kvpfs, write_pools

DIRECTORIES = ("external", "guest", "auto_external")


@dataclass
class StartResult:
    size: int
    ready: Stat
    rss_ready: Stat
    rss_used: Stat
    hwm: int


def run_start(device: str, size: int, workdir: Path, repeat: int) -> StartResult:
    base = workdir / f"start-{size}"
    pool_dir = base / "pools"
    write_pools(pool_dir, size)
    ready: list[float] = []
    rss_ready: list[float] = []
    rss_used: list[float] = []
    hwm = 0
    for _ in range(repeat):
        with run_kvpfs(device, pool_dir, base) as run:
            ready.append(run.ready_seconds)
            rss_ready.append(rss_bytes(run.pid)[0])
            for name in DIRECTORIES:
                count = 0
                with os.scandir(run.mnt / name) as entries:
                    for entry in entries:
                        entry.stat()
                        count += 1
                if count != size:
                    raise RuntimeError(f"{name}: {count} files, expected {size}")
            rss, peak = rss_bytes(run.pid)
            rss_used.append(rss)
            hwm = max(hwm, peak)
    return StartResult(size, Stat.of(ready), Stat.of(rss_ready), Stat.of(rss_used), hwm)
