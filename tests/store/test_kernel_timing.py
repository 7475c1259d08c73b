"""A real `DeviceServer` on the kernel model with a fake clock: never a wrong pairing.

The kernel has no request ids: once its 30 s timer has fired it answers E_FAIL and
takes the daemon's next write as the reply to whatever request is outstanding then.
Each test plays one scenario of issue 17 with the kernel's real 30 s timeout on a
fake clock shared by the simulated kernel and kvpfs's deadline rule (the test moves
it while kvpfs is held up), and checks with `correct_or_e_fail` that every answer
the host saw is the right one for its own request or the kernel's E_FAIL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from kvpfs.host.intrinsic import FqdnCache, Intrinsics, OsInfo
from kvpfs.host.server import DeviceServer, IpInfoHandler, RegistrationRefused
from kvpfs.host.simulator import HostResult, SimulatedChannel, SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.wire import kernelside, protocol
from kvpfs.wire.kernelmodel import KERNEL_TIMEOUT, HostRequest, Source
from kvpfs.wire.protocol import Op, Pool, Status
from tests.support.lockholder import start_locker, stop_locker

OS_INFO = OsInfo("Test OS", "1", "")
GUID = "{11111111-2222-3333-4444-000000000001}"
WITHHELD = r"not answered: .*(armed its|suspended for)"


class FakeClock:
    """Monotonic and suspended time that only the test moves."""

    def __init__(self) -> None:
        self.now = 5000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def suspended(self) -> float:
        return self.slept

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "pools", lock_timeout=0.5, poll_interval=0.05)
    await opened.open()
    yield opened
    opened.close()


@dataclass
class Rig:
    clock: FakeClock
    host: SimulatedHost
    server: DeviceServer
    store: Store
    nursery: trio.Nursery
    seen: list[tuple[str, HostResult]] = field(default_factory=list)

    def start(self, what: str, call: Callable[[], object]) -> Pending:
        pending = Pending(what)

        async def run() -> None:
            result = await call()  # type: ignore[misc]
            pending.result = result
            self.seen.append((what, result))

        self.nursery.start_soon(run)
        return pending


@dataclass
class Pending:
    what: str
    result: HostResult | None = None


def make_rig(nursery: trio.Nursery, store: Store, handler: IpInfoHandler | None = None,
             host: SimulatedHost | None = None, clock: FakeClock | None = None) -> Rig:
    clock = clock or FakeClock()
    host = host or SimulatedHost(initial_pool3=(), clock=clock)
    server = DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.1, resolver=lambda n: n),
                                                  os_info=OS_INFO),
                          ip_info=handler, reopen_delay=0.02, idle_recheck=0.01,
                          clock=clock, suspended=clock.suspended)
    return Rig(clock, host, server, store, nursery)


async def started(rig: Rig) -> Rig:
    await rig.nursery.start(rig.host.run)
    await rig.nursery.start(rig.server.run)
    return rig


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def correct_or_e_fail(result: HostResult | None, expected: HostResult) -> bool:
    """The judge's rule: the answer to this very request, or the kernel's E_FAIL."""
    assert result is not None
    return result == expected or result.status == Status.E_FAIL


class Stall:
    """A SET_IP_INFO handler that blocks until released: kvpfs held up mid-request."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.during: Callable[[], None] | None = None

    async def __call__(self, request: protocol.IpInfoRequest) -> bytes:
        self.entered.set()
        if self.during is not None:
            self.during()
        await self.release.wait()
        return protocol.encode_status(Status.S_OK)


@pytest.mark.log_errors(WITHHELD)
async def test_stall_past_the_kernel_timeout_then_a_lock_wait_never_pairs_wrongly(
    store: Store,
) -> None:
    """Issue 17, case 1: A stalls 57 s, B is queued at 31 s and armed then; kvpfs must not
    answer A (late) and must not answer B from its own read either. Then a pool lock is
    held through the next request: E_FAIL in time, and service resumes."""
    stall = Stall()
    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store, stall))
        assert (await rig.host.set(Pool.GUEST, "k", "v")).ok
        a = rig.start("A", lambda: rig.host.ip_set(GUID, "192.0.2.10", "24"))
        await stall.entered.wait()
        rig.clock.advance(KERNEL_TIMEOUT)
        rig.host.tick()
        await wait_until(lambda: a.result is not None)
        assert a.result == HostResult(Status.E_FAIL) and rig.host.timeouts == 1
        rig.clock.advance(1)  # t=31: B arrives, passed down, its timer armed now
        b = rig.start("B", lambda: rig.host.enumerate(Pool.GUEST, 0))
        await wait_until(lambda: bool(rig.host.state["message_queued"]))
        rig.clock.advance(26)  # t=57: kvpfs wakes up
        stall.release.set()
        await wait_until(lambda: b.result is not None)
        assert correct_or_e_fail(b.result, HostResult(Status.S_OK, "k", "v"))
        assert b.result == HostResult(Status.E_FAIL)  # by kvp_on_reset, not a late write
        assert rig.server.late_replies_dropped == 1
        await wait_until(lambda: rig.host.registrations == 2)
        locker = start_locker(store.pool_dir / ".kvp_pool_1")
        try:
            c = await rig.host.set(Pool.GUEST, "c", "x")
        finally:
            stop_locker(locker)
        assert c == HostResult(Status.E_FAIL)  # LockTimeout, answered in time
        assert rig.host.timeouts == 1  # ... by kvpfs, not by the kernel's timer
        assert await rig.host.get(Pool.GUEST, "k") == HostResult(Status.S_OK, "k", "v")
        assert await rig.host.list(Pool.GUEST) == [("k", "v")]
        assert rig.host.refused_writes == 0  # no late write ever reached the kernel
        nursery.cancel_scope.cancel()


@pytest.mark.log_errors(WITHHELD)
async def test_a_request_read_on_time_whose_work_overran_is_never_answered(
    store: Store,
) -> None:
    """B's work outlasts its timer while the host's C is already passed down: writing B's
    reply would answer C. kvpfs withholds it and resets; C gets E_FAIL, D its answer."""
    stall = Stall()
    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store, stall))
        assert (await rig.host.set(Pool.GUEST, "k", "v")).ok
        b = rig.start("B", lambda: rig.host.ip_set(GUID, "192.0.2.10", "24"))
        await stall.entered.wait()
        rig.clock.advance(KERNEL_TIMEOUT)
        rig.host.tick()
        await wait_until(lambda: b.result is not None)
        c = rig.start("C", lambda: rig.host.enumerate(Pool.GUEST, 0))
        await wait_until(lambda: bool(rig.host.state["message_queued"]))
        stall.release.set()
        await wait_until(lambda: c.result is not None)
        assert c.result == HostResult(Status.E_FAIL)
        assert await rig.host.enumerate(Pool.GUEST, 0) == HostResult(Status.S_OK, "k", "v")
        nursery.cancel_scope.cancel()


@pytest.mark.log_errors(WITHHELD)
async def test_a_get_answered_on_the_device_thread_after_a_stall_is_withheld(
    store: Store,
) -> None:
    """GET and ENUMERATE never leave the device thread; a stall there is caught too."""
    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store))
        assert (await rig.host.set(Pool.GUEST, "k", "v")).ok
        held, holding = threading.Event(), threading.Event()
        real = rig.server.read_reply

        def stalled(request: protocol.EnumerateRequest | protocol.GetRequest) -> bytes:
            holding.set()
            held.wait()
            return real(request)

        rig.server.read_reply = stalled  # type: ignore[method-assign]
        a = rig.start("A", lambda: rig.host.get(Pool.GUEST, "k"))
        await trio.to_thread.run_sync(holding.wait)
        rig.clock.advance(KERNEL_TIMEOUT)
        rig.host.tick()
        await wait_until(lambda: a.result is not None)
        b = rig.start("B", lambda: rig.host.set(Pool.GUEST, "b", "1"))
        await wait_until(lambda: bool(rig.host.state["message_queued"]))
        rig.server.read_reply = real  # type: ignore[method-assign]
        held.set()
        await wait_until(lambda: b.result is not None)
        assert (a.result, b.result) == (HostResult(Status.E_FAIL), HostResult(Status.E_FAIL))
        assert await rig.host.list(Pool.GUEST) == [("k", "v")]  # B was never applied
        nursery.cancel_scope.cancel()


@pytest.mark.log_errors(WITHHELD)
async def test_a_request_read_across_a_suspend_is_not_answered(store: Store) -> None:
    """`hv_kvp_pre_suspend` forces READY: a reply to a request read before the suspend
    would answer the first request after it. kvpfs sees CLOCK_BOOTTIME jump and resets."""
    stall = Stall()
    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store, stall))
        a = rig.start("A", lambda: rig.host.ip_set(GUID, "192.0.2.10", "24"))
        await stall.entered.wait()
        rig.host.hibernate()
        rig.clock.slept += 3600  # an hour suspended; CLOCK_MONOTONIC did not move
        await wait_until(lambda: a.result is not None)
        b = rig.start("B", lambda: rig.host.enumerate(Pool.EXTERNAL, 0))
        await wait_until(lambda: bool(rig.host.state["message_queued"]))
        stall.release.set()
        await wait_until(lambda: b.result is not None)
        assert (a.result, b.result) == (HostResult(Status.E_FAIL), HostResult(Status.E_FAIL))
        await wait_until(lambda: rig.host.registrations == 2)
        assert (await rig.host.set(Pool.EXTERNAL, "after", "resume")).ok
        assert await rig.host.list(Pool.EXTERNAL) == [("after", "resume")]
        nursery.cancel_scope.cancel()


class RacingHost(SimulatedHost):
    """After a hibernation with no daemon, a host request arrives right after kvpfs opens:
    before its poll (`early`) or between its poll and its REGISTER1 (in the window)."""

    def __init__(self, message: bytes, *, early: bool, clock: FakeClock) -> None:
        super().__init__(initial_pool3=(), clock=clock)
        self.message = message
        self.early = early
        self.raced: HostRequest | None = None

    def _arrive(self) -> None:
        if self.raced is None:
            self.raced = HostRequest(self.message)
            with self._lock:
                self.kernel.submit(self.raced)

    async def open(self):  # type: ignore[no-untyped-def]
        channel = await super().open()
        assert isinstance(channel, SimulatedChannel)
        if self.early:
            self._arrive()
        else:
            polled = channel.poll_now

            def poll_then_arrive() -> int:
                bits = polled()
                self._arrive()
                return bits

            channel.poll_now = poll_then_arrive  # type: ignore[method-assign]
        return channel


SET_X = kernelside.encode_set_request(Pool.GUEST, b"raced", b"x")
GET_IP = kernelside.encode_ip_info_request(Op.GET_IP_INFO, "00:15:5D:00:00:01")


@pytest.mark.parametrize("early", [True, False], ids=["queued-before-poll", "in-the-window"])
@pytest.mark.parametrize("message", [SET_X, GET_IP], ids=["SET", "GET_IP_INFO"])
async def test_registration_race_after_hibernation(store: Store, message: bytes,
                                                   early: bool) -> None:
    clock = FakeClock()
    host = RacingHost(message, early=early, clock=clock)
    with host._lock:  # a daemon registered once, then went away
        host.kernel.open()
        host.kernel.write(protocol.encode_register(Op.REGISTER1))
        host.kernel.read()
        host.kernel.release()
    host.hibernate()
    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store, host=host, clock=clock))
        raced = host.raced
        assert raced is not None and raced.answered
        if early:  # kvpfs saw it queued and did not register on top of it
            assert (raced.status, raced.source) == (Status.E_FAIL, Source.RESET)
        else:  # the kernel took REGISTER1 as its reply: the op byte as a status
            assert (raced.status, raced.source) == (Op.REGISTER1, Source.DAEMON)
        assert rig.server.registration_races == 1 and rig.server.registrations == 1
        assert rig.server.version == "3.1" and rig.server.intrinsics.integration_version == "3.1"
        assert await rig.host.list(Pool.GUEST) == []  # the raced SET was never applied
        assert (await rig.host.set(Pool.GUEST, "after", "1")).ok
        nursery.cancel_scope.cancel()


async def test_refused_first_registration_is_retried(store: Store) -> None:
    async with trio.open_nursery() as nursery:
        rig = make_rig(nursery, store)
        rig.host.hibernate()  # no daemon connected: the kernel is left READY
        await started(rig)
        assert (rig.host.refused_writes, rig.host.registrations) == (1, 1)
        assert (await rig.host.set(Pool.EXTERNAL, "after", "hibernation")).ok
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
    server = DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.1, resolver=lambda n: n),
                                                  os_info=OS_INFO),
                          reopen_delay=0.02, registration_window=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        with pytest.raises(RegistrationRefused) as info:
            await server.run()
        nursery.cancel_scope.cancel()
    message = str(info.value)
    assert "refused registration" in message and "EINVAL" in message
    assert "over 0.3 s" in message and "protocol version" in message
    assert host.refused_writes >= 2  # closed, reopened and tried again in between


@pytest.mark.parametrize("late", [False, True], ids=["in-time", "dropped"])
@pytest.mark.log_errors(WITHHELD)
async def test_set_ip_info_changes_the_guest_only_once_its_reply_was_written_in_time(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: bool,
) -> None:
    """The configuration is staged before the answer and put in place (then activated)
    only after the answer reached the kernel in time; a dropped answer changes nothing."""
    from kvpfs.host.netconfig import IpInfoService
    from tests.support.fakenet import GUIDS, FakeSystem

    fake = FakeSystem(tmp_path / "net")
    fake.fake_program("nmcli")
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    clock = FakeClock()

    class SlowToPrepare(IpInfoService):
        def prepare(self, request: protocol.IpInfoRequest):  # type: ignore[no-untyped-def]
            outcome = super().prepare(request)
            if late:
                clock.advance(KERNEL_TIMEOUT)  # stuck in the thread: the kernel gave up
            return outcome

    service = SlowToPrepare(fake.settings())
    keyfile = fake.out / "etc/NetworkManager/system-connections/hyperv-hv0.nmconnection"
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        rig = await started(make_rig(nursery, store, service, clock=clock))
        result = rig.start("SET_IP_INFO", lambda: rig.host.ip_set(
            GUIDS["hv0"], "192.0.2.10", "255.255.255.0", "192.0.2.1"))
        if late:
            await wait_until(lambda: rig.server.late_replies_dropped == 1)
            rig.host.tick()
        await wait_until(lambda: result.result is not None)
        if late:
            assert result.result == HostResult(Status.E_FAIL)
            await wait_until(lambda: rig.host.registrations == 2)
            assert (await rig.host.set(Pool.GUEST, "after", "1")).ok
            assert not keyfile.exists() and fake.recorded() == []
            assert list(keyfile.parent.iterdir()) == []  # the staged file is gone too
        else:
            assert result.result == HostResult(Status.S_OK)
            await wait_until(lambda: service.activations_succeeded == 1)
            assert "address1=192.0.2.10/24" in keyfile.read_text()
        nursery.cancel_scope.cancel()


@pytest.mark.log_errors(WITHHELD)
async def test_random_stalls_never_give_a_request_another_ones_answer(store: Store) -> None:
    """Stalls of random length (0 to 70 s of the kernel's clock) in the device thread, with
    the host's next request sent meanwhile: every answer is the record asked for, the end
    of the pool, or E_FAIL."""
    from tests.support.safety import seeded_random

    rng, _ = seeded_random("test_random_stalls_never_give_a_request_another_ones_answer")
    records = [(f"key{i}", f"value{i}") for i in range(5)]

    def expected(index: int) -> HostResult:
        if index < len(records):
            return HostResult(Status.S_OK, *records[index])
        return HostResult(Status.S_CONT)

    async with trio.open_nursery() as nursery:
        rig = await started(make_rig(nursery, store))
        for key, value in records:
            assert (await rig.host.set(Pool.GUEST, key, value)).ok
        real = rig.server.read_reply
        stall_next = threading.Event()
        holding, held = threading.Event(), threading.Event()

        def maybe_stalled(request: protocol.EnumerateRequest | protocol.GetRequest) -> bytes:
            if stall_next.is_set():
                stall_next.clear()
                holding.set()
                held.wait()
            return real(request)

        rig.server.read_reply = maybe_stalled  # type: ignore[method-assign]
        outcomes: dict[str, int] = {"right": 0, "e_fail": 0}

        def check(pending: Pending, index: int) -> None:
            assert pending.result is not None
            assert correct_or_e_fail(pending.result, expected(index)), (pending, index)
            outcomes["right" if pending.result == expected(index) else "e_fail"] += 1

        for _ in range(30):
            first, second = rng.randrange(7), rng.randrange(7)
            if rng.random() < 0.4:
                a = rig.start("plain", lambda i=first: rig.host.enumerate(Pool.GUEST, i))
                await wait_until(lambda a=a: a.result is not None)
                check(a, first)
                continue
            holding.clear()
            held.clear()
            stall_next.set()
            a = rig.start("stalled", lambda i=first: rig.host.enumerate(Pool.GUEST, i))
            await trio.to_thread.run_sync(holding.wait)
            rig.clock.advance(rng.uniform(0, 70))
            rig.host.tick()
            b = rig.start("meanwhile", lambda i=second: rig.host.enumerate(Pool.GUEST, i))
            await wait_until(lambda b=b: b.result is not None or rig.host.state["ring"] == 1
                             or bool(rig.host.state["message_queued"]))
            held.set()
            await wait_until(lambda a=a, b=b: a.result is not None and b.result is not None)
            check(a, first)
            check(b, second)
        assert outcomes["right"] > 0 and outcomes["e_fail"] > 0, outcomes
        assert rig.host.refused_writes == 0  # no late write ever reached the kernel
        nursery.cancel_scope.cancel()
