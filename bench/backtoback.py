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

All four (two daemons, two sizes) run at once. In each of REPEAT rounds every
one makes one burst of COUNT SETs of each kind, timed as a whole: wall time ÷
COUNT is what a request costs the host, work left over after a reply
included. Each burst starts once the previous daemon has gone idle and the
page cache has been written back (sync), and who goes first rotates; the
table gives the median over rounds ±half their range, and each ratio the
median of the rounds' ratios, so that the machine's drift (other programs)
hits what is compared alike. CPU: the daemon's CPU time per request, its
child processes' included (kvpfs's echo helper), from the burst's start until
it is idle again (so deferred work counts). Two kinds of burst:
one key changed COUNT times, and ten keys changed in turn. Prints a Markdown
table and the ratios; figures only, not a test.
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
    size: int
    host: EmulatedHost
    pid: int
    mnt: Path | None = None  # kvpfs's mount point
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
    # hv_kvp_daemon rewrites the whole pool file per SET (7.5 MB at 3,000 records): its
    # dirty pages are written back before the next burst, not during it (untimed).
    os.sync()
    subject.wall.setdefault(kind, []).append(wall / count)
    subject.cpu.setdefault(kind, []).append(cpu / count)


@contextlib.contextmanager
def daemons(size: int, workdir: Path, stack: contextlib.ExitStack) -> Iterator[list[Subject]]:
    """hv_kvp_daemon and kvpfs, each on its own emulated device with `size` records."""
    device, host = stack.enter_context(
        run_emulated_device(workdir / "emu-ref", host_timeout=300.0))
    write_pools(workdir / "ref-pools", size)
    ref = stack.enter_context(run_reference_daemon(device, workdir / "ref-pools", host))
    subjects = [Subject(REFERENCE, size, host, ref.pid)]
    device, host = stack.enter_context(
        run_emulated_device(workdir / "emu-kvpfs", host_timeout=300.0))
    write_pools(workdir / "kvpfs-pools", size)
    run = stack.enter_context(common.run_kvpfs(device, workdir / "kvpfs-pools",
                                               workdir / "kvpfs"))
    subjects.append(Subject(KVPFS, size, host, run.pid, run.mnt))
    yield subjects
    if not ref.alive():
        raise RuntimeError(f"hv_kvp_daemon died: {ref.log}")


def keys_of(size: int) -> dict[str, list[str]]:
    return {"one": [key_name(size // 2)], "ten": [key_name(size * i // 10) for i in range(10)]}


def measure(sizes: list[int], workdir: Path, repeat: int, count: int,
            profile: Path | None = None) -> list[Subject]:
    """Every daemon at every size up at once, taking turns burst by burst, so that the
    machine's drift hits sizes alike too (the flatness ratio compares them)."""
    with contextlib.ExitStack() as stack:
        subjects: list[Subject] = []
        for size in sizes:
            subjects += stack.enter_context(daemons(size, workdir / str(size), stack))
        for subject in subjects:  # warm up: start the echo helper, fill caches
            for i in range(20):
                subject.host.set(EXTERNAL, keys_of(subject.size)["one"][0], f"warm-up {i}")
        kvpfs = [s for s in subjects if s.name == KVPFS]
        with contextlib.ExitStack() as profiles:
            for subject in kvpfs:
                profiles.enter_context(maybe_profile(
                    subject.pid, profile / f"kvpfs-b2b-{subject.size}" if profile else None))
            run_bursts(subjects, repeat, count)
    return subjects


def run_bursts(subjects: list[Subject], repeat: int, count: int) -> None:
    for rep in range(repeat):
        for kind, _ in BURSTS:
            # The kernel knows the keys (a reader looked them up and read them).
            for subject in subjects:
                if subject.mnt is not None:
                    for key in keys_of(subject.size)[kind]:
                        (subject.mnt / "external" / key).read_bytes()
            shift = rep % len(subjects)  # each daemon goes first in turn
            for subject in subjects[shift:] + subjects[:shift]:
                burst(subject, kind, keys_of(subject.size)[kind], count, f"r{rep}")


def paired(a: list[float], b: list[float]) -> float:
    """The median of repeat-by-repeat ratios (each pair ran within one round)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


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
    with tempfile.TemporaryDirectory(prefix="kvpfs-b2b-") as base:
        print(f"# {time.strftime('%H:%M:%S')} sizes {sizes}", file=sys.stderr)
        subjects = measure(sizes, Path(base), args.repeat, args.count, args.profile)
    found = {(s.name, s.size): s for s in subjects}
    table = Table(
        "Back-to-back host SETs (time per request)",
        ["records", "burst", "kvpfs", "kvpfs CPU", "hv_kvp_daemon", "hv CPU",
         "kvpfs ÷ hv_kvp_daemon"],
        [f"Bursts of {args.count} SETs with no gap, timed whole; {args.repeat} rounds in which "
         "every daemon at every size makes one burst of each kind, each on its own emulated "
         "device, each starting once the one before is idle and the page cache written "
         "back; median ±half the range. CPU: the daemon's CPU time per request, its "
         "children's (kvpfs's echo helper) and deferred work included. kvpfs ÷ "
         "hv_kvp_daemon: the median of the rounds' ratios. "
         f"{os.cpu_count()} CPUs, {'unpinned' if args.cpus == 'all' else 'on CPU ' + args.cpus}"
         f", load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at the end"
         + (f"; kvpfs from {args.kvpfs_src}" if args.kvpfs_src else "") + "."],
    )
    for size in sizes:
        kv, ref = found[(KVPFS, size)], found[(REFERENCE, size)]
        for kind, label in BURSTS:
            table.add(f"{size:,}", label, fmt_stat(Stat.of(kv.wall[kind])),
                      fmt_time(statistics.median(kv.cpu[kind])),
                      fmt_stat(Stat.of(ref.wall[kind])),
                      fmt_time(statistics.median(ref.cpu[kind])),
                      f"{paired(kv.wall[kind], ref.wall[kind]):.2f}x")
    failures = [f"{s.name} answered {s.failed} SETs with an error at {s.size:,} records"
                for s in subjects if s.failed]
    if failures:
        table.notes.append("; ".join(failures) + ".")
    print(table.render())
    print()
    small, large = min(sizes), max(sizes)
    for kind, label in BURSTS:
        kv = found[(KVPFS, small)]
        line = (f"{label}: kvpfs ÷ hv_kvp_daemon at {small:,} records "
                f"{paired(kv.wall[kind], found[(REFERENCE, small)].wall[kind]):.2f}x")
        if large != small:
            big = found[(KVPFS, large)]
            line += (f"; kvpfs at {large:,} ÷ at {small:,} records "
                     f"{paired(big.wall[kind], kv.wall[kind]):.2f}x"
                     f" (CPU {paired(big.cpu[kind], kv.cpu[kind]):.2f}x)")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
