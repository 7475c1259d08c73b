"""Filesystem operations on a mounted kvpfs, beside tmpfs and a minimal pyfuse3 filesystem.

The three targets hold the same N files (kvpfs: the `guest` directory of a
pool with N records). Each repeat runs every operation as a short batch on
each target in turn, so drift of the (shared, virtual) machine hits all three
alike. Calls are not interleaved between filesystems one by one: that would
make each server's work after a reply (RELEASE comes after `close` returns)
compete with the other servers' requests instead of overlapping this process's
next call, as it does for any program calling one filesystem. Operations are
plain syscalls from this process (what `stat`, `cat`, `echo >` and `ls` do,
without forking a program):

* stat, cached: `stat(2)` of one file again and again, within the entry and
  attribute timeouts, so the kernel answers from its cache;
* stat, expired: `stat(2)` of files whose entry and attribute timeouts (1 s in
  kvpfs and the floor) ran out: one LOOKUP round trip each, what a script
  that looks at a key every few seconds gets (tmpfs has no timeouts);
* open+read+close: `cat` of one 64-byte file (OPEN, READ, FLUSH if the
  filesystem has one, RELEASE), cached entry; and the same on expired entries
  (one LOOKUP more);
* write: `echo value > guest/key` of an existing key: open(O_WRONLY|O_TRUNC),
  write, close (kvpfs commits the value to the pool file at close);
* ls: `os.listdir` of the directory (OPENDIR, READDIRPLUS until done,
  RELEASEDIR).

The directory is held open (and files named relative to it), so the
directory's own lookup is never part of a measurement.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    VALUE_BYTES,
    Stat,
    key_name,
    run_floorfs,
    run_kvpfs,
    timed_batch,
    tmpfs_dir,
    write_pools,
)
from bench.profiling import maybe_profile

TMPFS, FLOOR, KVPFS = "tmpfs", "pyfuse3 floor", "kvpfs"
TARGETS = (TMPFS, FLOOR, KVPFS)
OPS = (
    ("stat_cached", "stat, cached"),
    ("stat_expired", "stat, expired entry (LOOKUP)"),
    ("read", "open+read+close"),
    ("read_expired", "open+read+close, expired entry"),
    ("write", "echo value > key"),
    ("ls", "ls (listdir)"),
)


TTL = 1.0  # entry and attribute timeouts of kvpfs (fs.TTL) and of the floor
EXPIRY_WAIT = TTL + 0.1
EXPIRED_SAMPLES = 20  # files per expired round and operation (fewer in small directories)


@dataclass
class FsConfig:
    repeat: int
    batch_seconds: float
    profile_dir: Path | None = None


@dataclass
class FsResult:
    size: int
    ops: dict[str, dict[str, Stat]] = field(default_factory=dict)  # target -> op -> Stat


class _Target:
    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.read_name = key_name(size // 2)
        self.write_name = key_name(size // 2 + 1 if size > 1 else 0)
        self.writes = 0

    def close(self) -> None:
        os.close(self.dir_fd)

    def stat(self, name: str | None = None) -> None:
        os.stat(name or self.read_name, dir_fd=self.dir_fd)

    def read(self, name: str | None = None) -> None:
        name = name or self.read_name
        fd = os.open(name, os.O_RDONLY, dir_fd=self.dir_fd)
        try:
            data = os.read(fd, 65536)
        finally:
            os.close(fd)
        if len(data) != VALUE_BYTES:
            raise RuntimeError(f"read {len(data)} bytes from {self.directory}/{name}")

    def write(self) -> None:
        self.writes += 1
        fd = os.open(self.write_name, os.O_WRONLY | os.O_TRUNC, dir_fd=self.dir_fd)
        try:
            os.write(fd, b"value %d\n" % (self.writes % 2))
        finally:
            os.close(fd)

    def ls(self) -> None:
        names = os.listdir(self.directory)
        if len(names) != self.size:
            raise RuntimeError(f"ls {self.directory}: {len(names)} names, expected {self.size}")


def _each(op: Callable[[str], None], names: list[str]) -> float:
    """Median seconds of `op(name)` over `names`, each call timed alone."""
    times = []
    for name in names:
        start = time.perf_counter()
        op(name)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _expired_names(size: int, busy: set[str]) -> tuple[list[str], list[str]]:
    """Two disjoint sets of files, one for stat and one for reads, spread over the pool and
    avoiding the files the cached batches use."""
    candidates = [key_name(i) for i in range(size) if key_name(i) not in busy]
    count = min(EXPIRED_SAMPLES, len(candidates) // 2)
    step = len(candidates) // (2 * count)
    names = candidates[::step][: 2 * count]
    return names[0::2], names[1::2]


def run_fs(device: str, size: int, workdir: Path, config: FsConfig) -> FsResult:
    base = workdir / f"fs-{size}"
    pool_dir = base / "pools"
    write_pools(pool_dir, size)
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in TARGETS}
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(run_kvpfs(device, pool_dir, base / "kvpfs"))
        directories = {
            TMPFS: stack.enter_context(tmpfs_dir(size)),
            FLOOR: stack.enter_context(run_floorfs(size, base)),
            KVPFS: run.mnt / "guest",
        }
        targets = {name: _Target(path, size) for name, path in directories.items()}
        for target in targets.values():
            stack.callback(target.close)
            # Untimed warm-up of every operation (first calls create nodes, worker threads...).
            for call in (target.ls, target.stat, target.read, target.write):
                timed_batch(call, min_seconds=0.05)
        profile = (config.profile_dir / f"kvpfs-fs-{size}") if config.profile_dir else None
        stack.enter_context(maybe_profile(run.pid, profile))
        busy = {name for t in targets.values() for name in (t.read_name, t.write_name)}
        stat_names, read_names = _expired_names(size, busy)
        for _ in range(config.repeat):
            # ls first: it refreshes every entry; the other batches touch only two files, and
            # they keep the machine busy while the rest expires (no idle CPU before the
            # expired rounds, which would make their first requests slower).
            for name, target in targets.items():
                samples[name].setdefault("ls", []).append(
                    timed_batch(target.ls, min_seconds=config.batch_seconds))
            refreshed = time.monotonic()
            for op in ("stat_cached", "read", "write"):
                for name, target in targets.items():
                    call = {"stat_cached": target.stat, "read": target.read,
                            "write": target.write}[op]
                    samples[name].setdefault(op, []).append(
                        timed_batch(call, min_seconds=config.batch_seconds))
            time.sleep(max(0.0, refreshed + EXPIRY_WAIT - time.monotonic()))
            for op, names in (("stat_expired", stat_names), ("read_expired", read_names)):
                for name, target in targets.items():
                    call = target.stat if op == "stat_expired" else target.read
                    samples[name].setdefault(op, []).append(_each(call, names))
    result = FsResult(size)
    result.ops = {t: {op: Stat.of(v) for op, v in ops.items()} for t, ops in samples.items()}
    return result
