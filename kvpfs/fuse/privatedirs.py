"""Directories made in guest/: private to the guest, empty, few, and gone at restart.

Puppet takes a lock by making a directory beside the file it replaces (`NAME<date>-<pid>-
<random>.lock`) and removes it a moment later. A pool has no directories to store, so kvpfs
offers exactly that: mkdir and rmdir of an empty directory directly in guest/, listed and
stat-able through the mount, never stored in a pool nor shown to the host, holding nothing
(creating anything inside is refused with EPERM), at most `MAX_DIRS` at once per user and
for all users but root together (root has `ROOT_DIRS` more, whatever others made), and
kept in memory only.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from kvpfs.fuse.errors import refusals
from kvpfs.quota import UserQuota

log = logging.getLogger(__name__)

MAX_DIRS = 64
ROOT_DIRS = 16


@dataclass(eq=False)
class PrivateDir:
    ino: int
    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    lookups: int = 0
    linked: bool = True
    maker: int = 0  # whose count it takes (`uid` may change by chown; the count may not)


class PrivateDirs:
    def __init__(self, new_ino: Callable[[], int],
                 privileged: frozenset[int] = frozenset({0})) -> None:
        self._new_ino = new_ino
        self.quota = UserQuota("private directories",
                               lambda: (MAX_DIRS, MAX_DIRS + ROOT_DIRS, ROOT_DIRS), privileged)
        self.by_name: dict[bytes, PrivateDir] = {}
        self.by_ino: dict[int, PrivateDir] = {}

    def get(self, ino: int) -> PrivateDir | None:
        return self.by_ino.get(ino)

    def find(self, name: bytes) -> PrivateDir | None:
        return self.by_name.get(name)

    def make(self, name: bytes, mode: int, uid: int, gid: int) -> PrivateDir:
        if name in self.by_name:
            raise pyfuse3.FUSEError(errno.EEXIST)
        why = self.quota.take(uid)
        if why is not None:
            refusals.warning("refused mkdir guest/%s: %s, the most kvpfs keeps; remove some",
                             name.decode(errors="replace"), why)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        directory = PrivateDir(self._new_ino(), name, stat.S_IMODE(mode), uid, gid, maker=uid)
        self.by_name[name] = directory
        self.by_ino[directory.ino] = directory
        return directory

    def remove(self, name: bytes) -> None:
        directory = self.by_name.pop(name, None)
        if directory is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        directory.linked = False
        self.quota.give(directory.maker)
        self._maybe_drop(directory)

    def forget(self, ino: int, count: int) -> bool:
        """Whether `ino` was one of ours."""
        directory = self.by_ino.get(ino)
        if directory is None:
            return False
        directory.lookups -= count
        self._maybe_drop(directory)
        return True

    def _maybe_drop(self, directory: PrivateDir) -> None:
        if not directory.linked and directory.lookups <= 0:
            self.by_ino.pop(directory.ino, None)

    def setattr(self, directory: PrivateDir, attr: pyfuse3.EntryAttributes,
                fields: pyfuse3.SetattrFields) -> None:
        if fields.update_mode:
            directory.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            directory.uid = attr.st_uid
        if fields.update_gid:
            directory.gid = attr.st_gid
        if fields.update_mtime:
            directory.mtime_ns = attr.st_mtime_ns
        directory.ctime_ns = time.time_ns()

    def attributes(self, directory: PrivateDir, ttl: float) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = directory.ino
        attr.st_mode = stat.S_IFDIR | directory.mode
        attr.st_nlink = 2 if directory.linked else 0
        attr.st_uid = directory.uid
        attr.st_gid = directory.gid
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_mtime_ns = attr.st_atime_ns = directory.mtime_ns
        attr.st_ctime_ns = directory.ctime_ns
        attr.entry_timeout = attr.attr_timeout = ttl
        return attr
