"""One pool file (`/var/lib/hyperv/.kvp_pool_0..4`), opened, locked and changed in place.

A pool file is a flat array of 2560-byte records (`records.py`), no header, no count.
Everything here is synchronous, blocking I/O; callers run it in worker threads.

Writing is done in place on the one inode (no temp file + rename): other writers lock the
inode they opened, and the reference daemon, cloud-init and azure-init keep or reopen the path,
so a rename would silently defeat their locking. Every change goes through the redo journal
(`journal.py`) first, so a killed kvpfs loses only the change in flight and never tears a
record.

`PoolFile.locked` takes both locks of `locks.py` through the one descriptor used for I/O.
Because both locks belong to that open file description, two threads sharing a PoolFile would
both "own" them, so a per-object thread lock serialises the threads of this process as well.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvpfs.storage import room, writeplan
from kvpfs.storage.errors import LockTimeout, PoolFileError, io_error
from kvpfs.storage.files import fstat, pread_all, prepare_dir, pwrite_all, refuse_special, truncate
from kvpfs.storage.journal import Journal
from kvpfs.storage.locks import (
    DEFAULT_LOCK_TIMEOUT,
    acquire_locks,
    deadline_after,
    lock_timeout_error,
    release_locks,
)
from kvpfs.storage.poolrecords import PoolRecords, Signature
from kvpfs.storage.records import RECORD_SIZE, Record, encode_record, slot_bytes
from kvpfs.wire.pools import POOL_COUNT

log = logging.getLogger(__name__)


def pool_path(pool_dir: Path, pool: int) -> Path:
    """Path of pool `pool` (0..4) in `pool_dir`, named as hv_kvp_daemon names it."""
    if not 0 <= pool < POOL_COUNT:
        raise ValueError(f"pool number must be 0..{POOL_COUNT - 1}, not {pool}")
    return Path(pool_dir) / f".kvp_pool_{pool}"


class PoolFile:
    """One pool file, kept open for the life of the process and modified in place.

    Use `with pool.locked(): records = pool.read().records; pool.write_record(...)`: `locked()`
    (re)opens the file, takes both locks, and first finishes a delete that a crash interrupted.
    All other methods expect the caller to hold the lock.
    """

    def __init__(self, path: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._fd: int | None = None
        self._mutex = threading.RLock()
        self._depth = 0  # nesting of locked() by the thread that holds _mutex
        self._locked_fd: int | None = None  # the descriptor our file locks are on
        self._reopened_in_lock = False  # this locked() block had to reopen the file
        self._journal = Journal(self.path)  # kept open (see _change)

    # ---- lifecycle

    def __enter__(self) -> PoolFile:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Open (creating 0600 if missing) unless already open."""
        with self._mutex:
            if self._fd is None:
                self._fd = self._open_fd()

    def close(self) -> None:
        """Close the descriptor (which drops any locks held through it)."""
        with self._mutex:
            self._refuse_while_locked("close")
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            self._journal.close()

    def ensure_open(self) -> bool:
        """Reopen if the path no longer names our inode (deleted or replaced); True if it did.

        A pool file deleted while we run is recreated instead of being fatal (the reference
        daemon exits in that case). `locked()` does this itself before locking, so inside a
        `locked()` block this returns True if that block had to reopen the file (the cached
        contents are then stale). If a writer that ignores locks replaced the file during the
        block, the locks are moved to the new file (waiting up to `lock_timeout`) and True is
        returned.
        """
        with self._mutex:
            if not self._depth:
                return self._reopen_if_replaced()
            if self._path_matches_fd():
                return self._reopened_in_lock
            fd, self._locked_fd = self._locked_fd, None
            if fd is not None:
                self._unlock(fd)
            self._lock_current(deadline_after(self.lock_timeout), self.lock_timeout)
            self._reopened_in_lock = True
            return True

    def _path_matches_fd(self) -> bool:
        """Does the path still name the inode we have open (not deleted, not replaced)?"""
        if self._fd is None:
            return False
        try:
            st = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise io_error("checking pool file", self.path, exc) from exc
        current = self._stat(self._fd)
        return (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)

    def _reopen_if_replaced(self) -> bool:
        if self._fd is not None and self._path_matches_fd():
            return False
        if self._fd is not None:
            log.info("pool file %s was deleted or replaced; reopening it", self.path)
            fd, self._fd = self._fd, None
            os.close(fd)
        self._fd = self._open_fd()
        return True

    def _refuse_while_locked(self, what: str) -> None:
        # Closing the locked descriptor would drop the locks and could let a reused fd number
        # be "unlocked" later; that is a caller bug, so say so loudly.
        if self._depth:
            raise RuntimeError(f"PoolFile.{what}() called inside locked() for {self.path}")

    def _open_fd(self) -> int:
        """Open O_RDWR|O_NOFOLLOW, creating with O_EXCL so we know whether we made the file
        (only then is the mode forced to 0600 with fchmod, so the umask cannot change it and
        an existing file's mode is left alone)."""
        prepare_dir(self.path.parent)
        base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        for _attempt in range(10):
            try:
                st: os.stat_result | None = os.lstat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise io_error("checking pool file", self.path, exc) from exc
            if st is not None:
                refuse_special(st, self.path)
            created = st is None
            try:
                if created:
                    fd = os.open(self.path, base | os.O_CREAT | os.O_EXCL, 0o600)
                else:
                    fd = os.open(self.path, base)
            except (FileExistsError, FileNotFoundError):
                continue  # raced with another creator or a deleter: look again
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PoolFileError(
                        f"pool file {self.path} is a symlink; refusing to follow it. Remove "
                        "the symlink so kvpfs can create a regular file",
                        self.path,
                        errno.ELOOP,
                    ) from exc
                raise io_error("opening pool file", self.path, exc) from exc
            try:
                try:
                    fst = os.fstat(fd)
                except OSError as exc:
                    raise io_error("stat of pool file", self.path, exc) from exc
                refuse_special(fst, self.path)
                if created:
                    try:
                        os.fchmod(fd, 0o600)
                    except OSError as exc:
                        raise io_error("setting mode 0600 on", self.path, exc) from exc
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise PoolFileError(
            f"pool file {self.path} keeps appearing and disappearing while being opened; "
            "another program is creating and deleting it",
            self.path,
            errno.EAGAIN,
        )

    def _require_fd(self) -> int:
        if self._fd is None:
            raise PoolFileError(
                f"pool file {self.path} is not open; call open() or use locked()",
                self.path,
                errno.EBADF,
            )
        return self._fd

    # ---- locking

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None, *,
               deadline: float | None = None) -> Iterator[PoolFile]:
        """Hold the OFD write lock and flock(LOCK_EX) on the current pool file.

        Reopens first if the file was deleted or replaced, and re-checks after locking (a
        replacement while we waited would leave us locking an orphaned inode). Then finishes a
        delete that a crash interrupted (see `delete_record`). Re-entrant in the same thread.
        Raises LockTimeout naming the holders.

        `deadline` (a `time.monotonic()` value) replaces `timeout` for a caller whose request
        has been waiting already: it fails at the moment fixed when the request arrived, so
        requests queued behind a stuck lock each wait one lock timeout in all, not one each.
        At least one attempt is made even when it has passed.
        """
        limit = self.lock_timeout if timeout is None else timeout
        if deadline is None:
            deadline = deadline_after(limit)
        wait = -1.0 if limit == float("inf") else max(0.0, deadline - time.monotonic())
        if not self._mutex.acquire(timeout=wait):
            raise LockTimeout(
                f"timed out after {limit:g}s waiting for the lock on {self.path}; held by "
                f"another thread of this process (pid {os.getpid()})",
                self.path,
                f"another thread of this process (pid {os.getpid()})",
            )
        try:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._reopened_in_lock = self._lock_current(deadline, limit)
            self._depth = 1
            try:
                self._journal.redo(self._require_fd())
                yield self
            finally:
                self._depth = 0
                self._reopened_in_lock = False
                fd, self._locked_fd = self._locked_fd, None
                if fd is not None:
                    self._unlock(fd)
        finally:
            self._mutex.release()

    def _lock_current(self, deadline: float, limit: float) -> bool:
        """Lock the file the path names now (sets `_locked_fd`); True if it had to reopen."""
        reopened = False
        while True:
            reopened = self._reopen_if_replaced() or reopened
            fd = self._require_fd()
            try:
                acquired = acquire_locks(fd, exclusive=True, deadline=deadline)
            except OSError as exc:
                raise io_error("locking pool file", self.path, exc) from exc
            if not acquired:
                raise lock_timeout_error(self.path, fd, limit)
            try:
                current = self._path_matches_fd()
            except BaseException:
                self._unlock(fd)
                raise
            if current:
                self._locked_fd = fd
                return reopened
            self._unlock(fd)  # replaced or deleted while we waited: lock the new file instead

    def _unlock(self, fd: int) -> None:
        try:
            release_locks(fd)
        except OSError as exc:
            raise io_error("unlocking pool file", self.path, exc) from exc

    # ---- reading

    def fstat_signature(self) -> Signature:
        """Signature of the open descriptor (what we would read)."""
        fd = self._require_fd()
        try:
            return Signature.from_stat(os.fstat(fd))
        except OSError as exc:
            raise io_error("stat of pool file", self.path, exc) from exc

    def read(self) -> PoolRecords:
        """Read and parse the whole file (caller holds the lock)."""
        fd = self._require_fd()
        try:
            data = pread_all(fd)
            signature = Signature.from_stat(os.fstat(fd))
        except OSError as exc:
            raise io_error("reading pool file", self.path, exc) from exc
        return PoolRecords.parse(data, signature)

    # ---- writing

    def write_record(self, index: int, key: bytes, value: bytes) -> None:
        """Overwrite whole record `index` in place (caller holds the lock)."""
        fd = self._require_fd()
        fst = self._stat(fd)
        count = fst.st_size // RECORD_SIZE
        if not 0 <= index < count:
            raise IndexError(f"record {index} out of range: {self.path} has {count} records")
        self._change(fd, fst, index * RECORD_SIZE, encode_record(key, value), fst.st_size,
                     f"writing record {index} of")

    def append_record(self, key: bytes, value: bytes) -> int:
        """Write a new record after the last whole one and return its index.

        A trailing partial record (from a crashed foreign writer) is overwritten, as the
        reference daemon's next rewrite would drop it.
        """
        fd = self._require_fd()
        fst = self._stat(fd)
        index = fst.st_size // RECORD_SIZE
        offset = index * RECORD_SIZE
        self._change(fd, fst, offset, encode_record(key, value), offset + RECORD_SIZE,
                     "appending a record to")
        return index

    def reserve_room(self, new_records: int) -> None:
        """Reserve room for `new_records` more records and one journal entry (caller holds
        the lock), so that a change made soon after cannot fail for want of room; the size
        is unchanged. PoolFileError(ENOSPC) if the pool cannot grow. The journal is best
        effort, as in `_change`."""
        fd = self._require_fd()
        end = self._stat(fd).st_size // RECORD_SIZE * RECORD_SIZE
        try:
            room.reserve(fd, end, new_records * RECORD_SIZE)
        except OSError as exc:
            raise io_error("reserving room for a new record in", self.path, exc) from exc
        self._journal.reserve()

    def delete_record(self, index: int, records: Sequence[Record]) -> None:
        """Remove slot `index`, keeping the order of the others (as the reference daemon does).

        `records` are the records read under the same lock. The later records are written one
        slot up (valid ones re-encoded zero-padded, others copied from `raw`), then the file
        is truncated by one record. No fsync: like the reference daemon we do not try to
        survive power loss, only the death of the process (see `_change`).
        """
        fd = self._require_fd()
        fst = self._stat(fd)
        count = fst.st_size // RECORD_SIZE
        if len(records) != count:
            raise ValueError(
                f"stale snapshot for {self.path}: it has {count} records, {len(records)} given; "
                "re-read under the lock"
            )
        if not 0 <= index < count:
            raise IndexError(f"record {index} out of range: {self.path} has {count} records")
        tail = b"".join(slot_bytes(r) for r in records[index + 1 :])
        self._change(fd, fst, index * RECORD_SIZE, tail, (count - 1) * RECORD_SIZE,
                     f"shifting records after {index} in")

    def apply(self, change: writeplan.Plan, records: Sequence[Record]) -> None:
        """Carry out a write plan made from `records`, read under the same lock."""
        if isinstance(change, writeplan.Modify):
            self.write_record(change.slot, change.record.key, change.record.value)
        elif isinstance(change, writeplan.Append):
            slot = self.append_record(change.record.key, change.record.value)
            if slot != change.slot:
                raise ValueError(f"stale records for {self.path}: appended slot {slot}, "
                                 f"planned {change.slot}; re-read under the lock")
        elif isinstance(change, (writeplan.Truncate, writeplan.Remove)):
            remaining = list(records)
            # Last to first, so each removal leaves the earlier slot numbers valid.
            for slot in reversed(change.slots):
                self.delete_record(slot, remaining)
                del remaining[slot]

    def _change(self, fd: int, fst: os.stat_result, offset: int, data: bytes,
                size_after: int, what: str) -> None:
        """Write `data` at `offset` and leave the file `size_after` long, crash-safely.

        A SIGKILL can stop a write at any page boundary (the kernel checks for a fatal
        signal before each page), and records straddle pages, so one pwrite is not enough:
        the change goes first, whole and with the bytes it replaces, into a redo journal,
        with a checksum that tells a complete entry from one a crash cut short. The journal
        file is kept and emptied after each change: creating, renaming and removing a file
        per change cost some 90 µs on ext4, a write and a truncate 5 µs. Whoever takes the
        lock next finishes a change cut short (`Journal.redo`).
        """
        before = self._before_image(fd, fst, offset, data, size_after)
        journaled = self._journal.write(fst, offset, data, size_after, before)
        try:
            if data:
                pwrite_all(fd, data, offset, self.path, what)
            if max(fst.st_size, offset + len(data)) != size_after:
                truncate(fd, size_after, self.path)
        except BaseException:
            # Reported as failed, so it must not be redone later: put the old bytes back.
            try:
                pwrite_all(fd, before, offset, self.path, "restoring after a failed change to")
                truncate(fd, fst.st_size, self.path)
            except PoolFileError:
                raise  # the journal stays: the next writer rolls the change forward
            if journaled:
                self._journal.clear()
            raise
        if journaled:
            self._journal.clear()

    def _before_image(self, fd: int, fst: os.stat_result, offset: int, data: bytes,
                      size_after: int) -> bytes:
        """The bytes a change replaces: its range, or up to the old end if it resizes."""
        end = offset + len(data) if size_after == fst.st_size else fst.st_size
        try:
            return os.pread(fd, max(0, end - offset), offset)
        except OSError as exc:
            raise io_error("reading pool file", self.path, exc) from exc

    def _stat(self, fd: int) -> os.stat_result:
        return fstat(fd, self.path)

