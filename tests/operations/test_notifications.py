"""The notification service's coalescing and its thread's owner, without a mount.

`AttrInvalidator` runs in a real thread with a stand-in for the kernel call (a
test cannot invalidate a kernel cache it has no mount for); `Notifications` is
built as mounted (`build_filesystem`) and fed real store changes, with its
lane not running, so that what it queued can be counted.
"""

from __future__ import annotations

import os
import threading

import trio

from kvpfs.fuse.attr_invalidation import AttrInvalidator
from kvpfs.fuse.operations import DIR_INODES
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import build_filesystem
from kvpfs.storage.store import Origin, Store
from kvpfs.wire.protocol import Pool
from tests.support.handlers import Ctx

THREAD_NAME = "kvpfs attribute invalidations"


def invalidation_threads() -> int:
    return sum(thread.name == THREAD_NAME for thread in threading.enumerate())


async def test_requests_for_a_waiting_inode_fold_into_one_call_and_every_callback_runs():
    calls: list[int] = []
    entered = threading.Event()
    gate = threading.Event()

    def invalidate(ino: int) -> None:
        calls.append(ino)
        if ino == 5:  # the kernel is slow with the first one
            entered.set()
            gate.wait()

    invalidator = AttrInvalidator(invalidate)
    threads = invalidation_threads()
    invalidator.start(trio.lowlevel.current_trio_token())
    invalidator.submit(5)
    await trio.to_thread.run_sync(entered.wait)
    done = trio.Event()
    seen: list[str] = []

    def callback(name: str):
        def run() -> None:
            seen.append(name)
            if len(seen) == 3:
                done.set()
        return run

    for name in ("a", "b", "c"):  # a host changing inode 7 three times meanwhile
        invalidator.submit(7, callback(name))
    assert invalidator.folded == 2
    assert invalidator.pending(7)
    gate.set()
    await done.wait()
    assert calls == [5, 7]  # one call for the three requests
    assert seen == ["a", "b", "c"]
    assert not invalidator.pending(7)
    await invalidator.aclose()
    assert invalidation_threads() == threads  # joined


async def test_the_thread_is_joined_at_shutdown_even_with_work_waiting():
    gate = threading.Event()
    entered = threading.Event()

    def invalidate(ino: int) -> None:
        entered.set()
        gate.wait()

    invalidator = AttrInvalidator(invalidate)
    threads = invalidation_threads()
    invalidator.start(trio.lowlevel.current_trio_token())
    invalidator.submit(1)
    invalidator.submit(2)  # still waiting when the mount goes: dropped
    await trio.to_thread.run_sync(entered.wait)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(invalidator.aclose)
        gate.set()  # the call in the kernel returns; the thread must then end
    assert invalidation_threads() == threads  # joined


async def test_back_to_back_host_sets_of_an_open_key_queue_one_page_drop(tmp_path):
    store = Store(tmp_path / "pools", lock_timeout=0.5)
    await store.open()
    try:
        fs = build_filesystem(store, Intrinsics(FqdnCache()))  # its lane is not running
        ops = fs.operations
        # Open for writing: changed in place (a file open for reading only is replaced
        # instead, docs/tools.md, test_a_host_change_replaces_a_file_open_for_reading).
        await store.set(Pool.GUEST, b"Config", b"zero", Origin.HOST)
        attr = await ops.lookup(DIR_INODES[Pool.GUEST], b"Config", Ctx())
        held = await ops.open(attr.st_ino, os.O_RDWR, Ctx())
        before = fs.notifications.queued()
        for value in (b"one", b"two", b"three"):
            await store.set(Pool.GUEST, b"Config", value, Origin.HOST)
        # The kernel's pages of the open file are dropped once for the three changes,
        # and its attributes once (the later requests fold into the waiting one).
        assert fs.notifications.queued() == before + 1
        assert fs.notifications.attrs.folded == 2
        assert fs.notifications.attrs_pending(attr.st_ino)
        # Our side answers the last value at once.
        fresh = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())
        assert await ops.read(fresh.fh, 0, 100) == b"three"
        await ops.release(fresh.fh)
        await ops.release(held.fh)
    finally:
        store.close()


async def test_a_host_change_replaces_a_file_open_for_reading(tmp_path):
    store = Store(tmp_path / "pools", lock_timeout=0.5)
    await store.open()
    try:
        fs = build_filesystem(store, Intrinsics(FqdnCache()))  # its lane is not running
        ops = fs.operations
        await store.set(Pool.EXTERNAL, b"Config", b"zero", Origin.HOST)
        attr = await ops.lookup(DIR_INODES[Pool.EXTERNAL], b"Config", Ctx())
        held = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())
        for value in (b"one", b"two, longer"):
            await store.set(Pool.EXTERNAL, b"Config", value, Origin.HOST)
        # The held file keeps its value and size; the name leads to a new inode.
        assert (await ops.getattr(attr.st_ino, Ctx())).st_size == 4
        assert await ops.read(held.fh, 0, 100) == b"zero"
        new = await ops.lookup(DIR_INODES[Pool.EXTERNAL], b"Config", Ctx())
        assert new.st_ino != attr.st_ino and new.st_size == len(b"two, longer")
        fresh = await ops.open(new.st_ino, os.O_RDONLY, Ctx())
        assert await ops.read(fresh.fh, 0, 100) == b"two, longer"
        await ops.release(fresh.fh)
        await ops.release(held.fh)
    finally:
        store.close()
