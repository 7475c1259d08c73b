"""The simulated host acts like the kernel (hv_kvp.c + hv_utils_transport.c), row by row.

Each test plays the daemon by hand on the channel `SimulatedHost.open` returns, with the
exact bytes and lengths a daemon would read and write, and drives the host through its
public API. Time is trio's autojump MockClock (each test names the fixture, which is how
pytest-trio picks the clock): the kernel's 30 s timeout is the real value, and a test
waits it out in no wall-clock time.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from kvpfs.host.simulator import KERNEL_TIMEOUT, HostResult, SimulatedChannel, SimulatedHost
from kvpfs.wire import protocol
from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Pool, Status


@pytest.fixture
async def host(autojump_clock: MockClock) -> AsyncIterator[SimulatedHost]:
    simulated = SimulatedHost(initial_pool3=())
    async with trio.open_nursery() as nursery:
        await nursery.start(simulated.run)
        yield simulated
        nursery.cancel_scope.cancel()


async def registered(host: SimulatedHost) -> SimulatedChannel:
    channel = await host.open()
    assert isinstance(channel, SimulatedChannel)
    assert channel.write(protocol.encode_register(Op.REGISTER1)) == MESSAGE_SIZE
    reply = await channel.read_message()
    assert reply[0] == Op.REGISTER1 and reply[4:8] == b"3.1\0"
    return channel


@dataclass
class Pending:
    """A host request running in the background; `result` once the host has its answer."""

    result: HostResult | None = None
    answered_at: float | None = None


def start(nursery: trio.Nursery, call: Callable[[], Awaitable[HostResult]]) -> Pending:
    pending = Pending()

    async def run() -> None:
        pending.result = await call()
        pending.answered_at = trio.current_time()

    nursery.start_soon(run)
    return pending


def einval(call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == errno.EINVAL, info.value


def ok_reply() -> bytes:
    return protocol.encode_status(Status.S_OK)


# ------------------------------------------------------------------------------ timeout


async def test_timeout_keeps_the_fd_and_a_late_reply_gets_einval(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await registered(host)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "slow", "1"))
        assert (await channel.read_message())[0] == Op.SET
    assert pending.result is not None and pending.result.status == Status.E_FAIL
    assert pending.answered_at is not None
    assert pending.answered_at - started == pytest.approx(KERNEL_TIMEOUT, abs=0.01)
    assert host.state["opened"] and host.timeouts == 1  # the fd stays open
    einval(lambda: channel.write(ok_reply()))  # nothing outstanding any more
    # The same fd serves the next request; no new registration was needed.
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "next", "2"))
        assert (await channel.read_message())[0] == Op.SET
        channel.write(ok_reply())
    assert pending.result is not None and pending.result.ok
    assert host.registrations == 1


async def test_timeout_leaves_an_unread_request_queued(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    """The unread request stays in the transport: the next host request fails at once, and
    a reply to the stale request is taken as the answer to whatever is outstanding."""
    channel = await registered(host)
    first = await host.enumerate(Pool.EXTERNAL, 0)  # never read by the daemon
    assert first.status == Status.E_FAIL
    before = trio.current_time()
    second = await host.enumerate(Pool.EXTERNAL, 1)
    assert second.status == Status.E_FAIL and trio.current_time() == before  # at once
    stale = await channel.read_message()
    assert stale[0] == Op.ENUMERATE and stale[4] == 0  # index 0: the first request
    async with trio.open_nursery() as nursery:
        third = start(nursery, lambda: host.enumerate(Pool.EXTERNAL, 2))
        await trio.testing.wait_all_tasks_blocked()
        # The daemon answers the stale index-0 request: the kernel pairs it with index 2.
        channel.write(protocol.encode_enumerate_reply(b"key-of-index-0", b"v"))
    assert third.result is not None and third.result.key == "key-of-index-0"
    index2 = await channel.read_message()  # and index 2 is still there to be read
    assert index2[0] == Op.ENUMERATE and index2[4] == 2
    einval(lambda: channel.write(ok_reply()))


# ------------------------------------------------------------------------------ open


async def test_second_open_is_ebusy_and_the_first_stays_live(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await registered(host)
    with pytest.raises(OSError) as info:
        await host.open()
    assert info.value.errno == errno.EBUSY and host.ebusy_opens == 1
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.delete(Pool.GUEST, "k"))
        assert (await channel.read_message())[0] == Op.DELETE
        channel.write(ok_reply())
    assert pending.result is not None and pending.result.ok
    channel.close()  # close releases the device: the next open works and must register
    again = await host.open()
    assert host.state["state"] == "DEVICE_INIT"
    again.close()


async def test_close_answers_a_pending_transaction_e_fail(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await registered(host)
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "k", "v"))
        await channel.read_message()
        channel.close()
    assert pending.result is not None and pending.result.status == Status.E_FAIL
    assert host.timeouts == 0 and host.state["state"] == "DEVICE_INIT"


# ------------------------------------------------------------------------------ hibernation


async def test_hibernation_keeps_the_fd_and_fails_only_the_reply_in_flight(
    host: SimulatedHost, autojump_clock: MockClock,
) -> None:
    channel = await registered(host)
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "during", "1"))
        assert (await channel.read_message())[0] == Op.SET
        host.hibernate()
    assert pending.result is not None and pending.result.status == Status.E_FAIL
    assert host.state["state"] == "READY" and host.state["opened"]
    einval(lambda: channel.write(ok_reply()))  # the reply that was in flight
    async with trio.open_nursery() as nursery:  # the same fd, no new registration
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "after", "2"))
        assert (await channel.read_message())[0] == Op.SET
        channel.write(ok_reply())
    assert pending.result is not None and pending.result.ok
    assert host.registrations == 1


async def test_hibernation_without_a_daemon_refuses_the_first_registration(
    host: SimulatedHost, autojump_clock: MockClock,
) -> None:
    host.hibernate()
    channel = await host.open()
    einval(lambda: channel.write(protocol.encode_register(Op.REGISTER1)))
    assert host.registrations == 0
    channel.close()  # kvp_on_reset: DEVICE_INIT again
    channel = await registered(host)
    assert host.registrations == 1
    channel.close()


# ------------------------------------------------------------------------------ registration


async def test_bad_registration_is_einval_and_the_fd_stays_usable(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await host.open()
    einval(lambda: channel.write(protocol.encode_register(7)))  # not 100 or 4
    einval(lambda: channel.write(protocol.encode_register(Op.REGISTER1)[:-1]))  # short
    # Still the same fd: a register of any length >= 7432 is accepted.
    channel.write(protocol.encode_register(Op.REGISTER1) + bytes(1000))
    reply = await channel.read_message()
    assert reply[0] == Op.REGISTER1 and host.registrations == 1
    assert host.state["opened"] and host.refused_writes == 2


async def test_short_read_is_einval_and_keeps_the_message(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await host.open()
    channel.write(protocol.encode_register(Op.REGISTER1))
    einval(lambda: channel.read(MESSAGE_SIZE - 1))
    assert channel.read(3 * MESSAGE_SIZE)[0] == Op.REGISTER1


# ------------------------------------------------------------------------------ replies


async def test_write_with_no_request_outstanding_is_einval(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await registered(host)
    einval(lambda: channel.write(ok_reply()))
    # It was not kept as the reply to the next request.
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.get(Pool.EXTERNAL, "k"))
        request = await channel.read_message()
        assert request[0] == Op.GET
        channel.write(protocol.encode_status(Status.S_CONT))
    assert pending.result is not None and pending.result.status == Status.S_CONT


async def test_short_reply_is_einval_and_the_host_waits_out_its_timeout(
    host: SimulatedHost, autojump_clock: MockClock,
) -> None:
    channel = await registered(host)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "k", "v"))
        await channel.read_message()
        einval(lambda: channel.write(ok_reply()[:100]))
        await trio.testing.wait_all_tasks_blocked()
        assert pending.result is None  # no immediate E_FAIL
    assert pending.result is not None and pending.result.status == Status.E_FAIL
    assert pending.answered_at is not None
    assert pending.answered_at - started == pytest.approx(KERNEL_TIMEOUT, abs=0.01)
    assert host.timeouts == 1


async def test_a_longer_reply_counts_as_one_message(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    channel = await registered(host)
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "k", "v"))
        await channel.read_message()
        assert channel.write(ok_reply() + b"trailing") == MESSAGE_SIZE + 8
    assert pending.result is not None and pending.result.ok


# ------------------------------------------------------------------------------ before registration


async def test_a_request_before_registration_waits_without_timeout(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "early", "1"))
        await trio.sleep(10 * KERNEL_TIMEOUT)
        assert pending.result is None and host.timeouts == 0 and host.state["ring"] == 1
        channel = await registered(host)  # reading the version releases the queue
        request = await channel.read_message()
        assert request[0] == Op.SET and b"early" in request
        channel.write(ok_reply())
    assert pending.result is not None and pending.result.ok


async def test_a_request_after_the_daemon_left_waits_for_the_next_one(
    host: SimulatedHost, autojump_clock: MockClock
) -> None:
    """Registered once, then closed: DEVICE_INIT again, so requests wait for the next one."""
    channel = await registered(host)
    channel.close()
    async with trio.open_nursery() as nursery:
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "k", "v"))
        await trio.sleep(2 * KERNEL_TIMEOUT)
        assert pending.result is None
        channel = await registered(host)
        await channel.read_message()
        channel.write(ok_reply())
    assert pending.result is not None and pending.result.ok


def test_the_simulated_host_and_the_emulated_device_drive_one_kernel_model() -> None:
    """Issue 17: one model of hv_kvp.c, not a copy per stand-in."""
    import inspect

    from emulation import emulated_device
    from kvpfs.host import simulator
    from kvpfs.wire.kernelmodel import KvpKernel

    device = emulated_device.KvpDevice(timeout=1.5)
    assert type(SimulatedHost(initial_pool3=()).kernel) is KvpKernel
    assert type(device.kernel) is KvpKernel and device.kernel.timeout == 1.5
    for module in (simulator, emulated_device):
        source = inspect.getsource(module)
        assert "USERSPACE_REQ" not in source and "KERNEL_TIMEOUT = " not in source


async def test_a_read_blocks_until_a_request_is_queued_whatever_o_nonblock_says() -> None:
    """`hvt_op_read` waits (wait_event_interruptible): no EAGAIN for an empty device."""
    host = SimulatedHost(initial_pool3=())
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        channel = await registered(host)
        results: list[bytes] = []

        async def read_in_thread() -> None:
            results.append(await trio.to_thread.run_sync(channel.read))

        nursery.start_soon(read_in_thread)
        with trio.fail_after(10):
            while host.state["blocked_readers"] != 1:
                await trio.sleep(0.005)
        pending = start(nursery, lambda: host.set(Pool.EXTERNAL, "k", "v"))
        with trio.fail_after(10):
            while not results:
                await trio.sleep(0.005)
        assert results[0][0] == Op.SET
        channel.write(ok_reply())
        with trio.fail_after(10):
            while pending.result is None:
                await trio.sleep(0.005)
        assert pending.result.ok
        channel.close()
        nursery.cancel_scope.cancel()
