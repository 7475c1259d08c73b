"""kvpfs.storage.worker: a dedicated thread for blocking calls, with to_thread's semantics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from kvpfs.storage.store import Store
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


async def test_close_ends_the_thread_and_join_waits_for_it() -> None:
    worker = Worker("closing worker")
    thread = await worker.run(threading.current_thread)
    assert thread.is_alive()
    worker.close()
    assert worker.join(5)
    assert not thread.is_alive()
    assert await worker.run(lambda: "restarted on use") == "restarted on use"
    assert worker.join(5)


async def test_join_waits_for_the_call_in_flight() -> None:
    """The owner's join ends only after the last call it was given; a timeout says so."""
    worker = Worker("busy worker")
    started, release = threading.Event(), threading.Event()
    finished = []

    def slow() -> threading.Thread:
        started.set()
        release.wait(10)
        finished.append(True)
        return threading.current_thread()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run, slow)
        await trio.to_thread.run_sync(started.wait)
        assert not await trio.to_thread.run_sync(worker.join, 0.05)  # still running slow()
        release.set()
        assert await trio.to_thread.run_sync(worker.join, 10)
        assert finished == [True]
    assert not any(t.name == "busy worker" for t in threading.enumerate())


async def test_a_worker_owned_by_async_with_is_joined_on_exit() -> None:
    async with Worker("owned worker") as worker:
        thread = await worker.run(threading.current_thread)
        worker.close()  # a restart inside the block: both threads are the owner's
        restarted = await worker.run(threading.current_thread)
        assert restarted is not thread
    assert not thread.is_alive() and not restarted.is_alive()


async def test_the_store_joins_its_pool_workers_at_close(tmp_path: Path) -> None:
    store = Store(tmp_path / "pools", lock_timeout=1.0)
    await store.open()
    await store.prepare_set(1, 1)  # runs in pool 1's worker thread
    threads = [t for t in threading.enumerate() if t.name.startswith("kvpfs pool ")]
    assert threads
    store.close()
    assert [t for t in threads if t.is_alive()] == []


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
