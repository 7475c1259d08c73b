"""Shared pieces of the benchmark: statistics, tables, pool files, processes.

Nothing here measures anything by itself; the sections (`hostbench`, `fsbench`,
`startbench`) do, and `main` prints what they return.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import encode_record
from kvpfs.wire.pools import POOL_COUNT

REPO = Path(__file__).resolve().parent.parent
KVPFS_SOURCE = REPO  # where `python -m kvpfs` finds the package it runs (--kvpfs-src)
FILLED_POOLS = (0, 1, 3)  # external, guest, auto_external: what the memory target names
VALUE_BYTES = 64


# ---------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Median and range over repeats (each repeat is already a mean over a batch)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no samples")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @property
    def spread(self) -> float:
        """Half the range, relative to the median (0.05 = ±5 %)."""
        if self.median <= 0:
            return 0.0
        return (self.high - self.low) / 2 / self.median


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-4:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e6:.1f} µs"


def fmt_stat(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    return f"{fmt_time(stat.median)} ±{stat.spread * 100:.0f}%"


def fmt_rate(stat: Stat | None) -> str:
    if stat is None or stat.median <= 0:
        return "-"
    rate = 1.0 / stat.median
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def ratio(numerator: Stat | None, denominator: Stat | None) -> float | None:
    if numerator is None or denominator is None or denominator.median <= 0:
        return None
    return numerator.median / denominator.median


# ---------------------------------------------------------------------- tables


class Table:
    """A Markdown table (so the output can be pasted into the README as it is)."""

    def __init__(
        self, title: str, columns: Sequence[str], notes: Sequence[str] = (), *,
        text_columns: int = 2,
    ) -> None:
        self.title = title
        self.text_columns = text_columns  # leading columns aligned left
        self.columns = list(columns)
        self.rows: list[list[str]] = []
        self.notes = list(notes)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(cell) for cell in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            padded = [
                cell.ljust(w) if i < self.text_columns else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "| " + " | ".join(padded) + " |"

        rule = "| " + " | ".join(
            "-" * w if i < self.text_columns else "-" * (w - 1) + ":" for i, w in enumerate(widths)
        ) + " |"
        out = [f"### {self.title}", "", line(self.columns), rule]
        out += [line(row) for row in self.rows]
        if self.notes:
            out.append("")
            out += self.notes
        return "\n".join(out)


# ---------------------------------------------------------------------- pool files


def key_name(index: int) -> str:
    return f"key-{index:06d}"


def value_text(index: int) -> str:
    return f"value {index} ".ljust(VALUE_BYTES, "x")


def write_pools(pool_dir: Path, records: int, pools: Sequence[int] = FILLED_POOLS) -> None:
    """Pool files with `records` records in each of `pools` (others empty), as kvpfs and
    hv_kvp_daemon both find them at start: mode 0600 in a 0700 directory."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pool_dir, 0o700)
    blob = b"".join(
        encode_record(key_name(i).encode(), value_text(i).encode()) for i in range(records)
    )
    for pool in range(POOL_COUNT):
        path = pool_path(pool_dir, pool)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if pool in pools:
                os.write(fd, blob)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- processes


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of `pid` (schedstat, nanosecond resolution).

    Threads that exit between two readings take their share with them; kvpfs's
    trio worker threads idle for 10 s before exiting, longer than any batch.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tasks:
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open(f"/proc/{pid}/task/{tid}/schedstat") as fh,
        ):
            total += int(fh.read().split()[0])
    return total / 1e9


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            if line.split()[4].encode().decode("unicode_escape") == target:
                return True
    return False


def lazy_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass
class KvpfsRun:
    proc: subprocess.Popen[bytes]
    mnt: Path
    pool_dir: Path
    ready_seconds: float  # from spawning the process to READY=1 (mounted, registered)
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def run_kvpfs(
    device: str, pool_dir: Path, workdir: Path, *, timeout: float = 30.0
) -> Iterator[KvpfsRun]:
    """`kvpfs mount` on the emulated device; readiness is systemd's READY=1, which kvpfs
    sends once the device is registered and the filesystem mounted."""
    workdir.mkdir(parents=True, exist_ok=True)
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="kvpb-"))  # sun_path is short
    notify_path = sockdir / "notify"
    log = workdir / "kvpfs.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    if KVPFS_SOURCE != REPO:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KVPFS_SOURCE),
                                                          env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "kvpfs", "mount", str(mnt), "--device", device,
            "--pool-dir", str(pool_dir), "--control", str(sockdir / "control")]
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log, "ab") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    env=env, cwd=KVPFS_SOURCE)
        deadline = start + timeout
        notify.settimeout(0.05)
        while True:
            try:
                message = notify.recv(4096)
            except TimeoutError:
                message = b""
            if b"READY=1" in message:
                ready = time.perf_counter() - start
                break
            if proc.poll() is not None:
                raise RuntimeError(f"kvpfs exited with {proc.returncode}: {log.read_text()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"kvpfs not ready after {timeout} s: {log.read_text()}")
        if not is_mounted(mnt):
            raise RuntimeError(f"kvpfs said READY=1 but {mnt} is not mounted")
        yield KvpfsRun(proc, mnt, pool_dir, ready, log)
    finally:
        notify.close()
        if proc is not None:
            stop_process(proc)
        lazy_unmount(mnt)
        shutil.rmtree(sockdir, ignore_errors=True)


@contextlib.contextmanager
def run_floorfs(files: int, workdir: Path, *, ttl: float = 1.0) -> Iterator[Path]:
    """The minimal pyfuse3 filesystem; yields its directory of `files` files."""
    mnt = workdir / "floor"
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "floorfs.py"), str(mnt), "--files", str(files),
         "--value-bytes", str(VALUE_BYTES), "--ttl", str(ttl)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("floor filesystem did not start")
        yield mnt / "guest"
    finally:
        stop_process(proc)
        lazy_unmount(mnt)


@contextlib.contextmanager
def tmpfs_dir(files: int) -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm) holding the same files."""
    base = Path(tempfile.mkdtemp(prefix="kvpfs-bench-", dir="/dev/shm"))
    try:
        guest = base / "guest"
        guest.mkdir()
        for i in range(files):
            (guest / key_name(i)).write_text(value_text(i))
        yield guest
    finally:
        shutil.rmtree(base, ignore_errors=True)


def timed_batch(op: Callable[[], object], *, min_seconds: float, min_count: int = 5) -> float:
    """Median seconds of one call of `op`, each call timed alone, calling it until both
    bounds are reached. The median rather than the mean: on a shared 2-CPU machine a
    batch now and then loses the CPU to another process, and that is not the cost of `op`."""
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while True:
        start = time.perf_counter()
        op()
        end = time.perf_counter()
        times.append(end - start)
        if len(times) >= min_count and end >= deadline:
            return statistics.median(times)


def start_kvpfs(base: Path, src: Path, group: int) -> subprocess.Popen[bytes]:
    """kvpfs from checkout `src` on the simulated host in `base`, for attacks by members of
    `group`: mounted with --allow-other, its log in base/kvpfs.log."""
    mnt, control = base / "mnt", base / "control.sock"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    log = open(base / "kvpfs.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpfs", "mount", str(mnt), "--simulate",
         "--pool-dir", str(base / "pools"), "--control", str(control),
         "--allow-other", "--guest-group", str(group)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=src, env=env)
    deadline = time.monotonic() + 30
    while not (control.exists() and os.path.ismount(mnt)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"kvpfs did not start:\n{(base / 'kvpfs.log').read_text()}")
        time.sleep(0.05)
    return proc
