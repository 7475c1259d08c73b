"""Everything kvpfs tells the kernel and watchers after a change, in one service.

A change reaches the store from the host, from another program writing a pool
file, or through the mount. The store's listener (`on_store_change`) brings
our nodes up to date at once, so the next request is answered from the new
state, and queues what the kernel and watchers must be told:

- attribute invalidations (`attr_invalidation.py`, a thread of their own: they
  take no kernel lock, and a `stat` right after the host's reply must not see
  the old size);
- page and entry invalidations, and the inotify echoes (`fsnotify_echo.py`:
  a helper process repeats a host change through the mount, and the handlers
  answer it in `echoes.py`), run by `run()` one at a time, in order, outside
  any handler (invalidating inside one can deadlock the kernel against our own
  single thread, fuse-pyfuse3.md 1.8);
- wake-ups of /.events pollers (`wake_poller`), for the same reason.

It coalesces: the lane lets a burst of changes end first (SETTLE, at most
SETTLE_MAX), so that its work does not compete with the host's next request;
then the requests queued meanwhile are taken as one batch, in which an
inode's page drop, a name's entry drop and a poller's wake-up each run once,
echoes are one per key (`EchoQueue`), and an inode's attribute invalidation
folds into one still waiting for its thread. The host's reply never waits
for any of it. `mount.py` builds this service, adds
its listener to the store and runs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from kvpfs.fuse.attr_invalidation import AttrInvalidator
from kvpfs.fuse.echo_helper import EchoKind
from kvpfs.fuse.fsnotify_echo import EchoHelper, EchoOp, EchoQueue
from kvpfs.fuse.nodes import DIR_INODES, Node, NodeTable
from kvpfs.storage.store import Change, ChangeKind, Origin, Store
from kvpfs.storage.worker import Worker
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)

# A burst of host (or other programs') changes is let end before the lane tells the
# kernel and watchers, so that its work folds and does not compete with the host's next
# request: the lane waits until no such change came for SETTLE seconds, and never
# longer than SETTLE_MAX (a lone change's inotify events come SETTLE later).
SETTLE = 0.001
SETTLE_MAX = 0.004


# ---------------------------------------------------------------- the requests
@dataclass(frozen=True)
class PollNotify:
    """Wake a poller of /.events (its PollHandle)."""

    handle: pyfuse3.PollHandle


@dataclass(frozen=True)
class InodeDrop:
    """Drop the kernel's attributes and pages of an inode (the name stays)."""

    ino: int


@dataclass(frozen=True)
class EntryDrop:
    """Drop a name the kernel holds for an inode that is gone."""

    parent: int
    name: bytes
    deleted: int


@dataclass(frozen=True)
class EchoDue:
    """Run the inotify echoes that are due (the queue itself is in `EchoQueue`)."""


Invalidation = PollNotify | InodeDrop | EntryDrop | EchoDue


class Notifications:
    """The kernel's side of every change: what it must drop, and what watchers must see."""

    def __init__(self, store: Store, table: NodeTable) -> None:
        self.store = store
        self.table = table
        self._send: trio.MemorySendChannel[Invalidation]
        self._requests: trio.MemoryReceiveChannel[Invalidation]
        self._send, self._requests = trio.open_memory_channel(float("inf"))
        # Attribute-only invalidations take no lock in the kernel: a thread of their own,
        # never behind an echo or an entry invalidation.
        self.attrs = AttrInvalidator(lambda ino: pyfuse3.invalidate_inode(ino, True))
        # inotify echoes; the helper starts with `run`, which is given the mount point.
        self.echo_queue = EchoQueue({pool: store.states[pool].unique_keys()
                                     for pool in Pool if pool != Pool.AUTO})
        self.echo: EchoHelper | None = None
        self.echo_op: EchoOp | None = None  # the echo running now
        self.host_deleted: set[int] = set()  # inodes whose kernel entry is still to drop
        self._page_drops: set[int] = set()  # inodes with an InodeDrop queued, not yet run
        self._last_change = float("-inf")  # trio clock: the last change not through the mount

    def _queue(self, request: Invalidation) -> None:
        self._send.send_nowait(request)

    def queued(self) -> int:
        """Requests not yet run (the service may not be running)."""
        return self._requests.statistics().current_buffer_used

    # ================================================================ what others ask
    def wake_poller(self, handle: pyfuse3.PollHandle) -> None:
        """A reader polling /.events has something to read (never from inside a handler)."""
        self._queue(PollNotify(handle))

    def drop_refused_name(self, node: Node) -> None:
        """A file created through the mount whose value was refused: the kernel's name for
        it goes, as the pool never held it."""
        self._queue(EntryDrop(DIR_INODES[node.pool], node.name, node.ino))

    def attrs_pending(self, ino: int) -> bool:
        """The kernel may still hold attributes from before a change (not dropped yet)."""
        return self.attrs.pending(ino)

    def echo_owns(self, pid: int) -> bool:
        """A request from the inotify echo helper, answered for the echo (echoes.py)."""
        return self.echo is not None and self.echo.owns(pid)

    def _drop_pages(self, ino: int) -> None:
        if ino not in self._page_drops:  # one queued already: it runs after this change
            self._page_drops.add(ino)
            self._queue(InodeDrop(ino))

    # ================================================================ the listener
    async def on_store_change(self, changes: list[Change]) -> None:
        """Store listener (see `apply`)."""
        self.apply(changes)

    def apply(self, changes: list[Change]) -> None:
        """Bring our nodes up to date and queue the kernel's side.

        Never waits for the kernel: the host's reply (and the store's caller) must
        not depend on the kernel's cache. Our own state changes here, at once, so
        lookups, getattr and open answer the new value; invalidations and inotify
        echoes are queued to `run()`.

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
        echo = self.echo_mountpoint is not None
        if any(change.origin is not Origin.MOUNT for change in changes):
            self._last_change = trio.current_time()
        for change in changes:
            is_set = change.kind is ChangeKind.SET
            node = self.table.by_key.get((change.pool, change.key))
            if change.origin is Origin.MOUNT:
                self.echo_queue.seen_by_kernel(change.pool, change.key, is_set)
                if node is not None and is_set:
                    self.attr_invalidate(node, None)
                continue
            if node is not None and is_set and node.handles > 0 and node.writers == 0 \
                    and node.linked and not node.pending:
                # Open for reading only: the host's value replaces the file, as a rename
                # would (its readers keep what they opened, with its size: docs/tools.md);
                # the kernel drops the name, the echo below then reaches the new file.
                self.table.replace(node)
                self._queue(EntryDrop(DIR_INODES[change.pool], node.name, 0))
                node = None
            if node is not None:
                node.mtime_ns = node.ctime_ns = time.time_ns()
                node.kernel.cached = False
                if node.handles or time.monotonic() < node.kernel.attrs_until:
                    # First of all: a `stat` or `cat` right after the host's reply must
                    # not get the old size from the kernel's attribute cache.
                    self.attr_invalidate(node, node.kernel.attrs_until)
                if is_set and node.handles:
                    # Pages an open file holds; a later open drops them itself (`cached`).
                    self._drop_pages(node.ino)
            deleted = None
            if change.kind is ChangeKind.DELETE:
                deleted = node or Node(self.table.new_ino(), change.pool, change.key,
                                       names.key_to_name(change.key), linked=False)
            due: bool | None
            if echo:
                due = self.echo_queue.note(change.pool, change.key, deleted)
            else:  # not mounted yet (or no echo possible): nobody could watch
                due = None
                self.echo_queue.seen_by_kernel(change.pool, change.key, is_set)
            if due:
                self._queue(EchoDue())
            if node is None or is_set:
                continue
            name = node.name
            known = node.lookups > 0 or node.handles > 0
            self.table.unlink(node)
            if known:
                self.host_deleted.add(node.ino)
            if known and due is None:  # no echo will unlink it: drop the entry ourselves
                self._queue(EntryDrop(DIR_INODES[change.pool], name, node.ino))

    def attr_invalidate(self, node: Node, given_until: float | None) -> None:
        def done() -> None:
            # The kernel asks again next time, unless it already has (a new deadline).
            if given_until is not None and node.kernel.attrs_until == given_until:
                node.kernel.attrs_until = 0.0

        self.attrs.submit(node.ino, done)

    def host_deleted_gone(self, inode: int) -> bool:
        """A key deleted by the host or another program, no file open on it.

        The kernel may still hold its name (entry timeout) until the echo or an
        invalidation drops it, and the host's reply does not wait for that. Its
        GETATTR and OPEN answer ESTALE: the VFS then repeats the path walk with
        LOOKUP_REVAL, our LOOKUP says ENOENT, and the kernel drops the name itself,
        in the caller's context: `stat` fails with ENOENT, `echo x > KEY` creates
        the key anew, as if the name had already gone.
        """
        if inode not in self.host_deleted:
            return False
        node = self.table.get(inode)
        if node is None or node.linked:
            self.host_deleted.discard(inode)
            return False
        return node.handles <= 0

    # ================================================================ the service
    @property
    def echo_mountpoint(self) -> Path | None:
        return self.echo.mountpoint if self.echo is not None and not self.echo.disabled \
            else None

    async def run(self, mountpoint: Path | None = None) -> None:
        """Run kernel cache invalidations and inotify echoes, one at a time, in order.

        Invalidations run in a worker thread. Echoes run in the helper process,
        never while an invalidation is in the kernel: a SIGKILL during an entry
        invalidation must never find our own helper holding the directory's lock.
        Without `mountpoint` (no mount to echo through) deleted keys are
        invalidated instead of echoed. Attribute-only invalidations do not queue
        here: they take no kernel lock and run at once in `AttrInvalidator`'s thread.
        """
        if mountpoint is not None:
            self.echo = EchoHelper(mountpoint)
        self.attrs.start(trio.lowlevel.current_trio_token())
        try:
            await self._serial_lane()
        finally:
            await self.attrs.aclose()
            if self.echo is not None:
                await self.echo.aclose()

    async def _serial_lane(self) -> None:
        worker = Worker("kvpfs invalidations")
        try:
            async for first in self._requests:
                await self._settle()
                for request in self._batch(first):
                    await self._perform(request, worker)
        finally:
            worker.close()

    async def _settle(self) -> None:
        """Wait while changes keep coming, SETTLE_MAX at most (see SETTLE)."""
        until = trio.current_time() + SETTLE_MAX
        while (now := trio.current_time()) < until:
            quiet_at = self._last_change + SETTLE
            if now >= quiet_at:
                return
            await trio.sleep(min(quiet_at, until) - now)

    def _batch(self, first: Invalidation) -> list[Invalidation]:
        """`first` and everything queued behind it, each invalidation and wake-up once
        (in the order first asked); every EchoDue stays, as each stands for one key."""
        batch = [first]
        seen: set[Invalidation] = {first}
        while True:
            try:
                request = self._requests.receive_nowait()
            except trio.WouldBlock:
                return batch
            if isinstance(request, EchoDue):
                batch.append(request)
            elif request not in seen:
                seen.add(request)
                batch.append(request)

    async def _perform(self, request: Invalidation, worker: Worker) -> None:
        try:
            if isinstance(request, EchoDue):
                await self._run_echo(worker)
            elif isinstance(request, PollNotify):
                request.handle.notify()
            elif isinstance(request, InodeDrop):
                self._page_drops.discard(request.ino)  # a change from now on asks again
                await worker.run(pyfuse3.invalidate_inode, request.ino)
            else:
                try:
                    await worker.run(pyfuse3.invalidate_entry, request.parent,
                                     request.name, request.deleted)
                finally:
                    self.host_deleted.discard(request.deleted)
        except OSError as exc:
            log.debug("invalidation %r: %s", request, exc)

    async def _run_echo(self, worker: Worker) -> None:
        """The echoes for one key whose change watchers have not seen yet."""
        ops = self.echo_queue.next_ops(self._key_exists, names.key_to_name)
        for op in ops:
            error = errno.ENOTCONN
            if self.echo is not None and not self.echo.disabled:
                self.echo_op = op
                try:
                    error = await self.echo.run(op, Pool(op.pool).dirname.encode())
                finally:
                    self.echo_op = None
            if error:
                log.debug("inotify echo %s of %s/%r: %s", op.kind.name.lower(),
                          Pool(op.pool).dirname, op.name, os.strerror(error))
            node = op.node  # DELETE's only
            if error and op.kind is EchoKind.DELETE and node is not None \
                    and (node.lookups > 0 or node.handles > 0):
                with contextlib.suppress(OSError):  # the kernel may have dropped it already
                    await worker.run(pyfuse3.invalidate_entry, DIR_INODES[op.pool],
                                     op.name, node.ino)
            if op.kind is EchoKind.DELETE and node is not None:
                self.host_deleted.discard(node.ino)
            for ino in op.touched:  # echo-only attributes: the next stat asks again
                touched = self.table.get(ino)
                if touched is not None:
                    self.attr_invalidate(touched, None)
                else:
                    with contextlib.suppress(OSError):
                        await worker.run(pyfuse3.invalidate_inode, ino, True)

    def _key_exists(self, pool: int, key: bytes) -> bool:
        """What an echo must show: a stored key, or one a guest is creating right now (its
        file exists before its value is stored, and an echoed unlink must not remove it)."""
        if self.store.get(pool, key) is not None:
            return True
        node = self.table.by_key.get((pool, key))
        return node is not None and node.pending and node.linked
