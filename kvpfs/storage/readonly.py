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
from kvpfs.storage.records import Record, parse_pool
from kvpfs.wire.pools import POOL_COUNT, POOL_NAMES


@dataclass(frozen=True)
class PoolContents:
    """One pool file as read under the shared locks: bytes, records and stat of one moment."""

    pool: int
    path: Path
    data: bytes
    records: tuple[Record, ...]
    trailing_bytes: int
    stat_result: os.stat_result | None  # None: the file does not exist (an empty pool)
    # A kvpfs change was cut short; its journal still holds it for the next writer to finish.
    unfinished_change: bool = False

    @property
    def exists(self) -> bool:
        return self.stat_result is not None

    @property
    def name(self) -> str:
        return POOL_NAMES[self.pool]

    def valid_items(self) -> list[tuple[bytes, bytes]]:
        """Every record the host may see, in file order, duplicates included."""
        return [(r.key, r.value) for r in self.records if r.valid]

    def last_wins(self) -> dict[bytes, bytes]:
        """Key -> value of its last valid record (what the mount and lookups show), ordered by
        each key's first appearance."""
        values: dict[bytes, bytes] = {}
        for key, value in self.valid_items():
            values[key] = value
        return values

    def invalid_slots(self) -> list[int]:
        return [slot for slot, r in enumerate(self.records) if not r.valid]

    def lookup(self, key: bytes) -> bytes | None:
        """The value of the last valid record with `key`, or None."""
        for record in reversed(self.records):
            if record.valid and record.key == key:
                return record.value
        return None


def read_pool(pool_dir: Path, pool: int, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
              ) -> PoolContents:
    """Read one pool under the shared locks; a missing file is an empty pool.

    Never creates, modifies or recovers anything (that is the writers' job), so it is safe on
    read-only media and on another system's pool directory. Raises PoolFileError (LockTimeout
    naming the holder when a writer keeps the lock past `lock_timeout`). What tools
    (`kvpfs get/ls/status`, `kvpfs wait`) read with.
    """
    path = pool_path(pool_dir, pool)
    missing = PoolContents(pool, path, b"", (), 0, None)
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
    return PoolContents(pool, path, data, tuple(records), trailing, st, unfinished)


def load_pool_dir(pool_dir: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
                  ) -> dict[int, list[Record]]:
    """Read all pools under shared locks (OFD read lock + flock LOCK_SH), for tools.

    Missing files (or a missing directory) are empty pools. Nothing is created or modified.
    """
    return {
        pool: list(read_pool(pool_dir, pool, lock_timeout=lock_timeout).records)
        for pool in range(POOL_COUNT)
    }

