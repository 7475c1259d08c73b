"""systemd's notify protocol and watchdog: WATCHDOG=1 only while every part of kvpfs works.

kvpfs has three parts that can wedge independently: the trio loop (control socket,
changes, the trio side of the device), the device thread (answers the host), and
pyfuse3's request loop (answers the kernel for the mount). The pinger is a trio task,
so a wedged trio loop stops the pings by itself. The other two are checked for a
*stall*, not for activity, so that an idle kvpfs keeps pinging:

* the device thread reports when it took a request (`DeviceServer.stalled_for`); a
  thread waiting in poll(2) for the host is idle, not stalled. A request unanswered
  for DEVICE_STALL_LIMIT (twice the kernel's 30 s transaction timeout) is a wedge.
* the FUSE loop is probed: a *child process* runs statfs(2) on the mount root every
  ping interval. statfs is never answered from the kernel's caches, so each probe
  goes through the kernel and pyfuse3's handler loop. A probe unanswered for
  FUSE_STALL_LIMIT is a wedge.

Why a child process and never a thread of ours: a thread that waits for its own
process's FUSE answer cannot be killed. Once the kernel has handed a request to the
daemon, `request_wait_answer` waits uninterruptibly for the reply; after a SIGKILL
no reply comes, the thread never exits, so the process never releases /dev/fuse and
the connection is never aborted -- the same hang a SIGKILL during an entry
invalidation causes. A child process waiting on our mount is freed when we die: our
exit closes /dev/fuse, which aborts the connection and fails its request. The child
does not inherit /dev/fuse (subprocess closes every descriptor but 0-2, and libfuse
opens it O_CLOEXEC), otherwise it would keep the connection alive itself.

When the pings stop, systemd sends WatchdogSignal= (SIGABRT: faulthandler then logs
every thread's Python stack), then SIGKILL; ExecStopPost= runs `kvpfs recover`,
which aborts a connection the process left wedged (kvpfs/recovery.py), and
Restart= brings kvpfs back.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

DEVICE_STALL_LIMIT = 60.0  # s a host request may stay unanswered (kernel gives up at 30 s)
FUSE_STALL_LIMIT = 30.0  # s the mount may leave a statfs unanswered
PINGS_PER_PERIOD = 4  # systemd asks for at least two; four leave room for a busy machine


def sd_notify(message: str) -> bool:
    """Send `message` to systemd's $NOTIFY_SOCKET; a no-op (False) outside systemd.

    Never blocks (it runs on the trio thread): a message the socket cannot take
    now is lost and logged; the next ping follows a quarter period later.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
    return True


def watchdog_period() -> float | None:
    """systemd's WatchdogSec= in seconds, if it is meant for this process (sd_watchdog_enabled)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # set for another process (our parent), not for us
    return int(usec) / 1e6


def _probe_command(mountpoint: Path) -> list[str]:
    """statfs(2) of the mount root in a small child process."""
    stat = shutil.which("stat")
    if stat:
        return [stat, "-f", "-c", "%t", str(mountpoint)]
    return [sys.executable, "-I", "-S", "-c", "import os, sys; os.statvfs(sys.argv[1])",
            str(mountpoint)]


class FuseProbe:
    """Probes the mount from a child process, one probe at a time."""

    def __init__(self, mountpoint: Path, interval: float) -> None:
        self.command = _probe_command(mountpoint)
        self.interval = interval
        self.probing_since: float | None = None  # monotonic start of the unanswered probe
        self.probes = 0

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.probing_since is None else now - self.probing_since

    async def run(self) -> None:
        while True:
            self.probing_since = time.monotonic()
            proc = await trio.lowlevel.open_process(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True)
            try:
                await proc.wait()  # any answer, even an error, proves the loop turns
            finally:
                if proc.returncode is None:
                    # Cancelled (shutdown): never wait for a child stuck on our own mount;
                    # it ends when the connection does.
                    proc.kill()
            self.probing_since = None
            self.probes += 1
            await trio.sleep(self.interval)


class Watchdog:
    """Sends WATCHDOG=1 every period/PINGS_PER_PERIOD while nothing is stalled."""

    def __init__(self, period: float, *, device_stalled_for: Callable[[float], float],
                 mountpoint: Path, device_limit: float = DEVICE_STALL_LIMIT,
                 fuse_limit: float = FUSE_STALL_LIMIT) -> None:
        self.interval = period / PINGS_PER_PERIOD
        self.device_stalled_for = device_stalled_for
        self.device_limit = device_limit
        self.fuse_limit = fuse_limit
        self.probe = FuseProbe(mountpoint, self.interval)
        self.pings = 0

    def stalled(self, now: float) -> str | None:
        """Which part is wedged, if any (None: all healthy)."""
        device = self.device_stalled_for(now)
        if device > self.device_limit:
            return f"the device thread has not answered a host request for {device:.0f} s"
        fuse = self.probe.stalled_for(now)
        if fuse > self.fuse_limit:
            return f"the mount has not answered a statfs for {fuse:.0f} s"
        return None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.probe.run)
            reported = False
            while True:
                problem = self.stalled(time.monotonic())
                if problem is None:
                    sd_notify("WATCHDOG=1")
                    self.pings += 1
                    if reported:
                        log.warning("every part of kvpfs makes progress again: pinging")
                    reported = False
                elif not reported:
                    log.error("%s: no more watchdog pings, systemd will restart kvpfs", problem)
                    reported = True
                await trio.sleep(self.interval)
