"""Safe opening conditions and whole, checked I/O for pool files and their directory.

A pool file must be a regular file (never followed through a symlink) in a directory only its
owner can write; reads take the whole file in one buffer, writes put all their bytes, and a
failure becomes a PoolFileError that names the file and the remedy.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kvpfs.storage.errors import PoolFileError, io_error

_READ_CHUNK = 1 << 20


def refuse_special(st: os.stat_result, path: Path) -> None:
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


def prepare_dir(directory: Path) -> None:
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
                raise io_error("setting mode 0700 on new pool directory", directory, exc) from exc
        try:
            st = os.lstat(directory)
        except OSError as exc:
            raise io_error("checking pool directory", directory, exc) from exc
    except OSError as exc:
        raise io_error("checking pool directory", directory, exc) from exc
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


def pread_all(fd: int) -> bytearray:
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




def pwrite_all(fd: int, data: bytes, offset: int, path: Path, what: str) -> None:
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
        raise io_error(what, path, exc) from exc


def truncate(fd: int, size: int, path: Path) -> None:
    """Set the file's size, as a PoolFileError naming `path` if that fails."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise io_error("truncating", path, exc) from exc


def fstat(fd: int, path: Path) -> os.stat_result:
    """fstat, as a PoolFileError naming `path` if that fails."""
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise io_error("stat of pool file", path, exc) from exc
