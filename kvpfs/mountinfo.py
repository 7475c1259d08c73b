"""Which kvpfs mounts exist, read from /proc/self/mountinfo, never from the mounts themselves.

A dead or wedged FUSE mount answers ENOTCONN or does not answer at all, so everything that
must find or judge a kvpfs mount (start-up, `kvpfs host`, `status`, `wait`, `recover`, the
inotify echo helper) asks the kernel's mount table instead. Standard library only: the echo
helper process imports it too.

Any user may mount a filesystem of type fuse.kvpfs (fusermount3 lets them name the
subtype), so the type alone proves nothing: a command trusts only mounts made by root or
by the user running it. Who made a FUSE mount is its `user_id=` option, which the kernel
reports from the connection itself and fusermount3 always sets to the real caller's uid
(a user cannot pass `user_id=` to it).
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
    owner: int | None = None  # the FUSE connection's user_id=: who mounted it

    @property
    def trusted(self) -> bool:
        """Made by root or by the user running this: a mount anyone else made may serve
        made-up values, or name a control socket of their choosing."""
        return self.owner is not None and self.owner in (0, os.getuid())


def owner_of(super_options: str) -> int | None:
    """The `user_id=` of a FUSE mount's superblock options, or None."""
    for option in super_options.split(","):
        name, _, value = option.partition("=")
        if name == "user_id" and value.isdigit():
            return int(value)
    return None


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


@dataclass(frozen=True)
class MountLine:
    """One line of mountinfo: any mount, of any filesystem."""

    mount_id: int
    parent_id: int
    device: str
    point: Path
    fstype: str
    owner: int | None  # a FUSE mount's user_id=; None for other filesystems


def mount_lines() -> list[MountLine]:
    """Every mount visible to this process, in mount order; none if mountinfo is unreadable."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                options = fields[sep + 3] if len(fields) > sep + 3 else ""
                fstype = fields[sep + 1]
                found.append(MountLine(
                    int(fields[0]), int(fields[1]), fields[2], Path(unescape(fields[4])),
                    fstype, owner_of(options) if fstype.startswith("fuse") else None))
    except (OSError, ValueError, IndexError):
        pass
    return found


def kvpfs_entries(*, anyones: bool = False) -> list[KvpfsMount]:
    """The kvpfs mounts visible to this process that it can trust (see `KvpfsMount.trusted`),
    in mount order (stacked ones too); with `anyones`, every user's."""
    found = [KvpfsMount(m.mount_id, m.device, m.point, m.owner)
             for m in mount_lines() if m.fstype == FSTYPE]
    return found if anyones else [entry for entry in found if entry.trusted]


def kvpfs_mount_table() -> list[tuple[str, Path]]:
    """(device number, mount point) of every trusted kvpfs mount here, in mount order."""
    return [(entry.device, entry.point) for entry in kvpfs_entries()]


def kvpfs_mounts() -> list[Path]:
    """Mount points of the trusted kvpfs filesystems visible to this process."""
    return [entry.point for entry in kvpfs_entries()]


def canonical_mountpoint(mountpoint: Path) -> Path:
    """The mount point's absolute path, resolving symlinks in its parent only.

    Never looks at the mount point itself: a dead or wedged FUSE mount there would
    answer ENOTCONN or hang.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    return Path(os.path.realpath(mountpoint.parent)) / mountpoint.name

