"""Reserving disk room ahead of a change, so that the change cannot fail for want of it.

A value written through the mount is stored when the file is closed, and shells
ignore the error of that close (bash closes inside `dup2`). So kvpfs makes sure,
when the file is opened or first written, that the pool file can take the record
it will need: `fallocate(FALLOC_FL_KEEP_SIZE)` allocates the blocks past the end
of the file without changing its size, so the later append writes into blocks
that already exist. Filesystems without `fallocate` get a `statvfs` estimate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def reserve(fd: int, offset: int, length: int) -> None:
    """Make sure `length` bytes from `offset` can be written to `fd` without ENOSPC.

    Raises OSError(ENOSPC) if they cannot be had. The file's size is left alone.
    """
    if length <= 0:
        return
    if _fallocate is not None:
        if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code))
    # No fallocate here (some FUSE and network filesystems): an estimate, not a reservation.
    st = os.fstatvfs(fd)
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    if free * st.f_frsize < length:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
