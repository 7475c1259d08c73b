"""The inotify echo helper's requests: routed at one seam, answered for the echo only.

The helper (fsnotify_echo.py) repeats a host change through the mount so that
the kernel raises inotify events for it. `EchoingOperations` is the one place
where its requests (known by its pid, and then by the file handles it got)
leave the ordinary handlers: they go to `EchoRequests`, whose answers touch
neither the store nor what anyone else sees. The handlers in operations.py
never hear of the helper.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

import pyfuse3

from kvpfs.fuse.attributes import Attributes
from kvpfs.fuse.echo_helper import EchoKind
from kvpfs.fuse.errors import handler
from kvpfs.fuse.fsnotify_echo import EchoOp
from kvpfs.fuse.nodes import DIR_INODES, ROOT_INODE, Node, NodeTable
from kvpfs.fuse.notifications import Notifications
from kvpfs.fuse.operations import KvpOperations, Parts
from kvpfs.fuse.permissions import Permissions


class EchoRequests:
    """The echo helper's lookups, opens, creates and unlinks, and its file handles."""

    def __init__(self, notifications: Notifications, table: NodeTable,
                 attributes: Attributes, perm: Permissions, new_fh: Callable[[], int]) -> None:
        self.notifications = notifications
        self.table = table
        self.attributes = attributes
        self.perm = perm
        self.new_fh = new_fh
        self.fhs: dict[int, Node] = {}  # the helper's open files (its byte is discarded)

    def owns(self, ctx: pyfuse3.RequestContext | None) -> bool:
        """A request from the echo helper: answered for the echo, never stored."""
        return ctx is not None and self.notifications.echo_owns(ctx.pid)

    def owns_fh(self, fh: int) -> bool:
        """A file the helper opened (its byte is discarded)."""
        return fh in self.fhs

    def _target(self, parent_inode: int, name: bytes) -> EchoOp | None:
        op = self.notifications.echo_op
        if op is None or parent_inode != DIR_INODES[op.pool] or name != op.name:
            return None
        return op

    async def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The echo's entry, or None: a path component, looked up as for anyone."""
        op = self._target(parent_inode, name)
        if op is None or op.kind is EchoKind.MODIFY:
            return None
        if op.kind is EchoKind.CREATE:
            raise pyfuse3.FUSEError(errno.ENOENT)  # so that the kernel creates it
        node = op.node  # DELETE: the deleted key, for the kernel to unlink
        if node is None:  # every DELETE echo carries it; without, nothing to unlink
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.table.by_ino.setdefault(node.ino, node)
        attr = await self.attributes.of_node(node)
        attr.st_nlink = 1
        attr.entry_timeout = attr.attr_timeout = 0
        node.lookups += 1
        return attr

    async def getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        """The file or pool directory, writable by its owner (our uid) for the echo only.

        Without CAP_DAC_OVERRIDE (the shipped unit's sandbox) the kernel would refuse
        the helper's write to a 0400 file in a 0500 directory before asking us; when
        it refuses, it asks for fresh attributes first (fuse_permission), and gets
        these. They are never cached (timeout 0) and are dropped after the echo.
        """
        attr = await self.attributes.of(inode)
        op = self.notifications.echo_op
        if op is None:
            return attr
        targets = (DIR_INODES[op.pool], op.node.ino if op.node is not None else None)
        node = self.table.by_key.get((op.pool, op.key))
        if inode in targets or (node is not None and node.ino == inode):
            attr.st_mode |= 0o300 if stat.S_ISDIR(attr.st_mode) else 0o200
            attr.st_uid = self.perm.uid
            attr.attr_timeout = 0
            op.touched.add(inode)
        return attr

    def open(self, inode: int) -> pyfuse3.FileInfo:
        op = self.notifications.echo_op
        node = self.table.get(inode)
        if op is None or op.kind is EchoKind.DELETE or node is None or node.key != op.key \
                or node.pool != op.pool:
            raise pyfuse3.FUSEError(errno.EACCES)
        return self._handle(node)

    def _handle(self, node: Node) -> pyfuse3.FileInfo:
        fh = self.new_fh()
        self.fhs[fh] = node
        # direct_io: the discarded byte never reaches the page cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def create(self, parent_inode: int, name: bytes,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        op = self._target(parent_inode, name)
        node = self.table.find(op.pool, name) if op is not None and op.kind is EchoKind.CREATE \
            else None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # gone again: its echo is due too
        info = self._handle(node)
        attr = await self.attributes.of_node(node)
        node.lookups += 1
        return info, attr

    def unlink(self, parent_inode: int, name: bytes) -> None:
        """The key is gone already: the kernel only drops its entry."""
        op = self._target(parent_inode, name)
        if op is None or op.kind is not EchoKind.DELETE:
            raise pyfuse3.FUSEError(errno.EACCES)


class EchoingOperations(KvpOperations):
    """The handlers, with the echo helper's requests taken aside first (the one seam)."""

    def __init__(self, parts: Parts, echoes: EchoRequests) -> None:
        super().__init__(parts)
        self.echoes = echoes

    @handler
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if self.echoes.owns(ctx):
            echoed = await self.echoes.lookup(parent_inode, name)
            if echoed is not None:
                return echoed
            ctx = None  # a path component: as for anyone
        return await super().lookup(parent_inode, name, ctx)

    @handler
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if self.echoes.owns(ctx):
            return await self.echoes.getattr(inode)
        return await super().getattr(inode, ctx)

    @handler
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.echoes.owns(ctx):
            return self.echoes.open(inode)
        return await super().open(inode, flags, ctx)

    @handler
    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     mode: pyfuse3.ModeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT_INODE and self.echoes.owns(ctx):
            return await self.echoes.create(parent_inode, name)
        return await super().create(parent_inode, name, mode, flags, ctx)

    @handler
    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != ROOT_INODE and self.echoes.owns(ctx):
            return self.echoes.unlink(parent_inode, name)  # the key is gone already
        return await super().unlink(parent_inode, name, ctx)

    @handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        if self.echoes.owns_fh(fh):
            return len(buf)  # discarded
        return await super().write(fh, off, buf)

    @handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        if not self.echoes.owns_fh(fh):
            await super().flush(fh)

    @handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if not self.echoes.owns_fh(fh):
            await super().fsync(fh, datasync)

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        if self.echoes.fhs.pop(fh, None) is None:
            await super().release(fh)
