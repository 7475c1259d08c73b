"""A FUSE mount nobody answers: what a stuck kvpfs leaves behind, made on purpose."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def silent_fuse_mount(mnt: Path) -> int:
    """A kvpfs-typed FUSE mount whose /dev/fuse nobody reads: what a stuck kvpfs leaves.
    Every request on it waits (the kernel's FUSE_INIT is never answered). Returns the fd;
    closing it (the last reference) aborts the connection."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"kvpfs", os.fsencode(mnt), b"fuse.kvpfs", 2 | 4, options) != 0:  # nosuid,nodev
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, os.strerror(error), str(mnt))
    return fd


def waiting_in_fuse(pid: int) -> bool:
    try:
        return "fuse" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
