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
import errno
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kvpfs.host.device import Channel
from kvpfs.wire import kernelconv, kernelside, protocol
from kvpfs.wire.kernelmodel import DRIVER_VERSION, KERNEL_TIMEOUT, HostRequest, KvpKernel
from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Status

log = logging.getLogger(__name__)

__all__ = ["KERNEL_TIMEOUT", "HostResult", "IpInfoResult", "SimulatedChannel",
           "SimulatedHost"]

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


class SimulatedChannel(Channel):
    """What `SimulatedHost.open` returns: the device's read/write/poll/close semantics.

    `read` and `write` go straight into the kernel model (from whichever thread
    calls them), so they fail the way the device does: EINVAL for a short read (the
    message stays queued), EINVAL for a write the kernel refuses, EBADF once the
    module is gone; a read blocks until a message is queued, whatever O_NONBLOCK
    says. The fd is the read end of a pipe holding one byte while a message is
    queued, so poll(2) and trio see exactly the device's POLLIN (and POLLHUP once
    the module is gone).
    """

    def __init__(self, host: SimulatedHost, kernel: KvpKernel, fd: int) -> None:
        super().__init__(fd, host.name)
        self._host = host
        self.kernel = kernel

    def read(self, size: int = MESSAGE_SIZE) -> bytes:
        """`hvt_op_read`: blocks while nothing is queued."""
        return self._host._daemon_read(self, size)

    def write(self, data: bytes) -> int:
        """`hvt_op_write` -> `kvp_on_msg`: any length; OSError(EINVAL) when refused."""
        return self._host._daemon_write(self, data)

    def read_ready_message(self) -> bytes | None:
        data = self.read(MESSAGE_SIZE)
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
    """The kernel model (`kvpfs.wire.kernelmodel`) behind a channel, and a host API on top.

    Every kernel behaviour lives in the model: one opener (EBUSY otherwise), close
    resets the state, the 30 s timer (`timeout`) armed when a request leaves the
    ring, late replies paired with whatever request is outstanding, EINVAL when none
    is, host requests waiting without a timeout until a daemon registers. This class
    adds the threads and clocks: calls from the daemon's device thread and from the
    trio thread are serialised by a lock, as the kernel's by ``hvt->lock``; the
    model's clock is trio's (thread-safe to read), and a trio task runs its timer.
    `hibernate` is `hv_kvp_pre_suspend`; `disconnect` a module reload.
    """

    name = "simulated hv_kvp"

    def __init__(
        self,
        *,
        version: str = DRIVER_VERSION,
        timeout: float = KERNEL_TIMEOUT,
        initial_pool3: tuple[tuple[str, str], ...] = SYNTHETIC_POOL3,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.version = version
        self.fake_clock = clock  # a test's clock: it then runs the timer with `tick`
        self.timeout = timeout
        self.initial_pool3 = initial_pool3
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        self._token: trio.lowlevel.TrioToken | None = None
        self._clock: trio.abc.Clock | None = None
        self._channel: SimulatedChannel | None = None
        self._wake_fd = -1
        self._wake_byte = False
        self._timer_wake = trio.Event()
        self._first_registration = trio.Event()
        self.refused_writes = 0
        self._blocked_readers = 0
        self.transactions = 0
        self.host_data_pushed = False
        self._earlier: dict[str, int] = {}  # counters of unloaded modules
        self.kernel = self._new_kernel()

    def _new_kernel(self) -> KvpKernel:
        return KvpKernel(self._now, timeout=self.timeout, version=self.version,
                         on_change=self._on_change)

    def _now(self) -> float:
        if self.fake_clock is not None:
            return self.fake_clock()
        if self._clock is None:
            self._clock = trio.lowlevel.current_clock()
        return self._clock.current_time()

    def _bind(self) -> None:
        """Learn the trio run (token, clock) from whichever trio task calls first."""
        self._token = trio.lowlevel.current_trio_token()
        self._clock = trio.lowlevel.current_clock()

    def _counter(self, name: str) -> int:
        return self._earlier.get(name, 0) + self.kernel.counters[name]

    @property
    def registrations(self) -> int:
        return self._counter("handshakes")

    @property
    def timeouts(self) -> int:
        return self._counter("timeouts")

    @property
    def ebusy_opens(self) -> int:
        return self._counter("ebusy_opens")

    # ------------------------------------------------------------ the guest side
    async def open(self) -> Channel:
        """What kvpfs gets instead of opening /dev/vmbus/hv_kvp (`hvt_op_open`)."""
        self._bind()
        with self._lock:
            self.kernel.open()
            read_fd, self._wake_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._wake_byte = False
            self._channel = SimulatedChannel(self, self.kernel, read_fd)
            return self._channel

    @property
    def state(self) -> dict[str, object]:
        """The kernel's view, for tests and `kvpfs host status`."""
        with self._lock:
            snap = self.kernel.snapshot()
            return {"state": snap["state"], "opened": self._channel is not None,
                    "message_queued": snap["message_queued"], "ring": snap["ring"],
                    "transaction": snap["transaction"], "timeouts": self.timeouts,
                    "registrations": self.registrations, "ebusy_opens": self.ebusy_opens,
                    "refused_writes": self.refused_writes,
                    "blocked_readers": self._blocked_readers}

    def _daemon_read(self, channel: SimulatedChannel, size: int) -> bytes:
        with self._lock:
            kernel = channel.kernel
            while kernel.read_blocks and channel is self._channel and kernel is self.kernel:
                self._blocked_readers += 1
                try:
                    self._readable.wait()
                finally:
                    self._blocked_readers -= 1
            return kernel.read(size)

    def _daemon_write(self, channel: SimulatedChannel, data: bytes) -> int:
        with self._lock:
            try:
                return channel.kernel.write(data)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.refused_writes += 1
                raise

    def _release(self, channel: SimulatedChannel) -> None:
        """`hvt_op_release` + `kvp_on_reset`."""
        with self._lock:
            if channel is not self._channel:
                return  # an fd of an earlier "module load" (see `disconnect`)
            self._channel = None
            self._close_wake()
            channel.kernel.release()
            self._readable.notify_all()

    def _close_wake(self) -> None:
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _on_change(self) -> None:
        """The model changed (called under the lock): mirror POLLIN, wake the timer."""
        queued = self.kernel.outmsg is not None and self._channel is not None
        if queued != self._wake_byte and self._wake_fd >= 0 and self._channel is not None:
            if queued:
                os.write(self._wake_fd, b"m")
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._channel.fd, 1)
            self._wake_byte = queued
        self._readable.notify_all()
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake_timer)

    def _wake_timer(self) -> None:
        self._timer_wake.set()
        if self.kernel.counters["handshakes"] and not self._first_registration.is_set():
            self._first_registration.set()

    def tick(self) -> None:
        """With a test's clock: run the kernel's timer for the time the test moved on."""
        with self._lock:
            self.kernel.run_timer()

    async def _timer(self) -> None:
        """Run the model's timer (`kvp_timeout_work`) when it is due on trio's clock."""
        if self.fake_clock is not None:
            return
        while True:
            wake = self._timer_wake = trio.Event()
            with self._lock:
                self.kernel.run_timer()
                deadline = self.kernel.timer_deadline
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await wake.wait()

    def hibernate(self) -> None:
        """`hv_kvp_pre_suspend` and resume: state forced READY, the queued message kept.

        The host's requests in flight are lost with the closed VMBus channel (here:
        answered E_FAIL); an open fd stays usable, but a reply to a request read before
        now gets EINVAL, or answers the host's next request. With no daemon connected,
        the next registration gets EINVAL until the device is closed and opened again.
        """
        with self._lock:
            self.kernel.hibernate()

    def disconnect(self) -> None:
        """A module reload: the open fd fails (EBADF, poll HUP), a new open starts afresh."""
        with self._lock:
            self.kernel.destroy()
            for name, value in self.kernel.counters.items():
                self._earlier[name] = self._earlier.get(name, 0) + value
            self._channel = None
            self._close_wake()  # poll on the old fd reports POLLHUP
            self._readable.notify_all()
            self.kernel = self._new_kernel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The kernel's timer; the host's pool-3 push after the first registration."""
        self._bind()
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
        self._bind()
        done = trio.Event()
        token = self._token
        assert token is not None

        def notify() -> None:  # under the lock, from any thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        host_request = HostRequest(request[:MESSAGE_SIZE], notify)
        with self._lock:
            self.kernel.submit(host_request)
        try:
            await done.wait()
        finally:
            with self._lock:
                if not host_request.answered:
                    self.kernel.withdraw(host_request)  # a cancelled caller withdraws it
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
