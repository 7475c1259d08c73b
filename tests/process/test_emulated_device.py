"""Tests of the emulated /dev/vmbus/hv_kvp itself, and a first run of the real Debian daemon.

The device is driven with raw os.open/os.read/os.write/poll, the way a daemon uses the kernel's
char device; the scripted host runs in a worker thread because each host call blocks until
the transaction ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from emulation.emuwire import ReplySource
from emulation.kvphost import (
    EmulatedHost,
    HostReply,
    control_socket_of,
    run_emulated_device,
)
from emulation.refdaemon import REFERENCE_DAEMON, run_reference_daemon
from kvpfs.wire.kernelside import encode_set_request
from kvpfs.wire.protocol import (
    MESSAGE_SIZE,
    Op,
    Pool,
    Status,
    encode_enumerate_reply,
    encode_register,
    encode_status,
)

T = TypeVar("T")

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
              pytest.mark.fuse_poll]  # the emulated device is polled (pyfuse3 >= 3.5)

RECORD = 2560
POLLIN = select.POLLIN | select.POLLRDNORM


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[tuple[str, EmulatedHost]]:
    with run_emulated_device(tmp_path, host_timeout=10) as (device, host):
        yield device, host


@pytest.fixture
def pool(emu: tuple[str, EmulatedHost]) -> Iterator[ThreadPoolExecutor]:
    """Threads for blocking host calls; a failed test must not leave one waiting."""
    executor = ThreadPoolExecutor(max_workers=4)
    try:
        yield executor
    finally:
        emu[1].close()  # wakes any thread still waiting for an answer
        executor.shutdown(wait=True, cancel_futures=True)


def in_thread(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> Future[T]:
    return executor.submit(fn)


class Dev:
    """An open device fd, closed at the end of the test no matter what."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def poll(self, timeout_ms: int = 0) -> int:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLRDNORM)
        events = poller.poll(timeout_ms)
        return events[0][1] if events else 0

    def register(self, op: int = Op.REGISTER1) -> bytes:
        assert os.write(self.fd, encode_register(op)) == MESSAGE_SIZE
        assert self.poll(2000) & select.POLLIN
        reply = os.read(self.fd, MESSAGE_SIZE)
        assert len(reply) == MESSAGE_SIZE
        return reply

    def read_message(self, timeout_ms: int = 2000) -> bytes:
        assert self.poll(timeout_ms) & select.POLLIN, "no message queued"
        return os.read(self.fd, MESSAGE_SIZE)


@pytest.fixture
def opened(emu: tuple[str, EmulatedHost]) -> Iterator[Callable[[], Dev]]:
    devs: list[Dev] = []

    def open_device() -> Dev:
        dev = Dev(emu[0])
        devs.append(dev)
        return dev

    yield open_device
    for dev in devs:
        dev.close()


def set_request(key: bytes = b"k", value: bytes = b"v") -> bytes:
    return encode_set_request(Pool.EXTERNAL, key, value)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


# ---------------------------------------------------------------------- char device semantics


def test_second_open_is_ebusy_until_close(emu, opened) -> None:
    device, host = emu
    first = opened()
    assert errno_of(lambda: os.open(device, os.O_RDWR)) == errno.EBUSY
    assert host.state()["ebusy_opens"] == 1
    first.close()
    second = opened()  # close released the device at once
    assert host.state()["opens"] == 2
    second.close()


def test_handshake_reply_is_op_echo_and_version(emu, opened) -> None:
    _, host = emu
    dev = opened()
    assert dev.poll() == 0
    assert host.state()["registered"] is False
    reply = dev.register()
    assert reply[0] == Op.REGISTER1
    assert reply[4:8] == b"3.1\0"
    assert reply[8:] == bytes(MESSAGE_SIZE - 8)
    assert dev.poll() == 0
    state = host.state()
    assert state["registered"] and state["handshakes"] == 1 and state["reg_value"] == 100


def test_handshake_rejects_other_ops_and_short_writes(emu, opened) -> None:
    _, host = emu
    dev = opened()
    assert errno_of(lambda: os.write(dev.fd, set_request())) == errno.EINVAL
    assert errno_of(lambda: os.write(dev.fd, encode_register()[:-1])) == errno.EINVAL
    assert host.state()["registered"] is False
    reply = dev.register(op=4)  # the legacy daemon's KVP_OP_REGISTER
    assert reply[0] == 4 and reply[4:8] == b"3.1\0"
    assert host.state()["reg_value"] == 4


def test_second_register_before_reading_reply_is_efault(emu, opened) -> None:
    dev = opened()
    os.write(dev.fd, encode_register())
    assert errno_of(lambda: os.write(dev.fd, encode_register())) == errno.EFAULT


def test_short_read_is_einval_and_keeps_message(emu, opened) -> None:
    dev = opened()
    os.write(dev.fd, encode_register())
    assert errno_of(lambda: os.read(dev.fd, MESSAGE_SIZE - 1)) == errno.EINVAL
    assert dev.poll() & select.POLLIN
    reply = os.read(dev.fd, 3 * MESSAGE_SIZE)  # a bigger buffer gets exactly one message
    assert len(reply) == MESSAGE_SIZE and reply[0] == Op.REGISTER1


def test_write_without_outstanding_request_is_einval(emu, opened) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    assert errno_of(lambda: os.write(dev.fd, encode_status(0))) == errno.EINVAL
    assert host.state()["spurious_writes"] == 1


def test_request_roundtrip_and_poll_wakeup(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    assert dev.poll(100) == 0
    request = set_request(b"alpha", b"one")
    answer = in_thread(pool, lambda: host.transact(request))
    revents = dev.poll(3000)  # blocks until the host request is queued, then notify()
    assert revents & POLLIN == POLLIN
    assert os.read(dev.fd, MESSAGE_SIZE) == request
    assert dev.poll() == 0
    assert os.write(dev.fd, encode_status(Status.S_CONT)) == MESSAGE_SIZE
    result = answer.result(timeout=3)
    assert result.status == Status.S_CONT and result.source is ReplySource.DAEMON


def test_epoll_wakeup(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    epoll = select.epoll()
    try:
        epoll.register(dev.fd, select.EPOLLIN)
        assert epoll.poll(0.1) == []
        answer = in_thread(pool, lambda: host.enumerate(Pool.GUEST, 0))
        assert epoll.poll(3) == [(dev.fd, select.EPOLLIN)]
    finally:
        epoll.close()
    assert os.read(dev.fd, MESSAGE_SIZE)[0] == Op.ENUMERATE
    os.write(dev.fd, encode_enumerate_reply(b"key", "välue".encode()))
    assert answer.result(timeout=3) == (Status.S_OK, "key", "välue")


def test_host_sees_kernel_conversions(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    answer = in_thread(pool, lambda: host.enumerate(Pool.GUEST, 0))
    dev.read_message()
    os.write(dev.fd, encode_enumerate_reply(b"k" * 300, b"\xff\xfe"))  # invalid UTF-8 value
    assert answer.result(timeout=3) == (Status.E_FAIL, "", "")
    answer = in_thread(pool, lambda: host.enumerate(Pool.GUEST, 0))
    dev.read_message()
    os.write(dev.fd, encode_enumerate_reply(b"k" * 300, b"v" * 1500))
    assert answer.result(timeout=3) == (Status.S_OK, "k" * 254, "v" * 1022)


def test_host_requests_wait_for_a_registered_daemon(emu, opened, pool) -> None:
    _, host = emu
    answer = in_thread(pool, lambda: host.delete(Pool.EXTERNAL, "gone"))
    host.wait_for(timeout=2)  # let the request reach the emulator's ring
    deadline = time.monotonic() + 2
    while host.state()["ring"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dev = opened()
    assert dev.poll(200) == 0  # opened but not registered: nothing is delivered
    dev.register()
    message = dev.read_message()
    assert message[0] == Op.DELETE and message[8:13] == b"gone\0"
    os.write(dev.fd, encode_status(Status.S_OK))
    assert answer.result(timeout=3) == Status.S_OK


def test_close_mid_transaction_fails_host_and_requires_new_handshake(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    answer = in_thread(pool, lambda: host.transact(set_request()))
    dev.read_message()
    dev.close()
    result: HostReply = answer.result(timeout=3)
    assert (result.status, result.source, result.reply) == (
        Status.E_FAIL,
        ReplySource.RESET,
        None,
    )
    state = host.state()
    assert state["state"] == "DEVICE_INIT" and not state["registered"]

    again = opened()
    answer = in_thread(pool, lambda: host.set(Pool.EXTERNAL, "k", "v"))
    # A reply-looking write is taken as a (bad) handshake, not as a reply.
    assert errno_of(lambda: os.write(again.fd, encode_status(0))) == errno.EINVAL
    assert again.poll(200) == 0
    again.register()
    assert again.read_message() == set_request()
    os.write(again.fd, encode_status(0))
    assert answer.result(timeout=3) == Status.S_OK


def test_timeout_answers_e_fail_and_late_reply_is_einval(emu, opened, pool) -> None:
    _, host = emu
    host.set_timeout(0.3)
    dev = opened()
    dev.register()
    started = time.monotonic()
    result = host.transact(set_request(b"slow"))
    assert 0.25 < time.monotonic() - started < 2
    assert (result.status, result.source) == (Status.E_FAIL, ReplySource.TIMEOUT)
    # The unread request stays queued; a reply to it comes too late.
    assert dev.read_message()[16:21] == b"slow\0"
    assert errno_of(lambda: os.write(dev.fd, encode_status(0))) == errno.EINVAL
    assert host.state()["timeouts"] == 1


def test_late_reply_is_paired_with_the_next_request(emu, opened, pool) -> None:
    """No request ids: once the timer fired, the daemon's next write answers whatever request
    is outstanding, even one it has not read yet (the state is USERSPACE_REQ already)."""
    _, host = emu
    host.set_timeout(0.3)
    dev = opened()
    dev.register()
    assert host.transact(set_request(b"slow")).source is ReplySource.TIMEOUT
    assert dev.read_message()[16:21] == b"slow\0"
    host.set_timeout(10)
    pending = in_thread(pool, lambda: host.enumerate(Pool.EXTERNAL, 0))
    host.wait_for(message_queued=True)
    assert os.write(dev.fd, encode_status(Status.S_OK)) == MESSAGE_SIZE  # meant for "slow"
    assert pending.result(timeout=5) == (Status.S_OK, "", "")  # the ENUMERATE got it
    assert dev.read_message()[0] == Op.ENUMERATE  # still queued, and now unanswerable
    reply = encode_enumerate_reply(b"key", b"value")
    assert errno_of(lambda: os.write(dev.fd, reply)) == errno.EINVAL


def test_unread_stale_message_fails_next_request_at_once(emu, opened) -> None:
    _, host = emu
    host.set_timeout(0.2)
    dev = opened()
    dev.register()
    assert host.transact(set_request(b"first")).source is ReplySource.TIMEOUT
    result = host.transact(set_request(b"second"))  # SEND_FAILED: at once, not a timeout
    assert (result.status, result.source) == (Status.E_FAIL, ReplySource.SEND_FAILED)
    assert dev.read_message()[16:22] == b"first\0"


def test_injected_read_and_write_errors(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    os.write(dev.fd, encode_register())
    host.fail_next_read()
    assert errno_of(lambda: os.read(dev.fd, MESSAGE_SIZE)) == errno.EIO
    assert os.read(dev.fd, MESSAGE_SIZE)[0] == Op.REGISTER1  # message survived
    answer = in_thread(pool, lambda: host.transact(set_request()))
    dev.read_message()
    host.fail_next_write(errno.ENOSPC)
    assert errno_of(lambda: os.write(dev.fd, encode_status(0))) == errno.ENOSPC
    os.write(dev.fd, encode_status(0))  # the retry is the reply
    assert answer.result(timeout=3).status == Status.S_OK


def test_vanish_unlink_and_return(emu, opened) -> None:
    device, host = emu
    dev = opened()
    dev.register()
    host.vanish("unlink")
    assert errno_of(lambda: os.open(device, os.O_RDWR)) == errno.ENOENT
    assert os.listdir(os.path.dirname(device)) == []
    assert host.state()["registered"]  # the open fd is unaffected
    host.reappear()
    assert os.listdir(os.path.dirname(device)) == ["hv_kvp"]


def test_vanish_unload_kills_open_fd_then_name(emu, opened) -> None:
    device, host = emu
    dev = opened()
    dev.register()
    host.vanish()
    assert dev.poll() == select.POLLERR | select.POLLHUP
    assert errno_of(lambda: os.read(dev.fd, MESSAGE_SIZE)) == errno.EBADF
    assert errno_of(lambda: os.write(dev.fd, encode_register())) == errno.EBADF
    assert errno_of(lambda: os.open(device, os.O_RDWR)) == errno.EBADF
    dev.close()
    assert errno_of(lambda: os.open(device, os.O_RDWR)) == errno.ENOENT
    host.reappear()
    fresh = opened()
    assert host.state()["state"] == "DEVICE_INIT"
    assert fresh.register()[0] == Op.REGISTER1


def test_blocked_reader_can_be_killed(emu, tmp_path) -> None:
    """A daemon killed while blocked in read() must die, not hang in D state."""
    device, host = emu
    script = (
        "import os, sys\n"
        "from kvpfs.wire.protocol import encode_register\n"
        f"fd = os.open({device!r}, os.O_RDWR)\n"
        "os.write(fd, encode_register())\n"
        "os.read(fd, 7432)\n"
        "os.read(fd, 7432)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo)
    try:
        host.wait_for(timeout=4, registered=True)
        time.sleep(0.1)  # now blocked in the second read
        assert proc.poll() is None
        proc.kill()
        proc.wait(timeout=3)
        host.wait_for(timeout=2, opened=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_host_timeout_withdraws_queued_request(emu) -> None:
    device, host = emu
    impatient = EmulatedHost(control_socket_of(device), timeout=0.2)
    with impatient, pytest.raises(TimeoutError):
        impatient.set(Pool.EXTERNAL, "k", "v")
    state = host.wait_for(timeout=2, idle=True)
    assert state["requests"] == 1 and state["ring"] == 0 and state["completed"] == 0


def test_hosts_that_hang_up_never_stop_the_emulator(emu) -> None:
    """A host that closes before its answer is sent is dropped quietly; one that only
    closes its sending side still gets the answers to what it asked."""
    import socket

    from emulation import emuwire

    device, host = emu
    path = str(control_socket_of(device))
    for _ in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
            gone.connect(path)
            gone.sendall(emuwire.json_frame({"cmd": "ping"}) * 2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as polite:
        polite.settimeout(10)
        polite.connect(path)
        polite.sendall(emuwire.json_frame({"cmd": "ping"}) + emuwire.json_frame({"cmd": "state"}))
        polite.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := polite.recv(65536):
            data += chunk
    answers = []
    while data:
        length = emuwire.split_length(data[:4])
        answers.append(json.loads(data[5 : 4 + length]))
        data = data[4 + length :]
    assert [a["ok"] for a in answers] == [True, True] and "state" in answers[1]
    assert host.wait_for(timeout=2, idle=True)["present"]  # still serving


def test_context_manager_cleans_up_after_emulator_crash(tmp_path) -> None:
    with run_emulated_device(tmp_path) as (device, host):
        os.kill(host.ping(), signal.SIGKILL)
        time.sleep(0.1)
        assert errno_of(lambda: os.stat(device)) == errno.ENOTCONN
    assert not os.path.ismount(os.path.dirname(device))
    assert os.listdir(os.path.dirname(device)) == []


# ---------------------------------------------------------------------- reference daemon

# ./dev.sh installs hyperv-daemons, so under CI=true a missing daemon fails the test instead.
needs_reference = pytest.mark.skipif(
    (not os.access(REFERENCE_DAEMON, os.X_OK) or os.geteuid() != 0)
    and os.environ.get("CI") != "true",
    reason="needs root and hyperv-daemons (hv_kvp_daemon)",
)


@needs_reference
def test_reference_daemon_set_enumerate_get(emu, tmp_path) -> None:
    device, host = emu
    pool_dir = tmp_path / "pools"
    with run_reference_daemon(device, pool_dir, host) as ref:
        assert host.set(Pool.EXTERNAL, "alpha", "first") == Status.S_OK
        assert host.enumerate_all(Pool.EXTERNAL) == [("alpha", "first")]
        assert host.get(Pool.EXTERNAL, "alpha") == (Status.S_OK, "")  # §9 bug 1
        assert host.get(Pool.EXTERNAL, "missing") == (Status.S_CONT, "")
        data = ref.pool_file(0).read_bytes()
        assert len(data) == RECORD
        assert data[:6] == b"alpha\0" and data[512:518] == b"first\0"
        assert sorted(p.name for p in pool_dir.iterdir()) == [f".kvp_pool_{n}" for n in range(5)]
        assert ref.wait_log("KVP LIC Version: 3.1")
        assert host.enumerate(Pool.AUTO, 1) == (Status.S_OK, "IntegrationServicesVersion", "3.1")
    assert host.wait_for(timeout=3, opened=False)["state"] == "DEVICE_INIT"


@needs_reference
def test_reference_daemon_reopens_after_read_error(emu, tmp_path) -> None:
    device, host = emu
    with run_reference_daemon(device, tmp_path / "pools", host) as ref:
        host.fail_next_read()
        result = host.transact(set_request(b"lost"))
        # The daemon's read failed, it closed the device: the kernel fails the request.
        assert (result.status, result.source) == (Status.E_FAIL, ReplySource.RESET)
        state = host.wait_registered(timeout=3, min_handshakes=2)
        assert state["opens"] == 2 and ref.alive()
        assert host.set(Pool.GUEST, "after", "reopen") == Status.S_OK
        assert host.enumerate_all(Pool.GUEST) == [("after", "reopen")]


@needs_reference
def test_reference_daemon_late_reply_after_timeout(emu, tmp_path) -> None:
    """A pool lock held past the timeout: host gets E_FAIL, the late reply EINVAL, reopen."""
    device, host = emu
    with run_reference_daemon(device, tmp_path / "pools", host) as ref:
        host.set_timeout(0.3)
        with open(ref.pool_file(0), "rb+") as locked:
            fcntl.lockf(locked, fcntl.LOCK_EX)
            result = host.transact(set_request(b"late", b"1"))
            assert (result.status, result.source) == (Status.E_FAIL, ReplySource.TIMEOUT)
            fcntl.lockf(locked, fcntl.LOCK_UN)
        state = host.wait_registered(timeout=3, min_handshakes=2)
        assert state["spurious_writes"] == 1 and ref.alive()
        # The SET itself was applied, only its answer was lost.
        assert host.enumerate_all(Pool.EXTERNAL) == [("late", "1")]


# ---------------------------------------------------------------------- hibernation


def test_hibernation_without_a_daemon_refuses_the_first_registration(emu, opened) -> None:
    """hv_kvp_pre_suspend forces READY: REGISTER1 is then "a reply with nothing
    outstanding" (EINVAL), and only a close (kvp_on_reset) makes it work again."""
    _, host = emu
    assert host.hibernate()["state"] == "READY"
    dev = opened()
    assert errno_of(lambda: os.write(dev.fd, encode_register())) == errno.EINVAL
    assert errno_of(lambda: os.write(dev.fd, encode_register())) == errno.EINVAL
    assert host.state()["handshakes"] == 0
    dev.close()
    assert host.wait_for(min_resets=1)["state"] == "DEVICE_INIT"  # FUSE releases after close
    reply = opened().register()
    assert reply[0] == Op.REGISTER1 and host.state()["handshakes"] == 1


def test_hibernation_keeps_the_fd_and_fails_only_the_reply_in_flight(emu, opened, pool) -> None:
    _, host = emu
    dev = opened()
    dev.register()
    pending = in_thread(pool, lambda: host.set(0, "during", "1"))
    request = dev.read_message()
    assert request[0] == Op.SET
    host.hibernate()
    assert pending.result(timeout=5) == Status.E_FAIL
    assert errno_of(lambda: os.write(dev.fd, encode_status(Status.S_OK))) == errno.EINVAL
    # The same fd serves the next request: no reset, no new registration.
    after = in_thread(pool, lambda: host.set(0, "after", "2"))
    assert dev.read_message()[0] == Op.SET
    assert os.write(dev.fd, encode_status(Status.S_OK)) == MESSAGE_SIZE
    assert after.result(timeout=5) == Status.S_OK
    state = host.state()
    assert (state["opens"], state["handshakes"], state["resets"]) == (1, 1, 0)


def _registered_once_then_hibernated(opened: Callable[[], Dev], host: EmulatedHost) -> None:
    """A daemon registered, went away, and the guest hibernated: the kernel is READY."""
    dev = opened()
    dev.register()
    dev.close()
    host.wait_for(min_resets=1)
    assert host.hibernate()["state"] == "READY"


def test_registration_race_register1_answers_a_request_that_arrived_after_open(
    emu, opened, pool,
) -> None:
    """hv_kvp_pre_suspend + kvp_on_msg: a host request passed down between the open and
    REGISTER1 takes REGISTER1 as its reply (the host sees the op byte as a status) and
    the daemon reads the request where it expected the echo."""
    _, host = emu
    _registered_once_then_hibernated(opened, host)
    host.hold_until_open()
    raced = in_thread(pool, lambda: host.transact(set_request(b"raced", b"x")))
    host.wait_for(min_held=1)
    dev = opened()
    assert dev.poll(2000) & select.POLLIN  # already queued when open returns
    assert os.write(dev.fd, encode_register()) == MESSAGE_SIZE
    result = raced.result(timeout=5)
    assert (result.status, result.source) == (Op.REGISTER1, ReplySource.DAEMON)
    assert dev.read_message()[0] == Op.SET  # instead of the echo
    assert host.state()["handshakes"] == 1  # only the one before the hibernation


@needs_reference
def test_reference_daemon_recovers_from_the_registration_race(emu, opened, tmp_path) -> None:
    """Debian's daemon reads the raced request as one, answers it (EINVAL: nothing is
    outstanding any more), reopens the device and registers: service resumes."""
    device, host = emu
    _registered_once_then_hibernated(opened, host)
    host.hold_until_open()
    with ThreadPoolExecutor(max_workers=1) as executor:
        raced = executor.submit(lambda: host.transact(set_request(b"raced", b"x")))
        host.wait_for(min_held=1)
        with run_reference_daemon(device, tmp_path / "pools", host) as ref:
            result = raced.result(timeout=10)
            assert (result.status, result.source) == (Op.REGISTER1, ReplySource.DAEMON)
            state = host.wait_registered(timeout=10, min_handshakes=2)
            assert state["spurious_writes"] >= 1 and ref.alive()
            assert host.set(Pool.GUEST, "after", "race") == Status.S_OK
            assert ("after", "race") in host.enumerate_all(Pool.GUEST)
