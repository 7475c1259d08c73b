"""The change feed's limits on waiting readers and open feeds, on `EventFeed` itself.

The mount tests (test_events_abuse.py) show one unprivileged user held to
WAITING_PER_USER; here the other limits, with smaller values, and that every
slot comes back when a read ends, however it ends.
"""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
import trio
import trio.testing

from kvpfs.fuse import events
from kvpfs.fuse.events import EventFeed
from kvpfs.storage.store import Change, ChangeKind, Origin
from tests.support.handlers import Ctx, refused


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(events, "WAITING_PER_USER", 2)
    monkeypatch.setattr(events, "WAITING_OTHERS", 3)
    monkeypatch.setattr(events, "WAITING_MAX", 5)
    monkeypatch.setattr(events, "STREAMS_PER_USER", 4)
    monkeypatch.setattr(events, "STREAMS_OTHERS", 6)


class Feed:
    def __init__(self) -> None:
        self.notified: list[object] = []
        self.feed = EventFeed(self.notified.append)
        self.next_fh = 1

    def open(self, uid: int, flags: int = os.O_RDONLY) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.feed.open(fh, flags, Ctx(uid), include_external=True)
        return fh


async def test_waiting_reads_are_capped_per_user_for_others_and_in_all(small_limits):
    f = Feed()
    results: dict[int, bytes] = {}

    async def read(fh: int) -> None:
        results[fh] = await f.feed.read(fh, 100)

    async with trio.open_nursery() as nursery:
        first = [f.open(1000) for _ in range(3)]
        for fh in first[:2]:
            nursery.start_soon(read, fh)
        await trio.testing.wait_all_tasks_blocked()
        assert await refused(f.feed.read(first[2], 100)) == errno.EMFILE  # per user
        other = f.open(1001)
        nursery.start_soon(read, other)
        await trio.testing.wait_all_tasks_blocked()
        assert await refused(f.feed.read(f.open(1002), 100)) == errno.EMFILE  # all non-root
        roots = [f.open(0) for _ in range(3)]
        for fh in roots[:2]:
            nursery.start_soon(read, fh)
        await trio.testing.wait_all_tasks_blocked()
        assert await refused(f.feed.read(roots[2], 100)) == errno.EMFILE  # everyone
        f.feed.publish([Change(ChangeKind.SET, 1, b"k", Origin.HOST)])
    assert set(results) == {*first[:2], other, *roots[:2]}
    assert set(results.values()) == {b"set guest k\n"}
    # Every slot is free again: the same number of reads waits once more.
    async with trio.open_nursery() as nursery:
        for fh in [*first[:2], other, *roots[:2]]:
            nursery.start_soon(read, fh)
        await trio.testing.wait_all_tasks_blocked()
        f.feed.shutdown()


async def test_an_interrupted_read_ends_with_eintr_and_frees_its_slot(small_limits):
    f = Feed()
    fh = f.open(1000)
    outcome: list[int] = []

    async def read() -> None:
        outcome.append(await refused(f.feed.read(fh, 100)))

    for _ in range(events.WAITING_PER_USER + 1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            f.feed._streams[fh].wake(interrupted=True)
    assert outcome == [errno.EINTR] * (events.WAITING_PER_USER + 1)


async def test_open_feeds_are_capped_per_user_and_for_others(small_limits):
    f = Feed()
    for _ in range(4):
        f.open(1000)
    with pytest.raises(pyfuse3.FUSEError) as info:
        f.open(1000)
    assert info.value.errno == errno.EMFILE
    first = f.open(1001)
    f.open(1001)
    with pytest.raises(pyfuse3.FUSEError):
        f.open(1002)  # six open for users other than root
    for _ in range(10):
        f.open(0)  # root is not limited
    f.feed.release(first)
    f.open(1002)  # a closed feed gives its place back


async def test_every_new_line_notifies_a_registered_poller():
    f = Feed()
    fh = f.open(0, os.O_RDONLY | os.O_NONBLOCK)
    handle = object()
    assert f.feed.poll(fh, handle) == 0
    for i in range(3):
        f.feed.publish([Change(ChangeKind.SET, 1, b"k%d" % i, Origin.HOST)])
        assert f.notified == [handle] * (i + 1)
        # Answering "ready" keeps the handle: an edge-triggered waiter drains
        # the queue and must still hear of the next line.
        assert f.feed.poll(fh, None) != 0
        await f.feed.read(fh, 100)
