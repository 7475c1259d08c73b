"""The redo journal: a pool change written whole beside the pool before it is made.

A SIGKILL can stop a write at a page boundary (the kernel checks for a fatal signal before
each page), and records straddle pages, so every change to a pool file is first written whole,
with the bytes it replaces, to `.kvpfs-journal.kvp_pool_N` beside the pool (kept open and
emptied after each change; its name is outside the `.kvp_pool_*` glob scripts use), with a
checksum that tells a complete entry from one a crash cut short. The next writer to take the
lock redoes a change that was cut short: a killed kvpfs loses only the change in flight, and
never tears a record.

Entry format: the magic line, then one ASCII line `inode size_before offset size_after
len(data) len(before) sha256(data + before)`, then the new bytes and the bytes they replace.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

from kvpfs.storage import room
from kvpfs.storage.errors import io_error
from kvpfs.storage.files import fstat, pread_all, pwrite_all, truncate
from kvpfs.storage.records import RECORD_SIZE

log = logging.getLogger(__name__)

JOURNAL_PREFIX = ".kvpfs-journal"
_JOURNAL_MAGIC = b"kvpfs-redo 2\n"  # then: inode, sizes, offset, lengths, sha256; the bytes
_PAGE = 4096


def journal_path(pool_file: Path) -> Path:
    """The redo journal kept beside a pool file."""
    return pool_file.with_name(JOURNAL_PREFIX + pool_file.name)


def holds_change(pool_file: Path) -> bool:
    """Does the pool's journal hold a change (one a crash cut short, if the lock is ours)?"""
    try:
        return os.lstat(journal_path(pool_file)).st_size > 0
    except OSError:
        return False


class Journal:
    """The redo journal of one pool file, opened at its first change and kept open.

    Every method expects the caller to hold the pool file's locks.
    """

    def __init__(self, pool_file: Path) -> None:
        self.pool_file = pool_file
        self.path = journal_path(pool_file)
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None  # its (st_dev, st_ino)
        self._complained = False  # an unusable journal is logged once, not per lock

    def open(self, *, create: bool) -> tuple[int, int] | None:
        """The journal's descriptor and size, (re)opened if its path names another file:
        one lstat when it is the one we hold. None if there is none and `create` is
        False (made at the first change, so pools kvpfs only reads get none), or if it
        cannot be used."""
        try:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                if not create:
                    return None
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._id:
                assert self._fd is not None
                return self._fd, st.st_size
            self.close()
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            fd = os.open(self.path, flags, 0o600)
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError as exc:
            log.log(logging.DEBUG if self._complained else logging.WARNING,
                    "cannot use %s (%s); changes are not protected against a crash",
                    self.path, exc.strerror or exc)
            self._complained = True
            return None
        self._complained = False
        self._fd, self._id = fd, (opened.st_dev, opened.st_ino)
        return fd, opened.st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._id = None

    def write(self, fst: os.stat_result, offset: int, data: bytes, size_after: int,
              before: bytes) -> bool:
        """Record a change about to be made; True if it is now protected.

        Best effort: a full disk must not stop a change (a delete frees space), so a
        failure only logs, and that one change is then unprotected against a torn write."""
        journal = self.open(create=True)
        if journal is None:
            return False
        body = data + before
        header = (f"{fst.st_ino} {fst.st_size} {offset} {size_after} {len(data)} "
                  f"{len(before)} {hashlib.sha256(body).hexdigest()}\n").encode("ascii")
        entry = _JOURNAL_MAGIC + header + body
        try:
            # One call at offset 0 of an empty file; bytes after the entry (none unless
            # emptying it failed) are never read.
            written = os.pwrite(journal[0], entry, 0)
            if written != len(entry):
                raise OSError(errno.EIO, f"short write of {written} bytes")
        except OSError as exc:
            log.warning("cannot write %s (%s); this change is not protected against a crash",
                        self.path, exc.strerror or exc)
            self.clear()
            return False
        return True

    def clear(self) -> None:
        """Empty the journal: the change it held is done (or undone)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            log.warning("cannot empty %s: %s", self.path, exc.strerror)

    def reserve(self) -> None:
        """Best effort: room for one entry, if the journal exists already."""
        journal = self.open(create=False)  # made by the first change, as before
        if journal is not None:
            try:
                room.reserve(journal[0], 0, 2 * RECORD_SIZE + 512)
            except OSError as exc:
                log.debug("cannot reserve room in %s: %s", self.path, exc)

    def redo(self, fd: int) -> bool:
        """Finish the change a crash interrupted on pool descriptor `fd`; True if redone.

        Redone only on the same inode, while the file's size is between its sizes before
        and after the change (nobody appended since); the write is idempotent, so redoing
        a change that had in fact completed is harmless. The journal is emptied either way.
        Checked on every lock: normally one lstat of an empty journal.
        """
        journal = self.open(create=False)
        if journal is None or journal[1] == 0:
            return False
        redone = self._apply(fd)  # raises: kept for the next try
        self.clear()
        return redone

    def _apply(self, fd: int) -> bool:
        assert self._fd is not None
        try:
            raw = pread_all(self._fd)
            if not raw.startswith(_JOURNAL_MAGIC):
                raise ValueError("not a kvpfs journal")
            end = raw.index(b"\n", len(_JOURNAL_MAGIC))
            fields = raw[len(_JOURNAL_MAGIC) : end].decode("ascii").split()
            ino, size_before, offset, size_after, length, before_length = (
                int(f) for f in fields[:6])
            body = bytes(raw[end + 1 : end + 1 + length + before_length])
            if len(body) < length + before_length or \
                    hashlib.sha256(body).hexdigest() != fields[6]:
                raise ValueError("incomplete journal")
        except (OSError, UnicodeDecodeError, ValueError, IndexError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return False
        data, before = body[:length], body[length:]
        fst = fstat(fd, self.pool_file)
        if fst.st_ino != ino:
            return False
        try:
            current = os.pread(fd, max(0, fst.st_size - offset), offset)
        except OSError as exc:
            raise io_error("reading pool file", self.pool_file, exc) from exc
        done = fst.st_size == size_after and current[:length] == data
        if done or not _cut_short(current, fst.st_size, offset, data, before, size_before):
            if not done:
                log.warning("not redoing the change in %s: another program changed the file"
                            " since the crash", self.path)
            return False
        if data:
            pwrite_all(fd, data, offset, self.pool_file, "redoing an interrupted change in")
        if max(fst.st_size, offset + len(data)) != size_after:
            truncate(fd, size_after, self.pool_file)
        log.warning("finished a change to %s interrupted by a crash", self.pool_file)
        return True


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    low, high = 0, n  # the first difference lies in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _cut_short(current: bytes, size: int, offset: int, data: bytes, before: bytes,
               size_before: int) -> bool:
    """Is the file what this change leaves when stopped part-way, and nothing else?

    A write stops only at a page boundary (or before its first or after its last byte),
    and the truncate comes after it: so the region must read `data[:k] + before[k:]` for
    such a `k`, with the size that leaves. Any other content means another program
    wrote since the crash, and redoing would clobber it.
    """
    current = current[: max(len(data), len(before))]  # the region this change covers
    prefix = _common_prefix(current, data)  # new bytes reach at most this far
    if len(current) <= len(before):  # old bytes start at the latest from here
        old = before[: len(current)]
        old_from = len(current) - _common_prefix(current[::-1], old[::-1])
    else:
        old_from = len(current)  # grown past the old end: only all-new can match
    first_page = (-offset) % _PAGE
    candidates = sorted({0, len(data), *range(first_page, len(data), _PAGE)})
    return any(
        old_from <= k <= prefix and size == max(size_before, offset + k)
        for k in candidates
    )

