"""Taking down the mounts other users make inside kvpfs's tree (issue 18, item 5).

fusermount3 lets any user mount a FUSE filesystem on a directory they may write to and
that is not a sticky directory owned by someone else, or on a regular file they may open
for writing. guest/ is writable by its group and its keys by their writers, so a group
member can cover guest/ or guest/ReadyAck with a mount of their own; root (without the
kernel's allow_sys_admin_access) then gets EACCES there, and what root writes never
reaches the host. A sticky guest/ would stop the directory case only, and would also stop
group members from replacing or removing the keys root and the host made.

So kvpfs, when it runs as root, watches the mount table (poll(2) on /proc/self/mountinfo
wakes at every change) and lazily detaches every FUSE mount made by another user whose
parent is its own mount. It acts through a descriptor checked to be on exactly that mount
(as `recovery` does), never through a path the user could change meanwhile. Mounts made by
root are left alone. The log says so at a bounded rate (`RateLog`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
from pathlib import Path

from kvpfs import compat, mountinfo
from kvpfs.quietlog import RateLog

log = logging.getLogger(__name__)

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
WAKE_CHECK = 1.0  # the watching thread returns this often even without a change


def ours(where: Path, uid: int, lines: list[mountinfo.MountLine]) -> set[int]:
    """The ids of our own kvpfs mounts on `where`."""
    return {m.mount_id for m in lines
            if m.fstype == mountinfo.FSTYPE and m.point == where and m.owner == uid}


def intruders(where: Path, uid: int, lines: list[mountinfo.MountLine]
              ) -> list[mountinfo.MountLine]:
    """FUSE mounts of other users (not root) right on top of or inside our mounts."""
    mine = ours(where, uid, lines)
    return [m for m in lines if m.parent_id in mine and m.fstype.startswith("fuse")
            and m.owner not in (None, 0, uid)]


def detach(mount: mountinfo.MountLine) -> int:
    """Detach exactly `mount`; 0 or the errno (ESTALE if its path leads elsewhere now)."""
    try:
        fd = os.open(mount.point, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or 1
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            ids = [int(line.split()[1]) for line in f if line.startswith("mnt_id:")]
        if ids != [mount.mount_id]:
            return 116  # ESTALE: another mount is there now; the next look sees it
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(f"/proc/self/fd/{fd}"), MNT_DETACH) != 0:
            return ctypes.get_errno()
        return 0
    finally:
        os.close(fd)


class MountGuard:
    """Watches for other users' mounts inside the mount at `where` and detaches them."""

    def __init__(self, where: Path, uid: int | None = None) -> None:
        self.where = where
        self.uid = os.getuid() if uid is None else uid
        self.said = RateLog(log, lines=10, window=10.0)  # a user may mount again and again
        self.detached = 0

    def sweep(self) -> None:
        """One look at the mount table (in a worker thread): detach every intruder."""
        for _attempt in range(8):  # stacked mounts uncover one another
            found = intruders(self.where, self.uid, mountinfo.mount_lines())
            if not found:
                return
            for mount in found:
                error = detach(mount)
                if error == 0:
                    self.detached += 1
                self.said.warning(
                    "%s a FUSE mount of uid %s on %s: only root may mount inside kvpfs (a"
                    " user's mount there would hide guest/ from root and the host)",
                    "detached" if error == 0 else f"could not detach ({os.strerror(error)})",
                    mount.owner, mount.point)

    def watch(self, stop: threading.Event) -> None:
        """Sweep at every change of the mount table until `stop` (a worker thread)."""
        with open("/proc/self/mountinfo", "rb") as table:
            poller = select.poll()  # POLLPRI once per change made since the last poll
            poller.register(table, select.POLLPRI | select.POLLERR)
            while not stop.is_set():
                self.sweep()
                poller.poll(WAKE_CHECK * 1000)

    async def run(self) -> None:
        """Until cancelled; only root can detach other users' mounts."""
        if os.geteuid() != 0:
            return
        stop = threading.Event()
        try:
            await compat.to_thread_run_sync(self.watch, stop, abandon_on_cancel=True,
                                            thread_name="kvpfs mount guard")
        finally:
            stop.set()
