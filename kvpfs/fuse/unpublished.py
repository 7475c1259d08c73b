"""The bound on memory held for data not yet stored (write buffers, appends, scratch files).

Counted per user (`quota.UserQuota`): an unprivileged user holds at most
UNPUBLISHED_PER_USER_BYTES, all of them together at most UNPUBLISHED_MAX_BYTES less
UNPUBLISHED_ROOT_BYTES, which only root (and the user kvpfs runs as) may use; so no one
can make kvpfs hold unbounded memory, nor take the room root needs to write. A buffer that
would pass a bound gets ENOSPC and changes nothing.
"""

from __future__ import annotations

import errno

import pyfuse3

from kvpfs.fuse.errors import refusals
from kvpfs.quota import UserQuota
from kvpfs.wire import limits
from kvpfs.wire.protocol import Pool


class Unpublished:
    def __init__(self, privileged: frozenset[int] = frozenset({0})) -> None:
        self.quota = UserQuota(
            "unpublished data (open write buffers, appends and scratch files), in bytes,",
            lambda: (limits.UNPUBLISHED_PER_USER_BYTES, limits.UNPUBLISHED_MAX_BYTES,
                     limits.UNPUBLISHED_ROOT_BYTES), privileged)

    @property
    def total(self) -> int:
        return self.quota.sum_all

    def account(self, pool: int, name: bytes, old: int, new: int, *, uid: int = 0) -> int:
        """Move one buffer's share, counted for `uid`, from `old` to `new` bytes and return
        `new`; ENOSPC with a log line (at a bounded rate), changing nothing, past a bound."""
        why = self.quota.take(uid, new - old)
        if why is not None:
            refusals.warning("refused to grow %s/%s: %s; nothing stored",
                             Pool(pool).dirname, name.decode(errors="replace"), why)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return new
