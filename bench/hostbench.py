"""Host transactions through the emulated /dev/vmbus/hv_kvp, kvpfs beside hv_kvp_daemon.

Each daemon runs on its own instance of the emulated device (the one the
differential tests use), with its own fresh copy of the same pool directory
(`size` records in pools 0, 1 and 3), and gets the same host requests from
`EmulatedHost`. The daemons take turns every few requests, so a slow moment of
the (shared, virtual) machine hits both alike. Per repeat, on pool 0
(external):

* SET of `batch` new keys (each appended), SET of an existing key (the
  middle record; it was read through the mount first, so kvpfs also pays for
  invalidating the kernel's cache), GET of that key, then DELETE of the new
  keys newest first (each is the last record: nothing to shift);
* DELETE of the first record, which shifts every later record one slot up
  (order is kept, so this is O(records) in any daemon); each is followed by an
  untimed SET that appends the key again, so the pool keeps its size;
* one full ENUMERATE pass of pool 0, and passes over pool 2 (intrinsic values).

Times are wall-clock per host transaction as the host sees it (each request
timed alone; per repeat the median of a batch or of a pass's requests, and for
a full pass also its total); CPU is the daemon process's own CPU time (all
threads) per transaction, averaged over the batch. End-to-end latencies use
pools 1 and 3, which the rest never changes.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.common import (
    REPO,
    Stat,
    cpu_seconds,
    key_name,
    rss_bytes,
    run_kvpfs,
    stop_process,
    value_text,
    write_pools,
)
from bench.profiling import maybe_profile
from emulation.kvphost import EmulatedHost, run_emulated_device
from emulation.refdaemon import run_reference_daemon
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.storage.poolfile import PoolFile, pool_path
from kvpfs.storage.records import KEY_FIELD, RECORD_SIZE
from kvpfs.wire.protocol import Status

KVPFS = "kvpfs"
REFERENCE = "hv_kvp_daemon"

# (id, label) in table order. DELETE of the first record is O(records) by design.
OPS = (
    ("set_new", "SET, new key"),
    ("set_existing", "SET, existing key"),
    ("delete_last", "DELETE, newest key (last record)"),
    ("get", "GET"),
    ("enumerate", "ENUMERATE pool 0, per request of a full pass"),
    ("intrinsic", "ENUMERATE pool 2 (intrinsic), per request of a pass"),
    ("delete_first", "DELETE, first record (shifts all later ones)"),
)
FLAT_OPS = tuple(op for op, _ in OPS if op != "delete_first")
E2E = (
    ("guest_to_host", "guest write → host's next ENUMERATE shows it"),
    ("host_to_guest", "host SET → reader gets the new value"),
)
EXTERNAL, GUEST, AUTO, AUTO_EXTERNAL = 0, 1, 2, 3
PASS_REQUESTS = 500
ROUND = 25  # requests a daemon gets before the other one's turn


@dataclass
class HostResult:
    daemon: str
    size: int
    ops: dict[str, Stat] = field(default_factory=dict)
    cpu: dict[str, Stat] = field(default_factory=dict)
    enumerate_pass: Stat | None = None
    e2e: dict[str, Stat] = field(default_factory=dict)
    rss: int = 0


@dataclass
class HostConfig:
    repeat: int
    pass_repeat: int  # full ENUMERATE passes (the first pass_repeat repeats do one)
    batch: int  # host requests per timed batch
    first_batch: int  # DELETE-first requests per repeat (each shifts the whole pool)
    intrinsic_passes: int
    e2e_samples: int
    profile_dir: Path | None = None


class _Guest(Protocol):
    """How a guest program writes pool 1 and reads pool 3 next to a given daemon."""

    def write(self, key: str, slot: int, value: str) -> None: ...

    def read(self, key: str, slot: int) -> str: ...


@dataclass(eq=False)
class _Subject:
    """One daemon under measurement, on its own emulated device."""

    result: HostResult
    host: EmulatedHost
    pid: int
    guest: _Guest
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    passes: list[float] = field(default_factory=list)
    e2e: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)


Step = Callable[[_Subject], object]


def _check(status: int, what: str) -> None:
    if status != Status.S_OK:
        raise RuntimeError(f"{what}: host got status {status:#x}")


class _KvpfsGuest:
    """Through the mount: `echo value > guest/key`, `cat auto_external/key`."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt

    def write(self, key: str, slot: int, value: str) -> None:
        fd = os.open(self.mnt / "guest" / key, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode() + b"\n")
        finally:
            os.close(fd)

    def read(self, key: str, slot: int) -> str:
        fd = os.open(self.mnt / "auto_external" / key, os.O_RDONLY)
        try:
            return os.read(fd, 4096).decode()
        finally:
            os.close(fd)


class _PoolFileGuest:
    """What tools do beside hv_kvp_daemon: write the record in the pool file under the
    locks (as kvpfs.storage.poolfile does), read the record from the file."""

    def __init__(self, pool_dir: Path) -> None:
        self.pool_dir = pool_dir
        self.guest_pool = PoolFile(pool_path(pool_dir, GUEST))
        self.guest_pool.open()
        self.read_fd = os.open(pool_path(pool_dir, AUTO_EXTERNAL), os.O_RDONLY)

    def write(self, key: str, slot: int, value: str) -> None:
        with self.guest_pool.locked():
            self.guest_pool.write_record(slot, key.encode(), value.encode())

    def read(self, key: str, slot: int) -> str:
        record = os.pread(self.read_fd, RECORD_SIZE, slot * RECORD_SIZE)
        return record[KEY_FIELD:].split(b"\0", 1)[0].decode()

    def close(self) -> None:
        self.guest_pool.close()
        os.close(self.read_fd)


def _timed_rounds(subjects: list[_Subject], steps: list[Step]) -> dict[_Subject, list[float]]:
    """Run the steps for every subject, timing each step, the subjects taking turns every
    ROUND steps: close enough in time that the machine's drift hits them alike, far enough
    apart that one daemon's work after a reply is rarely counted in the other's requests."""
    times: dict[_Subject, list[float]] = {subject: [] for subject in subjects}
    for first in range(0, len(steps), ROUND):
        for subject in subjects:
            for step in steps[first : first + ROUND]:
                start = time.perf_counter()
                step(subject)
                times[subject].append(time.perf_counter() - start)
    return times


def _batch(subjects: list[_Subject], name: str, steps: list[Step]) -> None:
    """Median wall time of the steps (each timed alone), mean daemon CPU time per step."""
    cpu0 = {subject: cpu_seconds(subject.pid) for subject in subjects}
    times = _timed_rounds(subjects, steps)
    for subject in subjects:
        cpu = (cpu_seconds(subject.pid) - cpu0[subject]) / len(steps)
        subject.add(name, statistics.median(times[subject]), cpu)


def _enumerate_steps(pool: int, expected: int) -> list[Step]:
    """A pass as the host makes it: index 0, 1, ... until the daemon has no more (checked:
    `expected` records, then a non-S_OK status)."""

    def step(index: int) -> Step:
        def run(subject: _Subject) -> None:
            status = subject.host.enumerate(pool, index)[0]
            if (status == Status.S_OK) != (index < expected):
                raise RuntimeError(f"{subject.result.daemon}: ENUMERATE of pool {pool} index "
                                   f"{index} gave status {status:#x} ({expected} records)")
        return run

    return [step(index) for index in range(expected + 1)]


def _measure(subjects: list[_Subject], size: int, config: HostConfig) -> None:
    middle = key_name(size // 2)
    first_counter = 0
    for subject in subjects:
        for _ in range(3):
            _check(subject.host.get(EXTERNAL, middle)[0], "warm-up GET")

    for rep in range(config.repeat):
        # A reader of the mount knows the middle key of pool 0, so kvpfs must invalidate the
        # kernel's cache when the host changes it (again each repeat: DELETE of the first
        # record may have deleted and re-added it).
        for subject in subjects:
            if isinstance(subject.guest, _KvpfsGuest):
                with open(subject.guest.mnt / "external" / middle, "rb") as fh:
                    fh.read()
        new_keys = [f"bench-new-{rep}-{i:04d}" for i in range(config.batch)]
        _batch(subjects, "set_new", [
            lambda s, k=k: _check(s.host.set(EXTERNAL, k, "a new value"), "SET new")
            for k in new_keys
        ])
        _batch(subjects, "set_existing", [
            lambda s, v=f"changed {rep} {i}": _check(s.host.set(EXTERNAL, middle, v), "SET")
            for i in range(config.batch)
        ])
        _batch(subjects, "get", [
            lambda s: _check(s.host.get(EXTERNAL, middle)[0], "GET")
        ] * config.batch)
        _batch(subjects, "delete_last", [
            lambda s, k=k: _check(s.host.delete(EXTERNAL, k), "DELETE last")
            for k in reversed(new_keys)
        ])
        # DELETE of the first record, timed one by one; the re-append is not timed.
        times: dict[_Subject, list[float]] = {subject: [] for subject in subjects}
        cpu = dict.fromkeys(subjects, 0.0)
        for _ in range(config.first_batch):
            index = first_counter % size
            first_counter += 1
            key = key_name(index)
            for subject in subjects:
                cpu0 = cpu_seconds(subject.pid)
                start = time.perf_counter()
                _check(subject.host.delete(EXTERNAL, key), "DELETE first")
                times[subject].append(time.perf_counter() - start)
                cpu[subject] += cpu_seconds(subject.pid) - cpu0
                _check(subject.host.set(EXTERNAL, key, value_text(index)), "re-adding it")
        for subject in subjects:
            subject.add("delete_first", statistics.median(times[subject]),
                        cpu[subject] / config.first_batch)
        # Full passes, as the host's enumeration of a pool: each pass's total, and per
        # request the median of its requests. Small pools get several passes per repeat.
        if rep < config.pass_repeat:
            count = max(1, PASS_REQUESTS // (size + 1))
            steps = _enumerate_steps(EXTERNAL, size)
            cpu0 = {subject: cpu_seconds(subject.pid) for subject in subjects}
            rounds = [_timed_rounds(subjects, steps) for _ in range(count)]
            for subject in subjects:
                every = [t for one in rounds for t in one[subject]]
                subject.passes.append(statistics.median(sum(one[subject]) for one in rounds))
                subject.add("enumerate", statistics.median(every),
                            (cpu_seconds(subject.pid) - cpu0[subject]) / len(every))
        # Pool 2: the host always reads all ten values, two of which (the addresses) cost
        # more than the others, so per request here is a pass's mean (median of the passes).
        steps = _enumerate_steps(AUTO, len(INTRINSIC_KEYS))
        cpu0 = {subject: cpu_seconds(subject.pid) for subject in subjects}
        rounds = [_timed_rounds(subjects, steps) for _ in range(config.intrinsic_passes)]
        for subject in subjects:
            means = [sum(one[subject]) / len(steps) for one in rounds]
            subject.add("intrinsic", statistics.median(means),
                        (cpu_seconds(subject.pid) - cpu0[subject]) / (len(steps) * len(rounds)))
        # End to end, the daemons taking turns sample by sample.
        latencies: dict[_Subject, dict[str, list[float]]] = {s: {} for s in subjects}
        for i in range(config.e2e_samples):
            for subject in subjects:
                for name, seconds in _end_to_end(subject, size, f"{rep} {i}").items():
                    latencies[subject].setdefault(name, []).append(seconds)
        for subject in subjects:
            for name, values in latencies[subject].items():
                subject.e2e.setdefault(name, []).append(statistics.median(values))

    for subject in subjects:
        result = subject.result
        result.ops = {name: Stat.of(values) for name, values in subject.wall.items()}
        result.cpu = {name: Stat.of(values) for name, values in subject.cpu.items()}
        result.enumerate_pass = Stat.of(subject.passes)
        result.e2e = {name: Stat.of(values) for name, values in subject.e2e.items()}
        result.rss = rss_bytes(subject.pid)[0]


def _end_to_end(subject: _Subject, size: int, tag: str) -> dict[str, float]:
    """One sample of each end-to-end latency."""
    host, guest = subject.host, subject.guest
    slot = size // 2
    key = key_name(slot)
    out = {}
    value = f"e2e guest {tag}"
    start = time.perf_counter()
    guest.write(key, slot, value)
    for _ in range(10_000):
        status, got_key, got_value = host.enumerate(GUEST, slot)
        if status == Status.S_OK and got_key == key and got_value == value:
            break
    else:
        raise RuntimeError("the host never saw the guest's write")
    out["guest_to_host"] = time.perf_counter() - start

    value = f"e2e host {tag}"
    start = time.perf_counter()
    _check(host.set(AUTO_EXTERNAL, key, value), "e2e SET")
    deadline = start + 10.0
    while guest.read(key, slot) != value:
        if time.perf_counter() > deadline:
            raise RuntimeError("the guest never saw the host's SET")
    out["host_to_guest"] = time.perf_counter() - start
    return out


@contextlib.contextmanager
def _null_daemon(device: str, host: EmulatedHost) -> Iterator[int]:
    before = host.state()["handshakes"]
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "nulldaemon.py"), device],
                            stdin=subprocess.DEVNULL)
    try:
        host.wait_for(10.0, registered=True, min_handshakes=before + 1)
        yield proc.pid
    finally:
        stop_process(proc)


def emulation_floor(device: str, host: EmulatedHost, config: HostConfig) -> tuple[Stat, Stat]:
    """Per-transaction wall time, and the daemon's CPU time, with a daemon that does no
    work at all (each request timed alone, median per batch, as for the daemons)."""
    wall: list[float] = []
    cpu: list[float] = []
    with _null_daemon(device, host) as pid:
        for _ in range(3):
            host.get(EXTERNAL, "warm-up")
        for _ in range(config.repeat):
            times = []
            cpu0 = cpu_seconds(pid)
            for _ in range(config.batch * 2):
                start = time.perf_counter()
                _check(host.get(EXTERNAL, "anything")[0], "null GET")
                times.append(time.perf_counter() - start)
            cpu.append((cpu_seconds(pid) - cpu0) / len(times))
            wall.append(statistics.median(times))
    return Stat.of(wall), Stat.of(cpu)


def run_host(
    size: int, workdir: Path, config: HostConfig, *, reference: bool
) -> tuple[dict[str, HostResult], tuple[Stat, Stat]]:
    """Measure kvpfs (and hv_kvp_daemon if `reference`) at `size` records, interleaved.

    Returns the results by daemon and the emulation floor (wall, CPU) measured on kvpfs's
    emulated device just before kvpfs starts on it."""
    base = workdir / f"host-{size}"
    with contextlib.ExitStack() as stack:
        subjects: list[_Subject] = []
        if reference:
            device, host = stack.enter_context(
                run_emulated_device(base / "emu-ref", host_timeout=300.0))
            pool_dir = base / "ref-pools"
            write_pools(pool_dir, size)
            ref = stack.enter_context(run_reference_daemon(device, pool_dir, host))
            guest = _PoolFileGuest(pool_dir)
            stack.callback(guest.close)
            subjects.append(_Subject(HostResult(REFERENCE, size), host, ref.pid, guest))
        device, host = stack.enter_context(
            run_emulated_device(base / "emu-kvpfs", host_timeout=300.0))
        floor = emulation_floor(device, host, config)
        pool_dir = base / "kvpfs-pools"
        write_pools(pool_dir, size)
        run = stack.enter_context(run_kvpfs(device, pool_dir, base / "kvpfs"))
        subjects.append(_Subject(HostResult(KVPFS, size), host, run.pid, _KvpfsGuest(run.mnt)))
        profile = (config.profile_dir / f"kvpfs-host-{size}") if config.profile_dir else None
        with maybe_profile(run.pid, profile):
            _measure(subjects, size, config)
        if reference and not ref.alive():
            raise RuntimeError(f"hv_kvp_daemon died: {ref.log}")
    return {subject.result.daemon: subject.result for subject in subjects}, floor
