"""The echo helper process: replays, through the mount, changes the kernel did not see.

inotify events come from the VFS: a FUSE filesystem's cache notifications
raise none for a new key and none for a changed value, and an entry
notification raises no IN_DELETE on the directory (only IN_DELETE_SELF on a
watched file). So kvpfs asks this process to do what a program changing a
normal file would do: create (or open) the file for writing, write one byte,
close it; or unlink it. kvpfs's handlers know this process by its pid and
answer it without touching the store (the change was applied already): the
byte is discarded, the unlink removes nothing.

It is a process and not a thread of kvpfs so that a SIGKILL of kvpfs closes
/dev/fuse and aborts whatever request this process has in flight, instead
of leaving kvpfs's own thread stuck in the kernel. It imports only the standard
library and `kvpfs.mountinfo`, so it starts in a few tens of milliseconds, and ends
with kvpfs: its stdin reaches EOF, or its answer EPIPE. (Not PR_SET_PDEATHSIG: that follows
the *thread* that started it, one of trio's worker threads, which may end
any time.)

Protocol on stdin/stdout: a request is `!BH` (kind, length) and that many
bytes `POOLDIR/NAME`; the answer is `!i`, 0 or an errno. The first request
(kind 0) names the mount point (kept out of argv, where `ps` and pgrep look).
"""

from __future__ import annotations

import enum
import errno
import os
import struct
import sys

from kvpfs.mountinfo import kvpfs_entries


class EchoKind(enum.IntEnum):
    """What the helper repeats through the mount (a request's first byte)."""

    CREATE = 1  # create the file, write a byte, close: IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE
    MODIFY = 2  # open it, write a byte, close: IN_MODIFY, IN_CLOSE_WRITE
    DELETE = 3  # unlink it: IN_DELETE (and IN_DELETE_SELF)

REQUEST = struct.Struct("!BH")
ANSWER = struct.Struct("!i")


def mount_id(mountpoint: str) -> int | None:
    """The id of the topmost kvpfs mount on `mountpoint`."""
    ids = [entry.mount_id for entry in kvpfs_entries() if str(entry.point) == mountpoint]
    return ids[-1] if ids else None


def fd_mount_id(fd: int) -> int | None:
    """The mount an open file is on, without asking the filesystem (/proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def perform(mountpoint: str, expected: int, kind: int, target: bytes) -> int:
    pool, _, name = target.partition(b"/")
    try:
        dfd = os.open(os.path.join(os.fsencode(mountpoint), pool),
                      os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        if fd_mount_id(dfd) != expected:
            return errno.ESTALE  # something else is mounted there now: touch nothing
        if kind == EchoKind.DELETE:
            os.unlink(name, dir_fd=dfd)
            return 0
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if kind == EchoKind.CREATE:
            # O_EXCL makes the kernel ask kvpfs about a name it may have cached since
            # (someone listed the directory): kvpfs says "not there", the kernel creates.
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            except FileExistsError:
                fd = os.open(name, flags, dir_fd=dfd)  # still IN_MODIFY, IN_CLOSE_WRITE
        else:
            fd = os.open(name, flags, dir_fd=dfd)
        try:
            os.write(fd, b"\n")  # IN_MODIFY; kvpfs discards it
        finally:
            os.close(fd)  # IN_CLOSE_WRITE
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(dfd)


def read_exactly(size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    if os.getppid() != parent:
        return 1  # kvpfs is gone already
    header = read_exactly(REQUEST.size)
    if header is None:
        return 1
    mountpoint = os.fsdecode(read_exactly(REQUEST.unpack(header)[1]) or b"")
    expected = mount_id(mountpoint)
    if expected is None:
        os.write(1, ANSWER.pack(-errno.ENOENT))
        return 1
    os.write(1, ANSWER.pack(0))  # ready
    while (header := read_exactly(REQUEST.size)) is not None:
        kind, length = REQUEST.unpack(header)
        target = read_exactly(length)
        if target is None:
            break
        os.write(1, ANSWER.pack(perform(mountpoint, expected, kind, target)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)  # kvpfs is gone (a SIGKILL mid-echo): nothing left to answer
