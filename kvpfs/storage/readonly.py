"""Reading pools without changing anything, for the tools (`kvpfs get/ls/status/dump/wait`).

Shared locks only: nothing is created, modified or recovered (that is the writers' job), so it
is safe on read-only media and on another system's pool directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvpfs.storage.errors import PoolFileError, io_error
from kvpfs.storage.files import pread_all, refuse_special
from kvpfs.storage.journal import holds_change
from kvpfs.storage.locks import (
    DEFAULT_LOCK_TIMEOUT,
    acquire_locks,
    deadline_after,
    lock_timeout_error,
    release_locks,
)
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.poolrecords import PoolRecords, Signature
from kvpfs.storage.records import Record, parse_pool
from kvpfs.wire.pools import POOL_COUNT
from kvpfs.wire.protocol import Pool


@dataclass(kw_only=True)
class PoolFileRead(PoolRecords):
    """A pool's records as a tool read them, with the facts of the file at that moment."""

    pool: int
    path: Path
    data: bytes | bytearray = b""  # the whole file, as read
    stat_result: os.stat_result | None = None  # None: the file does not exist (an empty pool)
    # A kvpfs change was cut short; its journal still holds it for the next writer to finish.
    unfinished_change: bool = False

    @property
    def exists(self) -> bool:
        return self.stat_result is not None

    @property
    def name(self) -> str:
        return Pool(self.pool).dirname


def read_pool(pool_dir: Path, pool: int, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
              ) -> PoolFileRead:
    """Read one pool under the shared locks; a missing file is an empty pool.

    Never creates, modifies or recovers anything (that is the writers' job), so it is safe on
    read-only media and on another system's pool directory. Raises PoolFileError (LockTimeout
    naming the holder when a writer keeps the lock past `lock_timeout`). What tools
    (`kvpfs get/ls/status`, `kvpfs wait`) read with.
    """
    path = pool_path(pool_dir, pool)
    missing = PoolFileRead(pool=pool, path=path)
    try:
        refuse_special(os.lstat(path), path)
    except FileNotFoundError:
        return missing
    except PoolFileError:
        raise
    except OSError as exc:
        raise io_error("checking pool file", path, exc) from exc
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return missing
    except OSError as exc:
        raise io_error("opening pool file", path, exc) from exc
    try:
        refuse_special(os.fstat(fd), path)
        if not acquire_locks(fd, exclusive=False, deadline=deadline_after(lock_timeout)):
            raise lock_timeout_error(path, fd, lock_timeout)
        try:
            data = pread_all(fd)
            st = os.fstat(fd)
            unfinished = holds_change(path)  # under the lock: no change under way
        finally:
            release_locks(fd)
    except PoolFileError:
        raise
    except OSError as exc:
        raise io_error("reading pool file", path, exc) from exc
    finally:
        os.close(fd)
    records, trailing = parse_pool(data)
    return PoolFileRead(records, trailing, Signature.from_stat(st), st.st_mtime_ns, pool=pool,
                        path=path, data=data, stat_result=st, unfinished_change=unfinished)


def load_pool_dir(pool_dir: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
                  ) -> dict[int, list[Record]]:
    """Read all pools under shared locks (OFD read lock + flock LOCK_SH), for tools.

    Missing files (or a missing directory) are empty pools. Nothing is created or modified.
    """
    return {
        pool: read_pool(pool_dir, pool, lock_timeout=lock_timeout).records
        for pool in range(POOL_COUNT)
    }

