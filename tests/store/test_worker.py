"""kvpfs.storage.worker: a dedicated thread for blocking calls, with to_thread's semantics."""

from __future__ import annotations

import threading
import time

import pytest
import trio
import trio.testing

from kvpfs.storage.worker import Worker


async def test_runs_in_its_own_thread_and_returns_or_raises() -> None:
    worker = Worker("test worker")
    try:
        name = await worker.run(lambda: threading.current_thread().name)
        assert name == "test worker"
        assert await worker.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError, match="missing"):
            await worker.run({}.__getitem__, "missing")
        assert await worker.run(lambda: "still serving") == "still serving"
    finally:
        worker.close()


async def test_calls_run_one_at_a_time_in_order() -> None:
    worker = Worker("test worker")
    seen: list[int] = []
    active = []

    def job(n: int) -> None:
        active.append(n)
        assert len(active) == 1, "two calls at once"
        time.sleep(0.01)
        seen.append(n)
        active.remove(n)

    try:
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(worker.run, job, n)
                await trio.sleep(0)  # queued in this order
        assert seen == list(range(5))
    finally:
        worker.close()


async def test_a_started_call_is_waited_for_when_cancelled() -> None:
    """Like to_thread.run_sync without abandon_on_cancel: the caller learns the effects."""
    worker = Worker("test worker")
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    returned = trio.Event()
    scope = trio.CancelScope()

    def slow() -> None:
        started.set()
        release.wait(10)
        done.set()

    async def caller() -> None:
        with scope:
            await worker.run(slow)
            assert done.is_set(), "the cancelled caller went on before the call ended"
            await trio.lowlevel.checkpoint()  # where the cancellation lands
        returned.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set(), "cancellation abandoned a call that had started"
            release.set()
        assert scope.cancelled_caught and done.is_set()
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            with pytest.raises(trio.Cancelled):
                await worker.run(done.clear)  # cancelled before it starts: never runs
        assert done.is_set()
    finally:
        worker.close()


async def test_close_ends_the_thread() -> None:
    worker = Worker("closing worker")
    await worker.run(lambda: None)
    assert any(t.name == "closing worker" for t in threading.enumerate())
    worker.close()
    with trio.fail_after(5):
        while any(t.name == "closing worker" for t in threading.enumerate()):
            await trio.sleep(0.01)
    assert await worker.run(lambda: "restarted on use") == "restarted on use"
    worker.close()



def test_a_worker_serves_one_trio_run_after_another() -> None:
    """The thread outlives a trio run (the store's workers do across tests); a thread
    that has ended is replaced, so no caller is ever left waiting."""
    worker = Worker("long-lived worker")

    async def use() -> threading.Thread:
        return await worker.run(threading.current_thread)

    first = trio.run(use)
    assert trio.run(use) is first
    worker.close()
    first.join(5)
    assert not first.is_alive()
    assert trio.run(use) is not first
    worker.close()
