"""A dedicated thread for blocking calls that are made one at a time anyway.

`trio.to_thread.run_sync` costs about 50 µs per call on a small VM (thread
cache, capacity limiter, thread renaming); a long-lived thread fed through a
queue costs about half that. A host SET pays for two such calls (the pool-file
change and the kernel cache invalidation), so the store keeps one `Worker` per
pool, whose changes its per-pool lock serializes already, and the filesystem
one for its invalidations, which it runs in order.

Like `to_thread.run_sync` without `abandon_on_cancel`, a call that has started
is waited for even when the caller is cancelled: the blocking function's
effects must be known before the caller moves on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class Worker:
    """One daemon thread, started on first use and ended by `close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the worker thread; its result or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((fn, args, trio.lowlevel.current_task(),
                        trio.lowlevel.current_trio_token()))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED  # a started call is always waited for
        )

    def close(self) -> None:
        """Let the thread end once it has finished what it was given."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, task, token = job
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                return  # the caller's trio run is over; nobody waits any more
