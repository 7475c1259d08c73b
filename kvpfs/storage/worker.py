"""A dedicated thread for blocking calls that are made one at a time anyway.

`trio.to_thread.run_sync` costs about 50 µs per call on a small VM (thread
cache, capacity limiter, thread renaming); a long-lived thread fed through a
queue costs about half that. The store keeps one `Worker` per pool for its
pool-file changes, which its per-pool lock serializes already, and the
filesystem one for its kernel cache invalidations, which it runs in order.

Like `to_thread.run_sync` without `abandon_on_cancel`, a call that has started
is waited for even when the caller is cancelled: the blocking function's
effects must be known before the caller moves on.

Each `Worker` has an owner that ends and joins its thread at shutdown: the store
in `Store.close`, a task with `async with Worker(...)`. The thread is still a
daemon thread, so that an owner that never got to its shutdown (a crash on the
way out) cannot keep the interpreter from exiting; joining is the rule.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class Worker:
    """One thread, started on first use (again after `close`), joined by `join`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._thread: threading.Thread | None = None
        # Threads told to end and not yet seen to have ended: what `join` waits for.
        self._ending: list[threading.Thread] = []

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the worker thread; its result or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._jobs is None or self._thread is None or not self._thread.is_alive():
            # Each thread has its own queue: one that is ending never takes a new job.
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=_serve, args=(self._jobs,), name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((fn, args, trio.lowlevel.current_task(),
                        trio.lowlevel.current_trio_token()))
        result: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED  # a started call is always waited for
        )
        return result

    def close(self) -> None:
        """Let the thread end once it has finished what it was given, without waiting.
        A later `run` starts a new thread, which does not wait for that last call to end."""
        if self._jobs is not None:
            self._jobs.put(None)
        if self._thread is not None:
            self._ending.append(self._thread)
        self._jobs = self._thread = None

    def join(self, timeout: float | None = None) -> bool:
        """`close`, then wait up to `timeout` s for every thread this worker started to end.

        True once none is left. Blocking: an owner on the trio thread calls it when every
        caller of `run` has returned, so the thread is idle and ends at once (a call still
        running would be waited for, which `aclose` does off the loop).
        """
        self.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._ending):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                self._ending.remove(thread)
        return not self._ending

    async def aclose(self) -> None:
        """`close`, then wait for the threads to end in a trio worker thread."""
        self.close()
        if self._ending:
            with trio.CancelScope(shield=True):  # the owner's shutdown must see the end
                await trio.to_thread.run_sync(self.join)

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        fn, args, task, token = job
        result = outcome.capture(fn, *args)
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
        except trio.RunFinishedError:
            return  # the caller's trio run is over; nobody waits any more
