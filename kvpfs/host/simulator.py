"""A simulated Hyper-V host and guest kernel, speaking the device's exact bytes.

`SimulatedHost` stands in for `/dev/vmbus/hv_kvp` and everything behind it:
kvpfs opens it like the device and gets a `SimulatedChannel`: reads and writes
of 7432-byte messages go straight into a model of `drivers/hv/hv_utils_transport.c`
and `drivers/hv/hv_kvp.c` (so a write can fail with EINVAL, as on the device),
and its fd polls readable exactly while a message is queued. The kernel model
expects a register message, answers with version "3.1", then passes host
requests down one at a time, converting host strings the way the kernel does
(UTF-16 to UTF-8 capped at 511/2047 bytes) and guest replies back (at most
254/1022 UTF-16 units, invalid UTF-8 failing with E_FAIL), with the kernel's
timeout and its consequences (see `SimulatedHost`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import math
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kvpfs.host.device import Channel
from kvpfs.wire import kernelconv, kernelside, protocol
from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Status

log = logging.getLogger(__name__)

KERNEL_TIMEOUT = 30.0  # HV_UTIL_TIMEOUT
# The legacy daemon's status convention looks at byte 20 (kvp_enum_data.data.key[0]).
_LEGACY_KEY_OFFSET = 20

# Synthetic host identity, shaped like what a Hyper-V host pushes into pool 3
# when the channel opens (no real host names or ids).
SYNTHETIC_POOL3: tuple[tuple[str, str], ...] = (
    ("HostName", "HV-SIM-0001"),
    ("HostingSystemEditionId", "168"),
    ("HostingSystemNestedLevel", "0"),
    ("HostingSystemOsMajor", "10"),
    ("HostingSystemOsMinor", "0"),
    ("HostingSystemProcessorArchitecture", "9"),
    ("HostingSystemProcessorIdleStateMax", "0"),
    ("HostingSystemProcessorThrottleMax", "100"),
    ("HostingSystemProcessorThrottleMin", "100"),
    ("HostingSystemSpMajor", "0"),
    ("HostingSystemSpMinor", "0"),
    ("PhysicalHostName", "HV-SIM-0001"),
    ("PhysicalHostNameFullyQualified", "hv-sim-0001.example.test"),
    ("VirtualMachineDynamicMemoryBalancingEnabled", "0"),
    ("VirtualMachineId", "5B0C7C0E-2F4A-4D4B-9B8E-3C1D2E0F4A11"),
    ("VirtualMachineName", "kvpfs-simulated-vm"),
)


@dataclass(frozen=True)
class HostResult:
    """What the host sees: a status, and for GET/ENUMERATE a key and value."""

    status: int
    key: str = ""
    value: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.S_OK

    @property
    def status_name(self) -> str:
        try:
            return Status(self.status).name
        except ValueError:
            return f"0x{self.status:08X}"


# process_ib_ipinfo / process_ob_ipinfo limits: bytes host -> guest, UTF-16 units back.
_IP_ADAPTER_MAX = 128  # MAX_ADAPTER_ID_SIZE
_IP_ADDR_MAX = 1024  # MAX_IP_ADDR_SIZE
_IP_GATEWAY_MAX = 512  # MAX_GATEWAY_SIZE


@dataclass(frozen=True)
class IpInfoResult:
    """GET_IP_INFO as the host receives it (fields empty unless the status is S_OK)."""

    status: int
    adapter_id: str = ""
    addr_family: int = 0
    dhcp_enabled: int = 0
    ip_addr: str = ""
    sub_net: str = ""
    gate_way: str = ""
    dns_addr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.S_OK

    @property
    def status_name(self) -> str:
        return HostResult(self.status).status_name


def ip_info_as_host_sees(raw: bytes) -> IpInfoResult:
    """A GET_IP_INFO reply after the kernel's conversions (process_ob_ipinfo's limits)."""
    reply = kernelside.decode_ip_info_reply(raw)
    if reply.status != Status.S_OK:
        return IpInfoResult(reply.status)
    try:
        adapter, ip, sub, gateway, dns = (
            kernelconv.guest_to_host(field, limit) for field, limit in (
                (reply.adapter_id, _IP_ADAPTER_MAX), (reply.ip_addr, _IP_ADDR_MAX),
                (reply.sub_net, _IP_ADDR_MAX), (reply.gate_way, _IP_GATEWAY_MAX),
                (reply.dns_addr, _IP_ADDR_MAX))
        )
    except kernelconv.ConversionError:
        return IpInfoResult(Status.E_FAIL)
    return IpInfoResult(Status.S_OK, adapter, reply.addr_family, reply.dhcp_enabled,
                        ip, sub, gateway, dns)


def _ip_text(text: str, limit: int) -> str:
    return kernelconv.host_to_guest(text, limit).decode("utf-8")


class _State(enum.IntEnum):
    """`enum hvutil_device_state`; the kernel compares with < and >, so order matters."""

    DEVICE_INIT = 0
    READY = 1
    HOSTMSG_RECEIVED = 2
    USERSPACE_REQ = 3
    USERSPACE_RECV = 4


class _HostRequest:
    """One host request: in the ring, then the transaction, then answered exactly once."""

    def __init__(self, message: bytes, token: trio.lowlevel.TrioToken) -> None:
        self.message = message
        self.status: int | None = None
        self.reply: bytes | None = None
        self.done = trio.Event()
        self._token = token

    def complete(self, status: int, reply: bytes | None) -> None:
        """Callable from any thread (under the kernel lock); the first answer wins."""
        if self.status is not None:
            return
        self.status = status & 0xFFFF_FFFF
        self.reply = reply
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.done.set)


@dataclass(eq=False)
class _Transaction:
    """`kvp_transaction` with its armed `kvp_timeout_work` (deadline on the trio clock)."""

    request: _HostRequest
    timer_pending: bool = True
    deadline: float | None = None


class SimulatedChannel(Channel):
    """What `SimulatedHost.open` returns: the device's read/write/poll/close semantics.

    `read` and `write` go straight into the simulated kernel (from whichever thread
    calls them), so they fail the way the device does: EINVAL for a short read (the
    message stays queued), EINVAL for a write the kernel refuses. The fd is the read
    end of a pipe holding one byte while a message is queued, so poll(2) and trio
    see exactly the device's POLLIN.
    """

    def __init__(self, host: SimulatedHost, fd: int) -> None:
        super().__init__(fd, host.name)
        self._host = host

    def read(self, size: int = MESSAGE_SIZE) -> bytes:
        """`hvt_op_read`, except that an empty queue raises BlockingIOError."""
        return self._host._daemon_read(self, size)

    def write(self, data: bytes) -> int:
        """`hvt_op_write` -> `kvp_on_msg`: any length; OSError(EINVAL) when refused."""
        return self._host._daemon_write(self, data)

    def read_ready_message(self) -> bytes | None:
        try:
            data = self.read(MESSAGE_SIZE)
        except BlockingIOError:
            return None
        if len(data) != MESSAGE_SIZE:  # only a test's malformed `transact` gets here
            raise OSError(errno.EIO, f"{self.name}: read returned {len(data)} bytes, expected"
                                     f" one {MESSAGE_SIZE}-byte message")
        return data

    def write_ready_message(self, message: bytes) -> bool:
        assert len(message) == MESSAGE_SIZE
        self.write(message)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            self._host._release(self)
            super().close()


class SimulatedHost:
    """The simulated kernel (transport + KVP state machine) and a host API on top of it.

    The kernel part mirrors `hv_utils_transport.c` and `hv_kvp.c` row by row: one
    opener (EBUSY otherwise); close resets the state (a pending transaction is
    answered E_FAIL) so the next opener registers again; a registration other than
    op 100/4 gets EINVAL and the fd stays usable; any write of >= 7432 bytes is one
    message, shorter ones get EINVAL; a reply with no request outstanding gets
    EINVAL; one transaction at a time with a `timeout` (HV_UTIL_TIMEOUT) after which
    the host gets E_FAIL, the fd stays open and the unread request stays queued (so
    the next host request fails at once, and a late reply pairs with whatever request
    is outstanding, or gets EINVAL); host requests wait, without a timeout, until a
    daemon registers. `hibernate` is `hv_kvp_pre_suspend`; `disconnect` a module
    reload (the open fd dies).

    State is guarded by a plain lock, as the kernel's is by `hvt->lock`, because the
    daemon's reads and writes come from its device thread.
    """

    name = "simulated hv_kvp"

    def __init__(
        self,
        *,
        version: str = "3.1",
        timeout: float = KERNEL_TIMEOUT,
        initial_pool3: tuple[tuple[str, str], ...] = SYNTHETIC_POOL3,
    ) -> None:
        self.version = version
        self.timeout = timeout
        self.initial_pool3 = initial_pool3
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._channel: SimulatedChannel | None = None
        self._wake_fd = -1
        self._outmsg: bytes | None = None
        self._on_read: Callable[[], None] | None = None
        self._state = _State.DEVICE_INIT
        self._dm_reg_value = 0
        self._txn: _Transaction | None = None
        self._ring: deque[_HostRequest] = deque()
        self._starting = False
        self._timer_wake = trio.Event()
        self._first_registration = trio.Event()
        self.registrations = 0
        self.transactions = 0
        self.timeouts = 0
        self.ebusy_opens = 0
        self.refused_writes = 0
        self.host_data_pushed = False

    # ------------------------------------------------------------ the guest side
    async def open(self) -> Channel:
        """What kvpfs gets instead of opening /dev/vmbus/hv_kvp (`hvt_op_open`)."""
        self._token = trio.lowlevel.current_trio_token()
        with self._lock:
            if self._channel is not None:
                self.ebusy_opens += 1
                raise OSError(errno.EBUSY, f"{self.name} is busy: it allows one opener")
            read_fd, self._wake_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._channel = SimulatedChannel(self, read_fd)
            return self._channel

    @property
    def state(self) -> dict[str, object]:
        """The kernel's view, for tests and `kvpfs host status`."""
        with self._lock:
            return {"state": self._state.name, "opened": self._channel is not None,
                    "message_queued": self._outmsg is not None, "ring": len(self._ring),
                    "transaction": self._txn is not None, "timeouts": self.timeouts,
                    "registrations": self.registrations, "ebusy_opens": self.ebusy_opens,
                    "refused_writes": self.refused_writes}

    def _daemon_read(self, channel: SimulatedChannel, size: int) -> bytes:
        with self._lock:
            if channel is not self._channel:
                raise OSError(errno.EBADF, f"{self.name}: the device went away")
            if self._outmsg is None:
                raise BlockingIOError(errno.EAGAIN, f"{self.name}: no message queued")
            if size < len(self._outmsg):
                raise OSError(errno.EINVAL, f"{self.name}: read of {size} bytes, a message"
                                            f" is {len(self._outmsg)}")
            message, callback = self._outmsg, self._on_read
            self._outmsg = self._on_read = None
            with contextlib.suppress(BlockingIOError):
                os.read(channel.fd, 1)
            if callback is not None:
                callback()
            return message

    def _daemon_write(self, channel: SimulatedChannel, data: bytes) -> int:
        with self._lock:
            if channel is not self._channel:
                raise OSError(errno.EBADF, f"{self.name}: the device went away")
            why = self._on_msg(bytes(data))
            if why:
                self.refused_writes += 1
        if why:
            raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: {self.name} {why}")
        return len(data)

    def _release(self, channel: SimulatedChannel) -> None:
        """`hvt_op_release` + `kvp_on_reset`."""
        with self._lock:
            if channel is not self._channel:
                return  # an fd of an earlier "module load" (see `disconnect`)
            self._channel = None
            self._close_wake()
            self._outmsg = self._on_read = None
            txn = self._txn
            if txn is not None and self._cancel_timer(txn):
                txn.request.complete(Status.E_FAIL, None)
            self._txn = None
            self._state = _State.DEVICE_INIT

    def _close_wake(self) -> None:
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _transport_send(self, message: bytes, on_read: Callable[[], None] | None) -> bool:
        """`hvutil_transport_send`: no reader, or a previous message unread, fails."""
        if self._channel is None or self._outmsg is not None:
            return False
        self._outmsg, self._on_read = message, on_read
        os.write(self._wake_fd, b"m")
        return True

    def _on_msg(self, buf: bytes) -> str | None:
        """`kvp_on_msg`: None if accepted, else why the write gets EINVAL."""
        if len(buf) < protocol.MESSAGE_SIZE:
            return f"takes messages of {protocol.MESSAGE_SIZE} bytes, not {len(buf)}"
        if self._state < _State.READY:
            return self._handle_handshake(buf)
        if self._state < _State.USERSPACE_REQ:
            return "had no request outstanding (timed out, or never sent)"
        self._state = _State.USERSPACE_RECV
        if self._dm_reg_value == protocol.LEGACY_REGISTER:
            error = Status.S_CONT if buf[_LEGACY_KEY_OFFSET] == 0 else Status.S_OK
        else:
            (error,) = struct.unpack_from("<I", buf, 0)
        txn = self._txn
        if txn is not None and self._cancel_timer(txn):
            txn.request.complete(error, buf[:protocol.MESSAGE_SIZE])
            self._poll_channel()
        return None

    def _handle_handshake(self, buf: bytes) -> str | None:
        op = buf[0]
        if op not in (Op.REGISTER1, protocol.LEGACY_REGISTER):
            log.warning("simulated kernel: incompatible daemon (op %d)", op)
            return f"refused registration op {op} (expects {int(Op.REGISTER1)})"
        self._dm_reg_value = op
        if not self._transport_send(kernelside.encode_register_reply(op, self.version),
                                    self._register_done):
            return "still holds an unread message"  # the kernel says EFAULT here
        return None

    def _register_done(self) -> None:
        """`kvp_register_done`: the daemon read the version; serve queued requests."""
        self.registrations += 1
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._first_registration.set)
        self._poll_channel()

    def _poll_channel(self) -> None:
        """`kvp_poll_wrapper`: the transaction is over; look at the ring again."""
        self._state = _State.READY
        self._txn = None
        self._start_next()

    def _start_next(self) -> None:
        """`hv_kvp_onchannelcallback`: nothing before registration, then one at a time."""
        if self._starting:
            return
        self._starting = True
        try:
            while self._state == _State.READY and self._ring:
                self._send_key(self._ring.popleft())
        finally:
            self._starting = False

    def _send_key(self, request: _HostRequest) -> None:
        self._state = _State.HOSTMSG_RECEIVED
        txn = _Transaction(request)
        # On the device thread there is no trio clock: the timer task sets the deadline.
        with contextlib.suppress(RuntimeError):
            txn.deadline = trio.current_time() + self.timeout
        self._txn = txn
        self._kick_timer()
        self._state = _State.USERSPACE_REQ
        if not self._transport_send(request.message, None):
            log.info("simulated kernel: cannot pass the request down (no reader, or the"
                     " previous one still unread); host gets E_FAIL")
            if self._cancel_timer(txn):
                request.complete(Status.E_FAIL, None)
                self._poll_channel()

    @staticmethod
    def _cancel_timer(txn: _Transaction) -> bool:
        """`cancel_delayed_work_sync`: True if the timeout had not fired yet."""
        pending, txn.timer_pending = txn.timer_pending, False
        return pending

    def _kick_timer(self) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake_timer)

    def _wake_timer(self) -> None:
        self._timer_wake.set()

    async def _timer(self) -> None:
        """`kvp_timeout_work`: E_FAIL to the host; the fd and any unread request stay."""
        while True:
            wake = self._timer_wake = trio.Event()
            deadline = math.inf
            with self._lock:
                txn = self._txn
                if txn is not None and txn.timer_pending:
                    now = trio.current_time()
                    if txn.deadline is None:
                        txn.deadline = now + self.timeout
                    if now >= txn.deadline:
                        txn.timer_pending = False
                        self.timeouts += 1
                        log.warning("simulated kernel: no reply within %g s, host gets"
                                    " E_FAIL", self.timeout)
                        txn.request.complete(Status.E_FAIL, None)
                        self._poll_channel()
                        continue
                    deadline = txn.deadline
            with trio.move_on_at(deadline):
                await wake.wait()

    def hibernate(self) -> None:
        """`hv_kvp_pre_suspend` and resume: no transport reset, state forced READY.

        The host's transaction in flight is lost with the closed VMBus channel (here:
        answered E_FAIL); an open fd stays usable, but a reply to a request read before
        now gets EINVAL. With no daemon connected, the next registration gets EINVAL
        until the device is closed and opened again.
        """
        with self._lock:
            txn = self._txn
            if txn is not None and self._cancel_timer(txn):
                txn.request.complete(Status.E_FAIL, None)
            self._txn = None
            while self._ring:
                self._ring.popleft().complete(Status.E_FAIL, None)
            self._state = _State.READY

    def disconnect(self) -> None:
        """A module reload: the open fd fails (EBADF, poll HUP), a new open starts afresh."""
        with self._lock:
            txn = self._txn
            if txn is not None and self._cancel_timer(txn):
                txn.request.complete(Status.E_FAIL, None)
            self._txn = None
            self._channel = None
            self._close_wake()  # poll on the old fd reports POLLHUP
            self._outmsg = self._on_read = None
            self._state = _State.DEVICE_INIT

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The kernel's timer; the host's pool-3 push after the first registration."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer)
            task_status.started()
            await self._first_registration.wait()
            await self._push_host_data()

    async def _push_host_data(self) -> None:
        """What a real host sends when the channel opens: its identity in pool 3."""
        for key, value in self.initial_pool3:
            result = await self.set(protocol.Pool.AUTO_EXTERNAL, key, value)
            if not result.ok:
                log.warning("simulated host: pushing %s failed: %s", key, result.status_name)
        self.host_data_pushed = True

    # ------------------------------------------------------------ the host side
    async def transact(self, request: bytes) -> bytes:
        """One kernel-format request into the ring; the guest's raw reply, or a status.

        The kernel passes down a fixed 7432-byte struct, so longer input is cut to it;
        shorter input is passed down as it is, for tests that feed the daemon a
        malformed message.
        """
        self._token = trio.lowlevel.current_trio_token()
        host_request = _HostRequest(request[:MESSAGE_SIZE], self._token)
        with self._lock:
            self._ring.append(host_request)
            self._start_next()
        try:
            await host_request.done.wait()
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._ring.remove(host_request)  # a cancelled caller withdraws its request
        status = host_request.status
        if status == Status.S_OK and host_request.reply is not None:
            self.transactions += 1
            return host_request.reply
        return protocol.encode_status(Status.E_FAIL if status is None else status)

    async def _simple(self, request: bytes) -> HostResult:
        reply = kernelside.decode_daemon_message(await self.transact(request))
        return HostResult(reply.status)

    async def set(self, pool: int, key: str, value: str) -> HostResult:
        guest_key = kernelconv.host_to_guest(key, kernelconv.HOST_KEY_MAX_BYTES)
        guest_value = kernelconv.host_to_guest(value, kernelconv.HOST_VALUE_MAX_BYTES)
        return await self._simple(kernelside.encode_set_request(pool, guest_key, guest_value))

    async def delete(self, pool: int, key: str) -> HostResult:
        guest_key = kernelconv.host_to_guest(key, kernelconv.HOST_KEY_MAX_BYTES)
        return await self._simple(kernelside.encode_delete_request(pool, guest_key))

    async def get(self, pool: int, key: str) -> HostResult:
        guest_key = kernelconv.host_to_guest(key, kernelconv.HOST_KEY_MAX_BYTES)
        raw = await self.transact(kernelside.encode_get_request(pool, guest_key))
        return self._with_key_value(raw, key_from_reply=False, key=key)

    async def enumerate(self, pool: int, index: int) -> HostResult:
        raw = await self.transact(kernelside.encode_enumerate_request(pool, index))
        return self._with_key_value(raw, key_from_reply=True)

    async def list(self, pool: int) -> list[tuple[str, str]]:
        """Every item the host would see for `pool`, enumerating until not S_OK."""
        items: list[tuple[str, str]] = []
        index = 0
        while True:
            result = await self.enumerate(pool, index)
            if not result.ok:
                return items
            items.append((result.key, result.value))
            index += 1

    async def ip_get(self, mac: str, addr_family: int = 0) -> IpInfoResult:
        """GET_IP_INFO for the adapter with this MAC, converted as the kernel does."""
        request = kernelside.encode_ip_info_request(
            Op.GET_IP_INFO, _ip_text(mac, _IP_ADAPTER_MAX), addr_family)
        return ip_info_as_host_sees(await self.transact(request))

    async def ip_set(self, guid: str, ip_addr: str = "", sub_net: str = "",
                     gate_way: str = "", dns_addr: str = "", *, dhcp: bool = False,
                     addr_family: int = 0) -> HostResult:
        """SET_IP_INFO for the adapter with this VMBus GUID (`;`-separated lists)."""
        request = kernelside.encode_ip_info_request(
            Op.SET_IP_INFO, _ip_text(guid, _IP_ADAPTER_MAX), addr_family, int(dhcp),
            _ip_text(ip_addr, _IP_ADDR_MAX), _ip_text(sub_net, _IP_ADDR_MAX),
            _ip_text(gate_way, _IP_GATEWAY_MAX), _ip_text(dns_addr, _IP_ADDR_MAX))
        return await self._simple(request)

    @staticmethod
    def _with_key_value(raw: bytes, *, key_from_reply: bool, key: str = "") -> HostResult:
        reply = kernelside.decode_daemon_message(raw)
        if reply.status != Status.S_OK:
            return HostResult(reply.status)
        raw_key, raw_value = kernelside.reply_key_value(raw)
        try:
            value = kernelconv.guest_to_host(raw_value, kernelconv.GUEST_VALUE_MAX_UNITS)
            if key_from_reply:
                key = kernelconv.guest_to_host(raw_key, kernelconv.GUEST_KEY_MAX_UNITS)
        except kernelconv.ConversionError:
            return HostResult(Status.E_FAIL)
        return HostResult(Status.S_OK, key, value)
