"""FUSE semantics for the KVP pools: each pool a directory, each key a file.

This module only translates between the kernel's requests and the `Store`
(plus `Intrinsics` for pool 2); it never mounts anything (see `mount.py`) and
never calls pyfuse3's invalidation functions from a handler: invalidations
are queued to `invalidator()`, a separate task that runs them in a worker
thread. Host changes reach inotify watchers through echoes: a helper process
repeats each one through the mount (fsnotify_echo.py), and the handlers answer
that process's requests (`_echo_*`) without touching the store.

Writes are buffered per open file and committed when the file is closed
(flush), so the host never sees half a value; O_APPEND writes of all open
files go into one shared draft per key, at its end as it is at that moment.
A key reads back as written (trailing newline included) while the stored value
is the one that write made. Because shells ignore the error of that close, the
pool's lock and room are checked (and room reserved) at open and at the first
write, so that those fail instead. Sizes and offsets past a value, and the
total of unpublished bytes, are refused before anything is allocated. Only
`guest` (pool 1) is writable. Names starting with `.` in `guest` are scratch
files kept in memory until renamed to a key, which is how editors, `sed -i`
and rsync save.

The change feed, /.events, is `events.EventFeed`: the handlers here only
delegate to it.

Every handler is wrapped by `_handler`: anything but FUSEError becomes EIO and
a log line, because any other exception would end pyfuse3's main loop and
leave a dead mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import stat
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from kvpfs.fuse.attr_invalidation import AttrInvalidator
from kvpfs.fuse.events import EventFeed
from kvpfs.fuse.fsnotify_echo import CREATE, DELETE, MODIFY, EchoHelper, EchoOp, EchoQueue
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.host.intrinsic import Intrinsics
from kvpfs.storage.errors import LockTimeout, PoolFileError
from kvpfs.storage.store import Change, Origin, Store
from kvpfs.storage.worker import Worker
from kvpfs.wire import limits, names
from kvpfs.wire.limits import VALUE_MAX_BYTES, VALUE_MAX_UNITS
from kvpfs.wire.pools import AUTO as AUTO_POOL
from kvpfs.wire.pools import GUEST, POOL_NAMES

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
DIR_INODES = tuple(ROOT_INODE + 1 + pool for pool in range(5))  # 2..6
LINK_INODES = tuple(ROOT_INODE + 6 + pool for pool in range(5))  # 7..11
EVENTS_INODE = ROOT_INODE + 11  # 12: the change feed, /.events
EVENTS_NAME = b".events"
FIRST_KEY_INODE = 100


TTL = 1.0  # attribute/entry cache; host changes are also invalidated explicitly
# The kernel starts a timeout when the caller handles our reply, after we build it, and
# a busy or throttled guest can delay that: a generous margin, as skipping is a heuristic.
TTL_MARGIN = TTL
XATTR_KEY = b"user.kvp.key"
XATTR_POOL = b"user.kvp.pool"
XATTR_CONTROL = b"user.kvpfs.control"


def _handler(method):
    """Let only FUSEError out of a handler; anything else is logged and becomes EIO."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except LockTimeout as exc:
            log.warning("%s: pool file stayed locked: %s (held by %s)",
                        method.__name__, exc, exc.holders or "unknown")
            raise pyfuse3.FUSEError(errno.EBUSY) from None
        except PoolFileError as exc:
            log.error("%s: %s", method.__name__, exc)
            code = exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s; answered EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(frozen=True)
class Permissions:
    """Mode bits shown to the kernel, which enforces them (default_permissions).

    `external` (pool 0) often carries secrets (user data, keys): root only by
    default. `guest` is writable by its owner and, if set, by `guest_gid`.
    """

    uid: int = 0
    gid: int = 0
    guest_gid: int | None = None
    external_readable: bool = False

    def dir_mode(self, pool: int) -> int:
        if pool == GUEST:
            return 0o775 if self.guest_gid is not None else 0o755
        if pool == 0 and not self.external_readable:
            return 0o500
        return 0o555

    def file_mode(self, pool: int) -> int:
        if pool == GUEST:
            return 0o664 if self.guest_gid is not None else 0o644
        if pool == 0 and not self.external_readable:
            return 0o400
        return 0o444

    def group(self, pool: int) -> int:
        return self.guest_gid if pool == GUEST and self.guest_gid is not None else self.gid


@dataclass(eq=False)
class Node:
    """A key (or scratch) file; its inode number is never reused."""

    ino: int
    pool: int
    key: bytes | None  # None for a scratch file
    name: bytes
    lookups: int = 0
    handles: int = 0
    linked: bool = True
    pending: bool = False  # created through the mount, not committed yet
    content: bytes = b""  # scratch files and pending keys only
    last_size: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = 0
    atime_ns: int = 0
    inflight: bytes | None = None  # being published: what readers must already see
    cached: bool = False  # the kernel's page cache, if any, holds the current value
    # Until then the kernel may use the attributes we gave it without asking.
    kernel_attr_until: float = 0.0
    mode: int | None = None  # chmod/chown are accepted and remembered, not stored in pools
    uid: int | None = None
    gid: int | None = None
    # (stored value, bytes as written): what was written through the mount, shown while
    # the stored value is still the one it became (read what you wrote, trailing newline
    # included). Kept in memory only.
    shown: tuple[bytes, bytes] | None = None
    # O_APPEND writes go here, at the end of the value as it is at that moment, shared
    # by every appending handle until the last of them commits.
    draft: bytearray | None = None
    draft_writers: int = 0  # appending handles whose bytes are in `draft`, not yet committed
    charged: int = 0  # bytes of `content` counted as unpublished
    draft_charged: int = 0  # bytes of `draft` counted as unpublished


@dataclass(eq=False)
class Handle:
    node: Node
    # Read-only and untouched handles share the value they opened (no copy); the first
    # change through a handle that does not append makes it a private bytearray.
    buffer: bytes | bytearray
    writable: bool
    append: bool
    dirty: bool = False  # differs from what is published
    written: bool = False  # a write or truncate since the last commit
    failed: bool = False
    private: bool = False  # `buffer` is this handle's own copy (counted as unpublished)
    in_draft: bool = False  # has appended to node.draft since its last commit
    prepared: bool = False  # the pool's lock and room were checked for this handle
    charged: int = 0  # bytes of `buffer` counted as unpublished


class KvpOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        store: Store,
        intrinsics: Intrinsics,
        *,
        raw: bool = False,
        permissions: Permissions | None = None,
        control_path: str | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.intrinsics = intrinsics
        self.raw = raw
        self.perm = permissions or Permissions(uid=os.getuid(), gid=os.getgid())
        self.control_path = control_path
        self.started_ns = time.time_ns()
        self._next_ino = FIRST_KEY_INODE
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[int, bytes], Node] = {}
        self._guest_extra: dict[bytes, Node] = {}  # name -> scratch or pending node
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, list[tuple[int, bytes, Node | None]]] = {}
        self._next_fh = 1
        self._guest_lock = store.request_lock(GUEST)  # waiters give up at their deadline
        self._unpublished = 0  # bytes in private write buffers, drafts and scratch files
        self._invalidations_send, self._invalidations = trio.open_memory_channel(float("inf"))
        self.events = EventFeed(
            lambda handle: self._invalidations_send.send_nowait(("poll", 0, handle, None)))
        # Attribute-only invalidations take no lock in the kernel: a thread of their own,
        # never behind an echo or an entry invalidation (host changes).
        self._attrs = AttrInvalidator(lambda ino: pyfuse3.invalidate_inode(ino, True))
        # inotify echoes of host changes (fsnotify_echo.py); the helper starts with the
        # invalidator, which is given the mount point.
        self._echo_queue = EchoQueue({pool: store.states[pool].unique_keys()
                                      for pool in range(len(POOL_NAMES)) if pool != AUTO_POOL})
        self._echo: EchoHelper | None = None
        self._echo_op: EchoOp | None = None
        self._echo_fhs: dict[int, Node] = {}
        self._host_deleted: set[int] = set()  # inodes whose kernel entry is still to drop
        store.add_listener(self.on_store_change)

    # ================================================================ nodes
    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _key_node(self, pool: int, key: bytes) -> Node:
        node = self._by_key.get((pool, key))
        if node is None:
            node = Node(self._new_ino(), pool, key, names.key_to_name(key))
            node.mtime_ns = node.ctime_ns = self.store.states[pool].mtime_ns or self.started_ns
            self._nodes[node.ino] = node
            self._by_key[(pool, key)] = node
        return node

    def _unlink_node(self, node: Node) -> None:
        node.linked = False
        if node.key is None:  # a scratch file's bytes go with its name
            node.content = b""
            node.charged = self._account(node, node.charged, 0)
        if node.key is not None and self._by_key.get((node.pool, node.key)) is node:
            del self._by_key[(node.pool, node.key)]
        if self._guest_extra.get(node.name) is node:
            del self._guest_extra[node.name]
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if not node.linked and node.lookups <= 0 and node.handles <= 0:
            self._nodes.pop(node.ino, None)

    def _value(self, node: Node) -> bytes | None:
        """The current value of a key node as a reader sees it, None if it no longer exists:
        the bytes written through the mount while the stored value is still what they
        became, else the stored value."""
        if node.inflight is not None:
            return node.inflight
        if node.key is None or node.pending:
            return node.content
        if node.pool == AUTO_POOL:
            return None  # computed by _auto_value
        value = self.store.get(node.pool, node.key)
        if node.shown is not None and value is not None and node.shown[0] == value:
            return node.shown[1]
        return value

    def _stored(self, node: Node) -> bytes:
        """What the pool holds for a guest key node (b"" for a pending one)."""
        if node.key is None or node.pending:
            return b""
        return self.store.get(node.pool, node.key) or b""

    async def _auto_value(self, node: Node) -> bytes:
        index = INTRINSIC_KEYS.index(node.key.decode())
        if self.intrinsics.needs_thread(index):
            item = await trio.to_thread.run_sync(self.intrinsics.value, index)
        else:
            item = self.intrinsics.value(index)
        return item[1].encode()

    async def _current(self, node: Node) -> bytes | None:
        if node.pool == AUTO_POOL and node.key is not None:
            return await self._auto_value(node)
        return self._value(node)

    def _find(self, pool: int, name: bytes) -> Node | None:
        """The live node for `name` in a pool directory, or None."""
        if pool == GUEST:
            extra = self._guest_extra.get(name)
            if extra is not None:
                return extra
            if name.startswith(b"."):
                return None
        if pool == AUTO_POOL:
            try:
                key = names.name_to_key(name)
            except names.InvalidName:
                return None
            return self._key_node(pool, key) if key.decode() in INTRINSIC_KEYS else None
        if names.is_shortened(name):
            for key in self.store.states[pool].unique_keys():
                if names.key_to_name(key) == name:
                    return self._key_node(pool, key)
            return None
        try:
            key = names.name_to_key(name)
        except names.InvalidName:
            return None
        pending = self._by_key.get((pool, key))
        if pending is not None and pending.pending:
            return pending  # created through the mount, named here by its full long name
        if self.store.get(pool, key) is None:
            return None
        return self._key_node(pool, key)

    # ================================================================ attributes
    def _base_attr(self, ino: int, mode: int, size: int, mtime_ns: int, ttl: float = TTL):
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

    async def _attr(self, ino: int):
        if ino == ROOT_INODE:
            attr = self._base_attr(ino, stat.S_IFDIR | 0o555, 0, self.started_ns, 60)
            attr.st_nlink = 2 + len(POOL_NAMES)
            return attr
        if ino in DIR_INODES:
            pool = DIR_INODES.index(ino)
            mtime = self.store.states[pool].mtime_ns or self.started_ns
            attr = self._base_attr(ino, stat.S_IFDIR | self.perm.dir_mode(pool), 0, mtime)
            attr.st_nlink = 2
            attr.st_gid = self.perm.group(pool)
            return attr
        if ino == EVENTS_INODE:
            return self._base_attr(ino, stat.S_IFREG | 0o444, 0, self.started_ns, 60)
        if ino in LINK_INODES:
            target = POOL_NAMES[LINK_INODES.index(ino)].encode()
            return self._base_attr(ino, stat.S_IFLNK | 0o777, len(target), self.started_ns, 60)
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._node_attr(node)

    async def _node_attr(self, node: Node):
        value = await self._current(node) if node.linked else None
        if value is not None:
            node.last_size = len(value)
        ttl = TTL if node.pool != AUTO_POOL else 0.5
        node.kernel_attr_until = time.monotonic() + ttl + TTL_MARGIN
        mode = node.mode if node.mode is not None else self.perm.file_mode(node.pool)
        attr = self._base_attr(node.ino, stat.S_IFREG | mode, node.last_size, node.mtime_ns, ttl)
        attr.st_ctime_ns = max(node.ctime_ns, node.mtime_ns)
        if node.atime_ns:
            attr.st_atime_ns = node.atime_ns
        attr.st_uid = node.uid if node.uid is not None else self.perm.uid
        attr.st_gid = node.gid if node.gid is not None else self.perm.group(node.pool)
        attr.st_nlink = 1 if node.linked else 0
        return attr

    # ================================================================ lookup & dirs
    @_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if self._echo_owns(ctx):  # echo: kvpfs's helper replaying a host change (host changes)
            return await self._echo_lookup(parent_inode, name)
        if parent_inode == ROOT_INODE:
            if name in (b".", b".."):
                return await self._attr(ROOT_INODE)
            if name == EVENTS_NAME:
                return await self._attr(EVENTS_INODE)
            for pool, pool_name in enumerate(POOL_NAMES):
                if name == pool_name.encode():
                    return await self._attr(DIR_INODES[pool])
                if name == str(pool).encode():
                    return await self._attr(LINK_INODES[pool])
            raise pyfuse3.FUSEError(errno.ENOENT)
        pool = self._pool_of_dir(parent_inode)
        if name == b".":
            return await self._attr(parent_inode)
        if name == b"..":
            return await self._attr(ROOT_INODE)
        node = self._find(pool, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = await self._node_attr(node)
        node.lookups += 1
        return attr

    def _pool_of_dir(self, inode: int) -> int:
        if inode in DIR_INODES:
            return DIR_INODES.index(inode)
        raise pyfuse3.FUSEError(errno.ENOTDIR if inode in self._nodes else errno.ENOENT)

    @_handler
    async def getattr(self, inode, ctx=None):
        if self._echo_owns(ctx):  # echo (host changes)
            return await self._echo_getattr(inode)
        if inode in self._host_deleted and self._host_deleted_gone(inode):
            raise pyfuse3.FUSEError(errno.ESTALE)  # (host changes) see _host_deleted_gone
        return await self._attr(inode)

    @_handler
    async def readlink(self, inode, ctx):
        if inode in LINK_INODES:
            return POOL_NAMES[LINK_INODES.index(inode)].encode()
        raise pyfuse3.FUSEError(errno.EINVAL)

    @_handler
    async def opendir(self, inode, ctx):
        if inode == ROOT_INODE:
            entries: list[tuple[int, bytes, Node | None]] = []
            entries += [(DIR_INODES[p], n.encode(), None) for p, n in enumerate(POOL_NAMES)]
            entries += [(LINK_INODES[p], str(p).encode(), None) for p in range(len(POOL_NAMES))]
            entries.append((EVENTS_INODE, EVENTS_NAME, None))
        else:
            pool = self._pool_of_dir(inode)
            if pool == AUTO_POOL:
                nodes = [self._key_node(pool, k.encode()) for k in INTRINSIC_KEYS]
            else:
                nodes = [self._key_node(pool, key) for key in self.store.states[pool].unique_keys()]
                if pool == GUEST:
                    seen = {n.ino for n in nodes}
                    nodes += [n for n in self._guest_extra.values() if n.ino not in seen]
            entries = [(n.ino, n.name, n) for n in nodes]
        entries.sort(key=lambda entry: entry[0])  # inode order: stable next_id
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = entries
        return fh

    @_handler
    async def readdir(self, fh, start_id, token):
        entries = self._dir_handles.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        position = bisect_right(entries, start_id, key=lambda entry: entry[0])
        for ino, name, node in entries[position:]:
            if node is not None and not node.linked:
                continue
            attr = await (self._node_attr(node) if node is not None else self._attr(ino))
            if not pyfuse3.readdir_reply(token, name, attr, ino):
                return
            if node is not None:
                node.lookups += 1

    @_handler
    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    async def forget(self, inode_list):
        # Must not raise: no _handler, nothing in here can fail.
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is not None:
                node.lookups -= count
                self._maybe_drop(node)

    @_handler
    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 2560
        records = sum(len(s.records) for s in self.store.states)
        st.f_blocks = records
        st.f_files = records + len(self._guest_extra)
        st.f_namemax = names.NAME_MAX
        return st

    # ================================================================ reading
    @_handler
    async def open(self, inode, flags, ctx):
        if self._echo_owns(ctx):  # echo (host changes)
            return self._echo_open(inode)
        if inode == EVENTS_INODE:
            return self._open_events(flags, ctx)
        node = self._nodes.get(inode)
        if node is not None and inode in self._host_deleted and self._host_deleted_gone(inode):
            raise pyfuse3.FUSEError(errno.ESTALE)  # (host changes) see _host_deleted_gone
        if node is None or not node.linked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)
        if (writable or truncate) and node.pool != GUEST:
            log.info("refused write to %s/%s: only guest is writable",
                     POOL_NAMES[node.pool], node.name.decode(errors="replace"))
            raise pyfuse3.FUSEError(errno.EACCES)
        self._check_open_files()
        value = await self._current(node)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        handle = Handle(node, bytearray() if truncate else value, writable,
                        bool(flags & os.O_APPEND), dirty=truncate, private=truncate)
        if truncate:
            # `: > key` stores at release, where nobody hears of a failure: check now.
            await self._prepare(handle)
        return self._new_handle(handle)

    def _check_open_files(self) -> None:
        if len(self._handles) >= limits.OPEN_FILES_MAX:
            log.warning("refused an open: %d value files are open, the most kvpfs keeps"
                        " (all users together); close some", len(self._handles))
            raise pyfuse3.FUSEError(errno.ENFILE)

    def _new_handle(self, handle: Handle):
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        node = handle.node
        node.handles += 1
        # The kernel may keep what it cached at an earlier open only if the value has not
        # changed since (every change clears `cached`); pool 2 is computed per read.
        keep = node.cached and not handle.writable and node.pool != AUTO_POOL
        node.cached = not handle.writable
        # (host changes) direct I/O while the kernel may still hold a size from before a
        # host change: a read must not stop there.
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep,
                                direct_io=self._attrs.pending(node.ino))

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @_handler
    async def read(self, fh, off, size):
        if self.events.owns(fh):
            return await self.events.read(fh, size)
        return bytes(self._view(self._handle(fh))[off : off + size])

    # ================================================================ the change feed
    def _open_events(self, flags, ctx):
        # Whoever may not read external/ does not learn its key names either.
        include_external = ctx.uid == 0 or ctx.uid == self.perm.uid or \
            self.perm.external_readable
        fh = self._next_fh
        self._next_fh += 1
        return self.events.open(fh, flags, ctx, include_external=include_external)

    @_handler
    async def poll(self, inode, fh, poll_handle, ctx):
        if not self.events.owns(fh):
            return select.POLLIN | select.POLLRDNORM  # value files never block
        return self.events.poll(fh, poll_handle)

    def has_readers(self) -> bool:
        return self.events.has_readers()

    def shutdown(self) -> None:
        """End every blocked read of /.events so pyfuse3's main loop can return."""
        self.events.shutdown()

    # ================================================================ writing
    @_handler
    async def write(self, fh, off, buf):
        if fh in self._echo_fhs:  # echo (host changes): the byte is discarded
            return len(buf)
        handle = self._handle(fh)
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.append and not handle.private:
            if not handle.prepared:
                await self._prepare(handle)
            return self._append(handle, buf)
        size = len(handle.buffer) + len(buf) if handle.append else \
            max(len(handle.buffer), off + len(buf))
        self._check_size(handle, size, f"a write of {len(buf)} bytes at offset {off}")
        if not handle.prepared:
            await self._prepare(handle)
        data = self._make_private(handle, size)
        if handle.append:
            off = len(data)  # the kernel's offset comes from a possibly stale size
        if off > len(data):
            data.extend(b"\0" * (off - len(data)))
        data[off : off + len(buf)] = buf
        handle.dirty = handle.written = True
        error = self._early_check(handle.node, data)
        if error:
            handle.failed = True
            raise pyfuse3.FUSEError(error)
        return len(buf)

    def _append(self, handle: Handle, buf: bytes) -> int:
        """An O_APPEND write: at the end of the value as it is now, whoever else appends.

        Every appending handle of a node writes into one shared draft, based on the value
        readers see (the written form, trailing newline included); the draft is published
        whole when each of them commits, and dropped after the last. A refused write adds
        nothing and leaves what the others appended alone.
        """
        node = handle.node
        base = node.draft if node.draft is not None else (self._value(node) or b"")
        size = len(base) + len(buf)
        # Refused before this handle appended anything: it stores nothing at all (not
        # even the empty new key its open created), as a refused write does.
        self._check_size(handle, size, f"an append of {len(buf)} bytes",
                         fail=not handle.in_draft)
        new = bytearray(base)
        new += buf
        error = self._early_check(node, new)
        if error:
            handle.failed = handle.failed or not handle.in_draft
            raise pyfuse3.FUSEError(error)
        node.draft_charged = self._account(node, node.draft_charged, size)
        node.draft = new
        if not handle.in_draft:
            handle.in_draft = True
            node.draft_writers += 1
        handle.failed = False  # what it appends now is stored at its close
        handle.dirty = handle.written = True
        return len(buf)

    def _view(self, handle: Handle) -> bytes | bytearray:
        """What a read through this handle returns."""
        node = handle.node
        if handle.append and not handle.private and node.draft is not None:
            return node.draft
        return handle.buffer

    def _file_max(self, node: Node) -> int:
        """The most bytes an open or scratch file may hold: a value, plus the newline
        dropped at commit unless --raw (a scratch file is renamed into a key)."""
        if node.key is None:
            return limits.SCRATCH_FILE_MAX_BYTES
        return limits.VALUE_MAX_BYTES if self.raw else limits.FILE_MAX_BYTES

    def _check_size(self, handle: Handle, size: int, what: str, *, fail: bool = True) -> None:
        """EFBIG before anything is allocated if a file would grow past `_file_max`."""
        limit = self._file_max(handle.node)
        if size > limit:
            if fail:
                handle.failed = True
            self._refuse(handle.node, f"{what} would make the file {size} bytes; a value (and a"
                         f" scratch file, which may become one) is at most {limit} bytes"
                         f"{'' if self.raw else ' with its trailing newline'}")
            raise pyfuse3.FUSEError(errno.EFBIG)

    def _account(self, node: Node, old: int, new: int) -> int:
        """Move one buffer's share of the unpublished total from `old` to `new` bytes and
        return `new`; ENOSPC with a log line, changing nothing, past the bound."""
        if new > old and self._unpublished + new - old > limits.UNPUBLISHED_MAX_BYTES:
            log.warning("refused to grow %s/%s: unpublished data (open write buffers, appends"
                        " and scratch files of all users) would exceed %d bytes; nothing"
                        " stored", POOL_NAMES[node.pool], node.name.decode(errors="replace"),
                        limits.UNPUBLISHED_MAX_BYTES)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self._unpublished += new - old
        return new

    def _make_private(self, handle: Handle, size: int) -> bytearray:
        """The handle's own buffer, counted for at least `size` bytes (ENOSPC past the
        unpublished bound); copied from what it shows at its first change."""
        base = handle.buffer if handle.private else self._view(handle)
        handle.charged = self._account(handle.node, handle.charged, max(size, len(base)))
        if not handle.private:
            if handle.in_draft:
                self._leave_draft(handle)
            handle.buffer = bytearray(base)
            handle.private = True
        assert isinstance(handle.buffer, bytearray)
        return handle.buffer

    def _leave_draft(self, handle: Handle) -> None:
        node = handle.node
        handle.in_draft = False
        node.draft_writers -= 1
        if node.draft_writers <= 0:
            node.draft_writers = 0
            node.draft = None
            node.draft_charged = self._account(node, node.draft_charged, 0)

    async def _prepare(self, handle: Handle) -> None:
        """Fail this open or write, rather than the close, if the value cannot be stored.
        A write refused here changed nothing; the next one checks again."""
        if handle.node.key is not None:
            await self._prepare_key(handle.node.key)
        handle.prepared = True

    async def _prepare_key(self, key: bytes) -> None:
        """Check that a guest key can be stored soon: the pool's locks are free within the
        lock timeout (EBUSY) and the pool file has room for its record (ENOSPC). Shells
        ignore the error of the close that stores a value, so write(2) must fail instead.
        The lock is only taken and dropped: it is never held across the caller's time."""
        new = 0
        if self.store.get(GUEST, key) is None:
            new = 1 + sum(1 for node in self._guest_extra.values() if node.pending)
        await self.store.prepare_set(GUEST, new)

    def _check_scratch_room(self, name: bytes) -> None:
        if len(self._guest_extra) >= limits.SCRATCH_MAX_FILES:
            log.warning("refused to create guest/%s: %d scratch files and unstored new keys"
                        " exist, the most kvpfs keeps; rename or remove some",
                        name.decode(errors="replace"), len(self._guest_extra))
            raise pyfuse3.FUSEError(errno.ENOSPC)

    def _early_check(self, node: Node, buffer: bytes | bytearray) -> int:
        """Refuse a write as soon as the value can no longer become valid."""
        if node.key is None:
            return 0  # scratch files take any bytes (up to the size limit) until renamed
        data = bytes(buffer)
        limit = VALUE_MAX_BYTES + (0 if self.raw else 1)
        if len(data) > limit:
            self._refuse(node, "value longer than 2047 bytes (and 1022 UTF-16 units)")
            return errno.EFBIG
        if b"\0" in data:
            self._refuse(node, "value contains a NUL byte")
            return errno.EINVAL
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                self._refuse(node, f"value is not UTF-8 (byte {exc.start})")
                return errno.EILSEQ
            text = data[: exc.start].decode("utf-8")  # a character still being written
        if len(text.encode("utf-16-le")) // 2 > VALUE_MAX_UNITS + (0 if self.raw else 1):
            self._refuse(node, f"value longer than {VALUE_MAX_UNITS} UTF-16 units")
            return errno.EFBIG
        return 0

    def _refuse(self, node: Node, why: str) -> None:
        log.warning("refused value for %s/%s: %s; nothing stored",
                    POOL_NAMES[node.pool], node.name.decode(errors="replace"), why)

    def _final_value(self, node: Node, data: bytes) -> bytes:
        """The value to publish, or FUSEError naming the broken limit."""
        if not self.raw and data.endswith(b"\n"):
            data = data[:-1]
        try:
            limits.check_value(data)
        except limits.LimitError as exc:
            self._refuse(node, str(exc))
            raise pyfuse3.FUSEError(exc.errno) from None
        return data

    def _checked_key(self, name: bytes) -> bytes:
        try:
            key = names.name_to_key(name)
        except names.InvalidName as exc:
            log.warning("refused name %r in guest: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            limits.check_key(key)
        except limits.LimitError as exc:
            log.warning("refused key %r in guest: %s", key, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        return key

    async def _commit(self, handle: Handle) -> None:
        """Publish what the handle holds (at flush, fsync, release)."""
        if handle.failed:
            return
        node = handle.node
        if handle.in_draft:
            assert node.draft is not None
            data = bytes(node.draft)
            handle.dirty = handle.written = False
            self._leave_draft(handle)
        elif not handle.dirty:
            return
        elif handle.append and not handle.private:
            # An appending open of a new key that wrote nothing: it creates the key empty,
            # unless someone has stored it (or is appending to it) meanwhile.
            handle.dirty = handle.written = False
            if not node.pending or node.draft is not None:
                return
            data = b""
        else:
            data = bytes(handle.buffer)
            handle.dirty = handle.written = False
        if node.key is None:  # scratch: keep exact bytes until renamed
            if node.linked:
                node.charged = self._account(node, node.charged, len(data))
                node.content = data
            node.mtime_ns = time.time_ns()
            node.cached = False
            return
        value = self._final_value(node, data)
        # Visible to every reader from now on, before the first await: a `cat`
        # right after `close()` must not see the old value while we publish.
        node.inflight = data
        node.cached = False
        try:
            async with self._guest_lock:
                if node.linked:
                    await self._publish(node, value, data)
        finally:
            if node.inflight is data:
                node.inflight = None

    async def _publish(self, node: Node, value: bytes, written: bytes | None = None) -> None:
        """Store a guest key's value; the caller holds _guest_lock. `written` is what the
        user wrote, shown by reads while the stored value stays `value`."""
        assert node.key is not None
        await self.store.set(GUEST, node.key, value, Origin.MOUNT)
        node.shown = (value, written) if written is not None and written != value else None
        if node.pending:
            node.pending = False
            node.content = b""
            if self._guest_extra.get(node.name) is node:
                del self._guest_extra[node.name]
        node.last_size = len(written if node.shown is not None else value)
        node.cached = False
        node.mtime_ns = node.ctime_ns = time.time_ns()

    @_handler
    async def flush(self, fh):
        if fh in self._echo_fhs:  # echo (host changes)
            return
        # Shells open, dup2 and close the original fd before writing: that
        # first close must not publish an empty value. An open that only
        # truncated (`: > file`) is published at release.
        if self.events.owns(fh):
            return
        handle = self._handle(fh)
        if handle.written:
            await self._commit(handle)

    @_handler
    async def fsync(self, fh, datasync):
        if fh in self._echo_fhs:  # echo (host changes)
            return
        if not self.events.owns(fh):
            await self._commit(self._handle(fh))

    @_handler
    async def release(self, fh):
        if self._echo_fhs.pop(fh, None) is not None:  # echo (host changes)
            return
        if self.events.release(fh):
            return
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        node.handles -= 1
        try:
            await self._commit(handle)
        finally:
            handle.charged = self._account(node, handle.charged, 0)
            handle.buffer = b""
            if handle.in_draft:
                self._leave_draft(handle)
            if node.pending and node.handles <= 0 and node.linked:
                # Created through the mount but its value was refused: nothing was
                # stored, so no file may stay behind that the pool does not have.
                self._unlink_node(node)
                self._invalidations_send.send_nowait(
                    ("entry", DIR_INODES[GUEST], (node.name, node.ino), None))
            self._maybe_drop(node)

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EACCES)  # the root holds only the pools
        if self._echo_owns(ctx):  # echo (host changes)
            return await self._echo_create(parent_inode, name)
        pool = self._pool_of_dir(parent_inode)
        if pool != GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        self._check_open_files()
        key = None
        if not name.startswith(b"."):
            key = self._checked_key(name)
            await self._prepare_key(key)  # the value is stored at close: check now
        async with self._guest_lock:
            node = self._find(pool, name)
            if node is None:
                self._check_scratch_room(name)
                if key is None:
                    node = Node(self._new_ino(), GUEST, None, name)
                else:
                    # Listed as any key is (a name over NAME_MAX shows shortened).
                    node = Node(self._new_ino(), GUEST, key, names.key_to_name(key),
                                pending=True)
                    self._by_key[(GUEST, key)] = node
                self._nodes[node.ino] = node
                self._guest_extra[node.name] = node
            elif flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
        value = await self._current(node)
        append = bool(flags & os.O_APPEND)
        truncate = bool(flags & os.O_TRUNC) or node.pending
        private = bool(flags & os.O_TRUNC) or (node.pending and not append)
        handle = Handle(node, bytearray() if private else (value or b""), True, append,
                        dirty=truncate, private=private, prepared=key is not None)
        info = self._new_handle(handle)
        attr = await self._node_attr(node)
        node.lookups += 1
        return info, attr

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._nodes.get(inode)
        if node is None:
            if inode in (ROOT_INODE, *DIR_INODES, *LINK_INODES, EVENTS_INODE):
                raise pyfuse3.FUSEError(errno.EACCES)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.pool != GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        if fields.update_size:
            await self._truncate(node, attr.st_size, fh)
        now = time.time_ns()
        if fields.update_mode:
            node.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        node.ctime_ns = now
        return await self._node_attr(node)

    async def _truncate(self, node: Node, size: int, fh) -> None:
        handle = self._handles.get(fh) if fh is not None else None
        if size > self._file_max(node):
            self._refuse(node, f"truncate to {size} bytes; a value (and a scratch file, which"
                         f" may become one) is at most {self._file_max(node)} bytes")
            if handle is not None:
                handle.failed = True
            raise pyfuse3.FUSEError(errno.EFBIG)
        if handle is not None:
            if not handle.prepared:
                await self._prepare(handle)
            data = self._make_private(handle, size)
            del data[size:]
            data.extend(b"\0" * (size - len(data)))
            handle.charged = self._account(node, handle.charged, len(data))
            handle.dirty = handle.written = True
            error = self._early_check(node, data)
            if error:
                handle.failed = True
                raise pyfuse3.FUSEError(error)
            return
        current = await self._current(node) or b""
        data = current[:size] + b"\0" * max(0, size - len(current))
        if node.key is None:
            node.charged = self._account(node, node.charged, len(data))
            node.content = data
            node.cached = False
            return
        if data == current:
            return  # nothing changes (e.g. `truncate -s` to the size it has)
        # truncate(2) by path: there is no close to wait for, publish now, with the rule
        # of a write: the file's bytes read back, one trailing newline is not stored.
        value = self._final_value(node, data)
        node.cached = False
        async with self._guest_lock:
            if node.linked:
                await self._publish(node, value, data)

    @_handler
    async def unlink(self, parent_inode, name, ctx):
        if parent_inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EACCES)
        if self._echo_owns(ctx):  # echo (host changes): the key is gone already
            return self._echo_unlink(parent_inode, name)
        pool = self._pool_of_dir(parent_inode)
        if pool != GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)
        async with self._guest_lock:
            node = self._find(pool, name)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if node.key is not None and not node.pending:
                await self.store.delete(GUEST, node.key, Origin.MOUNT)
            self._unlink_node(node)

    @_handler
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        if ROOT_INODE in (parent_old, parent_new):
            raise pyfuse3.FUSEError(errno.EACCES)  # the root holds only the pools
        pool_old = self._pool_of_dir(parent_old)
        pool_new = self._pool_of_dir(parent_new)
        if pool_old != GUEST or pool_new != GUEST:
            raise pyfuse3.FUSEError(errno.EACCES)  # every pool but guest is read-only
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        async with self._guest_lock:
            node = self._find(GUEST, name_old)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name_new == name_old:
                return
            target = self._find(GUEST, name_new)
            if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            new_key = None if name_new.startswith(b".") else self._checked_key(name_new)
            # The file's bytes (a key's written form, newline included) and what is stored.
            data = await self._current(node) or b""
            if node.key is None:
                value = self._final_value(node, data) if new_key is not None else data
            else:
                value = self._stored(node)
            charged = node.charged
            if new_key is None:
                if node.key is not None and target is None:
                    self._check_scratch_room(name_new)
                charged = self._account(node, node.charged, len(data))
            try:
                if new_key is not None:
                    await self.store.set(GUEST, new_key, value, Origin.MOUNT)
                if node.key is not None and not node.pending:
                    await self.store.delete(GUEST, node.key, Origin.MOUNT)
            except BaseException:
                self._account(node, charged, node.charged)
                raise
            if target is not None and target is not node:
                self._unlink_node(target)
            # The same inode lives on under its new name.
            if node.key is not None and self._by_key.get((GUEST, node.key)) is node:
                del self._by_key[(GUEST, node.key)]
            if self._guest_extra.get(node.name) is node:
                del self._guest_extra[node.name]
            node.name = name_new if new_key is None else names.key_to_name(new_key)
            node.key = new_key
            node.pending = False
            node.cached = False
            node.ctime_ns = time.time_ns()
            if new_key is None:
                node.content = data
                node.charged = charged
                node.shown = None
                self._guest_extra[name_new] = node
            else:
                node.content = b""
                node.charged = self._account(node, node.charged, 0)
                node.shown = (value, data) if data != value else None
                node.last_size = len(data)
                self._by_key[(GUEST, new_key)] = node

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM if parent_inode == DIR_INODES[GUEST]
                                else errno.EACCES)

    @_handler
    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EACCES)

    @_handler
    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM if parent_inode == DIR_INODES[GUEST]
                                else errno.EACCES)

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM if new_parent_inode == DIR_INODES[GUEST]
                                else errno.EACCES)

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM if parent_inode == DIR_INODES[GUEST]
                                else errno.EACCES)

    # ================================================================ xattrs
    @_handler
    async def getxattr(self, inode, name, ctx):
        if inode == ROOT_INODE and name == XATTR_CONTROL and self.control_path:
            return self.control_path.encode()
        node = self._nodes.get(inode)
        if node is not None and node.key is not None:
            if name == XATTR_KEY:
                return node.key
            if name == XATTR_POOL:
                return str(node.pool).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_handler
    async def listxattr(self, inode, ctx):
        if inode == ROOT_INODE and self.control_path:
            return [XATTR_CONTROL]
        node = self._nodes.get(inode)
        if node is not None and node.key is not None:
            return [XATTR_KEY, XATTR_POOL]
        return []

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @_handler
    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    # ================================================================ host changes
    async def on_store_change(self, changes: list[Change]) -> None:
        """Store listener: bring our nodes up to date and queue the kernel's side.

        Never waits for the kernel: the host's reply (and the store's caller) must
        not depend on the kernel's cache. Our own state changes here, before the
        first await, so lookups, getattr and open answer the new value at once;
        invalidations and inotify echoes are queued to `invalidator()`.

        Changes made through the mount are already known to the kernel, except
        that a dropped trailing newline makes a value shorter than written:
        those get an attribute refresh. For changes from the host or other
        programs, a changed value is invalidated only while the kernel may hold
        something it would use (its attributes' timeout, an open file; a page
        cache left by an earlier read is dropped by the next open, as `cached` is
        now False). A deleted key the kernel knows is unlinked by the echo (which
        drops the kernel's entry and raises IN_DELETE and IN_DELETE_SELF), or,
        without one, invalidated as before.
        """
        self.events.publish(changes)
        echo = self._echo_mountpoint is not None
        for change in changes:
            node = self._by_key.get((change.pool, change.key))
            if change.origin is Origin.MOUNT:
                self._echo_queue.seen_by_kernel(change.pool, change.key, change.kind == "set")
                if node is not None and change.kind == "set":
                    self._attr_invalidate(node, None)
                continue
            if node is not None:
                node.mtime_ns = node.ctime_ns = time.time_ns()
                node.cached = False
                if node.handles or time.monotonic() < node.kernel_attr_until:
                    # First of all: a `stat` or `cat` right after the host's reply must
                    # not get the old size from the kernel's attribute cache.
                    self._attr_invalidate(node, node.kernel_attr_until)
                if change.kind == "set" and node.handles:
                    # Pages an open file holds; a later open drops them itself (`cached`).
                    self._invalidations_send.send_nowait(("inode", node.ino, None, None))
            deleted = None
            if change.kind == "delete":
                deleted = node or Node(self._new_ino(), change.pool, change.key,
                                       names.key_to_name(change.key), linked=False)
            if echo:
                due = self._echo_queue.note(change.pool, change.key, deleted)
            else:  # not mounted yet (or no echo possible): nobody could watch
                due = None
                self._echo_queue.seen_by_kernel(change.pool, change.key, change.kind == "set")
            if due:
                self._invalidations_send.send_nowait(("echo", 0, None, None))
            if node is None or change.kind == "set":
                continue
            name = node.name
            known = node.lookups > 0 or node.handles > 0
            self._unlink_node(node)
            if known:
                self._host_deleted.add(node.ino)
            if known and due is None:  # no echo will unlink it: drop the entry ourselves
                self._invalidations_send.send_nowait(
                    ("entry", DIR_INODES[change.pool], (name, node.ino), None))

    async def invalidator(self, mountpoint: Path | None = None) -> None:
        """Run kernel cache invalidations and inotify echoes, one at a time, in order.

        Invalidations run in a worker thread, never from a handler: invalidating
        inside one can deadlock the kernel against our own single thread
        (fuse-pyfuse3.md 1.8). Echoes run in the helper process (fsnotify_echo.py),
        never while an invalidation is in the kernel: a SIGKILL during an entry
        invalidation must never find our own helper holding the directory's lock.
        Without `mountpoint` (no mount to echo through) deleted keys are
        invalidated instead of echoed. Attribute-only invalidations do not queue
        here: they take no kernel lock and run at once in `AttrInvalidator`'s thread.
        """
        if mountpoint is not None:
            self._echo = EchoHelper(mountpoint)
        self._attrs.start(trio.lowlevel.current_trio_token())
        try:
            await self._serial_lane()
        finally:
            self._attrs.close()
            if self._echo is not None:
                await self._echo.aclose()

    async def _serial_lane(self) -> None:
        worker = Worker("kvpfs invalidations")
        try:
            async for kind, ino, arg, done in self._invalidations:
                try:
                    if kind == "echo":
                        await self._run_echo(worker)
                    elif kind == "poll":
                        arg.notify()
                    elif kind == "attr":
                        await worker.run(pyfuse3.invalidate_inode, ino, True)
                    elif kind == "inode":
                        await worker.run(pyfuse3.invalidate_inode, ino)
                    else:
                        name, deleted = arg
                        try:
                            await worker.run(pyfuse3.invalidate_entry, ino, name, deleted)
                        finally:
                            self._host_deleted.discard(deleted)
                except (FileNotFoundError, OSError) as exc:
                    log.debug("invalidation %s of %d: %s", kind, ino, exc)
                finally:
                    if done is not None:
                        done.set()
        finally:
            worker.close()

    def _attr_invalidate(self, node: Node, given_until: float | None) -> None:
        def done() -> None:
            # The kernel asks again next time, unless it already has (a new deadline).
            if given_until is not None and node.kernel_attr_until == given_until:
                node.kernel_attr_until = 0.0

        self._attrs.submit(node.ino, done)

    @property
    def _echo_mountpoint(self) -> Path | None:
        return self._echo.mountpoint if self._echo is not None and not self._echo.disabled \
            else None

    async def _run_echo(self, worker: Worker) -> None:
        """The echoes for one key whose change watchers have not seen yet."""
        ops = self._echo_queue.next_ops(self._key_exists, names.key_to_name)
        for op in ops:
            error = errno.ENOTCONN
            if self._echo is not None and not self._echo.disabled:
                self._echo_op = op
                try:
                    error = await self._echo.run(op, POOL_NAMES[op.pool].encode())
                finally:
                    self._echo_op = None
            if error:
                log.debug("inotify echo %s of %s/%r: %s", op.kind, POOL_NAMES[op.pool],
                          op.name, os.strerror(error))
            node = op.node
            if error and op.kind == DELETE and (node.lookups > 0 or node.handles > 0):
                with contextlib.suppress(OSError):  # the kernel may have dropped it already
                    await worker.run(pyfuse3.invalidate_entry, DIR_INODES[op.pool],
                                     op.name, node.ino)
            if op.kind == DELETE:
                self._host_deleted.discard(node.ino)
            for ino in op.touched:  # echo-only attributes: the next stat asks again
                touched = self._nodes.get(ino)
                if touched is not None:
                    self._attr_invalidate(touched, None)
                else:
                    with contextlib.suppress(OSError):
                        await worker.run(pyfuse3.invalidate_inode, ino, True)

    def _key_exists(self, pool: int, key: bytes) -> bool:
        """What an echo must show: a stored key, or one a guest is creating right now (its
        file exists before its value is stored, and an echoed unlink must not remove it)."""
        if self.store.get(pool, key) is not None:
            return True
        node = self._by_key.get((pool, key))
        return node is not None and node.pending and node.linked

    def _host_deleted_gone(self, inode: int) -> bool:
        """A key deleted by the host or another program, no file open on it.

        The kernel may still hold its name (entry timeout) until the echo or an
        invalidation drops it, and the host's reply does not wait for that. Its
        GETATTR and OPEN answer ESTALE: the VFS then repeats the path walk with
        LOOKUP_REVAL, our LOOKUP says ENOENT, and the kernel drops the name itself,
        in the caller's context: `stat` fails with ENOENT, `echo x > KEY` creates
        the key anew, as if the name had already gone.
        """
        node = self._nodes.get(inode)
        if node is None or node.linked:
            self._host_deleted.discard(inode)
            return False
        return node.handles <= 0

    # ---------------------------------------------------------------- the echo's requests
    def _echo_owns(self, ctx) -> bool:
        """A request from the echo helper: answered for the echo, never stored."""
        return self._echo is not None and ctx is not None and self._echo.owns(ctx.pid)

    def _echo_target(self, parent_inode: int, name: bytes) -> EchoOp | None:
        op = self._echo_op
        if op is None or parent_inode != DIR_INODES[op.pool] or name != op.name:
            return None
        return op

    async def _echo_lookup(self, parent_inode: int, name: bytes):
        op = self._echo_target(parent_inode, name)
        if op is None or op.kind == MODIFY:
            return await self.lookup(parent_inode, name)  # path components: as for anyone
        if op.kind == CREATE:
            raise pyfuse3.FUSEError(errno.ENOENT)  # so that the kernel creates it
        node = op.node  # DELETE: the deleted key, for the kernel to unlink
        self._nodes.setdefault(node.ino, node)
        attr = await self._node_attr(node)
        attr.st_nlink = 1
        attr.entry_timeout = attr.attr_timeout = 0
        node.lookups += 1
        return attr

    async def _echo_getattr(self, inode: int):
        """The file or pool directory, writable by its owner (our uid) for the echo only.

        Without CAP_DAC_OVERRIDE (the shipped unit's sandbox) the kernel would refuse
        the helper's write to a 0400 file in a 0500 directory before asking us; when
        it refuses, it asks for fresh attributes first (fuse_permission), and gets
        these. They are never cached (timeout 0) and are dropped after the echo.
        """
        attr = await self._attr(inode)
        op = self._echo_op
        targets = () if op is None else (DIR_INODES[op.pool], getattr(op.node, "ino", None))
        node = self._by_key.get((op.pool, op.key)) if op is not None else None
        if op is not None and (inode in targets or (node is not None and node.ino == inode)):
            attr.st_mode |= 0o300 if stat.S_ISDIR(attr.st_mode) else 0o200
            attr.st_uid = self.perm.uid
            attr.attr_timeout = 0
            op.touched.add(inode)
        return attr

    def _echo_open(self, inode: int):
        op = self._echo_op
        node = self._nodes.get(inode)
        if op is None or op.kind == DELETE or node is None or node.key != op.key \
                or node.pool != op.pool:
            raise pyfuse3.FUSEError(errno.EACCES)
        return self._echo_handle(node)

    def _echo_handle(self, node: Node):
        fh = self._next_fh
        self._next_fh += 1
        self._echo_fhs[fh] = node
        # direct_io: the discarded byte never reaches the page cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def _echo_create(self, parent_inode: int, name: bytes):
        op = self._echo_target(parent_inode, name)
        node = self._find(op.pool, name) if op is not None and op.kind == CREATE else None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # gone again: its echo is due too
        info = self._echo_handle(node)
        attr = await self._node_attr(node)
        node.lookups += 1
        return info, attr

    def _echo_unlink(self, parent_inode: int, name: bytes) -> None:
        op = self._echo_target(parent_inode, name)
        if op is None or op.kind != DELETE:
            raise pyfuse3.FUSEError(errno.EACCES)
