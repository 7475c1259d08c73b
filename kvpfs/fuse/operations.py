"""FUSE semantics for the KVP pools: each pool a directory, each key a file.

The handlers here translate the kernel's requests and answer with the errno
each case calls for; the work is elsewhere, in collaborators that `mount.py`
builds and hands over (`Parts`): inodes in `nodes`, what a file reads as in
`contents`, attributes in `attributes`, write buffering and its refusals in
`writes`, the change feed (/.events) in `events`, and everything the kernel
and watchers must be told after a change in `notifications` (never from a
handler: it runs in a task of its own). Only `guest` (pool 1) is writable.
Temporary names in `guest` (dot-files, `sedXXXXXX`, Puppet's and Salt's: `tempnames`)
are scratch files kept in memory until renamed to a key, which is how editors, `sed -i`,
rsync and configuration tools save; directories made there are private (`privatedirs`);
what users set on guest keys is kept across restarts (`durable`). docs/tools.md.

The inotify echo helper's requests never reach these handlers: they are taken
aside by `echoes.EchoingOperations`, the subclass that is mounted. Every
handler is wrapped by `errors.handler`, as any exception but FUSEError would
leave a dead mount.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyfuse3

from kvpfs.fuse.attributes import TTL, Attributes
from kvpfs.fuse.contents import Contents
from kvpfs.fuse.durable import DurableMeta
from kvpfs.fuse.errors import handler
from kvpfs.fuse.events import EventFeed
from kvpfs.fuse.handles import Buffer, Handle, OpenFiles, Publication
from kvpfs.fuse.listings import Listings
from kvpfs.fuse.nodes import (
    DIR_INODES,
    EVENTS_INODE,
    EVENTS_NAME,
    FIXED_INODES,
    LINK_INODES,
    ROOT_INODE,
    NodeTable,
)
from kvpfs.fuse.notifications import Notifications
from kvpfs.fuse.permissions import Permissions
from kvpfs.fuse.privatedirs import PrivateDirs
from kvpfs.fuse.tempnames import is_temporary_create
from kvpfs.fuse.writes import Writes
from kvpfs.storage.store import Origin, RequestLock, Store
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool

__all__ = ["DIR_INODES", "EVENTS_INODE", "KvpOperations", "Parts", "Permissions"]

log = logging.getLogger(__name__)

XATTR_KEY = b"user.kvp.key"
XATTR_POOL = b"user.kvp.pool"
XATTR_CONTROL = b"user.kvpfs.control"

@dataclass(frozen=True)
class Parts:
    """What the handlers work with, built by the composition root (`mount.py`)."""

    store: Store
    table: NodeTable
    contents: Contents
    attributes: Attributes
    writes: Writes
    feed: EventFeed
    notifications: Notifications
    perm: Permissions
    guest_lock: RequestLock  # held while changing guest; waiters give up at their deadline
    new_fh: Callable[[], int]  # file handle numbers, shared with the echo helper's files
    dirs: PrivateDirs  # mkdir in guest/ (docs/tools.md)
    meta: DurableMeta  # what users set on guest keys, kept across restarts
    control_path: str | None = None


class KvpOperations(pyfuse3.Operations):
    """Which request gets which answer or errno; the work is delegated (see above)."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.store = parts.store
        self.table = parts.table
        self.contents = parts.contents
        self.attributes = parts.attributes
        self.writes = parts.writes
        self.events = parts.feed
        self.notifications = parts.notifications
        self.perm = parts.perm
        self._guest_lock = parts.guest_lock
        self._new_fh = parts.new_fh
        self.dirs = parts.dirs
        self.meta = parts.meta
        self.control_path = parts.control_path
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, tuple[int, int]] = {}  # fh -> (directory inode, uid)
        self.listings = Listings(parts.store, parts.table, parts.dirs)
        self.open_files = OpenFiles(parts.perm.privileged)

    # ================================================================ lookup & dirs
    @handler
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            if name in (b".", b".."):
                return await self.attributes.of(ROOT_INODE)
            if name == EVENTS_NAME:
                return await self.attributes.of(EVENTS_INODE)
            for pool in Pool:
                if name == pool.dirname.encode():
                    return await self.attributes.of(DIR_INODES[pool])
                if name == str(int(pool)).encode():
                    return await self.attributes.of(LINK_INODES[pool])
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.dirs.get(parent_inode) is not None:
            if name in (b".", b".."):
                return await self._attributes(parent_inode if name == b"." else
                                              DIR_INODES[Pool.GUEST])
            raise pyfuse3.FUSEError(errno.ENOENT)  # private directories hold nothing
        pool = self.table.pool_of_dir(parent_inode)
        if name == b".":
            return await self.attributes.of(parent_inode)
        if name == b"..":
            return await self.attributes.of(ROOT_INODE)
        directory = self.dirs.find(name) if pool == Pool.GUEST else None
        if directory is not None:
            directory.lookups += 1
            return self.dirs.attributes(directory, TTL)
        node = self.table.find(pool, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = await self.attributes.of_node(node)
        node.lookups += 1
        return attr

    @handler
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if self.notifications.host_deleted_gone(inode):
            raise pyfuse3.FUSEError(errno.ESTALE)  # see Notifications.host_deleted_gone
        return await self._attributes(inode)

    async def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        """Any inode's attributes, private directories' included."""
        directory = self.dirs.get(inode)
        if directory is not None:
            return self.dirs.attributes(directory, TTL)
        return await self.attributes.of(inode)

    @handler
    async def readlink(self, inode: pyfuse3.InodeT,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        if inode in LINK_INODES:
            return Pool(LINK_INODES.index(inode)).dirname.encode()
        raise pyfuse3.FUSEError(errno.EINVAL)

    @handler
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode != ROOT_INODE and self.dirs.get(inode) is None:
            self.table.pool_of_dir(inode)  # ENOTDIR, ENOENT
        self.open_files.take(ctx.uid, "open the directory")
        fh = self._new_fh()
        self._dir_handles[fh] = (inode, ctx.uid)
        return fh

    @handler
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        opened = self._dir_handles.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        entries = self.listings.entries(opened[0])
        position = bisect_right(entries, start_id, key=lambda entry: entry[0])
        for ino, name, node in entries[position:]:
            if node is not None and not node.linked:
                continue
            if node is None and ino not in FIXED_INODES:
                directory = self.dirs.get(ino)
                if directory is None or not directory.linked:
                    continue  # removed since opendir
                if not pyfuse3.readdir_reply(token, name, self.dirs.attributes(directory, TTL),
                                             ino):
                    return
                directory.lookups += 1
                continue
            attr = await (self.attributes.of_node(node) if node is not None
                          else self.attributes.of(ino))
            if not pyfuse3.readdir_reply(token, name, attr, ino):
                return
            if node is not None:
                node.lookups += 1

    @handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        opened = self._dir_handles.pop(fh, None)
        if opened is not None:
            self.open_files.give(opened[1])

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Must not raise: no handler wrapper, nothing in here can fail.
        for inode, count in inode_list:
            if not self.dirs.forget(inode, count):
                self.table.forget(inode, count)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # No figures: counts of records would tell every user when the host changes
        # external/, which they may not list, and a full-looking filesystem sets off
        # disk-space alerts. Zero blocks and inodes: `df` shows `-` for Use%, and leaves
        # the mount out of its listing unless named.
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = names.NAME_MAX
        return st

    # ================================================================ reading
    @handler
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == EVENTS_INODE:
            return self._open_events(flags, ctx)
        node = self.table.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not node.linked:
            # Only a name the kernel still caches leads here (Notifications.host_deleted_gone),
            # also once its echo has run: ESTALE makes the VFS walk the path again, and an
            # `echo x > KEY` then creates the key anew instead of failing with ENOENT.
            raise pyfuse3.FUSEError(errno.ESTALE)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)
        if (writable or truncate) and node.pool != Pool.GUEST:
            log.info("refused write to %s/%s: only guest is writable",
                     Pool(node.pool).dirname, node.name.decode(errors="replace"))
            raise pyfuse3.FUSEError(errno.EACCES)
        value = await self.contents.current(node)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if truncate:
            handle = Handle(node, bytearray(), writable, bool(flags & os.O_APPEND),
                            mode=Buffer.PRIVATE, publication=Publication.TRUNCATED,
                            uid=ctx.uid)
        else:
            handle = Handle(node, value, writable, bool(flags & os.O_APPEND), uid=ctx.uid)
        if truncate:
            # `: > key` stores at release, where nobody hears of a failure: check now.
            await self.writes.prepare(handle)
        self.open_files.take(ctx.uid, f"open {Pool(node.pool).dirname}/"
                             f"{node.name.decode(errors='replace')}")
        return self._new_handle(handle)

    def _new_handle(self, handle: Handle) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._handles[fh] = handle
        node = handle.node
        node.handles += 1
        node.writers += handle.writable
        if not handle.writable and isinstance(handle.buffer, bytes):
            node.kernel.seen = handle.buffer
        # The kernel may keep what it cached at an earlier open only if the value has not
        # changed since (every change clears `cached`); pool 2 is computed per read.
        keep = node.kernel.cached and not handle.writable and node.pool != Pool.AUTO
        node.kernel.cached = not handle.writable
        # Direct I/O while the kernel may still hold a size from before a host change:
        # a read must not stop there.
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep,
                                direct_io=self.notifications.attrs_pending(node.ino))

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if self.events.owns(fh):
            return await self.events.read(fh, size)
        return bytes(self.writes.view(self._handle(fh))[off : off + size])

    # ================================================================ the change feed
    def _open_events(self, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # Whoever may not read external/ does not learn its key names either.
        include_external = ctx.uid == 0 or ctx.uid == self.perm.uid or \
            self.perm.external_readable
        return self.events.open(self._new_fh(), flags, ctx, include_external=include_external)

    @handler
    async def poll(self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT,
                   poll_handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        if not self.events.owns(fh):
            return select.POLLIN | select.POLLRDNORM  # value files never block
        return self.events.poll(fh, poll_handle)

    # ================================================================ writing
    @handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.writes.write(handle, off, buf)

    @handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # Shells open, dup2 and close the original fd before writing: that
        # first close must not publish an empty value. An open that only
        # truncated (`: > file`) is published at release.
        if self.events.owns(fh):
            return
        handle = self._handle(fh)
        if handle.written:
            await self.writes.commit(handle)

    @handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if not self.events.owns(fh):
            await self.writes.commit(self._handle(fh))

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        if self.events.release(fh):
            return
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        self.open_files.give(handle.uid)
        node = handle.node
        node.handles -= 1
        node.writers -= handle.writable
        try:
            await self.writes.commit(handle)
        finally:
            self.writes.discard(handle)
            if node.pending and node.handles <= 0 and node.linked:
                # Created through the mount but its value was refused: nothing was
                # stored, so no file may stay behind that the pool does not have.
                self.table.unlink(node)
                self.notifications.drop_refused_name(node)
            self.table.maybe_drop(node)

    @handler
    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     mode: pyfuse3.ModeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EACCES)  # the root holds only the pools
        if self.dirs.get(parent_inode) is not None:
            raise pyfuse3.FUSEError(errno.EPERM)  # private directories hold nothing
        pool = self.table.pool_of_dir(parent_inode)
        if pool != Pool.GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        self.open_files.take(ctx.uid, f"create guest/{name.decode(errors='replace')}")
        try:
            handle = await self._new_guest_file(name, mode, flags, ctx.uid)
        except BaseException:
            self.open_files.give(ctx.uid)  # no handle: nothing will release it
            raise
        info = self._new_handle(handle)
        attr = await self.attributes.of_node(handle.node)
        handle.node.lookups += 1
        return info, attr

    async def _new_guest_file(self, name: bytes, mode: int, flags: int, uid: int) -> Handle:
        """create(2)'s handle on `name` in guest, made (counted against `uid`) or found."""
        pool = Pool.GUEST
        key = None
        # A temporary file (by its name, docs/tools.md) is private until renamed to a key.
        if not is_temporary_create(name, exclusive=bool(flags & os.O_EXCL), mode=mode,
                                   exists=lambda n: self.table.find(Pool.GUEST, n) is not None):
            key = self.writes.checked_key(name)
            await self.writes.prepare_key(key)  # the value is stored at close: check now
        async with self._guest_lock:
            node = self.table.find(pool, name)
            if node is None:
                self.writes.check_scratch_room(name, uid)
                node = self.table.add_guest(name, key, uid)
                # Its creator owns it (the group stays guest/'s, as in a setgid directory);
                # a file made owner-only (mkstemp) stays so until chmod.
                if uid != self.perm.uid:
                    node.chmod.uid = uid
                if stat.S_IMODE(mode) & 0o077 == 0:
                    node.chmod.mode = stat.S_IMODE(mode)
            elif flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
        value = await self.contents.current(node)
        append = bool(flags & os.O_APPEND)
        truncate = bool(flags & os.O_TRUNC) or node.pending
        private = bool(flags & os.O_TRUNC) or (node.pending and not append)
        handle = Handle(node, bytearray() if private else (value or b""), True, append,
                        mode=Buffer.PRIVATE if private else Buffer.SHARED,
                        publication=Publication.TRUNCATED if truncate else Publication.CLEAN,
                        prepared=key is not None, uid=uid)
        return handle

    @handler
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        directory = self.dirs.get(inode)
        if directory is not None:
            self.dirs.setattr(directory, attr, fields)
            return self.dirs.attributes(directory, TTL)
        node = self.table.get(inode)
        if node is None:
            if inode in (ROOT_INODE, *DIR_INODES):
                # rsync -a, cp -a, tar -x and touch set times on a pool directory, and its
                # mode and owner as they are: accepted, times not kept (a pool directory's
                # mtime is when a name in it last came, went or moved). docs/tools.md
                current = await self.attributes.of(inode)
                if _changes_only_times(fields, attr, current):
                    return current
            if inode in FIXED_INODES:
                raise pyfuse3.FUSEError(errno.EACCES)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.pool != Pool.GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        if fields.update_size:
            handle = self._handles.get(fh) if fh is not None else None
            await self.writes.truncate(node, attr.st_size, handle)
        now = time.time_ns()
        owned_before = (node.chmod.mode, node.chmod.uid, node.chmod.gid)
        if fields.update_mode:
            node.chmod.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.chmod.uid = attr.st_uid
        if fields.update_gid:
            node.chmod.gid = attr.st_gid
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
            node.mtime_explicit = True
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        node.ctime_ns = now
        if node.key is not None and not node.pending and node.linked and (
                fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_mtime):
            # On disk before chmod returns (durable.py).
            stored = self.contents.stored(node)
            try:
                await self.meta.keep(node.key, self.meta.record_of(
                    node, stored, self.contents.value(node) or stored))
            except pyfuse3.FUSEError:  # not on disk, so not done: the key stays as it was
                node.chmod.mode, node.chmod.uid, node.chmod.gid = owned_before
                raise
        return await self.attributes.of_node(node)

    @handler
    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        if parent_inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EACCES)
        pool = self.table.pool_of_dir(parent_inode)
        if pool != Pool.GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        async with self._guest_lock:
            node = self.table.find(pool, name)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if node.key is not None and not node.pending:
                await self.store.delete(Pool.GUEST, node.key, Origin.MOUNT)
                await self.meta.keep(node.key, None)  # after the key is gone (durable.py)
            self.table.unlink(node)

    @handler
    async def rename(self, parent_old: pyfuse3.InodeT, name_old: pyfuse3.FileNameT,
                     parent_new: pyfuse3.InodeT, name_new: pyfuse3.FileNameT,
                     flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> None:
        if ROOT_INODE in (parent_old, parent_new):
            raise pyfuse3.FUSEError(errno.EACCES)  # the root holds only the pools
        pool_old = self.table.pool_of_dir(parent_old)
        pool_new = self.table.pool_of_dir(parent_new)
        if pool_old != Pool.GUEST or pool_new != Pool.GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)  # every pool but guest is read-only
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        async with self._guest_lock:
            node = self.table.find(Pool.GUEST, name_old)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name_new == name_old:
                return
            target = self.table.find(Pool.GUEST, name_new)
            if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            await self.writes.rename(node, target, name_new, ctx.uid)

    @handler
    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext,
                    ) -> pyfuse3.EntryAttributes:
        if parent_inode != DIR_INODES[Pool.GUEST]:
            raise _no_such_entries(parent_inode)
        # A private directory (Puppet's lock, docs/tools.md): never stored, never published.
        if self.table.find(Pool.GUEST, name) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        directory = self.dirs.make(name, mode, ctx.uid, ctx.gid)
        self.table.names_changed()
        directory.lookups += 1
        return self.dirs.attributes(directory, TTL)

    @handler
    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != DIR_INODES[Pool.GUEST]:
            raise pyfuse3.FUSEError(errno.EACCES)
        if self.dirs.find(name) is None:
            missing = self.table.find(Pool.GUEST, name) is None
            raise pyfuse3.FUSEError(errno.ENOENT if missing else errno.ENOTDIR)
        self.dirs.remove(name)
        self.table.names_changed()

    @handler
    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext,
                      ) -> pyfuse3.EntryAttributes:
        raise _no_such_entries(parent_inode)

    @handler
    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext,
                   ) -> pyfuse3.EntryAttributes:
        raise _no_such_entries(new_parent_inode)

    @handler
    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, rdev: int, ctx: pyfuse3.RequestContext,
                    ) -> pyfuse3.EntryAttributes:
        raise _no_such_entries(parent_inode)

    # ================================================================ xattrs
    @handler
    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == XATTR_CONTROL and self.control_path:
            return self.control_path.encode()
        node = self.table.get(inode)
        if node is not None and node.key is not None:
            if name == XATTR_KEY:
                return node.key
            if name == XATTR_POOL:
                return str(node.pool).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @handler
    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        if inode == ROOT_INODE and self.control_path:
            return [XATTR_CONTROL]
        node = self.table.get(inode)
        if node is not None and node.key is not None:
            return [XATTR_KEY, XATTR_POOL]
        return []

    @handler
    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @handler
    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)


def _changes_only_times(fields: pyfuse3.SetattrFields, new: pyfuse3.EntryAttributes,
                        current: pyfuse3.EntryAttributes) -> bool:
    """A setattr that changes nothing but atime, mtime or ctime (mode, owner and group, if
    given, are what they are)."""
    mode_changes = stat.S_IMODE(new.st_mode) != stat.S_IMODE(current.st_mode)
    return not (fields.update_size or (fields.update_mode and mode_changes)
                or (fields.update_uid and new.st_uid != current.st_uid)
                or (fields.update_gid and new.st_gid != current.st_gid))


def _no_such_entries(parent: int) -> pyfuse3.FUSEError:
    """Directories, links and special files: EPERM in guest (only values live there, as on a
    filesystem that does not support them), EACCES elsewhere (read-only)."""
    return pyfuse3.FUSEError(errno.EPERM if parent == DIR_INODES[Pool.GUEST] else errno.EACCES)
