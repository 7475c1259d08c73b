"""The attributes the kernel gets for each inode, and how long it may keep them.

Host changes are also invalidated explicitly, but the timeouts bound how stale
a listing or a size can be if an invalidation is skipped or lost.
"""

from __future__ import annotations

import errno
import stat
import time

import pyfuse3

from kvpfs.fuse.contents import Contents
from kvpfs.fuse.nodes import (
    DIR_INODES,
    EVENTS_INODE,
    LINK_INODES,
    ROOT_INODE,
    Node,
    NodeTable,
)
from kvpfs.fuse.permissions import Permissions
from kvpfs.storage.store import Store
from kvpfs.wire.protocol import Pool

TTL = 1.0  # attribute/entry cache; host changes are also invalidated explicitly
# The kernel starts a timeout when the caller handles our reply, after we build it, and
# a busy or throttled guest can delay that: a generous margin, as skipping is a heuristic.
TTL_MARGIN = TTL
AUTO_TTL = 0.5  # pool 2's values are computed, some (addresses) change on their own
FIXED_TTL = 60  # the root, /.events and the numeric links never change


class Attributes:
    def __init__(self, store: Store, table: NodeTable, contents: Contents,
                 perm: Permissions, started_ns: int) -> None:
        self.store = store
        self.table = table
        self.contents = contents
        self.perm = perm
        self.started_ns = started_ns

    def base(self, ino: int, mode: int, size: int, mtime_ns: int,
             ttl: float = TTL) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = mode
        attr.st_size = size
        attr.st_uid = self.perm.uid
        attr.st_gid = self.perm.gid
        attr.st_nlink = 1
        attr.st_blksize = 4096
        attr.st_blocks = (size + 511) // 512
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime_ns
        attr.entry_timeout = ttl
        attr.attr_timeout = ttl
        return attr

    async def of(self, ino: int) -> pyfuse3.EntryAttributes:
        """Any inode's attributes; ENOENT for one the table no longer has."""
        if ino == ROOT_INODE:
            attr = self.base(ino, stat.S_IFDIR | 0o555, 0, self.started_ns, FIXED_TTL)
            attr.st_nlink = 2 + len(Pool)
            return attr
        if ino in DIR_INODES:
            pool = DIR_INODES.index(ino)
            mtime = self.store.states[pool].mtime_ns or self.started_ns
            attr = self.base(ino, stat.S_IFDIR | self.perm.dir_mode(pool), 0, mtime)
            attr.st_nlink = 2
            attr.st_gid = self.perm.group(pool)
            return attr
        if ino == EVENTS_INODE:
            return self.base(ino, stat.S_IFREG | 0o444, 0, self.started_ns, FIXED_TTL)
        if ino in LINK_INODES:
            target = Pool(LINK_INODES.index(ino)).dirname.encode()
            return self.base(ino, stat.S_IFLNK | 0o777, len(target), self.started_ns, FIXED_TTL)
        node = self.table.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.of_node(node)

    async def of_node(self, node: Node) -> pyfuse3.EntryAttributes:
        """A file's attributes; notes until when the kernel may use them without asking."""
        value = await self.contents.current(node) if node.linked else None
        if value is not None:
            node.kernel.size = len(value)
            node.kernel.seen = value
        ttl = TTL if node.pool != Pool.AUTO else AUTO_TTL
        node.kernel.attrs_until = time.monotonic() + ttl + TTL_MARGIN
        mode = node.chmod.mode if node.chmod.mode is not None else self.perm.file_mode(node.pool)
        attr = self.base(node.ino, stat.S_IFREG | mode, node.kernel.size, node.mtime_ns, ttl)
        attr.st_ctime_ns = max(node.ctime_ns, node.mtime_ns)
        if node.atime_ns:
            attr.st_atime_ns = node.atime_ns
        attr.st_uid = node.chmod.uid if node.chmod.uid is not None else self.perm.uid
        attr.st_gid = node.chmod.gid if node.chmod.gid is not None else self.perm.group(node.pool)
        attr.st_nlink = 1 if node.linked else 0
        return attr
