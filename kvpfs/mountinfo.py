"""Which kvpfs mounts exist, read from /proc/self/mountinfo, never from the mounts themselves.

A dead or wedged FUSE mount answers ENOTCONN or does not answer at all, so everything that
must find or judge a kvpfs mount (start-up, `kvpfs host`, `status`, `wait`, `recover`, the
inotify echo helper) asks the kernel's mount table instead. Standard library only: the echo
helper process imports it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.kvpfs"


@dataclass(frozen=True)
class KvpfsMount:
    mount_id: int
    device: str  # major:minor; the minor is the FUSE connection's number
    point: Path


def unescape(text: str) -> str:
    """A mountinfo field: space, tab, newline and backslash are written as octal escapes."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def kvpfs_entries() -> list[KvpfsMount]:
    """Every kvpfs mount visible to this process, in mount order (stacked ones too)."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == FSTYPE:
                    found.append(KvpfsMount(int(fields[0]), fields[2],
                                            Path(unescape(fields[4]))))
    except OSError:
        pass
    return found


def kvpfs_mount_table() -> list[tuple[str, Path]]:
    """(device number, mount point) of every kvpfs mount visible here, in mount order."""
    return [(entry.device, entry.point) for entry in kvpfs_entries()]


def kvpfs_mounts() -> list[Path]:
    """Mount points of kvpfs filesystems visible to this process."""
    return [entry.point for entry in kvpfs_entries()]


def canonical_mountpoint(mountpoint: Path) -> Path:
    """The mount point's absolute path, resolving symlinks in its parent only.

    Never looks at the mount point itself: a dead or wedged FUSE mount there would
    answer ENOTCONN or hang.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    return Path(os.path.realpath(mountpoint.parent)) / mountpoint.name

