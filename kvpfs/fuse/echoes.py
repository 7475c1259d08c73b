"""Answers to the inotify echo helper's requests: for the echo, never stored.

The helper (fsnotify_echo.py) repeats a host change through the mount so that
the kernel raises inotify events for it; the handlers hand its requests here
(they come from its pid) and these answers touch neither the store nor what
anyone else sees.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

import pyfuse3

from kvpfs.fuse.attributes import Attributes
from kvpfs.fuse.echo_helper import CREATE, DELETE, MODIFY
from kvpfs.fuse.fsnotify_echo import EchoOp
from kvpfs.fuse.hostchanges import HostChanges
from kvpfs.fuse.nodes import DIR_INODES, Node, NodeTable
from kvpfs.fuse.permissions import Permissions


class EchoRequests:
    """The echo helper's lookups, opens, creates and unlinks, and its file handles."""

    def __init__(self, changes: HostChanges, table: NodeTable, attributes: Attributes,
                 perm: Permissions, new_fh: Callable[[], int]) -> None:
        self.changes = changes
        self.table = table
        self.attributes = attributes
        self.perm = perm
        self.new_fh = new_fh
        self.fhs: dict[int, Node] = {}  # the helper's open files (its byte is discarded)

    def owns(self, ctx: pyfuse3.RequestContext | None) -> bool:
        """A request from the echo helper: answered for the echo, never stored."""
        echo = self.changes.echo
        return echo is not None and ctx is not None and echo.owns(ctx.pid)

    def _target(self, parent_inode: int, name: bytes) -> EchoOp | None:
        op = self.changes.echo_op
        if op is None or parent_inode != DIR_INODES[op.pool] or name != op.name:
            return None
        return op

    async def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The echo's entry, or None: a path component, looked up as for anyone."""
        op = self._target(parent_inode, name)
        if op is None or op.kind == MODIFY:
            return None
        if op.kind == CREATE:
            raise pyfuse3.FUSEError(errno.ENOENT)  # so that the kernel creates it
        node = op.node  # DELETE: the deleted key, for the kernel to unlink
        assert isinstance(node, Node)
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
        op = self.changes.echo_op
        if op is None:
            return attr
        targets = (DIR_INODES[op.pool], getattr(op.node, "ino", None))
        node = self.table.by_key.get((op.pool, op.key))
        if inode in targets or (node is not None and node.ino == inode):
            attr.st_mode |= 0o300 if stat.S_ISDIR(attr.st_mode) else 0o200
            attr.st_uid = self.perm.uid
            attr.attr_timeout = 0
            op.touched.add(inode)
        return attr

    def open(self, inode: int) -> pyfuse3.FileInfo:
        op = self.changes.echo_op
        node = self.table.get(inode)
        if op is None or op.kind == DELETE or node is None or node.key != op.key \
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
        node = self.table.find(op.pool, name) if op is not None and op.kind == CREATE \
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
        if op is None or op.kind != DELETE:
            raise pyfuse3.FUSEError(errno.EACCES)
