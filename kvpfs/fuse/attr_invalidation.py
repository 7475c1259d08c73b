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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

_Job = tuple[int, Callable[[], None] | None]


class AttrInvalidator:
    """One thread running `invalidate(ino)` calls in order; callbacks on the trio thread."""

    def __init__(self, invalidate: Callable[[int], None]) -> None:
        self._invalidate = invalidate
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending: dict[int, int] = {}  # inode -> invalidations asked and not done
        self._thread: threading.Thread | None = None

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        """Start running what is asked (and what was asked before: it waited)."""
        self._thread = threading.Thread(target=self._serve, args=(self._jobs, token),
                                        name="kvpfs attribute invalidations", daemon=True)
        self._thread.start()

    def submit(self, ino: int, done: Callable[[], None] | None = None) -> None:
        """Ask for it; `done` runs on the trio thread once the kernel has dropped them.
        Trio thread only."""
        self._pending[ino] = self._pending.get(ino, 0) + 1
        self._jobs.put((ino, done))

    def pending(self, ino: int) -> bool:
        return ino in self._pending

    def close(self) -> None:
        self._jobs.put(None)
        self._thread = None

    def _finished(self, ino: int, done: Callable[[], None] | None) -> None:
        left = self._pending.get(ino, 1) - 1
        if left > 0:
            self._pending[ino] = left
        else:
            self._pending.pop(ino, None)
        if done is not None:
            done()

    def _serve(self, jobs: queue.SimpleQueue[_Job | None], token: trio.lowlevel.TrioToken
               ) -> None:
        while (job := jobs.get()) is not None:
            ino, done = job
            try:
                self._invalidate(ino)
            except OSError as exc:  # the kernel has forgotten the inode: nothing to drop
                log.debug("attribute invalidation of %d: %s", ino, exc)
            try:
                token.run_sync_soon(self._finished, ino, done)
            except trio.RunFinishedError:
                return
