"""Attribute-only kernel invalidations, started the moment a host change is known.

After a host SET the kernel may still hold the key's old attributes (its size
above all) for up to the attribute timeout; a `cat` would then stop at the old
size. Dropping them (FUSE_NOTIFY_INVAL_INODE with a negative offset) takes no
page and no inode lock in the kernel, so it never waits on a reader and never
takes part in the SIGKILL hang that entry and data invalidations can cause. It
is still a system call, so it runs in this module's own thread, handed over
without a trio round trip: it usually completes before the host has even read
its reply. Nobody waits for it; until it has completed, `pending()` says so and
the filesystem opens the file with direct I/O, which reads past a stale size.

Coalescing: while an inode's invalidation waits for the thread, further
requests for it fold into that one (their callbacks run when it completes), so
a host changing one key back to back costs one system call per turn of the
thread, not one per change. The owner (notifications.py) starts the thread and
joins it at shutdown (`aclose`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import trio

from kvpfs import compat

log = logging.getLogger(__name__)

JOIN_BOUND = 2.0  # seconds to wait for the thread at shutdown (one system call at most)

Done = Callable[[], None]


class AttrInvalidator:
    """One thread running `invalidate(ino)` calls in order; callbacks on the trio thread."""

    def __init__(self, invalidate: Callable[[int], None]) -> None:
        self._invalidate = invalidate
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._order: deque[int] = deque()  # inodes waiting for the thread (under _lock)
        self._waiting: dict[int, list[Done | None]] = {}  # their callbacks (under _lock)
        self._closing = False  # (under _lock)
        self._pending: dict[int, int] = {}  # trio thread: inode -> calls not completed
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.folded = 0  # requests merged into one already waiting (trio thread)

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        """Start running what is asked (and what was asked before: it waited)."""
        self._token = token
        self._thread = threading.Thread(target=self._serve, name="kvpfs attribute invalidations",
                                        daemon=True)
        self._thread.start()

    def submit(self, ino: int, done: Done | None = None) -> None:
        """Ask for it; `done` runs on the trio thread once the kernel has dropped them.
        Trio thread only."""
        with self._lock:
            callbacks = self._waiting.get(ino)
            if callbacks is not None:  # not started yet: this one folds into it
                callbacks.append(done)
                self.folded += 1
                return
            self._waiting[ino] = [done]
            self._order.append(ino)
            self._wake.notify()
        self._pending[ino] = self._pending.get(ino, 0) + 1

    def pending(self, ino: int) -> bool:
        return ino in self._pending

    async def aclose(self) -> None:
        """Stop the thread (what still waits is dropped: the mount is going) and join it."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(JOIN_BOUND):
            await compat.to_thread_run_sync(thread.join, abandon_on_cancel=True)
        if thread.is_alive():
            log.warning("attribute invalidation thread still in the kernel after %g s",
                        JOIN_BOUND)

    def _finished(self, ino: int, callbacks: list[Done | None]) -> None:
        left = self._pending.get(ino, 1) - 1
        if left > 0:
            self._pending[ino] = left
        else:
            self._pending.pop(ino, None)
        for done in callbacks:
            if done is not None:
                done()

    def _serve(self) -> None:
        token = self._token
        assert token is not None  # set by start() before the thread exists
        while True:
            with self._lock:
                while not self._order and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                ino = self._order.popleft()
                callbacks = self._waiting.pop(ino)
            try:
                self._invalidate(ino)
            except OSError as exc:  # the kernel has forgotten the inode: nothing to drop
                log.debug("attribute invalidation of %d: %s", ino, exc)
            try:
                token.run_sync_soon(self._finished, ino, callbacks)
            except trio.RunFinishedError:
                return
