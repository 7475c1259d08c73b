"""The one bound on memory held for data not yet stored (write buffers, appends, scratch files).

Every user of the mount shares it, so that no one can make kvpfs hold unbounded
memory; a buffer that would pass it gets ENOSPC and changes nothing.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

from kvpfs.wire import limits
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)


class Unpublished:
    def __init__(self) -> None:
        self.total = 0

    def account(self, pool: int, name: bytes, old: int, new: int) -> int:
        """Move one buffer's share of the total from `old` to `new` bytes and return
        `new`; ENOSPC with a log line, changing nothing, past the bound."""
        if new > old and self.total + new - old > limits.UNPUBLISHED_MAX_BYTES:
            log.warning("refused to grow %s/%s: unpublished data (open write buffers, appends"
                        " and scratch files of all users) would exceed %d bytes; nothing"
                        " stored", Pool(pool).dirname, name.decode(errors="replace"),
                        limits.UNPUBLISHED_MAX_BYTES)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.total += new - old
        return new
