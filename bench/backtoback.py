#!/usr/bin/env python3
"""Back-to-back host SETs with a new value each time: kvpfs beside hv_kvp_daemon.

    .venv/bin/python bench/backtoback.py [--sizes 10,3000] [--repeat 9] [--count 300]

A host that pushes changed values as fast as the daemon answers, with no gap
between one reply and the next request: the case where the work kvpfs does
after a change (inotify echo, kernel cache invalidations) competes with the
host's next request. Each daemon runs on its own instance of the emulated
/dev/vmbus/hv_kvp with `size` records in pools 0, 1 and 3 (as bench/run.py
does), and the kernel knows the key: it was read through the mount, so kvpfs
owes an invalidation as well as an echo for it.

Per repeat and daemon, one burst of COUNT SETs is timed as a whole: wall time
÷ COUNT is what a request costs the host, work left over after a reply
included. The daemons alternate bursts (the order flips every repeat), each
burst starting once the previous daemon has gone idle; the table gives the
median over repeats ±half their range, and the ratio the median of the
repeats' ratios (each pair of bursts ran back to back). CPU: the daemon's CPU time per
request, its child processes' included (kvpfs's echo helper), from the burst's
start until it is idle again (so deferred work counts). Two bursts: one key
changed COUNT times, and ten keys changed in
turn. Prints a Markdown table and the ratios; figures only, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.common import Stat, Table, cpu_seconds, fmt_stat, fmt_time, key_name, write_pools
from bench.profiling import maybe_profile
from emulation.kvphost import EmulatedHost, run_emulated_device
from emulation.refdaemon import run_reference_daemon
from kvpfs.wire.protocol import Status

EXTERNAL = 0
KVPFS, REFERENCE = "kvpfs", "hv_kvp_daemon"
BURSTS = (("one", "SET of one key, new value each time"),
          ("ten", "SET of ten keys in turn, new value each time"))
IDLE_GAP = 0.02  # a daemon is idle once its CPU time stops growing for this long
IDLE_BOUND = 5.0


@dataclass(eq=False)
class Subject:
    name: str
    host: EmulatedHost
    pid: int
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    failed: int = 0  # SETs answered with an error status (counted, not retried)


def family_cpu(pid: int) -> float:
    """CPU time of the process and of its live children (kvpfs's echo helper)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                total += sum(cpu_seconds(int(child)) for child in fh.read().split())
    return total


def wait_idle(pid: int) -> float:
    """Wait until the process's (and its children's) CPU time stops growing; return it."""
    deadline = time.monotonic() + IDLE_BOUND
    last = family_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(IDLE_GAP)
        now = family_cpu(pid)
        if now - last < 1e-4:  # under 0.1 ms of CPU in IDLE_GAP: nothing deferred is left
            return now
        last = now
    return last


def burst(subject: Subject, kind: str, keys: list[str], count: int, tag: str) -> None:
    host = subject.host
    cpu0 = wait_idle(subject.pid)
    start = time.perf_counter()
    for i in range(count):
        if host.set(EXTERNAL, keys[i % len(keys)], f"{tag} {i}") != Status.S_OK:
            subject.failed += 1
    wall = time.perf_counter() - start
    cpu = wait_idle(subject.pid) - cpu0
    subject.wall.setdefault(kind, []).append(wall / count)
    subject.cpu.setdefault(kind, []).append(cpu / count)


@contextlib.contextmanager
def daemons(size: int, workdir: Path) -> Iterator[tuple[list[Subject], Path]]:
    """hv_kvp_daemon and kvpfs, each on its own emulated device with `size` records."""
    with contextlib.ExitStack() as stack:
        device, host = stack.enter_context(
            run_emulated_device(workdir / "emu-ref", host_timeout=300.0))
        write_pools(workdir / "ref-pools", size)
        ref = stack.enter_context(run_reference_daemon(device, workdir / "ref-pools", host))
        subjects = [Subject(REFERENCE, host, ref.pid)]
        device, host = stack.enter_context(
            run_emulated_device(workdir / "emu-kvpfs", host_timeout=300.0))
        write_pools(workdir / "kvpfs-pools", size)
        run = stack.enter_context(common.run_kvpfs(device, workdir / "kvpfs-pools",
                                                   workdir / "kvpfs"))
        subjects.append(Subject(KVPFS, host, run.pid))
        yield subjects, run.mnt
        if not ref.alive():
            raise RuntimeError(f"hv_kvp_daemon died: {ref.log}")


def measure(size: int, workdir: Path, repeat: int, count: int,
            profile: Path | None = None) -> dict[str, Subject]:
    keys = {"one": [key_name(size // 2)],
            "ten": [key_name(size * i // 10) for i in range(10)]}
    with daemons(size, workdir) as (subjects, mnt):
        for subject in subjects:  # warm up: start the echo helper, fill caches
            for i in range(20):
                subject.host.set(EXTERNAL, keys["one"][0], f"warm-up {i}")
        kvpfs_pid = next(s.pid for s in subjects if s.name == KVPFS)
        with maybe_profile(kvpfs_pid, profile / f"kvpfs-b2b-{size}" if profile else None):
            run_bursts(subjects, mnt, keys, repeat, count)
    return {subject.name: subject for subject in subjects}


def run_bursts(subjects: list[Subject], mnt: Path, keys: dict[str, list[str]], repeat: int,
               count: int) -> None:
    for rep in range(repeat):
        for kind, _ in BURSTS:
            # The kernel knows the keys (a reader looked them up and read them).
            for key in keys[kind]:
                (mnt / "external" / key).read_bytes()
            order = subjects if rep % 2 == 0 else subjects[::-1]
            for subject in order:
                burst(subject, kind, keys[kind], count, f"r{rep}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,3000",
                        help="records in pools 0, 1 and 3 (default 10,3000)")
    parser.add_argument("--repeat", type=int, default=9, help="bursts per daemon (default 9)")
    parser.add_argument("--count", type=int, default=300, help="SETs per burst (default 300)")
    parser.add_argument("--cpus", default="0",
                        help="CPUs everything runs on, e.g. 0 or 0,1, or 'all' (default 0,"
                             " as bench/run.py)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample kvpfs with py-spy (bench extra) and write its stacks and"
                             " a summary to DIR (timings are then not comparable)")
    parser.add_argument("--kvpfs-src", type=Path, metavar="DIR",
                        help="run the kvpfs package found in DIR instead of this checkout's")
    args = parser.parse_args()
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    if args.cpus != "all":
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    if args.kvpfs_src:
        common.KVPFS_SOURCE = args.kvpfs_src.resolve()
    load = os.getloadavg()[0]
    results: dict[int, dict[str, Subject]] = {}
    with tempfile.TemporaryDirectory(prefix="kvpfs-b2b-") as base:
        for size in sizes:
            print(f"# {time.strftime('%H:%M:%S')} {size:,} records", file=sys.stderr)
            results[size] = measure(size, Path(base) / str(size), args.repeat, args.count,
                                    args.profile)
    table = Table(
        "Back-to-back host SETs (time per request)",
        ["records", "burst", "kvpfs", "kvpfs CPU", "hv_kvp_daemon", "hv CPU",
         "kvpfs ÷ hv_kvp_daemon"],
        [f"Bursts of {args.count} SETs with no gap, timed whole; {args.repeat} repeats per "
         "daemon, alternating, median ±half the range. CPU: the daemon's CPU time per "
         "request, its children's (kvpfs's echo helper) and deferred work included. "
         "kvpfs ÷ hv_kvp_daemon: the median of the repeats' ratios. "
         f"{os.cpu_count()} CPUs, {'unpinned' if args.cpus == 'all' else 'on CPU ' + args.cpus}"
         f", load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at the end"
         + (f"; kvpfs from {args.kvpfs_src}" if args.kvpfs_src else "") + "."],
    )
    ratios: dict[tuple[int, str], float] = {}
    for size, by_name in results.items():
        kv, ref = by_name[KVPFS], by_name[REFERENCE]
        for kind, label in BURSTS:
            k, r = Stat.of(kv.wall[kind]), Stat.of(ref.wall[kind])
            # Repeat by repeat: the two bursts ran back to back, so the machine's drift
            # (other programs) hits both alike.
            ratios[(size, kind)] = statistics.median(
                a / b for a, b in zip(kv.wall[kind], ref.wall[kind], strict=True))
            table.add(f"{size:,}", label, fmt_stat(k), fmt_time(statistics.median(kv.cpu[kind])),
                      fmt_stat(r), fmt_time(statistics.median(ref.cpu[kind])),
                      f"{ratios[(size, kind)]:.2f}x")
    failures = [f"{name} answered {subject.failed} SETs with an error at {size:,} records"
                for size, by_name in results.items() for name, subject in by_name.items()
                if subject.failed]
    if failures:
        table.notes.append("; ".join(failures) + ".")
    print(table.render())
    print()
    small, large = min(sizes), max(sizes)
    for kind, label in BURSTS:
        line = f"{label}: kvpfs ÷ hv_kvp_daemon at {small:,} records {ratios[(small, kind)]:.2f}x"
        if large != small:
            flat = (statistics.median(results[large][KVPFS].wall[kind])
                    / statistics.median(results[small][KVPFS].wall[kind]))
            line += f"; kvpfs at {large:,} ÷ at {small:,} records {flat:.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
