"""The kernel's KVP transport as a state machine without I/O: the one model of the kernel.

`KvpKernel` is ``drivers/hv/hv_kvp.c`` (the KVP state machine, its 30 s timer,
the registration) on top of ``drivers/hv/hv_utils_transport.c`` (the char
device: one opener, one undelivered message, blocking read, poll bits), in the
spirit of h11: it only changes state and says what happened. Time comes from an
injected clock, so a 30 s scenario runs in microseconds under a fake clock;
whoever drives it (the simulated host in `kvpfs.host.simulator`, the FUSE device
in `emulation.emulated_device`, the unit tests) does the blocking, the waking
and the real I/O, and calls `advance` when `timer_deadline` has come.

What it reproduces, each pinned by a test naming the kernel function
(tests/bytes/test_kernelmodel.py):

* `hvt_op_open`: INIT -> CHARDEV, EBUSY for a second opener, EBADF once destroyed;
  `hvt_op_release` + `kvp_on_reset`: the queued message is freed, a pending
  transaction is answered E_FAIL, the state goes back to DEVICE_INIT.
* `hvt_op_read`: blocks while nothing is queued (O_NONBLOCK is ignored: `read`
  raises BlockingIOError only so that the driver can block), EINVAL for a short
  buffer with the message kept, EBADF once destroyed; reading the registration
  echo runs `kvp_register_done`.
* `hvt_op_poll`: POLLIN|POLLRDNORM while a message is queued, POLLERR|POLLHUP once
  destroyed, else 0.
* `kvp_on_msg`: EINVAL for < 7432 bytes; before READY the handshake (op 100 or 4,
  anything else EINVAL; a second REGISTER1 before the echo was read fails with
  EFAULT since 3fcf923302a8, and succeeded silently before: `register_errors`);
  EINVAL while no request is outstanding (READY, HOSTMSG_RECEIVED); otherwise the
  write is taken as the reply to whatever request is outstanding, with no request
  id, so a late reply answers the next request; a write that races the timer
  (`cancel_delayed_work_sync` returns false) returns success and is dropped.
* `hv_kvp_onchannelcallback`: no daemon registered, the ring is left alone; else
  one request at a time, its 30 s timer armed as it is taken from the ring, before
  the daemon reads it; `kvp_send_key` failing (no reader, message still unread)
  answers E_FAIL at once. `kvp_timeout_func`: E_FAIL, READY, next request at once;
  an unread request stays queued.
* `hv_kvp_pre_suspend`: work cancelled, state forced READY, the queued message
  kept; `hv_kvp_deinit`: DESTROY.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvpfs.wire import kernelside
from kvpfs.wire.protocol import LEGACY_REGISTER, MESSAGE_SIZE, Op, Status

KERNEL_TIMEOUT = 30.0
"""HV_UTIL_TIMEOUT: seconds from the host packet's arrival to the kernel's own E_FAIL."""
DRIVER_VERSION = "3.1"  # HV_DRV_VERSION, the version in the registration echo

# poll(2) bits, as in <poll.h> (kept here so the model needs no I/O module).
POLLIN, POLLERR, POLLHUP, POLLRDNORM = 0x001, 0x008, 0x010, 0x040

# The legacy daemon's status convention looks at byte 20 (kvp_enum_data.data.key[0]).
_LEGACY_KEY_OFFSET = 20
_U32 = struct.Struct("<I")


class Mode(enum.Enum):
    """``hvutil_transport`` mode (NETLINK is not modelled)."""

    INIT = "INIT"
    CHARDEV = "CHARDEV"
    DESTROY = "DESTROY"


class State(enum.IntEnum):
    """``enum hvutil_device_state``; the kernel compares with < and >, so order matters."""

    DEVICE_INIT = 0
    READY = 1
    HOSTMSG_RECEIVED = 2
    USERSPACE_REQ = 3
    USERSPACE_RECV = 4
    DEVICE_DYING = 5


class Source(enum.IntEnum):
    """Who answered the host."""

    DAEMON = 0  # the daemon's write (its ``error``, or the legacy rule)
    TIMEOUT = 1  # kvp_timeout_func
    RESET = 2  # kvp_on_reset: the daemon closed the device mid-transaction
    SEND_FAILED = 3  # kvp_send_key: hvutil_transport_send failed
    DESTROYED = 4  # hv_kvp_deinit while the request was in flight
    SUSPENDED = 5  # hv_kvp_pre_suspend: the channel closes; the host sees a failure


class HostRequest:
    """One host packet: in the ring, then the transaction, then answered exactly once."""

    def __init__(self, message: bytes, notify: Callable[[], None] | None = None) -> None:
        self.message = message
        self.notify = notify
        self.status: int | None = None
        self.source = Source.DAEMON
        self.reply: bytes | None = None
        self.withdrawn = False

    @property
    def answered(self) -> bool:
        return self.status is not None

    def answer(self, status: int, source: Source, reply: bytes | None) -> None:
        """The first answer wins (the kernel answers each packet once)."""
        if self.status is not None:
            return
        self.status = status & 0xFFFF_FFFF
        self.source = source
        self.reply = reply
        if self.notify is not None:
            self.notify()


@dataclass(eq=False)
class Transaction:
    """``kvp_transaction`` and its armed ``kvp_timeout_work``."""

    request: HostRequest
    deadline: float
    timer_pending: bool = True


COUNTERS = ("opens", "ebusy_opens", "register_writes", "rejected_registers", "handshakes",
            "reads", "short_reads", "writes", "short_writes", "spurious_writes", "raced_writes",
            "requests", "completed", "timeouts", "resets", "reset_failures", "send_failures",
            "hibernations")


class KvpKernel:
    """One loaded hv_kvp module: transport and KVP state, driven by its callers.

    Not thread-safe by itself, as the kernel's state is guarded by ``hvt->lock``:
    a driver calling from several threads holds its own lock around each call.
    `on_change` is called after anything a waiter may care about changed (a
    message queued or consumed, a host request answered, the mode changed).
    """

    def __init__(self, clock: Callable[[], float], *, timeout: float = KERNEL_TIMEOUT,
                 register_errors: bool = True, version: str = DRIVER_VERSION,
                 on_change: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.timeout = timeout
        self.register_errors = register_errors
        self.version = version
        self.on_change = on_change
        self.mode = Mode.INIT
        self.state = State.DEVICE_INIT
        self.outmsg: bytes | None = None
        self._echo_queued = False  # on_read is kvp_register_done
        self.dm_reg_value = 0
        self.txn: Transaction | None = None
        self.ring: deque[HostRequest] = deque()
        self.negotiation_deferred = False  # kvp_host_handshake_work scheduled once
        self._now: float | None = None  # while timers fire: the moment they fired
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ---------------------------------------------------------------- helpers
    def now(self) -> float:
        return self.clock() if self._now is None else self._now

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def registered(self) -> bool:
        return self.mode == Mode.CHARDEV and State.READY <= self.state < State.DEVICE_DYING

    @property
    def timer_deadline(self) -> float | None:
        """When `advance` must be called next (the armed timer), or None."""
        txn = self.txn
        return txn.deadline if txn is not None and txn.timer_pending else None

    @property
    def read_blocks(self) -> bool:
        """`hvt_op_read`'s wait condition: nothing queued and still CHARDEV."""
        return self.outmsg is None and self.mode == Mode.CHARDEV

    # ---------------------------------------------------------------- the char device
    def open(self) -> None:
        """`hvt_op_open`."""
        self.advance()
        if self.mode == Mode.DESTROY:
            raise OSError(errno.EBADF, "hv_kvp is being destroyed")
        if self.mode != Mode.INIT:
            self.counters["ebusy_opens"] += 1
            raise OSError(errno.EBUSY, "hv_kvp allows one opener")
        self.mode = Mode.CHARDEV
        self.counters["opens"] += 1
        self._changed()

    def read(self, size: int = MESSAGE_SIZE) -> bytes:
        """`hvt_op_read` once its wait is over; BlockingIOError while `read_blocks`."""
        self.advance()
        if self.mode == Mode.DESTROY:
            raise OSError(errno.EBADF, "hv_kvp was destroyed")
        if self.outmsg is None:
            raise BlockingIOError(errno.EAGAIN, "no message queued (the kernel blocks here)")
        if size < len(self.outmsg):
            self.counters["short_reads"] += 1
            raise OSError(errno.EINVAL, f"read of {size} bytes, a message is {len(self.outmsg)}")
        message, echo = self.outmsg, self._echo_queued
        self.outmsg, self._echo_queued = None, False
        self.counters["reads"] += 1
        if echo:
            self._register_done()
        self._changed()
        return message

    def write(self, data: bytes) -> int:
        """`hvt_op_write` -> `kvp_on_msg`: the byte count, or OSError(errno)."""
        self.advance()
        if self.mode == Mode.DESTROY:
            raise OSError(errno.EBADF, "hv_kvp was destroyed")
        self.counters["writes"] += 1
        try:
            self._on_msg(bytes(data))
        finally:
            self._changed()
        return len(data)

    def poll(self) -> int:
        """`hvt_op_poll`."""
        self.advance()
        if self.mode == Mode.DESTROY:
            return POLLERR | POLLHUP
        return POLLIN | POLLRDNORM if self.outmsg is not None else 0

    def release(self) -> None:
        """`hvt_op_release`: back to INIT, `hvt_reset` frees the message, `kvp_on_reset`."""
        self.advance()
        if self.mode != Mode.DESTROY:
            self.mode = Mode.INIT
        self.outmsg, self._echo_queued = None, False
        self.counters["resets"] += 1
        txn = self.txn
        if txn is not None and self._cancel_timer(txn):
            self.counters["reset_failures"] += 1
            self._respond(txn, Status.E_FAIL, Source.RESET, None)
        self.txn = None
        if self.state != State.DEVICE_DYING:
            self.state = State.DEVICE_INIT
        self._changed()

    # ---------------------------------------------------------------- the host
    def submit(self, request: HostRequest) -> None:
        """A host packet lands in the VMBus ring; the channel callback runs."""
        self.advance()
        self.counters["requests"] += 1
        self.ring.append(request)
        self._channel_callback()
        self._changed()

    def withdraw(self, request: HostRequest) -> None:
        """The host gave up on a packet still in the ring (test hosts only)."""
        request.withdrawn = True
        if request in self.ring:
            self.ring.remove(request)
        self._changed()

    def run_timer(self) -> None:
        """The timer's own work: what is due now (deadline included) fires."""
        self.advance(due_now=True)

    def advance(self, *, due_now: bool = False) -> None:
        """Fire the timer if it is overdue: `kvp_timeout_func` at its own deadline, so
        a request it lets through is armed from then. Every entry point calls this.

        A timer due exactly now is left to `run_timer`: a write at this very moment
        races it (see `_on_msg`).
        """
        now = self.clock()
        while (txn := self.txn) is not None and txn.timer_pending and (
                txn.deadline < now or (due_now and txn.deadline <= now)):
            self._now = txn.deadline
            try:
                self._time_out(txn)
            finally:
                self._now = None
            self._changed()

    # ---------------------------------------------------------------- power and module
    def hibernate(self) -> None:
        """`hv_kvp_pre_suspend` (and resume): work cancelled, READY, the message kept.

        The kernel does not answer the host (closing the channel implies the failure);
        the model answers the requests in flight and in the ring E_FAIL so that host
        clients return.
        """
        self.advance()
        self.counters["hibernations"] += 1
        txn = self.txn
        if txn is not None and self._cancel_timer(txn):
            self._respond(txn, Status.E_FAIL, Source.SUSPENDED, None)
        self.txn = None
        while self.ring:
            self.ring.popleft().answer(Status.E_FAIL, Source.SUSPENDED, None)
        self.state = State.READY
        self._changed()

    def destroy(self) -> None:
        """`hv_kvp_deinit` + `hvutil_transport_destroy`: readers EBADF, pollers ERR|HUP."""
        self.advance()
        txn = self.txn
        if txn is not None and self._cancel_timer(txn):
            self._respond(txn, Status.E_FAIL, Source.DESTROYED, None)
        self.txn = None
        while self.ring:
            self.ring.popleft().answer(Status.E_FAIL, Source.DESTROYED, None)
        self.state = State.DEVICE_DYING
        self.mode = Mode.DESTROY
        self._changed()

    # ---------------------------------------------------------------- hv_kvp.c
    def _on_msg(self, buf: bytes) -> None:
        """`kvp_on_msg`."""
        if len(buf) < MESSAGE_SIZE:
            self.counters["short_writes"] += 1
            raise OSError(errno.EINVAL, f"hv_kvp takes {MESSAGE_SIZE}-byte messages,"
                                        f" not {len(buf)}")
        if self.state < State.READY:
            self._handle_handshake(buf)
            return
        if self.state < State.USERSPACE_REQ:
            self.counters["spurious_writes"] += 1
            raise OSError(errno.EINVAL, f"hv_kvp had no request outstanding"
                                        f" (state {self.state.name})")
        self.state = State.USERSPACE_RECV
        error = 0  # no daemon ever registered (dm_reg_value 0): the switch sets nothing
        if self.dm_reg_value == LEGACY_REGISTER:
            error = Status.S_CONT if buf[_LEGACY_KEY_OFFSET] == 0 else Status.S_OK
        elif self.dm_reg_value == Op.REGISTER1:
            (error,) = _U32.unpack_from(buf, 0)
        txn = self.txn
        if txn is None:
            return
        if txn.timer_pending and txn.deadline <= self.now():
            # cancel_delayed_work_sync() finds kvp_timeout_func running: the write
            # "succeeds", the host gets E_FAIL, the reply is dropped.
            self.counters["raced_writes"] += 1
            self._time_out(txn)
            return
        if self._cancel_timer(txn):
            self._respond(txn, error, Source.DAEMON, buf[:MESSAGE_SIZE])
            self._poll_channel()

    def _handle_handshake(self, buf: bytes) -> None:
        """`kvp_handle_handshake` + `kvp_register`."""
        op = buf[0]
        self.counters["register_writes"] += 1
        if op not in (Op.REGISTER1, LEGACY_REGISTER):
            self.counters["rejected_registers"] += 1
            raise OSError(errno.EINVAL, f"KVP: incompatible daemon (op {op})")
        self.dm_reg_value = op
        echo = kernelside.encode_register_reply(op, self.version)
        sent = self._transport_send(echo, echo=True)
        if sent and self.register_errors:
            raise OSError(sent, "hv_kvp: previous message wasn't received")

    def _register_done(self) -> None:
        """`kvp_register_done`: the daemon read the echo; serve the ring."""
        self.counters["handshakes"] += 1
        self._poll_channel()

    def _poll_channel(self) -> None:
        """`kvp_poll_wrapper`: the transaction is over; READY, then the channel callback."""
        self.state = State.READY
        self.txn = None
        self._channel_callback()

    def _channel_callback(self) -> None:
        """`hv_kvp_onchannelcallback`: one ring packet, only in state READY."""
        while self.ring:
            if self.state < State.READY:
                self.negotiation_deferred = True  # kvp_host_handshake_work, 55 s: no-op
                return
            if self.state > State.READY:
                return
            request = self.ring.popleft()
            if request.withdrawn:
                continue
            self.state = State.HOSTMSG_RECEIVED
            txn = Transaction(request, self.now() + self.timeout)
            self.txn = txn
            self._send_key(txn)

    def _send_key(self, txn: Transaction) -> None:
        """`kvp_send_key`: pass the request down; a failed send is E_FAIL at once."""
        self.state = State.USERSPACE_REQ
        if self._transport_send(txn.request.message, echo=False):
            self.counters["send_failures"] += 1
            if self._cancel_timer(txn):
                self._respond(txn, Status.E_FAIL, Source.SEND_FAILED, None)
                self.state = State.READY
                self.txn = None

    def _time_out(self, txn: Transaction) -> None:
        """`kvp_timeout_func`: E_FAIL to the host, then `kvp_poll_wrapper`."""
        txn.timer_pending = False
        self.counters["timeouts"] += 1
        self._respond(txn, Status.E_FAIL, Source.TIMEOUT, None)
        if self.txn is txn:
            self._poll_channel()

    @staticmethod
    def _cancel_timer(txn: Transaction) -> bool:
        """`cancel_delayed_work_sync`: True if the timer had not fired yet."""
        pending, txn.timer_pending = txn.timer_pending, False
        return pending

    def _respond(self, txn: Transaction, status: int, source: Source,
                 reply: bytes | None) -> None:
        """`kvp_respond_to_host` (the UTF-8 -> UTF-16 part is the host driver's)."""
        self.counters["completed"] += 1
        txn.request.answer(status, source, reply)

    # ---------------------------------------------------------------- hv_utils_transport.c
    def _transport_send(self, message: bytes, *, echo: bool) -> int:
        """`hvutil_transport_send` in CHARDEV mode: 0, or the errno it returns."""
        if self.mode != Mode.CHARDEV:
            return errno.EINVAL
        if self.outmsg is not None:
            return errno.EFAULT  # "Previous message wasn't received"
        self.outmsg, self._echo_queued = message, echo
        return 0

    def snapshot(self) -> dict[str, object]:
        """The kernel's view, JSON-ready, for tests and status commands."""
        return {"mode": self.mode.value, "state": self.state.name,
                "registered": self.registered, "reg_value": self.dm_reg_value,
                "message_queued": self.outmsg is not None,
                "transaction": self.txn is not None, "ring": len(self.ring),
                "timeout": self.timeout, **self.counters}
