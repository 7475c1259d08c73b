"""`kvpfs.wire.kernelmodel` behaves like drivers/hv/hv_kvp.c on hv_utils_transport.c.

Each test names the kernel function whose behaviour it pins (mainline, 2026; see
../shared/docs/kvp-protocol.md sections 2, 3.1 and 3.4). A fake clock drives the 30 s
timer, so every scenario runs in microseconds with the kernel's real timeout.
"""

from __future__ import annotations

import errno

import pytest

from kvpfs.wire import kernelside, protocol
from kvpfs.wire.kernelmodel import (
    KERNEL_TIMEOUT,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLRDNORM,
    HostRequest,
    KvpKernel,
    Source,
    State,
)
from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Pool, Status

T0 = 1000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kernel(clock: FakeClock) -> KvpKernel:
    return KvpKernel(clock)


def register(kernel: KvpKernel, op: int = Op.REGISTER1) -> bytes:
    kernel.open()
    assert kernel.write(protocol.encode_register(op)) == MESSAGE_SIZE
    return kernel.read()


def host(kernel: KvpKernel, message: bytes) -> HostRequest:
    request = HostRequest(message)
    kernel.submit(request)
    return request


def set_request(key: bytes = b"k", value: bytes = b"v") -> bytes:
    return kernelside.encode_set_request(Pool.EXTERNAL, key, value)


def enumerate_request(index: int) -> bytes:
    return kernelside.encode_enumerate_request(Pool.GUEST, index)


def ok() -> bytes:
    return protocol.encode_status(Status.S_OK)


def errno_of(call: object) -> int:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


# ------------------------------------------------------------------ hvt_op_open / release


def test_hvt_op_open_allows_one_opener_and_release_reopens(kernel: KvpKernel) -> None:
    kernel.open()
    assert errno_of(kernel.open) == errno.EBUSY
    kernel.release()
    kernel.open()
    assert kernel.counters["ebusy_opens"] == 1


def test_hvt_op_open_after_hv_kvp_deinit_is_ebadf(kernel: KvpKernel) -> None:
    register(kernel)
    kernel.destroy()
    assert errno_of(kernel.read) == errno.EBADF
    assert errno_of(lambda: kernel.write(ok())) == errno.EBADF
    assert kernel.poll() == POLLERR | POLLHUP
    kernel.release()
    assert errno_of(kernel.open) == errno.EBADF


# ------------------------------------------------------------------ handshake


def test_kvp_handle_handshake_echoes_register1_with_the_driver_version(kernel: KvpKernel) -> None:
    echo = register(kernel)
    assert echo[0] == Op.REGISTER1 and echo[4:8] == b"3.1\0"
    assert kernel.state == State.READY and kernel.registered


def test_kvp_handle_handshake_refuses_other_ops_and_kvp_on_msg_short_writes(
    kernel: KvpKernel,
) -> None:
    kernel.open()
    assert errno_of(lambda: kernel.write(protocol.encode_register(Op.SET))) == errno.EINVAL
    assert errno_of(lambda: kernel.write(b"\x64" + bytes(100))) == errno.EINVAL
    assert kernel.state == State.DEVICE_INIT and kernel.outmsg is None


@pytest.mark.parametrize(("register_errors", "outcome"), [(True, errno.EFAULT), (False, 0)])
def test_kvp_register_twice_before_the_echo_is_read(clock: FakeClock, register_errors: bool,
                                                    outcome: int) -> None:
    """Before 3fcf923302a8 `kvp_register`'s error was dropped (the write succeeded); since
    then `hvutil_transport_send`'s EFAULT ("previous message wasn't received") comes back."""
    kernel = KvpKernel(clock, register_errors=register_errors)
    kernel.open()
    kernel.write(protocol.encode_register(Op.REGISTER1))
    second = protocol.encode_register(Op.REGISTER1)
    if outcome:
        assert errno_of(lambda: kernel.write(second)) == outcome
    else:
        assert kernel.write(second) == MESSAGE_SIZE
    assert kernel.read()[0] == Op.REGISTER1  # one echo, still queued
    assert kernel.outmsg is None and kernel.registered


# ------------------------------------------------------------------ hvt_op_read / poll


def test_hvt_op_read_blocks_when_empty_and_a_short_read_keeps_the_message(
    kernel: KvpKernel,
) -> None:
    register(kernel)
    assert kernel.read_blocks and kernel.poll() == 0
    with pytest.raises(BlockingIOError):
        kernel.read()  # the driver blocks here: O_NONBLOCK is ignored
    request = host(kernel, set_request())
    assert kernel.poll() == POLLIN | POLLRDNORM and not kernel.read_blocks
    assert errno_of(lambda: kernel.read(MESSAGE_SIZE - 1)) == errno.EINVAL
    assert kernel.read()[0] == Op.SET
    assert kernel.poll() == 0 and not request.answered


# ------------------------------------------------------------------ hv_kvp_onchannelcallback


def test_hv_kvp_onchannelcallback_leaves_the_ring_alone_until_a_daemon_registers(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    waiting = host(kernel, set_request())
    clock.advance(10 * KERNEL_TIMEOUT)  # no timer is armed before registration
    kernel.advance()
    assert not waiting.answered and kernel.negotiation_deferred
    register(kernel)
    assert kernel.timer_deadline == clock.now + KERNEL_TIMEOUT  # armed when passed down
    assert kernel.read()[0] == Op.SET
    kernel.write(ok())
    assert waiting.status == Status.S_OK and waiting.source == Source.DAEMON


def test_the_timer_is_armed_when_the_packet_arrives_not_when_the_daemon_reads(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    register(kernel)
    request = host(kernel, set_request())
    clock.advance(20)
    assert kernel.read()[0] == Op.SET  # read 20 s late: 10 s are left, not 30
    clock.advance(10)
    kernel.run_timer()
    assert request.status == Status.E_FAIL and request.source == Source.TIMEOUT


# ------------------------------------------------------------------ kvp_timeout_func


def test_kvp_timeout_func_answers_e_fail_and_keeps_an_unread_request(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    register(kernel)
    first = host(kernel, enumerate_request(0))
    clock.advance(KERNEL_TIMEOUT)
    kernel.run_timer()
    assert first.status == Status.E_FAIL and kernel.state == State.READY
    # kvp_send_key: hvutil_transport_send fails (the stale message is unread): E_FAIL now.
    second = host(kernel, enumerate_request(1))
    assert second.status == Status.E_FAIL and second.source == Source.SEND_FAILED
    assert kernel.read()[4] == 0  # the stale index-0 request is still there


def test_kvp_on_msg_pairs_a_late_reply_with_the_next_request(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    """The cascade of issue 17: no request id, so the late answer to A answers B."""
    register(kernel)
    a = host(kernel, enumerate_request(0))
    assert kernel.read()[4] == 0
    clock.advance(KERNEL_TIMEOUT + 1)
    kernel.advance()
    assert a.status == Status.E_FAIL
    b = host(kernel, enumerate_request(1))
    assert kernel.write(protocol.encode_enumerate_reply(b"key-of-0", b"v")) == MESSAGE_SIZE
    assert b.status == Status.S_OK and b.reply is not None
    assert kernelside.reply_key_value(b.reply)[0] == b"key-of-0"  # B got A's answer


def test_kvp_on_msg_refuses_a_reply_with_nothing_outstanding(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    register(kernel)
    assert errno_of(lambda: kernel.write(ok())) == errno.EINVAL
    host(kernel, set_request())
    kernel.read()
    clock.advance(KERNEL_TIMEOUT + 1)
    assert errno_of(lambda: kernel.write(ok())) == errno.EINVAL
    assert kernel.counters["spurious_writes"] == 2


def test_a_write_racing_kvp_timeout_func_succeeds_and_is_dropped(
    kernel: KvpKernel, clock: FakeClock,
) -> None:
    """`cancel_delayed_work_sync` finds the timeout running: the write returns its
    length, the host gets the timer's E_FAIL and the reply goes nowhere."""
    register(kernel)
    request = host(kernel, set_request())
    kernel.read()
    clock.advance(KERNEL_TIMEOUT)  # exactly at the deadline: the timer is running
    assert kernel.write(ok()) == MESSAGE_SIZE
    assert request.status == Status.E_FAIL and request.source == Source.TIMEOUT
    assert kernel.counters["raced_writes"] == 1 and kernel.state == State.READY
    following = host(kernel, set_request(b"next"))
    kernel.read()
    kernel.write(ok())
    assert following.status == Status.S_OK


# ------------------------------------------------------------------ kvp_on_reset


def test_kvp_on_reset_fails_the_transaction_frees_the_message_and_needs_a_handshake(
    kernel: KvpKernel,
) -> None:
    register(kernel)
    request = host(kernel, set_request())
    kernel.release()
    assert request.status == Status.E_FAIL and request.source == Source.RESET
    assert kernel.state == State.DEVICE_INIT and kernel.outmsg is None
    kernel.open()
    assert errno_of(lambda: kernel.write(ok())) == errno.EINVAL  # op 0: not a handshake
    assert register_again(kernel)[0] == Op.REGISTER1


def register_again(kernel: KvpKernel) -> bytes:
    kernel.write(protocol.encode_register(Op.REGISTER1))
    return kernel.read()


# ------------------------------------------------------------------ hv_kvp_pre_suspend


def test_hv_kvp_pre_suspend_with_no_daemon_refuses_the_next_registration(
    kernel: KvpKernel,
) -> None:
    register(kernel)
    kernel.release()
    kernel.hibernate()
    assert kernel.state == State.READY
    kernel.open()
    refused = protocol.encode_register(Op.REGISTER1)
    assert errno_of(lambda: kernel.write(refused)) == errno.EINVAL
    kernel.release()  # kvp_on_reset: DEVICE_INIT again
    kernel.open()
    assert register_again(kernel)[0] == Op.REGISTER1


@pytest.mark.parametrize(("registered_before", "status"), [(True, Op.REGISTER1), (False, 0)])
def test_registration_race_after_hv_kvp_pre_suspend(clock: FakeClock, registered_before: bool,
                                                    status: int) -> None:
    """A host request arriving between open and REGISTER1 is passed down (the state is
    READY): REGISTER1 is taken as its reply. The host sees the op byte as a status, or
    S_OK when no daemon ever registered (`dm_reg_value` 0 selects no error at all)."""
    kernel = KvpKernel(clock)
    if registered_before:
        register(kernel)
        kernel.release()
    kernel.hibernate()
    kernel.open()
    request = host(kernel, set_request())
    assert kernel.write(protocol.encode_register(Op.REGISTER1)) == MESSAGE_SIZE
    assert request.status == status and request.source == Source.DAEMON
    assert kernel.read()[0] == Op.SET  # what the daemon reads instead of an echo


def test_registration_race_with_get_ip_info_reads_op_4(kernel: KvpKernel) -> None:
    register(kernel)
    kernel.release()
    kernel.hibernate()
    kernel.open()
    host(kernel, kernelside.encode_ip_info_request(Op.GET_IP_INFO, "00:15:5D:00:00:01"))
    kernel.write(protocol.encode_register(Op.REGISTER1))
    message = kernel.read()
    assert message[0] == Op.GET_IP_INFO == protocol.LEGACY_REGISTER  # looks like an echo


def test_hv_kvp_pre_suspend_keeps_a_queued_request_that_then_answers_the_next(
    kernel: KvpKernel,
) -> None:
    """The stale request after resume: read after the suspend, its reply answers the
    host's next request."""
    register(kernel)
    before = host(kernel, enumerate_request(0))
    kernel.hibernate()
    assert before.status == Status.E_FAIL and before.source == Source.SUSPENDED
    assert kernel.outmsg is not None  # kept
    stale = kernel.read()
    after = host(kernel, set_request(b"after-resume"))
    kernel.write(protocol.encode_enumerate_reply(b"k", b"v"))
    assert stale[0] == Op.ENUMERATE and after.status == Status.S_OK  # a wrong pairing


# ------------------------------------------------------------------ legacy daemon


def test_kvp_on_msg_legacy_daemon_status_is_the_empty_key_rule(kernel: KvpKernel) -> None:
    echo = register(kernel, protocol.LEGACY_REGISTER)
    assert echo[0] == protocol.LEGACY_REGISTER
    first = host(kernel, enumerate_request(0))
    kernel.read()
    kernel.write(protocol.encode_status(Status.E_FAIL))  # error ignored, key empty
    second = host(kernel, enumerate_request(1))
    kernel.read()
    kernel.write(protocol.encode_enumerate_reply(b"key", b"v"))
    assert (first.status, second.status) == (Status.S_CONT, Status.S_OK)


def test_a_withdrawn_request_is_never_passed_down(kernel: KvpKernel) -> None:
    waiting = host(kernel, set_request())
    kernel.withdraw(waiting)
    register(kernel)
    assert kernel.outmsg is None and not waiting.answered
