"""A simulated Hyper-V host and guest kernel, speaking the device's exact bytes.

`SimulatedHost` stands in for `/dev/vmbus/hv_kvp` and everything behind it:
kvpfs opens it like the device and gets one end of a SOCK_SEQPACKET socket
pair (one 7432-byte message per read or write); the other end plays the
kernel. It does what `drivers/hv/hv_kvp.c` does: expects a register message,
answers with version "3.1", then passes host requests down one at a time,
converting host strings the way the kernel does (UTF-16 to UTF-8 capped at
511/2047 bytes) and guest replies back (at most 254/1022 UTF-16 units,
invalid UTF-8 failing with E_FAIL), with the kernel's timeout. When kvpfs
does not answer in time, the simulated kernel answers E_FAIL and drops the
connection, as a late write to the real device fails with EINVAL.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from kvpfs.host.device import Channel
from kvpfs.wire import kernelconv, kernelside, protocol
from kvpfs.wire.protocol import Op, Status

log = logging.getLogger(__name__)

KERNEL_TIMEOUT = 30.0

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


class SimulatedHost:
    """The kernel side of a simulated device, plus a host API on top of it."""

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
        self._kernel: trio.socket.SocketType | None = None
        self._registered = trio.Event()
        self._transaction = trio.Lock()
        self._opened = trio.Event()
        self.registrations = 0
        self.transactions = 0
        self.host_data_pushed = False

    # ------------------------------------------------------------ the guest side
    async def open(self) -> Channel:
        """What kvpfs gets instead of opening /dev/vmbus/hv_kvp."""
        self._reset()
        guest, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._kernel = trio.socket.from_stdlib_socket(kernel)
        self._opened.set()
        return Channel(guest.detach(), self.name)

    def _reset(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        if self._registered.is_set():
            self._registered = trio.Event()

    def disconnect(self) -> None:
        """Break the device (as hibernation or a module reload would)."""
        self._reset()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Handshake with each opener; push the host's pool-3 data once."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            pushed = False
            while True:
                await self._opened.wait()
                self._opened = trio.Event()
                sock = self._kernel
                if sock is None:
                    continue
                try:
                    if not await self._handshake(sock):
                        continue
                except OSError as exc:
                    log.debug("simulated device closed during handshake: %s", exc)
                    continue
                if not pushed:
                    pushed = True
                    nursery.start_soon(self._push_host_data)

    async def _push_host_data(self) -> None:
        """What a real host sends when the channel opens: its identity in pool 3."""
        for key, value in self.initial_pool3:
            result = await self.set(protocol.Pool.AUTO_EXTERNAL, key, value)
            if not result.ok:
                log.warning("simulated host: pushing %s failed: %s", key, result.status_name)
        self.host_data_pushed = True

    async def _handshake(self, sock: trio.socket.SocketType) -> bool:
        message = await sock.recv(protocol.MESSAGE_SIZE + 1)
        if len(message) != protocol.MESSAGE_SIZE or message[0] not in (
            Op.REGISTER1, protocol.LEGACY_REGISTER
        ):
            log.warning("simulated kernel: incompatible registration (op %s, %d bytes)",
                        message[:1].hex(), len(message))
            self._reset()
            return False
        await sock.send(kernelside.encode_register_reply(message[0], self.version))
        self.registrations += 1
        self._registered.set()
        return True

    # ------------------------------------------------------------ the host side
    async def transact(self, request: bytes) -> bytes:
        """Send one kernel-format request down; the guest's raw reply, or a status."""
        async with self._transaction:
            with trio.move_on_after(self.timeout) as scope:
                await self._registered.wait()
                sock = self._kernel
                assert sock is not None
                try:
                    await sock.send(request)
                    reply = await sock.recv(protocol.MESSAGE_SIZE + 1)
                except OSError:
                    return protocol.encode_status(Status.E_FAIL)
                self.transactions += 1
                if len(reply) != protocol.MESSAGE_SIZE:
                    return protocol.encode_status(Status.E_FAIL)
                return reply
            if scope.cancelled_caught:
                log.warning("simulated kernel: no reply within %g s, host gets E_FAIL",
                            self.timeout)
                # The late reply would get EINVAL from the real device: the
                # daemon has to reopen and register again.
                self._reset()
            return protocol.encode_status(Status.E_FAIL)

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
