"""A pool's records as read at one moment, and the cheap identity of the file they came from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvpfs.storage.records import Record


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

