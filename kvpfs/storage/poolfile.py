"""Byte-compatible access to the KVP pool files (`/var/lib/hyperv/.kvp_pool_0..4`).

A pool file is a flat array of 2560-byte records (`char key[512]; char value[2048];`), no
header, no count. Everything here is synchronous, blocking I/O; callers run it in worker
threads.

Reading: key and value are cut at their first NUL, because the reference daemon and other
writers leave stale bytes (old values, heap garbage) after the terminator. A trailing partial
record (a foreign writer that crashed mid-write) is tolerated and reported, never parsed.
Records that are not valid UTF-8, or whose fields are not NUL-terminated, keep their original
2560 bytes in `Record.raw` so that shifting them during a delete copies them back untouched.

Writing is done in place on the one inode (no temp file + rename): other writers lock the
inode they opened, and the reference daemon, cloud-init and azure-init keep or reopen the path,
so a rename would silently defeat their locking. A SIGKILL can stop a write at a page
boundary, and records straddle pages, so every change is first written whole to a redo
journal beside the pool (`.kvpfs-journal.kvp_pool_N`, kept open and emptied after each change)
and redone by the next writer if it was cut short: a killed kvpfs loses only the change in
flight, and never tears a record.

Locking (`PoolFile.locked`) takes two locks on the whole file, always in the same order:

1. an exclusive fcntl lock of the *open-file-description* flavour (`F_OFD_SETLK`). It conflicts
   with the classic POSIX locks of hv_kvp_daemon (`F_SETLKW`) and `lockf`, but unlike a classic
   POSIX lock it is owned by our open file description, not by the process: a POSIX lock would
   be dropped as soon as *any* descriptor of the file is closed anywhere in this process (for
   example by a tool reading the pool), and would never exclude another PoolFile of the same
   process.
2. `flock(LOCK_EX)`, which is what cloud-init, azure-init and Azure/hyperkv use; on Linux flock
   and fcntl locks are independent, so neither alone excludes both kinds of writer.

An OFD lock and a flock taken through the same open file description do not conflict with each
other (they are different lock families, and each is owned by that description), so one
descriptor is used both for I/O and for locking; there is no separate lock fd. Because both
locks belong to the description, two threads sharing a PoolFile would both "own" them, so a
per-object thread lock serialises the threads of this process as well. Locks are acquired
without blocking, retried with short back-off sleeps until a deadline, and a timeout names the
holders from /proc/locks (and /proc/PID/fdinfo for OFD locks, which record no pid).

Not supported: pool files on NFS (flock is emulated there with fcntl locks, so our own two
locks would collide) and 32-bit `struct flock` layouts other than the LFS one Python uses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvpfs.storage import room, writeplan
from kvpfs.storage.records import (
    KEY_FIELD,
    RECORD_SIZE,
    VALUE_FIELD,
    Record,
    encode_record,
    parse_pool,
    slot_bytes,
)
from kvpfs.wire.pools import POOL_NAMES

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "KEY_FIELD",
    "POOL_COUNT",
    "RECORD_SIZE",
    "VALUE_FIELD",
    "LockTimeout",
    "PoolContents",
    "PoolFile",
    "PoolFileError",
    "Record",
    "Signature",
    "Snapshot",
    "describe_lock_holders",
    "encode_record",
    "load_pool_dir",
    "parse_pool",
    "pool_path",
    "read_pool",
    "stat_signature",
]

log = logging.getLogger(__name__)

POOL_COUNT = 5
# How long a writer waits for another program's lock (`--lock-timeout`).
DEFAULT_LOCK_TIMEOUT = 5.0

_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# with native alignment; zero padding is appended so the kernel never reads past our buffer.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_PAD = b"\0" * 8

# `.kvpfs-journal.kvp_pool_N` beside each pool: the change in flight, for redo. It stays
# (empty between changes) and its name is outside the `.kvp_pool_*` glob scripts use.
JOURNAL_PREFIX = ".kvpfs-journal"
_JOURNAL_MAGIC = b"kvpfs-redo 2\n"  # then: inode, sizes, offset, lengths, sha256; the bytes
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})
_BACKOFF_START = 0.001
_BACKOFF_MAX = 0.02
_READ_CHUNK = 1 << 20


def pool_path(pool_dir: Path, pool: int) -> Path:
    """Path of pool `pool` (0..4) in `pool_dir`, named as hv_kvp_daemon names it."""
    if not 0 <= pool < POOL_COUNT:
        raise ValueError(f"pool number must be 0..{POOL_COUNT - 1}, not {pool}")
    return Path(pool_dir) / f".kvp_pool_{pool}"


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class Signature:
    """Cheap identity of a file's current contents, to skip re-reading unchanged pools."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Signature:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_signature(path: Path | str) -> Signature | None:
    """Signature of whatever is at `path` now (not following symlinks), None if missing."""
    try:
        return Signature.from_stat(os.lstat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class Snapshot:
    """A pool's records as read under the lock, with the signature they were read at."""

    records: tuple[Record, ...]
    trailing_bytes: int
    signature: Signature


# --------------------------------------------------------------------------- errors


class PoolFileError(OSError):
    """A pool file or its directory is unusable, or I/O on it failed.

    The message names the path and, where there is one, the remedy. `errno` is kept from the
    underlying failure (so ENOSPC stays recognisable) or set to the closest match.
    """

    def __init__(self, message: str, path: Path | str | None = None, err: int | None = None):
        if err is None:
            super().__init__(message)
        else:
            super().__init__(err, message)
        self.message = message
        self.filename = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.message, self.filename, self.errno))


class LockTimeout(PoolFileError):
    """The pool file's locks were not free before the deadline; `holders` says who has them."""

    def __init__(self, message: str, path: Path | str | None = None, holders: str = ""):
        super().__init__(message, path, errno.EAGAIN)
        self.holders = holders

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.message, self.filename, self.holders))


def _io_error(what: str, path: Path, exc: OSError) -> PoolFileError:
    """Wrap an OSError, keeping its errno and adding the path and a remedy where obvious."""
    reason = exc.strerror or str(exc)
    message = f"{what} {path} failed: {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        message += f"; free space (or quota) on the filesystem holding {path.parent}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        message += "; run as root or fix the file's owner and mode"
    elif exc.errno == errno.EROFS:
        message += "; the filesystem is mounted read-only"
    return PoolFileError(message, path, exc.errno)


# --------------------------------------------------------------------------- lock holders


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _parse_lock_line(line: str, dev: int, ino: int) -> tuple[str, str, int] | None:
    """(kind, access, pid) of a /proc/locks-format line about dev/ino held (not awaited)."""
    parts = line.split()
    if len(parts) < 6 or parts[1] == "->":
        return None
    try:
        major, minor, inode = parts[5].split(":")
        if (os.makedev(int(major, 16), int(minor, 16)), int(inode)) != (dev, ino):
            return None
        return parts[1], parts[3], int(parts[4])
    except ValueError:
        return None


def _fdinfo_holders(dev: int, ino: int) -> list[tuple[str, str, int]]:
    """Locks on dev/ino found through /proc/PID/fdinfo, which lists them per descriptor.

    /proc/locks shows pid -1 for OFD locks (and 0 for pids outside our namespace); fdinfo
    tells which process holds the descriptor. Only used after a timeout, so cost is fine.
    """
    found: list[tuple[str, str, int]] = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_dev, st.st_ino) != (dev, ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                if line.startswith("lock:"):
                    entry = _parse_lock_line(line[len("lock:") :].strip(), dev, ino)
                    if entry is not None:
                        found.append((entry[0], entry[1], pid))
    return found


def describe_lock_holders(dev: int, ino: int) -> str:
    """Human-readable list of the locks held on a file, for LockTimeout messages."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return f"unknown (/proc/locks not readable: {exc.strerror})"
    held = [e for e in (_parse_lock_line(line, dev, ino) for line in lines) if e is not None]
    if not held:
        return "no holder listed in /proc/locks (the lock was probably just released)"
    named = [e for e in held if e[2] > 0]
    if len(named) < len(held):
        per_fd = _fdinfo_holders(dev, ino)
        for kind, access, _pid in (e for e in held if e[2] <= 0):
            match = next(
                (f for f in per_fd if f[:2] == (kind, access) and f not in named),
                (kind, access, -1),
            )
            named.append(match)
        held = named
    descriptions = []
    for kind, access, pid in held:
        if pid > 0:
            who = f"pid {pid} ({_comm(pid)})"
            if pid == os.getpid():
                who += " = this process"
        else:
            who = "an unidentified process (no pid recorded and no matching /proc/*/fdinfo)"
        descriptions.append(f"{kind} {access} lock held by {who}")
    return "; ".join(descriptions)


# --------------------------------------------------------------------------- locking


def _ofd_lock(fd: int, lock_type: int) -> None:
    """Non-blocking whole-file OFD lock (l_pid must be 0 for OFD locks)."""
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0) + _FLOCK_PAD)


def _release_locks(fd: int) -> None:
    """Drop flock then the OFD lock (reverse of acquisition); both are attempted."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _ofd_lock(fd, fcntl.F_UNLCK)


def _acquire_locks(fd: int, *, exclusive: bool, deadline: float) -> bool:
    """Take the OFD lock, then flock, polling until `deadline`. False (holding nothing) on
    timeout. Polling instead of blocking keeps a stuck foreign holder from hanging us forever,
    and the fixed order means two kvpfs processes cannot deadlock."""
    ofd_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    flock_op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    have_ofd = False
    delay = _BACKOFF_START
    while True:
        try:
            if not have_ofd:
                _ofd_lock(fd, ofd_type)
                have_ofd = True
            fcntl.flock(fd, flock_op)
            return True
        except OSError as exc:
            if exc.errno not in _BUSY_ERRNOS:
                if have_ofd:
                    _ofd_lock(fd, fcntl.F_UNLCK)
                raise
        now = time.monotonic()
        if now >= deadline:
            if have_ofd:
                _ofd_lock(fd, fcntl.F_UNLCK)
            return False
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, _BACKOFF_MAX)


def _deadline(timeout: float) -> float:
    return time.monotonic() + max(0.0, timeout)


def _lock_timeout(path: Path, fd: int, timeout: float) -> LockTimeout:
    st = os.fstat(fd)
    holders = describe_lock_holders(st.st_dev, st.st_ino)
    return LockTimeout(
        f"timed out after {timeout:g}s waiting for the lock on {path}; {holders}. "
        "Wait for or stop that process, or raise the lock timeout",
        path,
        holders,
    )


# --------------------------------------------------------------------------- file helpers


def _refuse_special(st: os.stat_result, path: Path) -> None:
    """Refuse anything but a regular file: we would write records into it."""
    if stat.S_ISLNK(st.st_mode):
        raise PoolFileError(
            f"pool file {path} is a symlink; refusing to follow it (it could point anywhere). "
            "Remove the symlink so kvpfs can create a regular file",
            path,
            errno.ELOOP,
        )
    if stat.S_ISDIR(st.st_mode):
        raise PoolFileError(
            f"pool file {path} is a directory; remove or rename it", path, errno.EISDIR
        )
    if not stat.S_ISREG(st.st_mode):
        raise PoolFileError(
            f"pool file {path} is not a regular file (mode {stat.filemode(st.st_mode)}); "
            "remove it so kvpfs can create a regular file",
            path,
            errno.EINVAL,
        )


def _prepare_dir(directory: Path) -> None:
    """Create the pool directory 0700 if missing; refuse a symlink or a world-writable one.

    In a world-writable directory (sticky or not) anyone could create or swap a pool file or
    our redo journal before we do, so we refuse rather than trust it.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise PoolFileError(
                f"cannot create pool directory {directory}: {exc.strerror}; create it "
                "(mode 0700, owned by root) or point kvpfs at an existing directory",
                directory,
                exc.errno,
            ) from exc
        else:
            try:
                dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchmod(dfd, 0o700)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise _io_error("setting mode 0700 on new pool directory", directory, exc) from exc
        try:
            st = os.lstat(directory)
        except OSError as exc:
            raise _io_error("checking pool directory", directory, exc) from exc
    except OSError as exc:
        raise _io_error("checking pool directory", directory, exc) from exc
    if stat.S_ISLNK(st.st_mode):
        raise PoolFileError(
            f"pool directory {directory} is a symlink; refusing to follow it. Use the real "
            f"directory ({os.path.realpath(directory)}) instead",
            directory,
            errno.ELOOP,
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PoolFileError(
            f"pool directory {directory} exists but is not a directory; remove it",
            directory,
            errno.ENOTDIR,
        )
    if st.st_mode & stat.S_IWOTH:
        raise PoolFileError(
            f"pool directory {directory} is world-writable (mode {stat.S_IMODE(st.st_mode):04o}); "
            "any user could replace the pool files. Fix with: chmod o-w " + str(directory),
            directory,
            errno.EPERM,
        )


def _pread_all(fd: int) -> bytearray:
    """The whole file in one buffer of its size.

    Not a list of chunks joined at the end: a pool can be megabytes, and the join
    would double the peak memory of every load.
    """
    buf = bytearray(os.fstat(fd).st_size)
    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], got)
            if n == 0:
                break  # shrunk since the fstat (a writer that ignores locks)
            got += n
    del buf[got:]
    while chunk := os.pread(fd, _READ_CHUNK, len(buf)):  # grown since the fstat
        buf += chunk
    return buf


# --------------------------------------------------------------------------- PoolFile


class PoolFile:
    """One pool file, kept open for the life of the process and modified in place.

    Use `with pool.locked(): snapshot = pool.read(); pool.write_record(...)`: `locked()`
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
        self._journal_fd: int | None = None  # the redo journal, kept open (see _change)
        self._journal_id: tuple[int, int] | None = None  # its (st_dev, st_ino)
        self._journal_complained = False  # an unusable journal is logged once, not per lock

    # ---- lifecycle

    def __enter__(self) -> PoolFile:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

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
            self._close_journal()

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
            self._lock_current(_deadline(self.lock_timeout), self.lock_timeout)
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
            raise _io_error("checking pool file", self.path, exc) from exc
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
        _prepare_dir(self.path.parent)
        base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        for _attempt in range(10):
            try:
                st: os.stat_result | None = os.lstat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise _io_error("checking pool file", self.path, exc) from exc
            if st is not None:
                _refuse_special(st, self.path)
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
                raise _io_error("opening pool file", self.path, exc) from exc
            try:
                try:
                    fst = os.fstat(fd)
                except OSError as exc:
                    raise _io_error("stat of pool file", self.path, exc) from exc
                _refuse_special(fst, self.path)
                if created:
                    try:
                        os.fchmod(fd, 0o600)
                    except OSError as exc:
                        raise _io_error("setting mode 0600 on", self.path, exc) from exc
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
            deadline = _deadline(limit)
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
                self._redo_journal(self._require_fd())
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
                acquired = _acquire_locks(fd, exclusive=True, deadline=deadline)
            except OSError as exc:
                raise _io_error("locking pool file", self.path, exc) from exc
            if not acquired:
                raise _lock_timeout(self.path, fd, limit)
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
            _release_locks(fd)
        except OSError as exc:
            raise _io_error("unlocking pool file", self.path, exc) from exc

    # ---- reading

    def fstat_signature(self) -> Signature:
        """Signature of the open descriptor (what we would read)."""
        fd = self._require_fd()
        try:
            return Signature.from_stat(os.fstat(fd))
        except OSError as exc:
            raise _io_error("stat of pool file", self.path, exc) from exc

    def read(self) -> Snapshot:
        """Read and parse the whole file (caller holds the lock)."""
        fd = self._require_fd()
        try:
            data = _pread_all(fd)
            signature = Signature.from_stat(os.fstat(fd))
        except OSError as exc:
            raise _io_error("reading pool file", self.path, exc) from exc
        records, trailing = parse_pool(data)
        return Snapshot(tuple(records), trailing, signature)

    # ---- writing

    def _size(self, fd: int) -> int:
        return self._stat(fd).st_size

    def _pwrite(self, fd: int, data: bytes, offset: int, what: str) -> None:
        """Write all of `data` at `offset`: normally one syscall, looping only on short writes.

        A single pwrite is not torn by a crash of ours except that Linux may stop a write that
        spans pages at a page boundary when SIGKILL arrives; the reference daemon's
        truncate-and-rewrite has a far larger window.
        """
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise _io_error(what, self.path, exc) from exc

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
        end = self._size(fd) // RECORD_SIZE * RECORD_SIZE
        try:
            room.reserve(fd, end, new_records * RECORD_SIZE)
        except OSError as exc:
            raise _io_error("reserving room for a new record in", self.path, exc) from exc
        journal = self._journal(create=False)  # made by the first change, as before
        if journal is not None:
            try:
                room.reserve(journal[0], 0, 2 * RECORD_SIZE + 512)
            except OSError as exc:
                log.debug("cannot reserve room in %s: %s", self._journal_path, exc)

    def delete_record(self, index: int, records: Sequence[Record]) -> None:
        """Remove slot `index`, keeping the order of the others (as the reference daemon does).

        `records` is the snapshot read under the same lock. The later records are written one
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
        lock next finishes a change cut short (`_redo_journal`).
        """
        before = self._before_image(fd, fst, offset, data, size_after)
        journaled = self._write_journal(fst, offset, data, size_after, before)
        try:
            if data:
                self._pwrite(fd, data, offset, what)
            if max(fst.st_size, offset + len(data)) != size_after:
                self._truncate(fd, size_after)
        except BaseException:
            # Reported as failed, so it must not be redone later: put the old bytes back.
            try:
                self._pwrite(fd, before, offset, "restoring after a failed change to")
                self._truncate(fd, fst.st_size)
            except PoolFileError:
                raise  # the journal stays: the next writer rolls the change forward
            if journaled:
                self._clear_journal()
            raise
        if journaled:
            self._clear_journal()

    def _before_image(self, fd: int, fst: os.stat_result, offset: int, data: bytes,
                      size_after: int) -> bytes:
        """The bytes a change replaces: its range, or up to the old end if it resizes."""
        end = offset + len(data) if size_after == fst.st_size else fst.st_size
        try:
            return os.pread(fd, max(0, end - offset), offset)
        except OSError as exc:
            raise _io_error("reading pool file", self.path, exc) from exc

    def _truncate(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise _io_error("truncating", self.path, exc) from exc

    def _stat(self, fd: int) -> os.stat_result:
        try:
            return os.fstat(fd)
        except OSError as exc:
            raise _io_error("stat of pool file", self.path, exc) from exc

    # ---- redo journal (crash recovery)

    @property
    def _journal_path(self) -> Path:
        return journal_path(self.path)

    def _journal(self, *, create: bool) -> tuple[int, int] | None:
        """The journal's descriptor and size, (re)opened if its path names another file:
        one lstat when it is the one we hold. None if there is none and `create` is
        False (made at the first change, so pools kvpfs only reads get none), or if it
        cannot be used."""
        path = self._journal_path
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._journal_id:
                assert self._journal_fd is not None
                return self._journal_fd, st.st_size
            self._close_journal()
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o600)
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError as exc:
            log.log(logging.DEBUG if self._journal_complained else logging.WARNING,
                    "cannot use %s (%s); changes are not protected against a crash",
                    path, exc.strerror or exc)
            self._journal_complained = True
            return None
        self._journal_complained = False
        self._journal_fd, self._journal_id = fd, (opened.st_dev, opened.st_ino)
        return fd, opened.st_size

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = self._journal_id = None

    def _write_journal(self, fst: os.stat_result, offset: int, data: bytes,
                       size_after: int, before: bytes) -> bool:
        """Best effort: a full disk must not stop a change (a delete frees space), so a
        failure only logs, and that one change is then unprotected against a torn write."""
        journal = self._journal(create=True)
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
                        self._journal_path, exc.strerror or exc)
            self._clear_journal()
            return False
        return True

    def _clear_journal(self) -> None:
        if self._journal_fd is None:
            return
        try:
            os.ftruncate(self._journal_fd, 0)
        except OSError as exc:
            log.warning("cannot empty %s: %s", self._journal_path, exc.strerror)

    def _redo_journal(self, fd: int) -> bool:
        """Finish the change a crash interrupted; True if it was redone.

        Redone only on the same inode, while the file's size is between its sizes before
        and after the change (nobody appended since); the write is idempotent, so redoing
        a change that had in fact completed is harmless. The journal is emptied either way.
        Checked on every lock: normally one lstat of an empty journal.
        """
        journal = self._journal(create=False)
        if journal is None or journal[1] == 0:
            return False
        redone = self._apply_journal(fd)  # raises: kept for the next try
        self._clear_journal()
        return redone

    def _apply_journal(self, fd: int) -> bool:
        assert self._journal_fd is not None
        try:
            raw = _pread_all(self._journal_fd)
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
            log.warning("ignoring unreadable %s: %s", self._journal_path, exc)
            return False
        data, before = body[:length], body[length:]
        fst = self._stat(fd)
        if fst.st_ino != ino:
            return False
        try:
            current = os.pread(fd, max(0, fst.st_size - offset), offset)
        except OSError as exc:
            raise _io_error("reading pool file", self.path, exc) from exc
        done = fst.st_size == size_after and current[:length] == data
        if done or not _cut_short(current, fst.st_size, offset, data, before, size_before):
            if not done:
                log.warning("not redoing the change in %s: another program changed the file"
                            " since the crash", self._journal_path)
            return False
        if data:
            self._pwrite(fd, data, offset, "redoing an interrupted change in")
        if max(fst.st_size, offset + len(data)) != size_after:
            self._truncate(fd, size_after)
        log.warning("finished a change to %s interrupted by a crash", self.path)
        return True


_PAGE = 4096


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


# --------------------------------------------------------------------------- tools


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


def journal_path(pool_file: Path) -> Path:
    """The redo journal kept beside a pool file."""
    return pool_file.with_name(JOURNAL_PREFIX + pool_file.name)


def _journal_holds_change(pool_file: Path) -> bool:
    try:
        return os.lstat(journal_path(pool_file)).st_size > 0
    except OSError:
        return False


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
        _refuse_special(os.lstat(path), path)
    except FileNotFoundError:
        return missing
    except PoolFileError:
        raise
    except OSError as exc:
        raise _io_error("checking pool file", path, exc) from exc
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return missing
    except OSError as exc:
        raise _io_error("opening pool file", path, exc) from exc
    try:
        _refuse_special(os.fstat(fd), path)
        if not _acquire_locks(fd, exclusive=False, deadline=_deadline(lock_timeout)):
            raise _lock_timeout(path, fd, lock_timeout)
        try:
            data = _pread_all(fd)
            st = os.fstat(fd)
            unfinished = _journal_holds_change(path)  # under the lock: no change under way
        finally:
            _release_locks(fd)
    except PoolFileError:
        raise
    except OSError as exc:
        raise _io_error("reading pool file", path, exc) from exc
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
