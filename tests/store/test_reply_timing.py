"""The deadline rule (`ReplyClock`) and the device that appears late at boot (`CharDevice`)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from kvpfs.host.device import CharDevice, DeviceUnavailable
from kvpfs.host.replytiming import ReplyClock, suspended_seconds


class Clocks:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def timing(clocks: Clocks) -> ReplyClock:
    return ReplyClock(30.0, 20.0, clock=lambda: clocks.now, suspended=lambda: clocks.slept)


def test_the_count_starts_at_the_last_mark_not_at_the_read(timing: ReplyClock,
                                                           clocks: Clocks) -> None:
    timing.mark()  # the device was seen empty (or a reply was written) at t=100
    clocks.now += 24  # the request is read 24 s later, after a stall
    stamp = timing.stamp()
    assert timing.verdict(stamp) is None and timing.work_left(stamp) == pytest.approx(-4)
    clocks.now += 1  # 25 s: halfway between the work's deadline and the kernel's
    why = timing.verdict(stamp)
    assert why is not None and "armed its 30 s timer for it 25.0 s ago" in why


def test_a_suspend_since_the_mark_withholds_the_reply(timing: ReplyClock,
                                                      clocks: Clocks) -> None:
    timing.mark()
    stamp = timing.stamp()
    clocks.slept += 2.0
    why = timing.verdict(stamp)
    assert why is not None and "suspended for 2.0 s" in why
    timing.mark()  # after the reset: a new count, suspend already accounted for
    assert timing.verdict(timing.stamp()) is None


def test_an_impossible_age_withholds_the_reply(timing: ReplyClock, clocks: Clocks) -> None:
    timing.mark()
    stamp = timing.stamp()
    clocks.now -= 1
    why = timing.verdict(stamp)
    assert why is not None and "impossible age" in why


def test_suspended_seconds_is_boottime_minus_monotonic() -> None:
    before = time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)
    assert suspended_seconds() == pytest.approx(before, abs=0.05)
    assert suspended_seconds() >= -0.05


async def test_a_device_that_appears_later_at_boot_is_waited_for(tmp_path: Path) -> None:
    node = tmp_path / "hv_kvp"
    device = CharDevice(str(node), vmbus_dir=str(tmp_path), appear_timeout=30,
                        check_interval=0.01)
    opened: list[int] = []

    async def open_it() -> None:
        channel = await device.open()
        opened.append(channel.fd)
        channel.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_it)
        await trio.testing.wait_all_tasks_blocked()
        assert opened == []  # still waiting for the node
        node.write_bytes(b"")  # the kernel creates it
        with trio.fail_after(10):
            while not opened:
                await trio.sleep(0.01)


async def test_a_device_that_never_appears_is_reported_with_the_bound(tmp_path: Path,
                                                                      caplog) -> None:
    device = CharDevice(str(tmp_path / "hv_kvp"), vmbus_dir=str(tmp_path),
                        appear_timeout=0.05, check_interval=0.01)
    with pytest.raises(DeviceUnavailable) as info:
        await device.open()
    message = str(info.value)
    assert "did not appear within 0.05 s" in message and "hv_utils" in message
    assert "waiting up to 0.05 s" in caplog.text and "CVE-2024-55916" in caplog.text


async def test_no_wait_on_a_machine_that_is_not_a_hyper_v_guest(tmp_path: Path) -> None:
    device = CharDevice(str(tmp_path / "hv_kvp"), vmbus_dir=str(tmp_path / "no-vmbus"),
                        appear_timeout=3600)
    with trio.fail_after(5):  # would wait an hour if it waited at all
        with pytest.raises(DeviceUnavailable) as info:
            await device.open()
    assert "does not look like a Hyper-V guest" in str(info.value)
    assert not os.path.exists(tmp_path / "hv_kvp")


def test_poll_is_trusted_only_where_it_says_whether_a_message_is_queued(tmp_path: Path) -> None:
    """A file without a poll method reports POLLOUT (the default mask): kvpfs then cannot
    see an empty device and does not pre-check before registering. Pipes and sockets,
    like the kernel's device, can be trusted."""
    import socket

    from kvpfs.host.device import Channel

    regular = tmp_path / "file"
    regular.write_bytes(b"")
    plain = Channel(os.open(regular, os.O_RDWR), "file")
    read_end, write_end = os.pipe()
    pipe = Channel(read_end, "pipe")
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = Channel(left.detach(), "socket")
    try:
        assert (plain.poll_reliable, pipe.poll_reliable, sock.poll_reliable) == (
            False, True, True)
        assert pipe.poll_now() == 0
        os.write(write_end, b"m")
        assert pipe.poll_now() & select.POLLIN
    finally:
        for channel in (plain, pipe, sock):
            os.close(channel.fd)
        os.close(write_end)
        right.close()
