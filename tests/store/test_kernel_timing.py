"""kvpfs never lets the kernel pair a late reply with another request, and survives a
refused first registration.

The kernel has no request ids: once its timer (30 s, shrunk here) fires it answers E_FAIL
and takes the daemon's next write as the reply to whatever request is outstanding then.
These tests run a real `DeviceServer` on the simulated host (whose kernel model does
exactly that) with slow request handlers, and check that every host request gets its
own answer.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from kvpfs.host.intrinsic import FqdnCache, Intrinsics, OsInfo
from kvpfs.host.server import DeviceServer, IpInfoHandler, RegistrationRefused
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.wire import protocol
from kvpfs.wire.protocol import Pool, Status
from tests.support.lockholder import start_locker, stop_locker

OS_INFO = OsInfo("Test OS", "1", "")
GUID = "{11111111-2222-3333-4444-000000000001}"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "pools", lock_timeout=0.5, poll_interval=0.05)
    await opened.open()
    yield opened
    opened.close()


def make_server(host: SimulatedHost, store: Store, handler: IpInfoHandler | None = None,
                **timing: float) -> DeviceServer:
    return DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.1, resolver=lambda n: n),
                                                os_info=OS_INFO),
                        ip_info=handler, reopen_delay=0.02, **timing)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.log_errors('not done within .* answered E_FAIL')
async def test_work_past_the_deadline_is_answered_e_fail_before_the_kernel_gives_up(
    store: Store,
) -> None:
    async def stuck(request: protocol.IpInfoRequest) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    host = SimulatedHost(timeout=2.0, initial_pool3=())
    server = make_server(host, store, stuck, reply_deadline=0.2, kernel_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        assert (await host.set(Pool.GUEST, "k", "v")).ok
        result = await host.ip_set(GUID, "192.0.2.10", "24")
        assert result.status == Status.E_FAIL
        assert host.timeouts == 0 and server.deadline_misses == 1  # our E_FAIL, not the kernel's
        assert await host.list(Pool.GUEST) == [("k", "v")]
        assert (host.registrations, host.refused_writes) == (1, 0)
        nursery.cancel_scope.cancel()


@pytest.mark.log_errors('was ready only after .* not written')
async def test_a_reply_ready_after_the_kernel_gave_up_is_never_written(store: Store) -> None:
    """Work that cannot be cancelled (a worker thread) ends after the kernel's timeout,
    while the host's next request is already waiting: that request gets its own answer."""
    release = threading.Event()

    async def uncancellable(request: protocol.IpInfoRequest) -> bytes:
        await trio.to_thread.run_sync(release.wait)
        return protocol.encode_status(Status.S_OK)

    host = SimulatedHost(timeout=0.5, initial_pool3=())
    server = make_server(host, store, uncancellable, reply_deadline=0.2, kernel_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        assert (await host.set(Pool.GUEST, "k", "v")).ok
        assert (await host.ip_set(GUID, "192.0.2.10", "24")).status == Status.E_FAIL
        assert host.timeouts == 1
        answers: list[protocol.Status | int | tuple[str, str]] = []

        async def enumerate_first() -> None:
            result = await host.enumerate(Pool.GUEST, 0)
            answers.append((result.key, result.value) if result.ok else result.status)

        nursery.start_soon(enumerate_first)
        # The ENUMERATE is with the kernel, unread, when the slow work ends.
        await wait_until(lambda: bool(host.state["message_queued"]))
        release.set()
        await wait_until(lambda: bool(answers))
        assert answers == [("k", "v")]
        assert server.late_replies_dropped == 1
        assert (host.registrations, host.refused_writes, host.timeouts) == (1, 0, 1)
        nursery.cancel_scope.cancel()


async def test_refused_first_registration_is_retried(store: Store) -> None:
    host = SimulatedHost(initial_pool3=())
    host.hibernate()  # no daemon connected: the kernel is left READY
    server = make_server(host, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        assert (host.refused_writes, host.registrations, server.registrations) == (1, 1, 1)
        assert (await host.set(Pool.EXTERNAL, "after", "hibernation")).ok
        nursery.cancel_scope.cancel()


async def test_registration_refused_for_the_whole_window_gives_up_saying_why(
    store: Store,
) -> None:
    class AlwaysRefused(SimulatedHost):
        async def open(self):  # type: ignore[no-untyped-def]
            channel = await super().open()
            self.hibernate()  # refused every time, as a different protocol version would be
            return channel

    host = AlwaysRefused(initial_pool3=())
    server = make_server(host, store, registration_window=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        with pytest.raises(RegistrationRefused) as info:
            await server.run()
        nursery.cancel_scope.cancel()
    message = str(info.value)
    assert "refused registration" in message and "EINVAL" in message
    assert "over 0.3 s" in message and "protocol version" in message
    assert host.refused_writes >= 2  # closed, reopened and tried again in between


@pytest.mark.log_errors('was ready only after .* not written')
async def test_a_set_held_up_by_a_lock_past_the_kernel_timeout_is_not_answered_late(
    store: Store,
) -> None:
    """A pool-file change is never cut short, so a lock held past the kernel's timeout
    makes its reply late: it is dropped, and the host's next request gets its own answer
    on the same registration (no EINVAL, no reopen)."""
    host = SimulatedHost(timeout=0.3, initial_pool3=())
    server = make_server(host, store, reply_deadline=0.1, kernel_timeout=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        assert (await host.set(Pool.GUEST, "k", "v")).ok
        locker = start_locker(store.pool_dir / ".kvp_pool_1")
        try:
            assert (await host.set(Pool.GUEST, "blocked", "x")).status == Status.E_FAIL
            assert host.timeouts == 1
            # Sent while the server still waits for the lock (0.5 s): its reply must not
            # become this request's answer.
            assert (await host.get(Pool.GUEST, "k")).value == "v"
        finally:
            stop_locker(locker)
        assert server.late_replies_dropped == 1
        assert (host.registrations, host.refused_writes) == (1, 0)
        assert await host.list(Pool.GUEST) == [("k", "v")]
        nursery.cancel_scope.cancel()
