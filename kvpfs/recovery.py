"""`kvpfs recover MOUNTPOINT`: free a kvpfs mount whose process is gone or stuck.

What it is for: a kvpfs killed while one of its threads waits in the kernel (a
SIGKILL during an entry invalidation: the thread waits for a directory lock held by
a process that waits for kvpfs's answer) never exits, so it never closes /dev/fuse,
and nothing else ends the connection. systemd cannot kill it either. Aborting the
FUSE connection fails every request in flight; the stuck thread returns, the process
exits, and systemd restarts kvpfs. The unit runs this as ExecStopPost=, so it runs
after every stop, crash, kill and watchdog timeout, once systemd has done its own
killing (see contrib/kvpfs.service).

It never looks at the mount point itself (a stat there could hang on the very
connection it is meant to free): the connection number is the mount's device minor
in /proc/self/mountinfo, and the abort goes to /sys/fs/fuse/connections/N/abort.
Without the fusectl filesystem there, umount2(MNT_FORCE) aborts the same connection
(the kernel's fuse_umount_begin). Then the mount is detached lazily.

The path it is given may lie in directories a user controls, and a user could swap one of
them for a symlink between the look at mountinfo and the unmount, sending root's umount2 to
another mount. So the mount point is opened once (O_PATH|O_NOFOLLOW: no request reaches
the filesystem), the descriptor is checked to be on exactly the mount listed (its mnt_id
in /proc/self/fdinfo), and every unmount then goes through that descriptor
(/proc/self/fd/N), never through the path again. Only mounts the caller can trust are
considered (`mountinfo.KvpfsMount.trusted`).

Do not run it on a kvpfs that works: it cuts that kvpfs's mount off.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

from kvpfs import mountinfo

log = logging.getLogger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")
MNT_FORCE = 1
MNT_DETACH = 2


def _umount2(target: Path, flags: int) -> int:
    """umount2(2); 0 or the errno. Called directly: umount(8) may look at the path."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


def abort_connection(device: str, mountpoint: Path) -> str:
    """Abort the FUSE connection of the mount with device number `device` ("0:NN");
    `mountpoint` (for the forced unmount) is the checked descriptor's /proc/self/fd path."""
    minor = int(device.split(":")[1])
    abort = FUSECTL / str(minor) / "abort"
    try:
        abort.write_text("1")
        return f"aborted FUSE connection {minor}"
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"could not abort FUSE connection {minor}: {exc.strerror}"
    # No fusectl mounted here: a forced unmount aborts the connection too.
    error = _umount2(mountpoint, MNT_FORCE)
    if error in (0, errno.EBUSY):  # busy: not unmounted, but aborted all the same
        return f"aborted FUSE connection {minor} (forced unmount)"
    return f"could not abort FUSE connection {minor}: {os.strerror(error)}"


def open_mount(entry: mountinfo.KvpfsMount) -> int | None:
    """An O_PATH descriptor of the root of exactly the mount `entry` lists, or None if its
    path leads elsewhere now (a component swapped, or another mount stacked on top)."""
    try:
        fd = os.open(entry.point, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if mount_id_of(fd) == entry.mount_id:
        return fd
    os.close(fd)
    return None


def mount_id_of(fd: int) -> int | None:
    """The mount an open descriptor is on, from /proc (never asking the filesystem)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def recover_mounts(where: Path, entries: list[mountinfo.KvpfsMount]) -> list[str]:
    """Abort and lazily unmount each listed mount (topmost first), acting only through a
    descriptor checked to be on that mount; what was done, line by line."""
    done = []
    for entry in entries:
        fd = open_mount(entry)
        if fd is None:
            done.append(f"{where}: left alone: the path no longer leads to the kvpfs mount"
                        f" {entry.mount_id} listed in mountinfo (changed meanwhile)")
            continue
        try:
            target = Path(f"/proc/self/fd/{fd}")
            done.append(f"{where}: " + abort_connection(entry.device, target))
            if entry not in mountinfo.kvpfs_entries():
                done.append(f"{where}: unmounted")  # by the forced unmount
                continue
            error = _umount2(target, MNT_DETACH)
            done.append(f"{where}: " + (f"could not unmount: {os.strerror(error)}" if error
                                        else "unmounted"))
        finally:
            os.close(fd)
    return done


def recover(mountpoint: Path) -> list[str]:
    """Abort and lazily unmount every trusted kvpfs mount on `mountpoint`; what was done."""
    where = mountinfo.canonical_mountpoint(mountpoint)
    # Topmost first: a detach removes the top mount and uncovers the one below.
    entries = [e for e in reversed(mountinfo.kvpfs_entries()) if e.point == where]
    return recover_mounts(where, entries)
