"""kvpfs.compat behaves the same on Debian 12's trio 0.22 and on the newest trio.

`./dev.sh test` runs these on PyPI's releases, `./dev.sh test-debian-libs` on
Debian's python3-trio; each checks the behaviour kvpfs relies on, not a version.
"""

from __future__ import annotations

import threading

import pytest
import trio

from kvpfs import compat


async def test_abandon_on_cancel_returns_at_once_and_leaves_the_thread_running() -> None:
    release = threading.Event()
    finished = threading.Event()

    def stuck() -> None:
        release.wait(30)
        finished.set()

    with trio.move_on_after(0.05) as scope:
        await compat.to_thread_run_sync(stuck, abandon_on_cancel=True)
    assert scope.cancelled_caught  # the call gave up without waiting for the thread
    assert not finished.is_set()
    release.set()
    assert await trio.to_thread.run_sync(finished.wait, 10)


async def test_a_call_not_abandoned_waits_for_the_thread() -> None:
    done = []

    def work() -> None:
        done.append(True)

    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await compat.to_thread_run_sync(work)
    assert done == []  # cancelled before it started: never run


async def test_the_thread_carries_the_name_during_the_call() -> None:
    seen = await compat.to_thread_run_sync(lambda: threading.current_thread().name,
                                           thread_name="kvpfs device")
    assert seen == "kvpfs device"
    # An unnamed call on the same (cached) worker is not left with that name.
    after = await compat.to_thread_run_sync(lambda: threading.current_thread().name)
    assert after != "kvpfs device"


async def test_start_raises_an_error_before_started_by_its_own_type() -> None:
    async def fails_to_start(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise LookupError("no device")

    async with trio.open_nursery() as nursery:
        with pytest.raises(LookupError, match="no device"):
            await compat.start(nursery, fails_to_start)


async def test_start_returns_the_started_value() -> None:
    async def serves(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(42)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        assert await compat.start(nursery, serves) == 42
        nursery.cancel_scope.cancel()


def test_run_groups_a_lone_child_error_as_trio_0_25_does() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("boom")

    with pytest.raises(BaseExceptionGroup) as caught:
        compat.run(main)
    assert caught.group_contains(KeyError) if hasattr(caught, "group_contains") \
        else caught.value.subgroup(KeyError) is not None
