"""Opening `/dev/vmbus/hv_kvp` and moving whole 7432-byte messages over it.

The kernel's device is exclusive (EBUSY for a second opener), reads exactly
one message at a time (EINVAL for a shorter buffer) and supports poll; its read
blocks whatever O_NONBLOCK says, so we only read once poll reports a message.
The simulated host hands out a socket pair instead, and the same `Channel`
works for both: all that matters is an fd that carries one message per
read/write.

The async methods serve the registration on the trio thread; the blocking ones
serve requests from the server's device thread, which polls the channel beside
a stop pipe so that it can always be told to let go.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from kvpfs.wire.protocol import MESSAGE_SIZE

DEFAULT_DEVICE = "/dev/vmbus/hv_kvp"
VMBUS_DIR = "/sys/bus/vmbus"  # present on every Hyper-V guest, hv_kvp or not

log = logging.getLogger(__name__)


class DeviceUnavailable(Exception):
    """The device cannot be used at all; the message says why and what to do."""


class Channel:
    """One open device (or simulated device) fd."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        os.set_blocking(fd, False)
        self.poll_reliable = _poll_reliable(fd)

    async def read_message(self) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            data = self.read_ready_message()
            if data is not None:
                return data

    async def write_message(self, message: bytes) -> None:
        while not self.write_ready_message(message):
            await trio.lowlevel.wait_writable(self.fd)

    def read_ready_message(self) -> bytes | None:
        """One message, read once poll said so; None if there was none after all."""
        try:
            data = os.read(self.fd, MESSAGE_SIZE)
        except BlockingIOError:
            return None
        if len(data) != MESSAGE_SIZE:
            raise OSError(
                errno.EIO,
                f"{self.name}: read returned {len(data)} bytes, expected one"
                f" {MESSAGE_SIZE}-byte message",
            )
        return data

    def write_ready_message(self, message: bytes) -> bool:
        """Write one message; False if the fd would block (only a socket pair does)."""
        assert len(message) == MESSAGE_SIZE
        try:
            written = os.write(self.fd, message)
        except BlockingIOError:
            return False
        if written != MESSAGE_SIZE:
            raise OSError(errno.EIO, f"{self.name}: short write of {written} bytes")
        return True

    def poll_now(self) -> int:
        """The channel's poll bits right now, without waiting (0: nothing queued).

        Only meaningful when `poll_reliable`: a FUSE file served without poll support
        (pyfuse3 < 3.5) always reports itself readable.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return sum(events for _, events in poller.poll(0))

    def waiter(self, events: int, stop_fd: int) -> Callable[[float | None], bool | None]:
        """A blocking wait for `events` on the channel, for the device thread.

        The wait returns True once the channel is ready (POLLERR and POLLHUP
        count: the read or write that follows says what went wrong), False as
        soon as `stop_fd` becomes readable, and None when `timeout` (seconds)
        passes first.
        """
        poller = select.poll()
        poller.register(self.fd, events)
        poller.register(stop_fd, select.POLLIN)

        def wait(timeout: float | None = None) -> bool | None:
            ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
            if any(fd == stop_fd for fd, _ in ready):
                return False
            return True if ready else None

        return wait

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1


def _poll_reliable(fd: int) -> bool:
    """Does poll(2) tell whether a message is queued? The kernel's device never reports
    POLLOUT; a file whose driver has no poll gets the default mask, POLLOUT included."""
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            return True  # a socket pair (the simulated host): poll is exact
    except OSError:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return not any(events & select.POLLOUT for _, events in poller.poll(0))


@dataclass(frozen=True)
class Holder:
    """A process with the device open, as /proc describes it."""

    pid: int
    comm: str
    cmdline: str
    state: str

    def describe(self) -> str:
        stopped = " (stopped: it answers nothing but keeps the device)" \
            if self.state in ("T", "t") else ""
        return f"pid {self.pid} {self.comm!r} ({self.cmdline or 'no command line'}){stopped}"


def device_holders(path: str, proc: str = "/proc") -> list[Holder]:
    """Processes that have `path` open, found through /proc/PID/fd.

    Compares link text, never stat()s the open files (a stat could hang on a wedged
    FUSE file). Only processes we may inspect are seen: all of them as root.
    """
    target = os.path.realpath(path)
    found: list[Holder] = []
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        base = f"{proc}/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{base}/fd/{fd}") != target:
                    continue
            except OSError:
                continue
            found.append(_holder(int(pid), base))
            break
    return found


def _holder(pid: int, base: str) -> Holder:
    def read(name: str) -> str:
        try:
            with open(f"{base}/{name}", "rb") as handle:
                return handle.read(4096).decode("utf-8", "replace")
        except OSError:
            return ""

    stat = read("stat")
    state = stat.rsplit(")", 1)[1].split()[0] if ")" in stat else "?"
    cmdline = " ".join(part for part in read("cmdline").split("\0") if part)
    return Holder(pid, read("comm").strip(), cmdline, state)


def busy_message(path: str, holders: list[Holder]) -> str:
    """Why the device is busy, naming whoever holds it."""
    if not holders:
        return (f"{path} is busy: another process holds it (it allows only one opener), most"
                " likely a KVP daemon such as hv_kvp_daemon (systemctl stop"
                " hv-kvp-daemon.service hypervkvpd.service) or another kvpfs; run kvpfs as"
                " root to be told which process it is")
    names = "; ".join(holder.describe() for holder in holders)
    hint = ""
    if any(holder.comm.startswith("hv_kvp_daemon") for holder in holders):
        hint = " (stop it with: systemctl stop hv-kvp-daemon.service hypervkvpd.service)"
    return (f"{path} is busy: it allows only one opener and is held by {names}{hint}."
            " Stop that process first.")


class Opener(Protocol):
    name: str

    async def open(self) -> Channel: ...


class CharDevice:
    """The real kernel device.

    Since the CVE-2024-55916 fix the kernel creates the node only once the KVP
    channel is open, later in boot than before: on a Hyper-V guest (`vmbus_dir`
    exists) the first open waits up to `appear_timeout` for it. udev starts
    kvpfs.service when it appears (contrib/60-kvpfs.rules); this covers a start
    by hand or by another unit.
    """

    def __init__(self, path: str = DEFAULT_DEVICE, *, appear_timeout: float = 60.0,
                 vmbus_dir: str = VMBUS_DIR, check_interval: float = 0.2) -> None:
        self.path = path
        self.name = path
        self.appear_timeout = appear_timeout
        self.vmbus_dir = vmbus_dir
        self.check_interval = check_interval
        self._opened_once = False

    async def open(self) -> Channel:
        if not self._opened_once:
            await self._wait_for_node()
        try:
            fd = await trio.to_thread.run_sync(
                os.open, self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK
            )
        except FileNotFoundError:
            raise DeviceUnavailable(
                f"{self.path} does not exist: this does not look like a Hyper-V guest"
                " (or the hv_utils module is not loaded). To try kvpfs without Hyper-V, add"
                " --simulate to run against the built-in simulated host."
            ) from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                holders = await trio.to_thread.run_sync(device_holders, self.path)
                raise DeviceUnavailable(busy_message(self.path, holders)) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise DeviceUnavailable(
                    f"cannot open {self.path}: {exc.strerror}; kvpfs must run as root"
                ) from None
            raise
        self._opened_once = True
        return Channel(fd, self.path)

    async def _wait_for_node(self) -> None:
        """On a Hyper-V guest, wait (bounded) for the kernel to create the node."""
        exists = os.path.lexists
        if exists(self.path) or not os.path.isdir(self.vmbus_dir):
            return
        log.warning("%s does not exist yet on this Hyper-V guest (%s exists): waiting up to"
                    " %g s for the kernel to create it (it does so once the KVP channel is"
                    " open, later in boot since the CVE-2024-55916 fix)", self.path,
                    self.vmbus_dir, self.appear_timeout)
        with trio.move_on_after(self.appear_timeout):
            while not await trio.to_thread.run_sync(exists, self.path):
                await trio.sleep(self.check_interval)
            log.info("%s appeared", self.path)
            return
        raise DeviceUnavailable(
            f"{self.path} did not appear within {self.appear_timeout:g} s although this is a"
            f" Hyper-V guest ({self.vmbus_dir} exists): is the hv_utils module loaded (lsmod |"
            " grep hv_utils) and Data Exchange enabled in the VM's integration services?"
            " kvpfs.service is also started by udev when the device appears"
            " (60-kvpfs.rules)")
