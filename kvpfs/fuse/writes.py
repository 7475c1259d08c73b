"""Write buffering: what an open file holds until it is stored, and when it is refused.

Writes are buffered per open file and stored when the file is closed (flush),
so the host never sees half a value; O_APPEND writes of all open files go into
one shared draft per key, at its end as it is at that moment. A key reads back
as written (trailing newline included) while the stored value is the one that
write made. Because shells ignore the error of that close, the pool's lock and
room are checked (and room reserved) at open and at the first write, and a
value that can no longer become valid is refused at the write that breaks it.
Sizes and offsets past a value, and the total of unpublished bytes, are refused
before anything is allocated. Only `guest` (pool 1) is writable.
"""

from __future__ import annotations

import errno
import logging
import time

import pyfuse3

from kvpfs.fuse.contents import Contents
from kvpfs.fuse.durable import DurableMeta
from kvpfs.fuse.errors import refusals
from kvpfs.fuse.handles import Buffer, Handle
from kvpfs.fuse.nodes import Node, NodeTable
from kvpfs.fuse.tempnames import is_temporary
from kvpfs.fuse.unpublished import Unpublished
from kvpfs.storage.store import Origin, RequestLock, Store
from kvpfs.wire import limits, names
from kvpfs.wire.limits import VALUE_MAX_BYTES, VALUE_MAX_UNITS
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)


def is_scratch(node: Node) -> bool:
    """Asked again after an await: a rename may have made a key a scratch file meanwhile."""
    return node.key is None


class Writes:
    def __init__(self, store: Store, table: NodeTable, contents: Contents,
                 unpublished: Unpublished, guest_lock: RequestLock, meta: DurableMeta, *,
                 raw: bool) -> None:
        self.store = store
        self.meta = meta  # what users set on guest keys, kept across restarts
        self.table = table
        self.contents = contents
        self.unpublished = unpublished
        self.guest_lock = guest_lock  # held while changing guest through the mount
        self.raw = raw

    def account(self, node: Node, old: int, new: int) -> int:
        """A scratch file's content, counted for whoever made it (`Node.owner`)."""
        return self.unpublished.account(node.pool, node.name, old, new, uid=node.owner)

    def account_handle(self, handle: Handle, new: int) -> None:
        node = handle.node
        handle.charged = self.unpublished.account(node.pool, node.name, handle.charged, new,
                                                  uid=handle.uid)

    def account_draft(self, node: Node, new: int) -> None:
        node.appends.charged = self.unpublished.account(node.pool, node.name,
                                                        node.appends.charged, new,
                                                        uid=node.appends.owner)

    # ================================================================ writing
    async def write(self, handle: Handle, off: int, buf: bytes) -> int:
        if handle.append and not handle.private:
            if not handle.prepared:
                await self.prepare(handle)
            return self._append(handle, buf)
        size = len(handle.buffer) + len(buf) if handle.append else \
            max(len(handle.buffer), off + len(buf))
        self._check_size(handle, size, f"a write of {len(buf)} bytes at offset {off}")
        if not handle.prepared:
            await self.prepare(handle)
        try:
            data = self._make_private(handle, size)
        except pyfuse3.FUSEError:
            # Never the empty value an O_TRUNC open left (the old value stays), nor a
            # value with this write missing.
            handle.lost_room()
            raise
        if handle.append:
            off = len(data)  # the kernel's offset comes from a possibly stale size
        if off > len(data):
            data.extend(b"\0" * (off - len(data)))
        data[off : off + len(buf)] = buf
        handle.changed()
        handle.node.mtime_explicit = False
        error = self._early_check(handle.node, data)
        if error:
            handle.refused()
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
        draft = node.appends.data
        base = draft if draft is not None else (self.contents.value(node) or b"")
        size = len(base) + len(buf)
        # Refused before this handle appended anything: it stores nothing at all (not
        # even the empty new key its open created), as a refused write does.
        self._check_size(handle, size, f"an append of {len(buf)} bytes",
                         fail=not handle.in_draft)
        new = bytearray(base)
        new += buf
        error = self._early_check(node, new)
        if error:
            if not handle.in_draft:
                handle.refused()
            raise pyfuse3.FUSEError(error)
        if node.appends.data is None:
            node.appends.owner = handle.uid
        self.account_draft(node, size)
        node.appends.data = new
        if not handle.in_draft:
            handle.move_buffer(Buffer.DRAFT)
            node.appends.writers += 1
        handle.appended()  # what it appends now is stored at its close
        node.mtime_explicit = False
        return len(buf)

    def view(self, handle: Handle) -> bytes | bytearray:
        """What a read through this handle returns: its own bytes once it changed them,
        else the file's current value, so that size and bytes always agree (a host change
        replaces a file open for reading, `NodeTable.replace`; pool 2 is computed once per
        open)."""
        node = handle.node
        if handle.private:
            return handle.buffer
        if handle.append and node.appends.data is not None:
            return node.appends.data
        if node.pool == Pool.AUTO:
            return handle.buffer
        current = self.contents.value(node)
        return handle.buffer if current is None else current

    async def truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        """Through an open file (ftruncate, O_TRUNC after open), or by path: stored now.
        A scratch file's bytes count against its owner (see `Node.owner`)."""
        if size > self._file_max(node):
            self.refuse(node, f"truncate to {size} bytes; a value (and a scratch file, which"
                        f" may become one) is at most {self._file_max(node)} bytes")
            if handle is not None:
                handle.refused()
            raise pyfuse3.FUSEError(errno.EFBIG)
        if handle is not None:
            if not handle.prepared:
                await self.prepare(handle)
            try:
                buffer = self._make_private(handle, size)
            except pyfuse3.FUSEError:
                handle.lost_room()
                raise
            del buffer[size:]
            buffer.extend(b"\0" * (size - len(buffer)))
            self.account_handle(handle, len(buffer))
            handle.changed()
            node.mtime_explicit = False
            error = self._early_check(node, buffer)
            if error:
                handle.refused()
                raise pyfuse3.FUSEError(error)
            return
        current = await self.contents.current(node) or b""
        data = current[:size] + b"\0" * max(0, size - len(current))
        if node.key is None:
            if not node.linked:
                # Unlinked (truncate through /proc/PID/fd/N): its bytes went with its name
                # and nobody can read them by name again; nothing to keep or count.
                return
            node.held.charged = self.account(node, node.held.charged, len(data))
            node.held.content = data
            node.kernel.cached = False
            return
        if data == current:
            return  # nothing changes (e.g. `truncate -s` to the size it has)
        # truncate(2) by path: there is no close to wait for, publish now, with the rule
        # of a write: the file's bytes read back, one trailing newline is not stored.
        value = self.final_value(node, data)
        node.kernel.cached = False
        async with self.guest_lock:
            if node.linked and node.key is not None:  # not renamed to scratch meanwhile
                await self.publish(node, value, data)

    # ================================================================ bounds
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
                handle.refused()
            self.refuse(handle.node, f"{what} would make the file {size} bytes; a value (and a"
                        f" scratch file, which may become one) is at most {limit} bytes"
                        f"{'' if self.raw else ' with its trailing newline'}")
            raise pyfuse3.FUSEError(errno.EFBIG)

    def _make_private(self, handle: Handle, size: int) -> bytearray:
        """The handle's own buffer, counted for at least `size` bytes (ENOSPC past the
        unpublished bound); copied from what it shows at its first change."""
        base = handle.buffer if handle.private else self.view(handle)
        self.account_handle(handle, max(size, len(base)))
        if not handle.private:
            if handle.in_draft:
                self._leave_draft(handle)
            handle.buffer = bytearray(base)
            handle.move_buffer(Buffer.PRIVATE)
        assert isinstance(handle.buffer, bytearray)
        return handle.buffer

    def _leave_draft(self, handle: Handle) -> None:
        node = handle.node
        handle.move_buffer(Buffer.SHARED)  # its bytes are in the draft, published or not
        node.appends.writers -= 1
        if node.appends.writers <= 0:
            node.appends.writers = 0
            node.appends.data = None
            self.account_draft(node, 0)

    def discard(self, handle: Handle) -> None:
        """A released handle's memory goes back to the unpublished bound."""
        self.account_handle(handle, 0)
        handle.buffer = b""
        if handle.in_draft:
            self._leave_draft(handle)

    # ================================================================ early checks
    async def prepare(self, handle: Handle) -> None:
        """Fail this open or write, rather than the close, if the value cannot be stored.
        A write refused here changed nothing; the next one checks again."""
        if handle.node.key is not None:
            await self.prepare_key(handle.node.key)
        handle.prepared = True

    async def prepare_key(self, key: bytes) -> None:
        """Check that a guest key can be stored soon: the pool's locks are free within the
        lock timeout (EBUSY) and the pool file has room for its record (ENOSPC). Shells
        ignore the error of the close that stores a value, so write(2) must fail instead.
        The lock is only taken and dropped: it is never held across the caller's time."""
        new = 0
        if self.store.get(Pool.GUEST, key) is None:
            new = 1 + self.table.pending_count()
        await self.store.prepare_set(Pool.GUEST, new)

    def check_scratch_room(self, name: bytes, uid: int) -> None:
        """ENOSPC if `uid` may not have one more scratch file or unstored new key: at most
        SCRATCH_MAX_FILES per user and for all unprivileged users together; root (and the
        user kvpfs runs as) has SCRATCH_ROOT_FILES more."""
        extra = self.table.guest_extra.values()
        privileged = self.unpublished.quota.privileged
        if uid in privileged:
            count, limit = len(extra), limits.SCRATCH_MAX_FILES + limits.SCRATCH_ROOT_FILES
            whose = "of all users"
        else:
            mine = sum(1 for node in extra if node.owner == uid)
            others = sum(1 for node in extra if node.owner not in privileged)
            count, limit = max(mine, others), limits.SCRATCH_MAX_FILES
            whose = f"of uid {uid}" if mine >= others else "of unprivileged users"
        if count >= limit:
            refusals.warning("refused to create guest/%s: %d scratch files and unstored new"
                             " keys exist (%s), the most kvpfs keeps; rename or remove some",
                             name.decode(errors="replace"), count, whose)
            raise pyfuse3.FUSEError(errno.ENOSPC)

    def _early_check(self, node: Node, buffer: bytes | bytearray) -> int:
        """Refuse a write as soon as the value can no longer become valid."""
        if node.key is None:
            return 0  # scratch files take any bytes (up to the size limit) until renamed
        data = bytes(buffer)
        limit = VALUE_MAX_BYTES + (0 if self.raw else 1)
        if len(data) > limit:
            self.refuse(node, "value longer than 2047 bytes (and 1022 UTF-16 units)")
            return errno.EFBIG
        if b"\0" in data:
            self.refuse(node, "value contains a NUL byte")
            return errno.EINVAL
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                self.refuse(node, f"value is not UTF-8 (byte {exc.start})")
                return errno.EILSEQ
            text = data[: exc.start].decode("utf-8")  # a character still being written
        if len(text.encode("utf-16-le")) // 2 > VALUE_MAX_UNITS + (0 if self.raw else 1):
            self.refuse(node, f"value longer than {VALUE_MAX_UNITS} UTF-16 units")
            return errno.EFBIG
        return 0

    def refuse(self, node: Node, why: str) -> None:
        refusals.warning("refused value for %s/%s: %s; nothing stored",
                         Pool(node.pool).dirname, node.name.decode(errors="replace"), why)

    def checked_key(self, name: bytes) -> bytes:
        """The guest key a new file name stands for; EINVAL or the limit's errno if none."""
        try:
            key = names.name_to_key(name)
        except names.InvalidName as exc:
            refusals.warning("refused name %r in guest: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            limits.check_key(key)
        except limits.LimitError as exc:
            refusals.warning("refused key %r in guest: %s", key, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        return key

    # ================================================================ storing
    def final_value(self, node: Node, data: bytes) -> bytes:
        """The value to publish (one trailing newline dropped unless --raw), or
        FUSEError naming the broken limit."""
        if not self.raw and data.endswith(b"\n"):
            data = data[:-1]
        try:
            limits.check_value(data)
        except limits.LimitError as exc:
            self.refuse(node, str(exc))
            raise pyfuse3.FUSEError(exc.errno) from None
        return data

    async def commit(self, handle: Handle) -> None:
        """Publish what the handle holds (at flush, fsync, release)."""
        if handle.failed:
            return
        node = handle.node
        if handle.in_draft:
            assert node.appends.data is not None
            data = bytes(node.appends.data)
            handle.published()
            self._leave_draft(handle)
        elif not handle.dirty:
            return
        elif handle.append and not handle.private:
            # An appending open of a new key that wrote nothing: it creates the key empty,
            # unless someone has stored it (or is appending to it) meanwhile.
            handle.published()
            if not node.pending or node.appends.data is not None:
                return
            data = b""
        else:
            data = bytes(handle.buffer)
            handle.published()
        if node.key is None:  # scratch: keep exact bytes until renamed
            if node.linked:
                node.held.charged = self.account(node, node.held.charged, len(data))
                node.held.content = data
            if not node.mtime_explicit:
                node.mtime_ns = time.time_ns()
            node.kernel.cached = False
            return
        value = self.final_value(node, data)
        # Visible to every reader from now on, before the first await: a `cat`
        # right after `close()` must not see the old value while we publish.
        node.held.inflight = data
        node.kernel.cached = False
        try:
            async with self.guest_lock:
                if not node.linked:
                    return
                if is_scratch(node):
                    # Renamed to a scratch name while this waited for the lock: the bytes
                    # stay the scratch file's, as a write to it would have left them.
                    node.held.charged = self.account(node, node.held.charged, len(data))
                    node.held.content = data
                    node.mtime_ns = time.time_ns()
                    return
                await self.publish(node, value, data)
        finally:
            if node.held.inflight is data:
                node.held.inflight = None

    async def publish(self, node: Node, value: bytes, written: bytes | None = None) -> None:
        """Store a guest key's value; the caller holds guest_lock. `written` is what the
        user wrote, shown by reads while the stored value stays `value`."""
        if node.key is None:  # callers check under guest_lock; a scratch file has no key
            raise pyfuse3.FUSEError(errno.ESTALE)
        now = time.time_ns()
        if not node.mtime_explicit:  # cp -p and touch -d set it before the close
            node.mtime_ns = now
        # Its record first when it changes the key's mode or owner (durable.py).
        await self.meta.keep(node.key, self.meta.record_of(node, value, written or value))
        await self.store.set(Pool.GUEST, node.key, value, Origin.MOUNT)
        node.held.shown = (value, written) if written is not None and written != value else None
        if node.pending:
            node.held.content = b""
            self.table.stored(node)
        node.kernel.size = len(node.held.shown[1] if node.held.shown is not None else value)
        node.kernel.cached = False
        node.ctime_ns = now

    async def rename(self, node: Node, target: Node | None, name_new: bytes,
                     uid: int) -> None:
        """rename(2) in guest, the caller holding guest_lock: store under the new name, then
        delete the old key. A scratch file renamed to a key is stored as a write would be; a
        key renamed to a scratch file keeps its bytes as they read."""
        # A temporary name (docs/tools.md) is never a key: renamed to one, a key leaves
        # the host; renamed from one to a key name, the file is published now. But a key
        # the pool already holds under that name (the host's `Build.tmp`) is replaced as
        # any key is, not left beside a scratch file of the same name.
        if target is not None and target.key is not None:
            new_key: bytes | None = target.key
        else:
            new_key = None if is_temporary(name_new) else self.checked_key(name_new)
        # The file's bytes (a key's written form, newline included) and what is stored.
        data = await self.contents.current(node) or b""
        if node.key is None:
            value = self.final_value(node, data) if new_key is not None else data
        else:
            value = self.contents.stored(node)
        charged = node.held.charged
        if new_key is None:
            if node.key is not None and target is None:
                self.check_scratch_room(name_new, uid)
            if node.key is not None:  # a key becomes scratch: its bytes count for `uid`
                node.owner = uid
            charged = self.account(node, node.held.charged, len(data))
        try:
            if new_key is not None:
                await self.meta.keep(new_key, self.meta.record_of(node, value, data))
                await self.store.set(Pool.GUEST, new_key, value, Origin.MOUNT)
            if node.key is not None and not node.pending:
                await self.store.delete(Pool.GUEST, node.key, Origin.MOUNT)
                await self.meta.keep(node.key, None)
        except BaseException:
            self.account(node, charged, node.held.charged)
            raise
        if target is not None and target is not node:
            self.table.unlink(target)
        self.table.rename(node, name_new, new_key)
        node.kernel.cached = False
        node.ctime_ns = time.time_ns()
        if new_key is None:
            node.held.content = data
            node.held.charged = charged
            node.held.shown = None
        else:
            node.held.content = b""
            node.held.charged = self.account(node, node.held.charged, 0)
            node.held.shown = (value, data) if data != value else None
            node.kernel.size = len(data)
