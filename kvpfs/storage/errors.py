"""The errors of pool-file access: each names the path and, where there is one, the remedy."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any


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

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.filename, self.errno))


class LockTimeout(PoolFileError):
    """The pool file's locks were not free before the deadline; `holders` says who has them."""

    def __init__(self, message: str, path: Path | str | None = None, holders: str = ""):
        super().__init__(message, path, errno.EAGAIN)
        self.holders = holders

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.filename, self.holders))


def io_error(what: str, path: Path, exc: OSError) -> PoolFileError:
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
