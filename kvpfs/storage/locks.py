"""The two locks every pool-file writer and reader takes, and who holds them when they time out.

A pool file is locked on the whole file, always in the same order:

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
descriptor is used both for I/O and for locking. Locks are acquired without blocking, retried
with short back-off sleeps until a deadline, and a timeout names the holders from /proc/locks
(and /proc/PID/fdinfo for OFD locks, which record no pid).

Not supported: pool files on NFS (flock is emulated there with fcntl locks, so our own two
locks would collide) and 32-bit `struct flock` layouts other than the LFS one Python uses.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

from kvpfs.storage.errors import LockTimeout

# How long a writer waits for another program's lock (`--lock-timeout`).
DEFAULT_LOCK_TIMEOUT = 5.0

_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# with native alignment; zero padding is appended so the kernel never reads past our buffer.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_PAD = b"\0" * 8
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})
_BACKOFF_START = 0.001
_BACKOFF_MAX = 0.02


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


def release_locks(fd: int) -> None:
    """Drop flock then the OFD lock (reverse of acquisition); both are attempted."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _ofd_lock(fd, fcntl.F_UNLCK)


def acquire_locks(fd: int, *, exclusive: bool, deadline: float) -> bool:
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


def deadline_after(timeout: float) -> float:
    """The `time.monotonic()` moment `timeout` seconds from now (never in the past)."""
    return time.monotonic() + max(0.0, timeout)


def lock_timeout_error(path: Path, fd: int, timeout: float) -> LockTimeout:
    """The error for locks on `fd` not had within `timeout`, naming who holds them now."""
    st = os.fstat(fd)
    holders = describe_lock_holders(st.st_dev, st.st_ino)
    return LockTimeout(
        f"timed out after {timeout:g}s waiting for the lock on {path}; {holders}. "
        "Wait for or stop that process, or raise the lock timeout",
        path,
        holders,
    )


